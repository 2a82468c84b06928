"""What transformers' LlamaDecoderLayer keeps for its backward, per layer, in bf16: the bytes of
the distinct storages autograd saves during the forward (torch.autograd.graph.saved_tensors_hooks),
for 1 and 2 layers, the difference being one layer; parameters are left out. Reported in units
of b·t·hidden bf16 values, the unit of bench/NOTES.md and of herd's own measurement
(model/tests/activation_memory.rs), so the two compare per layer.

    python bench/saved_activations.py [--batch 8 --seq 64 --hidden 256 --heads 8 --kv-heads 1
                                        --intermediate 704] [--attn sdpa|eager] [--json]

Runs on the CPU. What differs on a GPU: SDPA picks its flash or memory-efficient kernel there
(saving q, k, v, the output and the log-sum-exp, as the CPU flash kernel does); the rest of the
layer saves the same tensors on either device.
"""

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def saved_bytes(args, layers):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
        attn_implementation=args.attn,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 64, (args.batch, args.seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # The layers only: the head and loss are the same for any layer count.
        out = model.model(input_ids=ids).last_hidden_state
    del out
    return sum(seen.values())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    one, two = saved_bytes(args, 1), saved_bytes(args, 2)
    unit = args.batch * args.seq * args.hidden * 2
    result = {
        "tool": "transformers",
        "attn": args.attn,
        "saved_bytes_1_layer": one,
        "saved_bytes_2_layers": two,
        "per_layer_units": (two - one) / unit,
        "unit_bytes": unit,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"transformers ({args.attn}): one LlamaDecoderLayer saves {result['per_layer_units']:.3f} "
            f"units of b·t·hidden bf16 ({unit} B) for its backward"
        )


if __name__ == "__main__":
    main()
