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
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$HERD" demo init --dir demo >/dev/null 2>&1
cp -r demo/model big
python3 - <<'PY'
import array, json, random, struct
cfg = json.load(open("big/config.json"))
h, i, L, v = 512, 1376, 8, cfg["vocab_size"]
cfg.update(hidden_size=h, intermediate_size=i, num_hidden_layers=L,
           num_attention_heads=8, num_key_value_heads=8)
json.dump(cfg, open("big/config.json", "w"), indent=2)
shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
for l in range(L):
    p = f"model.layers.{l}."
    for n in ["q_proj", "k_proj", "v_proj", "o_proj"]:
        shapes[p + f"self_attn.{n}.weight"] = [h, h]
    shapes.update({p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                   p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
                   p + "post_attention_layernorm.weight": [h]})
rng = random.Random(0)
pool = [rng.gauss(0, 0.02) for _ in range(4096)]
header, blobs, off = {}, [], 0
for name, s in sorted(shapes.items()):
    n = 1
    for d in s:
        n *= d
    a = array.array("f", [1.0] * n if name.endswith("norm.weight")
                    else (pool[(k * 2654435761) % 4096] for k in range(n)))
    b = a.tobytes()
    header[name] = {"dtype": "F32", "shape": s, "data_offsets": [off, off + len(b)]}
    off += len(b)
    blobs.append(b)
hj = json.dumps(header).encode()
hj += b" " * ((8 - len(hj) % 8) % 8)
with open("big/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(hj)) + hj)
    for b in blobs:
        f.write(b)
print(f"model: {off // 4} parameters")
PY
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
  "$HERD" run "$1.yaml" --workers 2 >run.log 2>&1 &
  local pid=$! p
  : >samples.txt
  while kill -0 $pid 2>/dev/null; do
    for p in $(pgrep -f "herd worker" || true); do
      awk -v p="$p" '/VmRSS/{r=$2} /VmHWM/{h=$2} END{if (r) print p, r, h}' "/proc/$p/status" \
        2>/dev/null >>samples.txt || true
    done
    sleep 0.1
  done
  wait $pid || { cat run.log; exit 1; }
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
