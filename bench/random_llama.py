"""Turns a demo model directory into a bigger random LLaMA of the same vocabulary, written as
HF safetensors (f32, weights from a fixed Gaussian pool, norms 1), for the CPU benches.

    python3 bench/random_llama.py DIR [--hidden 512] [--intermediate 1376] [--layers 8] [--heads 8]
"""
import argparse, array, json, random, struct

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--hidden", type=int, default=512)
ap.add_argument("--intermediate", type=int, default=1376)
ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--heads", type=int, default=8)
a = ap.parse_args()
cfg = json.load(open(f"{a.dir}/config.json"))
h, i, L, v = a.hidden, a.intermediate, a.layers, cfg["vocab_size"]
cfg.update(hidden_size=h, intermediate_size=i, num_hidden_layers=L,
           num_attention_heads=a.heads, num_key_value_heads=a.heads)
json.dump(cfg, open(f"{a.dir}/config.json", "w"), indent=2)
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
    x = array.array("f", [1.0] * n if name.endswith("norm.weight")
                    else (pool[(k * 2654435761) % 4096] for k in range(n)))
    b = x.tobytes()
    header[name] = {"dtype": "F32", "shape": s, "data_offsets": [off, off + len(b)]}
    off += len(b)
    blobs.append(b)
hj = json.dumps(header).encode()
hj += b" " * ((8 - len(hj) % 8) % 8)
with open(f"{a.dir}/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(hj)) + hj)
    for b in blobs:
        f.write(b)
print(f"model: {off // 4} parameters")
