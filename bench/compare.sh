#!/usr/bin/env bash
# herd bench vs bench/baseline_transformers.py on the same config, alternating ROUNDS times each,
# then the ratios of the medians: herd/baseline tokens/s and peak memory.
#
#   bench/compare.sh [--model demo] [--batch 4] [--seq 128] [--steps 5] [--warmup 1] [--device cpu]
#   env: HERD (default target/release/herd, else target/debug/herd), PYTHON (default python3),
#        ROUNDS (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=("$@")
HERD=${HERD:-$( [ -x target/release/herd ] && echo target/release/herd || echo target/debug/herd )}
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
out=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
  "$HERD" bench --json "${ARGS[@]}" | tee -a "$out/herd.jsonl"
  # The demo preset's vocabulary is the demo tokenizer's: herd reports it, the baseline is told.
  vocab=$(tail -n 1 "$out/herd.jsonl" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["vocab_size"])')
  "$PYTHON" bench/baseline_transformers.py --demo-vocab "$vocab" "${ARGS[@]}" | tee -a "$out/hf.jsonl"
done
"$PYTHON" - "$out" <<'PY'
import json, statistics, sys
d = sys.argv[1]
load = lambda f: [json.loads(l) for l in open(f"{d}/{f}") if l.strip()]
h, b = load("herd.jsonl"), load("hf.jsonl")
med = lambda rows, k: statistics.median(r[k] for r in rows)
if any("error" in r for r in b):
    print(f"baseline not run: {b[0]['error']}; herd alone: {med(h, 'tokens_per_s'):,.1f} tokens/s, "
          f"{med(h, 'peak_memory_bytes'):,.0f} bytes peak memory")
    sys.exit(0)
print(f"model {h[0]['model']} ({h[0]['params']/1e6:.1f}M herd / {b[0]['params']/1e6:.1f}M transformers), "
      f"batch {h[0]['batch']} x seq {h[0]['seq']}, {len(h)} rounds each, device {h[0]['device']}")
for k, unit in [("tokens_per_s", "tokens/s"), ("peak_memory_bytes", "bytes peak memory")]:
    hv, bv = med(h, k), med(b, k)
    print(f"{unit:>20}: herd {hv:,.1f}  transformers {bv:,.1f}  herd/transformers {hv / bv:.3f}")
PY
