//! `herd bench`: training throughput of a model config on random tokens. Each step is what
//! `herd train` does per optimizer step (forward, backward, gradient sum / tokens, clipping,
//! AdamW); warmup steps are excluded from the timing. `bench/baseline_transformers.py` prints
//! the same JSON fields for transformers' LlamaForCausalLM, and `bench/compare.sh` compares them.
//!
//! FLOPs per token (PaLM, appendix B; Megatron's form without recompute):
//!     6·N + 12·L·H·Q·T
//! N = parameters that take part in a matmul (all but the input embedding table; lm_head counted
//! even when tied), L layers, H·Q = heads × head_dim, T = sequence length. The attention term
//! counts the full T×T score matrix, as PaLM does, although causal masking wastes half of it.
//! MFU = FLOPs per token × tokens/s ÷ peak; the peak is 989 TFLOP/s (H100/H200 dense bf16) on
//! cuda, and on the CPU only what --peak-tflops says (MFU is left out without it).

use anyhow::{bail, Context, Result};
use herd_kernels::device::DeviceSpec;
use herd_model::init::SplitMix64;
use herd_model::lora::LoraConfig;
use herd_model::{Llama, LlamaConfig};
use herd_worker::collective::SingleProcess;
use herd_worker::data::{Batch, IGNORE_INDEX};
use herd_worker::optim::AdamWConfig;
use herd_worker::trainer::engine::Engine;
use herd_worker::trainer::Placement;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// What the GPU's peak memory figure is (see `herd_kernels::device::peak_allocated`).
const GPU_PEAK_KIND: &str =
    "CUDA default mempool USED_MEM_HIGH (counterpart of torch.cuda.max_memory_allocated)";

/// H100/H200 SXM dense bf16 peak, TFLOP/s.
pub const H100_BF16_PEAK_TFLOPS: f64 = 989.0;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A preset (demo, llama-110m, tinyllama-1.1b) or a config.json (or a directory holding one).
    #[arg(long, default_value = "demo")]
    model: String,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// cpu, or cuda:N (needs a build with the CUDA backend). On cuda the steps run as a GPU rank
    /// does: bf16 compute, f32 master weights, fused kernels and fused AdamW on the device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On the CPU too, compute in bf16 with f32 master weights through the fused ops' host
    /// code (what `bf16: true` does to a CPU rank; slower than f32 there).
    #[arg(long)]
    bf16: bool,
    /// Peak TFLOP/s for MFU (default: 989 on cuda, none on the CPU).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Recompute decoder-layer activations in backward (the job key of the same name).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train LoRA adapters of this rank (alpha = 2·r, as Alpaca-LoRA's 8/16) instead of every
    /// weight; the base is frozen. FLOPs/token are then 4·N + attention (no weight gradients).
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA dropout (with --lora-r).
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// Modules that get adapters (with --lora-r), comma-separated.
    #[arg(long, default_value = "q_proj,v_proj")]
    lora_targets: String,
}

/// The config of a preset name, or of a config.json path.
pub fn model_config(model: &str) -> Result<LlamaConfig> {
    let dims = |vocab: usize, hidden, inter, layers, heads, kv_heads, tied| {
        json!({
            "model_type": "llama", "hidden_act": "silu", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "initializer_range": 0.02, "tie_word_embeddings": tied,
        })
    };
    let preset = match model {
        "demo" => {
            let vocab = herd_worker::demo::demo_tokenizer()?.len();
            return Ok(herd_worker::demo::demo_config(vocab)?);
        }
        "llama-110m" => dims(32000, 768, 2048, 12, 12, 12, true),
        "tinyllama-1.1b" => dims(32000, 2048, 5632, 22, 32, 4, false),
        path => {
            let p = Path::new(path);
            let file = if p.is_dir() {
                p.join("config.json")
            } else {
                p.into()
            };
            if !file.is_file() {
                bail!("--model {path}: not a preset (demo, llama-110m, tinyllama-1.1b) nor a config.json");
            }
            return Ok(LlamaConfig::from_file(&file)?);
        }
    };
    Ok(serde_json::from_value(preset)?)
}

/// Parameters that take part in a matmul: all but the input embedding (lm_head counted when tied).
pub fn matmul_parameters(cfg: &LlamaConfig, all: usize) -> usize {
    if cfg.tie_word_embeddings {
        all
    } else {
        all - cfg.vocab_size * cfg.hidden_size
    }
}

/// 6·N + 12·L·H·Q·T training FLOPs per token (PaLM); with a frozen base (LoRA) 4·N + 12·L·H·Q·T:
/// forward and the input gradient, no weight gradient (the adapters' few FLOPs not counted).
pub fn flops_per_token(cfg: &LlamaConfig, matmul_params: usize, seq: usize, frozen: bool) -> f64 {
    let attention = 12.0
        * cfg.num_hidden_layers as f64
        * (cfg.num_attention_heads * cfg.head_dim()) as f64
        * seq as f64;
    let per_weight = if frozen { 4.0 } else { 6.0 };
    per_weight * matmul_params as f64 + attention
}

/// Peak resident set size of this process in bytes (Linux: ru_maxrss is in KiB).
fn peak_rss_bytes() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we hand it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0;
    }
    usage.ru_maxrss as u64 * 1024
}

