//! Evaluation end to end: `eval_strategy: steps` puts eval_loss entries in the log history,
//! `herd predict` writes a prediction per record, `herd eval` reports loss and ROUGE-L by
//! reference length, and its eval loss is the trainer's on the same model and data.

mod common;
use common::*;

#[test]
fn eval_during_training_predict_and_eval() {
    let ws = Workspace::new(48);
    let eval_all: Vec<serde_json::Value> =
        serde_json::from_slice(&read(ws.path().join("demo/data/eval.json"))).unwrap();
    std::fs::write(
        ws.path().join("heldout.json"),
        serde_json::to_string(&eval_all[..12]).unwrap(),
    )
    .unwrap();
    let job = ws.job(
        "job.yaml",
        "out",
        "max_steps: 5\nsave_steps: 100\neval_strategy: steps\neval_steps: 2\neval_data_path: heldout.json\nper_device_eval_batch_size: 4\n",
    );
    let run = ws.train(&job, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("eval_loss"), "{stderr}");

    // Eval at steps 2 and 4 (eval_steps) and at the end (5), as HF entries.
    let o = ws.path().join("out");
    let st = trainer_state(&o);
    assert_eq!(st["eval_steps"].as_u64().unwrap(), 2);
    let evals: Vec<&serde_json::Value> = st["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .collect();
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![2, 4, 5]);
    for e in &evals {
        let l = e["eval_loss"].as_f64().unwrap();
        assert!(l.is_finite() && l > 0.0, "{e}");
        for k in [
            "epoch",
            "eval_runtime",
            "eval_samples_per_second",
            "eval_steps_per_second",
        ] {
            assert!(e[k].is_number(), "{e} lacks {k}");
        }
    }
    let final_eval = evals[2]["eval_loss"].as_f64().unwrap();

    // herd predict: one JSONL line per record, the record's fields kept, plus "prediction".
    let preds = ws.path().join("preds/p.jsonl");
    run_ok(
        herd()
            .current_dir(ws.path())
            .args([
                "predict",
                "--model",
                "out",
                "--data",
                "heldout.json",
                "--max-new-tokens",
                "8",
                "--out",
            ])
            .arg(&preds),
    );
    let text = String::from_utf8(read(&preds)).unwrap();
    // Batched decoding: the answers do not depend on the batch size (default 8: 8 + 4 records).
    let one = ws.path().join("preds/one.jsonl");
    run_ok(
        herd()
            .current_dir(ws.path())
            .args([
                "predict",
                "--model",
                "out",
                "--data",
                "heldout.json",
                "--max-new-tokens",
                "8",
                "--batch-size",
                "1",
                "--out",
            ])
            .arg(&one),
    );
    assert_eq!(String::from_utf8(read(&one)).unwrap(), text);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    for (l, r) in lines.iter().zip(&eval_all) {
        assert!(l["prediction"].is_string(), "{l}");
        for (k, v) in r.as_object().unwrap() {
            assert_eq!(&l[k], v, "field {k}");
        }
    }
    assert!(
        !std::fs::read_dir(ws.path().join("preds"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with('.')),
        "temp file left"
    );

    // herd eval --json: the trainer's eval loss on the same model, ROUGE-L in [0, 1], all buckets.
    let eval_json = |extra: &[&str]| -> serde_json::Value {
        let out = run_ok(
            herd()
                .current_dir(ws.path())
                .args(["eval", "--model", "out", "--data", "heldout.json"])
                .args(["--max-new-tokens", "8", "--batch-size", "4"])
                .args(["--model-max-length", "64", "--json"])
                .args(extra),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r = eval_json(&[]);
    let l = r["eval_loss"].as_f64().unwrap();
    assert!(
        (l - final_eval).abs() <= 1e-5 * final_eval,
        "herd eval {l} vs trainer {final_eval}"
    );
    assert_eq!(r["records"].as_u64().unwrap(), 12);
    let rouge = r["rouge_l"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rouge), "{r}");
    let buckets = r["by_reference_length"].as_object().unwrap();
    let mut total = 0;
    for b in ["0-2", "3-5", "6-10", ">10"] {
        let g = &buckets[b];
        total += g["count"].as_u64().unwrap();
        let x = g["rouge_l"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{b}: {g}");
    }
    assert_eq!(total, 12);

    // --dtype bf16: the same model in bf16 on the fused path (a GPU's dtype and code path):
    // the eval loss within 1 % of f32's, an answer for every record.
    let b = eval_json(&["--dtype", "bf16"]);
    let lb = b["eval_loss"].as_f64().unwrap();
    assert!(
        lb != l && (lb - l).abs() <= 0.01 * l,
        "bf16 {lb} vs f32 {l}"
    );
    assert_eq!(b["records"].as_u64().unwrap(), 12);

    // The text report and --limit.
    let out = run_ok(herd().current_dir(ws.path()).args([
        "eval",
        "--model",
        "out",
        "--data",
        "heldout.json",
        "--max-new-tokens",
        "4",
        "--limit",
        "3",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("eval_loss") && text.contains(">10") && text.contains("all"),
        "{text}"
    );

    // A file without reference outputs is refused by eval, accepted by predict.
    std::fs::write(
        ws.path().join("noref.jsonl"),
        "{\"instruction\": \"Say hi\"}\n",
    )
    .unwrap();
    let err = run_err(herd().current_dir(ws.path()).args([
        "eval",
        "--model",
        "out",
        "--data",
        "noref.jsonl",
    ]));
    assert!(err.contains("record 1") && err.contains("output"), "{err}");
    run_ok(herd().current_dir(ws.path()).args([
        "predict",
        "--model",
        "out",
        "--data",
        "noref.jsonl",
        "--out",
        "noref.out",
        "--max-new-tokens",
        "2",
    ]));
}

/// Two workers: rank 0 evaluates, and the checkpoint it names best reaches the coordinator, whose
/// status shows it as the trainer state names it.
#[test]
fn eval_with_two_workers_runs_on_rank_zero_and_status_shows_the_best_checkpoint() {
    let ws = Workspace::new(48);
    ws.heldout(8);
    let job = ws.job(
        "job.yaml",
        "w2",
        "per_device_train_batch_size: 2\nmax_steps: 4\nsave_steps: 2\neval_strategy: steps\neval_steps: 2\neval_data_path: heldout.json\nmetric_for_best_model: eval_loss\n",
    );
    let stderr = ws.run_workers(&job, 2);
    assert!(stderr.contains("SUCCEEDED"));
    let st = trainer_state(&ws.path().join("w2"));
    let evals: Vec<(u64, f64)> = st["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e["eval_loss"].as_f64()?)))
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4]);
    assert!(evals.iter().all(|e| e.1.is_finite() && e.1 > 0.0));
    let best = if evals[1].1 < evals[0].1 {
        evals[1]
    } else {
        evals[0]
    };
    let named = st["best_model_checkpoint"].as_str().unwrap();
    assert!(
        named.ends_with(&format!("checkpoint-{}", best.0)),
        "{named}"
    );
    let line = format!(
        "best checkpoint: step {} (eval_loss {:.4}) at {named}",
        best.0, best.1
    );
    assert!(stderr.contains(&line), "no {line:?} in\n{stderr}");
}
