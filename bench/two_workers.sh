# two_workers.sh, sourced by the two-worker CPU benches (zero_memory.sh, overlap.sh).
#
# `two_workers_setup HERD`: a fresh working directory (removed on exit) holding the demo
# (`demo/`) and `big/`, the demo model turned into bench/random_llama.py's 26M-parameter LLaMA.
two_workers_setup() {
  local bench
  bench=$(realpath "$(dirname "${BASH_SOURCE[0]}")")
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  cd "$WORK"
  "$1" demo init --dir demo >/dev/null 2>&1
  cp -r demo/model big
  python3 "$bench/random_llama.py" big
}

# `sample_workers BIN ARGS…` runs
# `BIN ARGS…` in the background (output to run.log) and, until it exits, writes
# "pid VmRSS VmHWM" (KiB) of each `BIN worker` process to samples.txt every 0.1 s; it returns
# the command's status, printing run.log if it failed.
sample_workers() {
  local bin=$1 pid p
  "$@" >run.log 2>&1 &
  pid=$!
  : >samples.txt
  while kill -0 $pid 2>/dev/null; do
    for p in $(pgrep -f "$bin worker" || true); do
      awk -v p="$p" '/VmRSS/{r=$2} /VmHWM/{h=$2} END{if (r) print p, r, h}' "/proc/$p/status" \
        2>/dev/null >>samples.txt || true
    done
    sleep 0.1
  done
  wait $pid || { cat run.log; return 1; }
}
