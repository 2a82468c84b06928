//! Parity with PyTorch / transformers 5.23 (fixtures made by tests/fixtures/make_parity.py, see
//! tests/fixtures/README.md): logits, loss and every gradient of the train.py-resized model on
//! the collated Alpaca batch; bf16 sharded loading; tied embeddings; the train.py resize.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use herd_model::loss::causal_lm_loss_sum;
use herd_model::{weights, Llama, LlamaConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity")
}

fn load_st(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

/// max |a - b| / max |b| over the positions where mask == 1. a, b: [b, t, v]; mask: [b, t].
fn masked_rel_max(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let a: Vec<Vec<Vec<f32>>> = a.to_vec3().unwrap();
    let b: Vec<Vec<Vec<f32>>> = b.to_vec3().unwrap();
    let mask: Vec<Vec<i64>> = mask.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
    let (mut diff, mut scale, mut positions) = (0f64, 0f64, 0);
    for (i, row) in mask.iter().enumerate() {
        for (j, &m) in row.iter().enumerate() {
            if m == 1 {
                positions += 1;
                for (x, y) in a[i][j].iter().zip(&b[i][j]) {
                    diff = diff.max((x - y).abs() as f64);
                    scale = scale.max(y.abs() as f64);
                }
            }
        }
    }
    assert!(positions > 0);
    diff / scale
}

/// model/ with the train.py-resized embed_tokens and lm_head from step.safetensors (vocab + 1).
fn resized_reference_model(step: &HashMap<String, Tensor>) -> Llama {
    let mut cfg = LlamaConfig::from_file(&fixtures().join("model/config.json")).unwrap();
    cfg.vocab_size += 1;
    let mut tensors: BTreeMap<String, Tensor> =
        weights::load_dir(&fixtures().join("model")).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        tensors.insert(name.to_string(), step[&format!("init.{name}")].clone());
    }
    Llama::from_tensors(cfg, tensors).unwrap()
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    let step = load_st("step.safetensors");
    let model = resized_reference_model(&step);
    let input_ids = step["input_ids"].to_dtype(DType::U32).unwrap();
    let labels = &step["labels"];

    let logits = model.forward(&input_ids).unwrap();
    let logits_err = masked_rel_max(&logits, &step["logits"], &step["attention_mask"]);

    let (sum, count) = causal_lm_loss_sum(&logits, labels).unwrap();
    let loss = (sum / count as f64).unwrap();
    let ours = loss.to_scalar::<f32>().unwrap() as f64;
    let reference = step["loss"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let loss_err = (ours - reference).abs() / reference.abs();

    let grads = loss.backward().unwrap();
    let mut worst = (0f64, String::new());
    let mut sq_norm = 0f64;
    assert_eq!(model.vars().len(), 21);
    for (name, var) in model.vars() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let err = common::rel_l2(g, &step[&format!("grad.{name}")]);
        sq_norm += g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        if err > worst.0 {
            worst = (err, name.clone());
        }
        assert!(err < 1e-3, "{name}: gradient relative error {err:e}");
    }
    let ref_norm = step["grad_norm"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let norm_err = (sq_norm.sqrt() - ref_norm).abs() / ref_norm;

    eprintln!(
        "parity: logits max rel err {logits_err:.3e}, loss {ours} vs {reference} (rel {loss_err:.3e}), \
         worst gradient rel err {:.3e} ({}), grad norm rel err {norm_err:.3e}",
        worst.0, worst.1
    );
    assert!(logits_err < 1e-4, "logits relative error {logits_err:e}");
    assert!(loss_err < 1e-4, "loss relative error {loss_err:e}");
    assert!(norm_err < 1e-4, "gradient norm relative error {norm_err:e}");
}

#[test]
fn resize_matches_train_py() {
    let step = load_st("step.safetensors");
    let mut model = Llama::load(&fixtures().join("model")).unwrap();
    model.resize_token_embeddings(308, 1).unwrap();
    assert_eq!(model.config().vocab_size, 308);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let var = &model.vars().iter().find(|(n, _)| n == name).unwrap().1;
        let reference = &step[&format!("init.{name}")];
        // Only the mean's summation order can differ from torch.
        let err = common::max_abs_diff(var.as_tensor(), reference);
        assert!(err < 1e-6, "{name}: max abs diff {err:e}");
    }
}

