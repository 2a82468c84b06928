//! The trainer's optimizer step against PyTorch: the fixture (tests/fixtures/make_parity.py) runs
//! the train.py-resized model on a masked batch, clips at 1.0 and takes two AdamW steps with HF
//! Trainer's parameter groups. Our engine must land on the same weights, and the lr schedules
//! must equal transformers' at every step.

mod common;

use candle_core::Tensor;
use common::{batch, fixtures, load_step, resized_model, torch_adam};
use herd_proto::SchedulerType;
use herd_worker::collective::SingleProcess;
use herd_worker::data::Batch;
use herd_worker::schedule::LrSchedule;
use herd_worker::trainer::engine::Engine;
use std::collections::HashMap;

fn scalar(step: &HashMap<String, Tensor>, name: &str) -> f64 {
    step[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

/// Largest |ours - theirs| over every parameter, and the parameter where it happens.
fn max_weight_diff(engine: &Engine, step: &HashMap<String, Tensor>, prefix: &str) -> (f32, String) {
    let mut worst = (0.0f32, String::new());
    for (name, var) in engine.model.vars() {
        let ours = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let theirs = step[&format!("{prefix}.{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (a, b) in ours.iter().zip(&theirs) {
            let d = (a - b).abs();
            if d > worst.0 {
                worst = (d, name.clone());
            }
        }
    }
    worst
}

#[test]
fn two_adamw_steps_match_pytorch() {
    let step = load_step();
    let model = resized_model(&step);
    let adam = torch_adam(0.1);
    let mut engine = Engine::new(model, adam, 1.0);
    let batch = batch(&step);
    for (k, (loss_name, norm_name, after)) in [
        ("loss", "grad_norm", "after1"),
        ("loss2", "grad_norm2", "after2"),
    ]
    .into_iter()
    .enumerate()
    {
        engine.zero_grad().unwrap();
        engine.accumulate(&batch).unwrap();
        let stats = engine.apply(&mut SingleProcess, 1e-3).unwrap();
        let (loss, norm) = (scalar(&step, loss_name), scalar(&step, norm_name));
        let loss_rel = (stats.loss - loss).abs() / loss.abs();
        let norm_rel = (stats.grad_norm - norm).abs() / norm;
        let (wdiff, wname) = max_weight_diff(&engine, &step, after);
        eprintln!("step {}: loss rel {loss_rel:.2e}, grad_norm rel {norm_rel:.2e}, max |Δw| {wdiff:.2e} ({wname})", k + 1);
        assert!(loss_rel < 1e-4, "loss {} vs {loss}", stats.loss);
        assert!(norm_rel < 1e-4, "grad norm {} vs {norm}", stats.grad_norm);
        assert!(
            wdiff < 1e-5,
            "weights after step {} differ by {wdiff} at {wname}",
            k + 1
        );
    }
}

#[test]
fn gradient_is_the_token_mean_across_micro_batches() {
    // Splitting the batch into two micro-batches (accumulation) gives the same step: gradients
    // are summed and divided by the global count of label tokens, as one big batch would be.
    let step = load_step();
    let adam = torch_adam(0.1);
    let whole = batch(&step);
    let half = |rows: std::ops::Range<usize>| Batch {
        input_ids: whole.input_ids[rows.start * whole.seq_len..rows.end * whole.seq_len].to_vec(),
        labels: whole.labels[rows.start * whole.seq_len..rows.end * whole.seq_len].to_vec(),
        attention_mask: whole.attention_mask[rows.start * whole.seq_len..rows.end * whole.seq_len]
            .to_vec(),
        batch: rows.len(),
        seq_len: whole.seq_len,
        layout: None,
    };
    let mut split = Engine::new(resized_model(&step), adam, 1.0);
    split.zero_grad().unwrap();
    split.accumulate(&half(0..1)).unwrap();
    split.accumulate(&half(1..4)).unwrap();
    let stats = split.apply(&mut SingleProcess, 1e-3).unwrap();
    assert!((stats.loss - scalar(&step, "loss")).abs() / scalar(&step, "loss") < 1e-5);
    let (wdiff, wname) = max_weight_diff(&split, &step, "after1");
    assert!(wdiff < 1e-5, "{wdiff} at {wname}");
}

/// A fixture case's schedule: `scheduler`, `base_lr`, the step counts and `kwargs` if given.
fn fixture_schedule(c: &serde_json::Value) -> LrSchedule {
    LrSchedule {
        kind: serde_json::from_value::<SchedulerType>(c["scheduler"].clone()).unwrap(),
        base_lr: c["base_lr"].as_f64().unwrap(),
        warmup_steps: c["num_warmup_steps"].as_u64().unwrap(),
        total_steps: c["num_training_steps"].as_u64().unwrap(),
        kwargs: match &c["kwargs"] {
            serde_json::Value::Null => Default::default(),
            k => serde_json::from_value(k.clone()).unwrap(),
        },
    }
}

#[test]
fn lr_schedules_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("schedules.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let mut worst = 0.0f64;
    for c in cases {
        let s = fixture_schedule(c);
        let kind = s.kind;
        let lrs: Vec<f64> = serde_json::from_value(c["lrs"].clone()).unwrap();
        assert_eq!(lrs.len() as u64, s.total_steps);
        for (i, want) in lrs.iter().enumerate() {
            let got = s.lr_at(i as u64);
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= 1e-7 * want.abs().max(1e-12),
                "{kind:?} step {i}: {got} vs {want}"
            );
        }
        // What HF logs at step s is the lr step s used (transformers 5.x).
        let logged: Vec<f64> = serde_json::from_value(c["logged_learning_rate"].clone()).unwrap();
        assert_eq!(logged, lrs);
        // The warmup_ratio cases: HF's ceil(T * ratio).
        if let Some(r) = c["warmup_ratio"].as_f64() {
            assert_eq!((s.total_steps as f64 * r).ceil() as u64, s.warmup_steps);
        }
    }
    eprintln!("lr schedules: max |Δlr| {worst:.2e}");
}

/// The other schedulers and their lr_scheduler_kwargs (tests/fixtures/make_hf_schedules.py, which
/// also checked that HF Trainer logs these lrs).
#[test]
fn more_lr_schedules_and_their_kwargs_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("hf_schedules.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    let mut worst = 0.0f64;
    for c in cases {
        let s = fixture_schedule(c);
        let kind = s.kind;
        let lrs: Vec<f64> = serde_json::from_value(c["lrs"].clone()).unwrap();
        assert_eq!(lrs.len() as u64, s.total_steps);
        for (i, want) in lrs.iter().enumerate() {
            let got = s.lr_at(i as u64);
            let rel = (got - want).abs() / want.abs().max(1e-30);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-12,
                "{kind:?} {} step {i}: {got} vs {want}",
                c["kwargs"]
            );
        }
    }
    eprintln!("more lr schedules: max relative |Δlr| {worst:.2e}");
}

#[test]
fn weight_decay_groups_match_hf_trainer() {
    let text = std::fs::read_to_string(fixtures().join("versions.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let hf: Vec<String> = serde_json::from_value(v["decay_parameters"].clone()).unwrap();
    let step = load_step();
    let model = resized_model(&step);
    let ours: Vec<String> = model
        .vars()
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| herd_worker::optim::decays(n))
        .collect();
    assert_eq!(ours, hf);
}

/// DeepSpeed's `scheduler` section against HF Trainer + DeepSpeed's engine
/// (tests/fixtures/make_ds_schedules.py): the lr every optimizer step used, and what HF logged.
#[test]
fn deepspeed_schedules_match_hf_trainer_with_deepspeed() {
    use herd_proto::job::deepspeed::scheduler;
    use herd_worker::schedule::{DeepSpeedSchedule, Schedule};
    let text = std::fs::read_to_string(fixtures().join("ds_schedules.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.iter().filter(|c| c["via"] == "trainer").count() >= 5);
    let mut worst = 0.0f64;
    for c in cases {
        let lr = c["learning_rate"].as_f64().unwrap();
        let (warmup, total) = (
            c["warmup_steps"].as_u64().unwrap(),
            c["total_steps"].as_u64().unwrap(),
        );
        let read = scheduler::read(&c["scheduler"], lr).unwrap();
        let s = Schedule::DeepSpeed(DeepSpeedSchedule::new(read.resolve(warmup, total).unwrap()));
        let lrs: Vec<f64> = serde_json::from_value(c["lrs"].clone()).unwrap();
        let logged: Vec<f64> = serde_json::from_value(c["logged"].clone()).unwrap();
        assert_eq!(lrs.len() as u64, total);
        for (i, (want, want_logged)) in lrs.iter().zip(&logged).enumerate() {
            let (got, got_logged) = (s.lr_at(i as u64), s.logged_lr(i as u64 + 1));
            for (g, w, what) in [(got, *want, "lr"), (got_logged, *want_logged, "logged")] {
                worst = worst.max((g - w).abs() / w.abs().max(1e-30));
                assert!(
                    (g - w).abs() <= 1e-12 * w.abs().max(1e-30),
                    "{} step {i} {what}: {g} vs {w}",
                    c["scheduler"]
                );
            }
        }
    }
    eprintln!("deepspeed schedules: max relative |Δlr| {worst:.2e}");
}