/// A [batch, seq] row-major batch of random tokens, every position a label.
fn random_batch(rng: &mut SplitMix64, vocab: usize, batch: usize, seq: usize) -> Batch {
    let input_ids: Vec<u32> = (0..batch * seq)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % seq == 0 { IGNORE_INDEX } else { t as i64 })
        .collect();
    Batch {
        attention_mask: vec![1; input_ids.len()],
        input_ids,
        labels,
        batch,
        seq_len: seq,
        layout: None,
    }
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let spec = DeviceSpec::parse(&a.device)?;
    if a.batch == 0 || a.seq < 2 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1 and --seq at least 2");
    }
    if let Some(p) = a.peak_tflops.filter(|p| !(p.is_finite() && *p > 0.0)) {
        bail!("--peak-tflops must be a number > 0 (the device's dense peak), got {p}");
    }
    if !(0.0..1.0).contains(&a.lora_dropout) {
        bail!("--lora-dropout must be in [0, 1), got {}", a.lora_dropout);
    }
    let placement = Placement::new(&herd_kernels::device::open(spec)?, a.bf16);
    let device = &placement.device;
    let mixed = placement.mixed.is_some();
    let cfg = model_config(&a.model)?;
    let mut model = Llama::random(cfg.clone(), a.seed).context("building the model")?;
    let params = model.num_parameters();
    if let Some(r) = a.lora_r {
        let targets = a.lora_targets.split(',').map(|s| s.trim().to_string());
        let lora = LoraConfig::new(r, 2.0 * r as f64, a.lora_dropout, targets.collect());
        lora.validate().context("--lora-r / --lora-targets")?;
        model.enable_lora(lora, a.seed)?;
    }
    let trainable: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let adam = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut engine =
        Engine::new(model, adam, 1.0).with_gradient_checkpointing(a.gradient_checkpointing);
    // Placed as a training rank places itself.
    let _fused_on_cpu = placement.fused_on_cpu();
    if let Some(dtype) = placement.mixed {
        engine.place(device, dtype)?;
    }
    let mut rng = SplitMix64::new(a.seed ^ 0x5EED);
    let mut timed = 0.0;
    let mut loss = 0.0;
    for step in 0..a.warmup + a.steps {
        let batch = random_batch(&mut rng, cfg.vocab_size, a.batch, a.seq);
        let t0 = Instant::now();
        engine.zero_grad()?;
        engine.accumulate(&batch)?;
        loss = engine.apply(&mut SingleProcess, 1e-4)?.loss;
        device.synchronize()?; // the step's queued GPU work counts in its time
        if step >= a.warmup {
            timed += t0.elapsed().as_secs_f64();
        }
    }
    let tokens = (a.batch * a.seq * a.steps) as f64;
    let tokens_per_s = tokens / timed.max(1e-9);
    let frozen = a.lora_r.is_some();
    let flops = flops_per_token(&cfg, matmul_parameters(&cfg, params), a.seq, frozen);
    let tflops = flops * tokens_per_s / 1e12;
    let peak = a
        .peak_tflops
        .or(spec.is_cuda().then_some(H100_BF16_PEAK_TFLOPS));
    let mfu = peak.map(|p| tflops / p);
    let (peak_memory, peak_memory_kind) = match herd_kernels::device::peak_allocated(device) {
        Some(b) => (b, GPU_PEAK_KIND),
        None if spec.is_cuda() => (0, "unknown: the device has no memory pool to ask"),
        None => (peak_rss_bytes(), "process peak RSS (getrusage)"),
    };
    let out = json!({
        "tool": "herd",
        "model": a.model,
        "params": params,
        "trainable_params": trainable,
        "lora_r": a.lora_r,
        "vocab_size": cfg.vocab_size,
        "device": spec.to_string(),
        "dtype": if mixed { "bf16 (f32 master weights)" } else { "f32" },
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "warmup": a.warmup,
        "gradient_checkpointing": a.gradient_checkpointing,
        "step_time_s": timed / a.steps as f64,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "achieved_tflops": tflops,
        "peak_tflops": peak,
        "mfu": mfu,
        "peak_memory_bytes": peak_memory,
        "peak_memory_kind": peak_memory_kind,
        "loss": loss,
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "model {} ({:.1}M parameters), {} rows x {} tokens, {} steps after {} warmup on {} in {}{}",
        a.model,
        params as f64 / 1e6,
        a.batch,
        a.seq,
        a.steps,
        a.warmup,
        spec,
        if mixed {
            "bf16 (f32 master weights)"
        } else {
            "f32"
        },
        if a.gradient_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        }
    );
    if let Some(r) = a.lora_r {
        println!(
            "LoRA r {r} on {} (dropout {}): {:.2}M trainable parameters, base frozen",
            a.lora_targets,
            a.lora_dropout,
            trainable as f64 / 1e6
        );
    }
    println!("step time      {:.3} s", timed / a.steps as f64);
    println!("tokens/s       {tokens_per_s:.1}");
    let formula = if frozen {
        "4·N + 12·L·H·Q·T: PaLM's without weight gradients"
    } else {
        "6·N + 12·L·H·Q·T, PaLM"
    };
    println!("FLOPs/token    {flops:.4e}  ({formula}; N = matmul parameters)");
    println!("achieved       {tflops:.4} TFLOP/s");
    match (mfu, peak) {
        (Some(m), Some(p)) => println!("MFU            {:.2}% of {p} TFLOP/s", m * 100.0),
        _ => {
            println!("MFU            not meaningful on the CPU (pass --peak-tflops to compute it)")
        }
    }
    println!(
        "peak memory    {:.1} MiB ({peak_memory_kind})",
        peak_memory as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tinyllama_preset_has_its_published_size() {
        let cfg = model_config("tinyllama-1.1b").unwrap();
        let n: usize = herd_model::llama::parameter_shapes(&cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(n, 1_100_048_384);
        // 6·N with N = n − embedding, plus 12·22·2048·T.
        let f = flops_per_token(&cfg, matmul_parameters(&cfg, n), 512, false);
        let expected = 6.0 * (n - 32000 * 2048) as f64 + 12.0 * 22.0 * 2048.0 * 512.0;
        assert_eq!(f, expected);
    }
}