#[test]
fn sharded_bf16_equals_rounded_f32() {
    let f32_model = Llama::load(&fixtures().join("model")).unwrap();
    let sharded = Llama::load(&fixtures().join("model_sharded")).unwrap();
    // The transformers-5 config (rope_parameters) must describe the same model as the 4.x layout.
    let (a, b) = (f32_model.config(), sharded.config());
    assert_eq!(a.rope_theta, b.rope_theta);
    assert_eq!(
        a.rope_scaling.as_ref().unwrap().kind(),
        b.rope_scaling.as_ref().unwrap().kind()
    );
    assert_eq!(
        a.rope_scaling.as_ref().unwrap().factor,
        b.rope_scaling.as_ref().unwrap().factor
    );
    assert_eq!(
        a.rope_scaling
            .as_ref()
            .unwrap()
            .original_max_position_embeddings,
        b.rope_scaling
            .as_ref()
            .unwrap()
            .original_max_position_embeddings
    );
    assert_eq!(f32_model.vars().len(), sharded.vars().len());
    for ((na, va), (nb, vb)) in f32_model.vars().iter().zip(sharded.vars()) {
        assert_eq!(na, nb);
        let rounded = va
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(common::max_abs_diff(&rounded, vb), 0.0, "{na}");
    }
    // Same forward up to the bf16 rounding of the weights.
    let ids = common::ids(&[&[1, 20, 30, 40, 50, 2]]);
    let rel = common::rel_l2(
        &sharded.forward(&ids).unwrap(),
        &f32_model.forward(&ids).unwrap(),
    );
    assert!(rel < 5e-2, "bf16 vs f32 logits rel {rel}");
}

#[test]
fn tied_logits_match_transformers() {
    let fx = load_st("tied_logits.safetensors");
    let model = Llama::load(&fixtures().join("tied")).unwrap();
    assert!(model.config().tie_word_embeddings);
    assert!(model.vars().iter().all(|(n, _)| n != "lm_head.weight"));
    assert_eq!(model.num_parameters(), 20_160);
    let logits = model
        .forward(&fx["input_ids"].to_dtype(DType::U32).unwrap())
        .unwrap();
    let mask = Tensor::ones(fx["input_ids"].dims(), DType::I64, &Device::Cpu).unwrap();
    let err = masked_rel_max(&logits, &fx["logits"], &mask);
    eprintln!("tied parity: logits max rel err {err:.3e}");
    assert!(err < 1e-4, "tied logits relative error {err:e}");
}

#[test]
fn parameter_count_matches_transformers() {
    assert_eq!(
        Llama::load(&fixtures().join("model"))
            .unwrap()
            .num_parameters(),
        125_632
    );
}

/// `echo` + `logprobs` scoring of a prompt equals log softmax of transformers' logits of the
/// same tokens: each token's value and the top five, in order.
#[test]
fn prompt_logprobs_match_transformers_log_softmax() {
    let fx = load_st("tied_logits.safetensors");
    let model = Llama::load(&fixtures().join("tied")).unwrap();
    let ids: Vec<Vec<i64>> = fx["input_ids"].to_vec2().unwrap();
    let reference: Vec<Vec<Vec<f32>>> = fx["logits"].to_vec3().unwrap();
    let mut checked = 0;
    for (row, want_logits) in ids.iter().zip(&reference) {
        let row: Vec<u32> = row.iter().map(|&i| i as u32).collect();
        let got = herd_model::logprob::prompt_logprobs(&model, &row, 5).unwrap();
        assert_eq!(got.len(), row.len() - 1);
        for (i, g) in got.iter().enumerate() {
            // transformers: log_softmax(logits[i])[ids[i + 1]], in f64.
            let l = &want_logits[i];
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_z = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let want = l[row[i + 1] as usize] as f64 - log_z;
            assert_eq!(g.token, row[i + 1]);
            assert!(
                (g.logprob as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
                "position {i}: {} vs transformers {want}",
                g.logprob
            );
            let mut order: Vec<usize> = (0..l.len()).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
            let top: Vec<u32> = g.top.iter().map(|t| t.0).collect();
            let want_top: Vec<u32> = order[..5].iter().map(|&t| t as u32).collect();
            assert_eq!(top, want_top, "position {i}: top 5");
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} positions");
}
