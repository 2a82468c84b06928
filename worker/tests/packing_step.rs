//! An optimizer step over packed rows equals the step over the same examples right-padded one
//! per row (loss, token count, gradient norm and the updated weights, f32 tolerance), with and
//! without gradient checkpointing. This is what makes `packing: true` a pure speed setting.

use herd_model::{Llama, LlamaConfig};
use herd_worker::collective::SingleProcess;
use herd_worker::data::{collate, collate_packed, pack, Example, IGNORE_INDEX};
use herd_worker::optim::AdamWConfig;
use herd_worker::trainer::engine::{Engine, StepStats};

const PAD: u32 = 0;

fn config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64, "tie_word_embeddings": false, "initializer_range": 0.2,
    }))
    .unwrap()
}

fn examples() -> Vec<Example> {
    let lens = [7, 3, 12, 5, 9, 4];
    lens.iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<u32> = (0..n).map(|i| 1 + ((i * 7 + k * 3) % 39) as u32).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < 2 { IGNORE_INDEX } else { t as i64 })
                .collect();
            Example {
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

fn engine(recompute: bool) -> Engine {
    let adam = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        // A large eps keeps Adam's first step (≈ lr·sign(g) for |g| >> eps) from amplifying
        // float noise in near-zero gradient entries into lr-sized weight differences.
        eps: 1e-3,
        weight_decay: 0.01,
    };
    Engine::new(Llama::random(config(), 11).unwrap(), adam, 1.0)
        .with_gradient_checkpointing(recompute)
}

fn weights(e: &Engine) -> Vec<f32> {
    e.model
        .vars()
        .iter()
        .flat_map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

#[test]
fn a_packed_step_equals_the_padded_step() {
    let all = examples();
    let mut plain = engine(false);
    plain.zero_grad().unwrap();
    plain
        .accumulate(&collate(&all.iter().collect::<Vec<_>>(), PAD))
        .unwrap();
    let want: StepStats = plain.apply(&mut SingleProcess, 1e-2).unwrap();
    let want_w = weights(&plain);

    let lengths: Vec<usize> = all.iter().map(Example::len).collect();
    let rows: Vec<Vec<&Example>> = pack(&lengths, 16)
        .iter()
        .map(|r| r.iter().map(|&i| &all[i]).collect())
        .collect();
    assert!(rows.len() < all.len(), "{rows:?}");
    for recompute in [false, true] {
        let mut packed = engine(recompute);
        packed.zero_grad().unwrap();
        packed.accumulate(&collate_packed(&rows, PAD)).unwrap();
        let got = packed.apply(&mut SingleProcess, 1e-2).unwrap();
        assert_eq!(got.label_tokens, want.label_tokens);
        assert!(close(got.loss, want.loss), "{got:?} vs {want:?}");
        assert!(close(got.grad_norm, want.grad_norm), "{got:?} vs {want:?}");
        let max_diff = weights(&packed)
            .iter()
            .zip(&want_w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            max_diff < 1e-5,
            "recompute {recompute}: weights differ by {max_diff}"
        );
    }
}
