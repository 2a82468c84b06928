#!/usr/bin/env bash
# gpu-test.sh: build herd's CUDA tests here, run them on a GPU machine in one go.
#
#   scripts/gpu-test.sh build   # here (no GPU needed): cuda build, stripped binaries -> .gpu/
#   scripts/gpu-test.sh run     # on the GPU machine, from the repository root (no Rust there):
#                               # the kernel tests, the bf16-vs-f32 check, the one-GPU CLI tests
#   scripts/gpu-test.sh nccl    # on the GPU machine: torch's own two-process NCCL check, then
#                               # herd's two-worker (NCCL_HOSTID) tests, a hung and a killed
#                               # worker's peer aborting its NCCL communicator among them
#   scripts/gpu-test.sh bench   # on the GPU machine: herd bench vs transformers (issue #6), the
#                               # TinyLlama-1.1B shape at seq 512; BATCH, STEPS, ROUNDS override
#   scripts/gpu-test.sh all     # on the GPU machine: run, nccl, then bench (one round), all under
#                               # one device call's 600 s limit (DEVICE_BUDGET_S, default 540)
#
# `build` needs nvcc and the link stubs: it evaluates the cuda-build-env script
# (HERD_CUDA_ENV_SCRIPT, default ../shared/tools/cuda-build-env.sh). It uses its own target dir
# (target-cuda) so the CPU build stays warm. `.gpu/` is git-ignored; with the workplace's device
# tool, carry it: run(command="scripts/gpu-test.sh run", carry=[".gpu"]) (64 MiB at most).
# `run` finds the CUDA 13 runtime and NCCL in the torch venv's NVIDIA wheels (HERD_TORCH_PY,
# default /opt/torch/.venv/bin/python3) or uses LD_LIBRARY_PATH as given, then runs every
# ignored GPU test, one test thread (one GPU), and the binary's smoke check; it writes logs to
# $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu

build() {
  local env_script=${HERD_CUDA_ENV_SCRIPT:-../shared/tools/cuda-build-env.sh}
  eval "$(bash "$env_script")"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
  rm -rf "$DIR" && mkdir -p "$DIR"
  local t0=$SECONDS
  cargo build --locked --features cuda --bin herd
  # test binaries: the kernels' unit tests, the worker's GPU parity test, the CLI's GPU tests
  cargo test --locked --features cuda --no-run --message-format=json \
    -p herd-kernels --lib -p herd-worker --test mixed_precision -p herd --test cuda_cli \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' >"$DIR/tests.txt"
  local bin=$DIR/bin
  mkdir -p "$bin"
  while read -r name exe; do
    [[ $name == herd_worker ]] && continue # the worker's lib tests: CPU-only, CI runs them
    cp "$exe" "$bin/$name" && strip "$bin/$name"
  done <"$DIR/tests.txt"
  cp "$CARGO_TARGET_DIR/debug/herd" "$bin/herd" && strip "$bin/herd"
  # Stripped, the binaries are ~220 MB (candle's PTX is text inside each); xz brings them to
  # ~23 MB, under the device tool's 64 MiB carry limit.
  tar -C "$DIR" -cf - bin | xz -T0 -6 >"$DIR/bin.tar.xz"
  rm -rf "$bin"
  # Test binaries carry absolute paths baked in at build time (CARGO_MANIFEST_DIR for the
  # fixtures, CARGO_BIN_EXE_herd); `run` recreates them on the GPU machine from these two lines.
  echo "$PWD" >"$DIR/root.txt"
  echo "$CARGO_TARGET_DIR/debug/herd" >"$DIR/herd-path.txt"
  echo "built in $((SECONDS - t0)) s:"; du -sh "$DIR"; ls -la "$DIR"
}

# The binaries, unpacked from the bundle `build` made (once).
unpack() {
  [[ -d $DIR/bin ]] || xz -dc "$DIR/bin.tar.xz" | tar -C "$DIR" -xf -
}

TORCH_PY=${HERD_TORCH_PY:-/opt/torch/.venv/bin/python3}

