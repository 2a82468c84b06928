//! Decoding with the KV cache equals recomputing the full sequence; sampling is reproducible.

mod common;

use candle_core::{Device, Tensor};
use herd_model::generate::{argmax, generate, generate_batch, GenerateOptions};
use herd_model::Llama;

fn full_forward_last(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&input).unwrap();
    logits
        .narrow(1, ids.len() - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn greedy_with_cache_equals_full_recomputation() {
    for tied in [false, true] {
        let model = Llama::random(common::tiny_config(tied), 21).unwrap();
        let prompt = [1u32, 7, 19, 33];
        let opts = GenerateOptions {
            max_new_tokens: 20,
            ..Default::default()
        };
        let out = generate(&model, &prompt, &[], &opts).unwrap();
        assert_eq!(out.len(), 20);
        let mut seq = prompt.to_vec();
        for &tok in &out {
            assert_eq!(
                tok,
                argmax(&full_forward_last(&model, &seq)),
                "after {seq:?}"
            );
            seq.push(tok);
        }
    }
}

#[test]
fn cached_logits_equal_full_forward_logits() {
    use herd_model::attention::LayerCache;
    let model = Llama::random(common::tiny_config(false), 22).unwrap();
    let seq = [1u32, 4, 9, 16, 25, 36, 49, 3, 8];
    let net = model.inference_net();
    let mut caches = vec![LayerCache::default(); net.num_layers()];
    // Prompt of 5 in one call, then 4 single tokens.
    let mut cached = Vec::new();
    let first = Tensor::from_vec(seq[..5].to_vec(), (1, 5), &Device::Cpu).unwrap();
    cached.push(net.forward(&first, Some(&mut caches)).unwrap());
    for &tok in &seq[5..] {
        let one = Tensor::from_vec(vec![tok], (1, 1), &Device::Cpu).unwrap();
        cached.push(net.forward(&one, Some(&mut caches)).unwrap());
    }
    let cached = Tensor::cat(&cached, 1).unwrap();
    let full = model
        .forward(&Tensor::from_vec(seq.to_vec(), (1, seq.len()), &Device::Cpu).unwrap())
        .unwrap();
    assert!(common::max_abs_diff(&cached, &full) < 1e-5);
}

#[test]
fn stops_at_eos_and_excludes_it() {
    let model = Llama::random(common::tiny_config(false), 23).unwrap();
    let prompt = [1u32, 2, 3];
    let opts = GenerateOptions {
        max_new_tokens: 10,
        ..Default::default()
    };
    let free = generate(&model, &prompt, &[], &opts).unwrap();
    let eos = free[3];
    let stopped = generate(&model, &prompt, &[eos], &opts).unwrap();
    let first = free.iter().position(|&t| t == eos).unwrap();
    assert_eq!(stopped, free[..first]);
}

#[test]
fn sampling_is_seeded_and_top_p_narrows() {
    let model = Llama::random(common::tiny_config(false), 24).unwrap();
    let prompt = [1u32, 5];
    let opts = |seed, top_p| GenerateOptions {
        max_new_tokens: 12,
        temperature: 1.0,
        top_p,
        seed,
        logprobs: None,
    };
    let a = generate(&model, &prompt, &[], &opts(7, 0.9)).unwrap();
    assert_eq!(a, generate(&model, &prompt, &[], &opts(7, 0.9)).unwrap());
    assert!(a.iter().all(|&t| t < 50));
    let seeds_differ = (8..12).any(|s| generate(&model, &prompt, &[], &opts(s, 1.0)).unwrap() != a);
    assert!(seeds_differ);
    // A nucleus so small it keeps only the top token is greedy decoding.
    let greedy = generate(
        &model,
        &prompt,
        &[],
        &GenerateOptions {
            max_new_tokens: 12,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        generate(&model, &prompt, &[], &opts(9, 1e-9)).unwrap(),
        greedy
    );
    assert!(generate(&model, &[], &[], &opts(1, 0.9)).is_err());
}

/// Prompts of different lengths decoded together (left-padded, one forward per token) give each
/// prompt's own answer, greedy and sampled (each row with its own seed), EOS included.
#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let model = Llama::random(common::tiny_config(false), 5).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 7, 19, 33, 2, 8, 40, 11],
        vec![1, 9],
        vec![1, 45, 3, 17],
        vec![4],
    ];
    for (temperature, top_p) in [(0.0, 1.0), (0.8, 0.9)] {
        let opts: Vec<GenerateOptions> = (0..prompts.len())
            .map(|i| GenerateOptions {
                max_new_tokens: 12 + i,
                temperature,
                top_p,
                seed: 100 + i as u64,
                logprobs: None,
            })
            .collect();
        let one_by_one: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&opts)
            .map(|(p, o)| generate(&model, p, &[], o).unwrap())
            .collect();
        let batched = generate_batch(&model, &prompts, &[], &opts).unwrap();
        assert_eq!(batched, one_by_one, "temperature {temperature}");
        assert_eq!(batched[3].len(), 15);
        // With an EOS that some rows produce, rows stop independently.
        let eos = one_by_one[0][3];
        let stopped = generate_batch(&model, &prompts, &[eos], &opts).unwrap();
        for ((p, o), got) in prompts.iter().zip(&opts).zip(&stopped) {
            assert_eq!(got, &generate(&model, p, &[eos], o).unwrap());
        }
        assert_eq!(stopped[0].len(), 3);
    }
    assert!(generate_batch(&model, &[vec![]], &[], &[GenerateOptions::default()]).is_err());
    assert!(generate_batch(&model, &prompts, &[], &[GenerateOptions::default()]).is_err());
}

