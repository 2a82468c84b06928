#!/usr/bin/env bash
# zero_memory.sh: what ZeRO-1 and ZeRO-2 save per CPU worker, measured. Two workers
# (`herd run`) train a 26M-parameter random LLaMA (hidden 512, 8 layers; written here as HF
# safetensors) on the demo data for 30 steps, f32 and bf16, zero_stage 0, 1 and 2,
# alternating, ROUNDS times (default 2).
# Prints each worker's median RSS over the run (sampled every 0.1 s: the steady state of the
# steps), its peak RSS (VmHWM: loading and the final save), and steps/s from trainer_state.json.
#   bench/zero_memory.sh            # uses target/debug/herd (HERD overrides)
#   JOBS="bf16-0 bf16-1 bf16-2" bench/zero_memory.sh   # some of the jobs only
set -euo pipefail
HERD=$(realpath "${HERD:-target/debug/herd}")
ROUNDS=${ROUNDS:-2}
# shellcheck source=two_workers.sh
source "$(dirname "$0")/two_workers.sh"
two_workers_setup "$HERD"
for prec in f32 bf16; do
  for z in 0 1 2; do
    cat >"$prec-$z.yaml" <<JOB
model_name_or_path: big
data_path: demo/data/train.json
output_dir: out-$prec-$z
per_device_train_batch_size: 4
learning_rate: 1.0e-4
logging_steps: 1
model_max_length: 64
max_steps: 30
save_strategy: "no"
bf16: $([[ $prec == bf16 ]] && echo true || echo false)
zero_stage: $z
JOB
  done
done
measure() { # job: run it on two workers, sampling the workers' memory
  rm -rf "out-$1"
  sample_workers "$HERD" run "$1.yaml" --workers 2 || exit 1
  python3 - "$1" <<'PY'
import collections, json, statistics, sys
job = sys.argv[1]
rss, peak = collections.defaultdict(list), {}
for line in open("samples.txt"):
    p, r, h = line.split()
    rss[p].append(int(r))
    peak[p] = int(h)
hist = json.load(open(f"out-{job}/trainer_state.json"))["log_history"]
sps = [e for e in hist if "train_steps_per_second" in e][0]["train_steps_per_second"]
workers = "; ".join(f"median {statistics.median(v) / 1024:.0f} MB peak {peak[p] / 1024:.0f} MB"
                    for p, v in sorted(rss.items()))
print(f"{job:8} {sps:.3f} steps/s  workers: {workers}")
PY
}
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  for job in ${JOBS:-f32-0 f32-1 f32-2 bf16-0 bf16-1 bf16-2}; do measure "$job"; done
done
