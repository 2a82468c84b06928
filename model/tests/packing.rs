//! Sequence packing and activation recompute change how the loss is computed, never its value:
//! packed per-example losses and gradients equal the unpacked ones, and recomputed gradients
//! equal the plain ones (f32 tolerance).

mod common;

use candle_core::{Device, Tensor};
use herd_model::loss::{causal_lm_loss_sum, IGNORE_INDEX};
use herd_model::recompute::Gradients;
use herd_model::{Layout, Llama};

const PAD: u32 = 0;

struct Example {
    ids: Vec<u32>,
    labels: Vec<i64>,
}

fn examples() -> Vec<Example> {
    let ex = |ids: &[u32], masked: usize| Example {
        ids: ids.to_vec(),
        labels: ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < masked { IGNORE_INDEX } else { t as i64 })
            .collect(),
    };
    vec![
        ex(&[1, 5, 9, 13, 2, 40, 7], 2),
        ex(&[1, 8, 17, 3], 0), // label 0 is never predicted, packed or not
        ex(&[1, 33, 21, 45, 12], 1),
    ]
}

/// (loss sum, gradients) of one [b, t] batch.
fn run(
    model: &Llama,
    rows: &[Vec<u32>],
    labels: &[Vec<i64>],
    layout: Option<&Layout>,
    recompute: bool,
) -> (f32, Gradients) {
    let t = rows[0].len();
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(rows.concat(), (rows.len(), t), &dev).unwrap();
    let labels = Tensor::from_vec(labels.concat(), (rows.len(), t), &dev).unwrap();
    let (sum, _, grads) = model
        .loss_and_gradients(&ids, layout, recompute, |top| {
            causal_lm_loss_sum(&top.logits()?, &labels)
        })
        .unwrap();
    (sum.to_scalar::<f32>().unwrap(), grads)
}

/// Each example alone in a batch of one.
fn unpacked(model: &Llama, e: &Example) -> (f32, Gradients) {
    run(
        model,
        std::slice::from_ref(&e.ids),
        std::slice::from_ref(&e.labels),
        None,
        false,
    )
}

/// Examples `rows` packed back to back, right-padded to `t`; only examples in `counted` have
/// labels (the first token of every packed example is ignored: nothing in its row predicts it).
fn packed(
    model: &Llama,
    all: &[Example],
    rows: &[Vec<usize>],
    t: usize,
    counted: &[usize],
    recompute: bool,
) -> (f32, Gradients) {
    let mut ids = vec![];
    let mut labels = vec![];
    for row in rows {
        let mut r_ids = vec![];
        let mut r_labels = vec![];
        for &i in row {
            r_ids.extend(&all[i].ids);
            let mut l = all[i].labels.clone();
            l[0] = IGNORE_INDEX;
            if !counted.contains(&i) {
                l.iter_mut().for_each(|x| *x = IGNORE_INDEX);
            }
            r_labels.extend(l);
        }
        r_ids.resize(t, PAD);
        r_labels.resize(t, IGNORE_INDEX);
        ids.push(r_ids);
        labels.push(r_labels);
    }
    let lengths: Vec<Vec<usize>> = rows
        .iter()
        .map(|r| r.iter().map(|&i| all[i].ids.len()).collect())
        .collect();
    let layout = Layout::from_lengths(t, &lengths).unwrap();
    run(model, &ids, &labels, Some(&layout), recompute)
}

fn sum_grads(a: &Gradients, b: &Gradients) -> Gradients {
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => Some((x + y).unwrap()),
            (x, None) => x.clone(),
            (None, y) => y.clone(),
        })
        .collect()
}

fn assert_grads_close(model: &Llama, a: &Gradients, b: &Gradients, what: &str) {
    for ((name, _), (x, y)) in model.trainable().iter().zip(a.iter().zip(b)) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        let rel = common::rel_l2(x, y);
        assert!(rel < 1e-5, "{what}: {name}: relative difference {rel}");
    }
}

fn assert_close(a: f32, b: f32, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
        "{what}: {a} vs {b}"
    );
}

#[test]
fn packed_losses_and_gradients_equal_unpacked() {
    let all = examples();
    for tied in [false, true] {
        let model = Llama::random(common::tiny_config(tied), 3).unwrap();
        let alone: Vec<(f32, Gradients)> = all.iter().map(|e| unpacked(&model, e)).collect();
        // Row 0: examples 0 and 1 (11 tokens) + 1 pad; row 1: example 2 + 7 pads.
        let rows = vec![vec![0, 1], vec![2]];
        for (i, (alone_loss, alone_grads)) in alone.iter().enumerate() {
            // Each example's own loss and gradient, read out of the packed batch.
            let (loss, grads) = packed(&model, &all, &rows, 12, &[i], false);
            assert_close(loss, *alone_loss, &format!("example {i} loss"));
            assert_grads_close(&model, &grads, alone_grads, &format!("example {i}"));
        }
        let (total, grads) = packed(&model, &all, &rows, 12, &[0, 1, 2], false);
        let sum: f32 = alone.iter().map(|(l, _)| l).sum();
        assert_close(total, sum, "total loss");
        let expected = alone
            .iter()
            .skip(1)
            .fold(alone[0].1.clone(), |acc, (_, g)| sum_grads(&acc, g));
        assert_grads_close(&model, &grads, &expected, "all examples");
    }
}

#[test]
fn recomputed_gradients_equal_plain_ones() {
    let all = examples();
    for tied in [false, true] {
        let model = Llama::random(common::tiny_config(tied), 5).unwrap();
        let rows = vec![vec![0, 1], vec![2]];
        let (l_plain, g_plain) = packed(&model, &all, &rows, 12, &[0, 1, 2], false);
        let (l_re, g_re) = packed(&model, &all, &rows, 12, &[0, 1, 2], true);
        assert_close(l_re, l_plain, "packed loss");
        assert_grads_close(&model, &g_re, &g_plain, "packed");

        let e = &all[0];
        let (l_plain, g_plain) = run(
            &model,
            std::slice::from_ref(&e.ids),
            std::slice::from_ref(&e.labels),
            None,
            false,
        );
        let (l_re, g_re) = run(
            &model,
            std::slice::from_ref(&e.ids),
            std::slice::from_ref(&e.labels),
            None,
            true,
        );
        assert_close(l_re, l_plain, "plain loss");
        assert_grads_close(&model, &g_re, &g_plain, "plain");
    }
}

#[test]
fn recompute_trains_only_lora_adapters() {
    let mut model = Llama::random(common::tiny_config(false), 7).unwrap();
    let cfg =
        herd_model::lora::LoraConfig::new(4, 8.0, 0.0, vec!["q_proj".into(), "v_proj".into()]);
    model.enable_lora(cfg, 1).unwrap();
    let e = &examples()[0];
    // Fresh LoRA B is zero, so A's gradient is zero; move B off zero first.
    for (_, v) in model.trainable() {
        let noise = Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    let (_, g_plain) = run(
        &model,
        std::slice::from_ref(&e.ids),
        std::slice::from_ref(&e.labels),
        None,
        false,
    );
    let (_, g_re) = run(
        &model,
        std::slice::from_ref(&e.ids),
        std::slice::from_ref(&e.labels),
        None,
        true,
    );
    assert_eq!(g_re.len(), model.trainable().len());
    assert_grads_close(&model, &g_re, &g_plain, "lora");
}
