#!/usr/bin/env python3
"""The `herd bench` measurement with transformers' LlamaForCausalLM, for comparison.

Same presets (or a config.json), random init from the config dims, random tokens, every position
a label; each step is forward + backward + clip_grad_norm_(1.0) + AdamW. bf16 weights/compute with
torch.optim.AdamW(fused=True) on cuda, f32 and plain AdamW on the CPU. Prints one JSON line with
the fields of `herd bench --json` (FLOPs/token: 6·N + 12·L·H·Q·T, N = matmul parameters).
With --lora-r, PEFT's LoRA (alpha = 2·r, dropout, target modules as `herd bench`) on the frozen
base, FLOPs/token 4·N + 12·L·H·Q·T; without PEFT installed it prints {"error": ...} instead.

    python bench/baseline_transformers.py --model demo --batch 4 --seq 128 --steps 5 --device cpu
"""
import argparse
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    # demo: worker/src/demo.rs demo_config (vocab = demo tokenizer size; herd prints it as params)
    "demo": dict(vocab_size=None, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=256),
    "llama-110m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       tie_word_embeddings=True, max_position_embeddings=2048),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           tie_word_embeddings=False, max_position_embeddings=2048),
}


def config_for(name, demo_vocab):
    if name in PRESETS:
        dims = dict(PRESETS[name])
        if dims["vocab_size"] is None:
            dims["vocab_size"] = demo_vocab
        return LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.02,
                           hidden_act="silu", **dims)
    path = name if name.endswith(".json") else f"{name}/config.json"
    return LlamaConfig.from_json_file(path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--demo-vocab", type=int, default=0,
                   help="vocab of the demo preset (herd bench --json reports it via params)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    a = p.parse_args()

    torch.manual_seed(a.seed)
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = config_for(a.model, a.demo_vocab)
    model = LlamaForCausalLM(cfg).to(device=a.device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    if a.lora_r is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            print(json.dumps({"tool": "transformers", "model": a.model, "lora_r": a.lora_r,
                              "error": f"--lora-r needs peft ({e})"}))
            return
        model = get_peft_model(model, LoraConfig(
            r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=a.lora_dropout,
            target_modules=a.lora_targets.split(","), task_type="CAUSAL_LM"))
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if a.lora_r is not None:
            model.enable_input_require_grads()  # a frozen embedding otherwise cuts the graph
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=cuda)
    matmul = params if cfg.tie_word_embeddings else params - cfg.vocab_size * cfg.hidden_size
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_weight = 4.0 if a.lora_r is not None else 6.0
    flops = per_weight * matmul + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * a.seq

    def sync():
        if cuda:
            torch.cuda.synchronize()

    timed, loss = 0.0, 0.0
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=a.device)
        labels = ids.clone()
        labels[:, 0] = -100
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= a.warmup:
            timed += time.perf_counter() - t0
        loss = out.loss.item()

    tokens_per_s = a.batch * a.seq * a.steps / max(timed, 1e-9)
    tflops = flops * tokens_per_s / 1e12
    peak = a.peak_tflops if a.peak_tflops is not None else (989.0 if cuda else None)
    if cuda:
        peak_mem, kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak_mem, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (getrusage)"
    print(json.dumps({
        "tool": "transformers", "model": a.model, "params": params, "vocab_size": cfg.vocab_size, "device": a.device,
        "trainable_params": sum(p.numel() for p in trainable), "lora_r": a.lora_r,
        "dtype": str(dtype).replace("torch.", ""), "batch": a.batch, "seq": a.seq,
        "steps": a.steps, "warmup": a.warmup, "gradient_checkpointing": a.gradient_checkpointing,
        "step_time_s": timed / a.steps, "tokens_per_s": tokens_per_s, "flops_per_token": flops,
        "achieved_tflops": tflops, "peak_tflops": peak,
        "mfu": tflops / peak if peak else None, "peak_memory_bytes": peak_mem,
        "peak_memory_kind": kind, "loss": loss, "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
