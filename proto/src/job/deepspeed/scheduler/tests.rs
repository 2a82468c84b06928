use super::*;
use serde_json::json;

const LR: f64 = 2e-5;

fn ok(v: Value) -> DsScheduler {
    read(&v, LR).unwrap()
}

fn err(v: Value) -> String {
    read(&v, LR).unwrap_err().join("; ")
}

#[test]
fn auto_values_take_the_jobs_and_the_step_counts_wait_for_training() {
    let s = ok(json!({"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto",
        "warmup_num_steps": "auto", "total_num_steps": "auto"}}));
    assert_eq!(s.kind, DsScheduleKind::WarmupDecayLr);
    assert_eq!((s.warmup_min_lr, s.warmup_max_lr), (0.0, LR));
    assert_eq!((s.warmup_num_steps, s.total_num_steps), (None, None));
    assert_eq!(s.warmup_type, WarmupType::Log);
    let r = s.resolve(30, 1000).unwrap();
    assert_eq!(
        (r.warmup_num_steps, r.total_num_steps),
        (Some(30), Some(1000))
    );
}

#[test]
fn left_out_parameters_take_deepspeeds_defaults() {
    let s = ok(json!({"type": "WarmupLR"}));
    assert_eq!(s.warmup_num_steps, Some(1000));
    // Left out, DeepSpeed's default runs whatever the job's warmup: HF checks only keys given.
    assert_eq!(s.resolve(30, 100).unwrap().warmup_num_steps, Some(1000));
    assert_eq!((s.warmup_min_lr, s.warmup_max_lr), (0.0, LR));
    assert_eq!(s.total_num_steps, None);
    // WarmupDecayLR hands WarmupLR its own default peak, 0.001.
    let s = ok(json!({"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}));
    assert_eq!(s.warmup_max_lr, 0.001);
    let s = ok(
        json!({"type": "WarmupCosineLR", "params": {"total_num_steps": 50, "warmup_type": "linear"}}),
    );
    assert_eq!((s.warmup_min_ratio, s.cos_min_ratio), (0.0, 0.0001));
    assert_eq!(s.warmup_type, WarmupType::Linear);
    assert_eq!(s.base_lr, LR);
}

#[test]
fn numbers_that_disagree_with_the_job_are_refused_when_training_starts() {
    let s = ok(json!({"type": "WarmupCosineLR", "params": {
        "warmup_num_steps": 10, "total_num_steps": 200}}));
    let e = s.resolve(30, 1000).unwrap_err();
    assert!(
        e.contains("`scheduler.params.warmup_num_steps` is 10 but the job's warmup"),
        "{e}"
    );
    assert!(e.contains("`scheduler.params.total_num_steps` is 200 but the job's number of optimizer steps is 1000"), "{e}");
    assert!(s.resolve(10, 200).is_ok());
}

#[test]
fn a_warmup_of_no_steps_is_refused_as_deepspeed_refuses_it_but_auto_fills_one() {
    let e = err(json!({"type": "WarmupLR", "params": {"warmup_num_steps": 0}}));
    assert!(e.contains("at least one step"), "{e}");
    // transformers 5 fills "auto" with max(1, warmup), so a job without warmup runs, and a
    // config that says 1 agrees with it.
    for given in [json!("auto"), json!(1)] {
        let s = ok(json!({"type": "WarmupDecayLR", "params": {
            "warmup_num_steps": given, "total_num_steps": "auto"}}));
        let r = s.resolve(0, 100).unwrap();
        assert_eq!(r.warmup_num_steps, Some(1), "{given}");
    }
}

#[test]
fn what_deepspeed_would_reject_is_named() {
    let e =
        err(json!({"type": "WarmupLR", "params": {"warmup_max_lr": 1e-4, "total_num_steps": 5}}));
    assert!(
        e.contains(
            "`scheduler.params.warmup_max_lr` is 0.0001 but the job's learning_rate is 0.00002"
        ),
        "{e}"
    );
    assert!(
        e.contains("`scheduler.params.total_num_steps` is not a parameter of DeepSpeed's WarmupLR"),
        "{e}"
    );
    let e = err(json!({"type": "WarmupDecayLR"}));
    assert!(
        e.contains("needs `scheduler.params.total_num_steps`"),
        "{e}"
    );
    let e = err(
        json!({"type": "WarmupCosineLR", "params": {"total_num_steps": 5, "cos_min_ratio": "auto", "warmup_type": "exp"}}),
    );
    assert!(
        e.contains("cos_min_ratio` is \"auto\" but HF Trainer fills no value"),
        "{e}"
    );
    assert!(e.contains("warmup_type` is \"exp\""), "{e}");
    let e = err(json!({"type": "OneCycle", "params": {}}));
    assert!(e.contains("OneCycle is not supported"), "{e}");
    let e = err(json!({"type": "Cosine"}));
    assert!(e.contains("`scheduler.type` is \"Cosine\""), "{e}");
    let e = err(json!({"type": "WarmupDecayLR", "params": {"total_num_steps": 10.5}}));
    assert!(e.contains("not a whole number of steps"), "{e}");
}