/// Decoding a bf16 copy on the fused path (what `--dtype bf16` and a GPU run): the cached
/// logits of a prompt then single tokens track the f32 model's full forward, and both decoders
/// run to their length with bf16 weights (their logits are chosen from in f32 on the host).
#[test]
fn bf16_decoding_on_the_fused_path_tracks_f32() {
    use herd_model::attention::LayerCache;
    let model = Llama::random(common::tiny_config(false), 31).unwrap();
    let bf16 = model
        .copy_to(&Device::Cpu, candle_core::DType::BF16)
        .unwrap();
    let seq = [1u32, 4, 9, 16, 25, 36, 49, 3, 8];
    let full = model
        .forward(&Tensor::from_vec(seq.to_vec(), (1, seq.len()), &Device::Cpu).unwrap())
        .unwrap();
    let _fused = herd_kernels::FusedOnCpu::enable();
    let net = bf16.inference_net();
    let mut caches = vec![LayerCache::default(); net.num_layers()];
    let first = Tensor::from_vec(seq[..5].to_vec(), (1, 5), &Device::Cpu).unwrap();
    let mut cached = vec![net.forward(&first, Some(&mut caches)).unwrap()];
    for &tok in &seq[5..] {
        let one = Tensor::from_vec(vec![tok], (1, 1), &Device::Cpu).unwrap();
        cached.push(net.forward(&one, Some(&mut caches)).unwrap());
    }
    let cached = Tensor::cat(&cached, 1)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let (diff, scale) = (common::max_abs_diff(&cached, &full), common::max_abs(&full));
    assert!(
        diff <= 0.03 * scale,
        "bf16 cached logits differ from f32 by {diff} (largest logit {scale})"
    );
    let opts = GenerateOptions {
        max_new_tokens: 7,
        ..Default::default()
    };
    assert_eq!(generate(&bf16, &seq[..3], &[], &opts).unwrap().len(), 7);
    let prompts = vec![seq[..3].to_vec(), seq[..6].to_vec()];
    let batched = generate_batch(&bf16, &prompts, &[], &[opts.clone(), opts]).unwrap();
    assert!(batched
        .iter()
        .all(|r| r.len() == 7 && r.iter().all(|&t| t < 50)));
}