# The CUDA 13 runtime and NCCL from the torch venv's NVIDIA wheels, unless told otherwise.
gpu_libs() {
  if [[ -z "${HERD_NO_TORCH_LIBS:-}" ]]; then
    local sp
    sp=$("$TORCH_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    export LD_LIBRARY_PATH=$sp/nvidia/cu13/lib:$sp/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
}

# herd bench and the transformers baseline alternating on one GPU, then the ratios: plain, with
# activation recompute, and LoRA r 8 on q_proj,v_proj (Alpaca-LoRA's; needs PEFT beside the
# baseline's torch, else herd's figures alone).
bench() {
  gpu_libs
  unpack
  local out=${OUT:-/tmp}
  nvidia-smi -L || true
  local args=(--model tinyllama-1.1b --batch "${BATCH:-8}" --seq 512 --steps "${STEPS:-10}"
    --warmup 3 --device cuda:0)
  for extra in "" --gradient-checkpointing "--lora-r 8"; do
    echo "=== bench ${args[*]} $extra"
    HERD=$DIR/bin/herd PYTHON=$TORCH_PY ROUNDS=${ROUNDS:-2} bench/compare.sh "${args[@]}" $extra \
      2>&1 | tee -a "$out/bench.log"
  done
}

# The test binaries' baked-in paths recreated here (see `build`).
prepare() {
  gpu_libs
  unpack
  local root herd_path
  root=$(cat "$DIR/root.txt")
  herd_path=$(cat "$DIR/herd-path.txt")
  if [[ ! -e $root/Cargo.toml ]]; then
    mkdir -p "$(dirname "$root")" && ln -sfn "$PWD" "$root"
  fi
  if [[ ! -x $herd_path ]]; then
    mkdir -p "$(dirname "$herd_path")" && cp "$DIR/bin/herd" "$herd_path"
  fi
}

# One test binary with the GPU tests included, from its crate's dir; extra args are libtest's
# (filters, --skip); the log goes to $OUT/<name>.log.
gpu_tests() {
  local t=$1 log=$2
  shift 2
  [[ -x $DIR/bin/$t ]] || { echo "missing $DIR/bin/$t"; return 1; }
  local crate=.
  case $t in herd_kernels) crate=kernels ;; mixed_precision) crate=worker ;; esac
  echo "=== $t (--include-ignored $*)"
  (cd "$crate" && "$OLDPWD/$DIR/bin/$t" --include-ignored --test-threads=1 "$@") \
    2>&1 | tee "${OUT:-/tmp}/$log.log"
}

# The kernels, the bf16-vs-f32 check and the one-GPU CLI tests (the NCCL ones are `nccl`'s).
run() {
  prepare
  nvidia-smi -L || true
  local status=0
  gpu_tests herd_kernels herd_kernels || status=1
  gpu_tests mixed_precision mixed_precision || status=1
  gpu_tests cuda_cli cuda_cli --skip two_gpu --skip zero_ || status=1
  exit $status
}

# Two workers on one GPU over NCCL: first torch's own two-process NCCL all-reduce with the
# same environment (so a refusal of the device's NCCL is told apart from a herd bug), then
# herd's two-worker tests.
nccl() {
  prepare
  echo "=== torch.distributed NCCL, two processes on one GPU"
  timeout -k 5 90 "$TORCH_PY" scripts/nccl_check.py 2>&1 | tee "${OUT:-/tmp}/nccl_check.log" ||
    echo "=== torch's NCCL check failed: the device's NCCL refuses this set-up (herd's tests follow)"
  gpu_tests cuda_cli cuda_cli_nccl two_gpu zero_
}

# Whatever a timed-out phase left running from .gpu/bin (test binaries, herd children) would
# hold GPU memory into the next phase.
reap() {
  pkill -f "$PWD/$DIR/bin/" 2>/dev/null || true
  pkill -f "^$DIR/bin/" 2>/dev/null || true
  # the workers and coordinators the CLI tests start run from the herd path baked into them
  [[ -f $DIR/herd-path.txt ]] && pkill -f "^$(cat "$DIR/herd-path.txt") " 2>/dev/null
  true
}

# The tests first (the kernels are proven before they are timed), then the benchmark in what is
# left of the call; every phase writes its log to $OUT as it goes, so a cut-off still reports.
all() {
  local budget=${DEVICE_BUDGET_S:-540} t0=$SECONDS
  timeout -k 5 "${RUN_BUDGET_S:-180}" "$0" run || echo "=== run: exit $? (logs in ${OUT:-/tmp})"
  reap
  timeout -k 5 "${NCCL_BUDGET_S:-210}" "$0" nccl || echo "=== nccl: exit $? (logs in ${OUT:-/tmp})"
  reap
  local left=$((budget - (SECONDS - t0)))
  if ((left < 60)); then
    echo "=== bench skipped: ${left} s left of ${budget}"
    exit 1
  fi
  ROUNDS=${ROUNDS:-1} timeout -k 5 "$left" "$0" bench || echo "=== bench: exit $?"
  reap
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  nccl) nccl ;;
  bench) bench ;;
  all) all ;;
  *) echo "usage: $0 build|run|nccl|bench|all"; exit 2 ;;
esac
