#!/usr/bin/env bash
# overlap.sh: the gradient sum overlapped with the backward (`ddp_bucket_cap_mb`), measured on
# two CPU workers (`herd run --workers 2`, the TCP ring on loopback). The same random LLaMA as
# zero_memory.sh (26M parameters, hidden 512, 8 layers) trains on the demo data in f32,
# alternating, ROUNDS times (default 2):
#   base   the BASE binary (herd before overlap), if BASE is set: one sum after the backward
#   one    ddp_bucket_cap_mb: 100000, one bucket: the sum starts when the backward ends
#   25     the default (DDP's): buckets of at least 25 MiB, last layer first
#   4      4 MiB buckets
# Prints steps/s (trainer_state.json's train_steps_per_second), each worker's peak RSS and the
# median time a step waited for the gradient sum once its backward was done (the workers' debug
# log; the sum's exposed part, which overlap shrinks).
#   BASE=/tmp/herd-base bench/overlap.sh          # HERD (default target/debug/herd) for the rest
#   BATCH=1 STEPS=40 JOBS="one 25" bench/overlap.sh
set -euo pipefail
HERD=$(realpath "${HERD:-target/debug/herd}")
BASE=${BASE:+$(realpath "$BASE")}
ROUNDS=${ROUNDS:-2}
# shellcheck source=two_workers.sh
source "$(dirname "$0")/two_workers.sh"
two_workers_setup "$HERD"
job() { # name, extra key
  cat >"$1.yaml" <<JOB
model_name_or_path: big
data_path: demo/data/train.json
output_dir: out-$1
per_device_train_batch_size: ${BATCH:-4}
learning_rate: 1.0e-4
logging_steps: 1
model_max_length: 64
max_steps: ${STEPS:-30}
save_strategy: "no"
$2
JOB
}
job base ""
job one "ddp_bucket_cap_mb: 100000"
job 25 ""
job 4 "ddp_bucket_cap_mb: 4"
measure() { # job
  local bin=$HERD
  if [[ $1 == base ]]; then
    [[ -n $BASE ]] || return 0
    bin=$BASE
  fi
  rm -rf "out-$1"
  RUST_LOG=info,herd_worker::trainer::engine=debug \
    sample_workers "$bin" run "$1.yaml" --workers 2 --keep-state || exit 1
  python3 - "$1" <<'PY'
import glob, json, re, shutil, statistics, sys
job = sys.argv[1]
peak = {}
for line in open("samples.txt"):
    p, _, h = line.split()
    peak[p] = int(h)
hist = json.load(open(f"out-{job}/trainer_state.json"))["log_history"]
end = [e for e in hist if "train_steps_per_second" in e][0]
losses = [e["loss"] for e in hist if "loss" in e]
# the time each step waited for the gradient sum after its backward (workers' debug lines;
# the BASE binary has none), median over the steps after the first, per worker
state = [l.split("kept in ")[1].strip() for l in open("run.log") if "kept in " in l][-1]
waits = []
for log in sorted(glob.glob(f"{state}/worker-*.log")):
    w = [float(m) for m in re.findall(r'waited_ms="?([0-9.]+)', open(log).read())][1:]
    waits.append(f"{statistics.median(w):.0f}" if w else "-")
shutil.rmtree(state, ignore_errors=True)
print(f"{job:5} {end['train_steps_per_second']:.3f} steps/s  final loss {losses[-1]:.6f}  "
      f"peak RSS {' '.join(f'{h / 1024:.0f}' for _, h in sorted(peak.items()))} MB  "
      f"waited {' '.join(waits)} ms/step")
PY
}
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  for j in ${JOBS:-base one 25 4}; do measure "$j"; done
done
