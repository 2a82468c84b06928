//! Reward models end to end (GPT-4-LLM's recipe on the demo's comparison pairs): `task: reward`
//! trains a LlamaForSequenceClassification-format model with loss and accuracy logged, resumes
//! bit-identically, gives the same weights through `herd run --workers 2`; `herd score` reports
//! pairwise accuracy and per-record rewards; `herd eval --best-of 2` reranks sampled answers.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The first `n` records of a demo data file, written to `name`.
fn subset(ws: &Workspace, from: &str, n: usize, name: &str) {
    let all: Vec<Value> = serde_json::from_slice(&read(ws.path().join(from))).unwrap();
    std::fs::write(
        ws.path().join(name),
        serde_json::to_string(&all[..n]).unwrap(),
    )
    .unwrap();
}

fn reward_job(ws: &Workspace, name: &str, out: &str, steps: u64, extra: &str) -> PathBuf {
    let text = format!(
        "task: reward\nmodel_name_or_path: demo/model\ndata_path: pairs.json\noutput_dir: {out}\n\
         per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\nlogging_steps: 1\nmax_steps: {steps}\n\
         warmup_steps: 1\nweight_decay: 0.01\nmodel_max_length: 64\nsave_steps: 2\n{extra}"
    );
    let p = ws.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn json_out(cmd: &mut std::process::Command) -> Value {
    let out = run_ok(cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn reward_model_trains_resumes_scores_and_reranks() {
    let ws = Workspace::new(8);
    subset(&ws, "demo/data/comparisons.json", 32, "pairs.json");
    subset(
        &ws,
        "demo/data/eval_comparisons.json",
        16,
        "heldout_pairs.json",
    );
    subset(&ws, "demo/data/eval.json", 3, "prompts.json");
    let eval = "eval_strategy: steps\neval_steps: 2\neval_data_path: heldout_pairs.json\n";
    ws.train(&reward_job(&ws, "rm.yaml", "rm", 4, eval), &[]);

    // log_history: loss and accuracy per step, eval_loss and eval_accuracy at steps 2 and 4.
    let o = ws.path().join("rm");
    let st = trainer_state(&o);
    let hist = st["log_history"].as_array().unwrap();
    let train: Vec<&Value> = hist.iter().filter(|e| e.get("loss").is_some()).collect();
    assert_eq!(train.len(), 4);
    for e in &train {
        let acc = e["accuracy"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&acc) && e["loss"].as_f64().unwrap() > 0.0,
            "{e}"
        );
    }
    let evals: Vec<&Value> = hist
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .collect();
    assert_eq!(
        evals
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 4]
    );
    assert!(evals.iter().all(|e| e["eval_accuracy"].is_number()));

    // The saved format: what transformers loads as LlamaForSequenceClassification(num_labels=1).
    let cfg: Value = serde_json::from_slice(&read(o.join("config.json"))).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
    assert!(cfg["pad_token_id"].is_u64());
    let w = tensors(&o.join("model.safetensors"));
    assert_eq!(
        w["score.weight"].len(),
        cfg["hidden_size"].as_u64().unwrap() as usize
    );
    assert!(!w.contains_key("lm_head.weight"));
    let ck: Value = serde_json::from_slice(&read(o.join("checkpoint-2/config.json"))).unwrap();
    assert_eq!(ck["architectures"], cfg["architectures"]);

    // Stopped at step 2 and resumed: bit-identical to the uninterrupted run.
    let job = reward_job(&ws, "rm2.yaml", "rm2", 4, eval);
    ws.train(&job, &["--until-step", "2"]);
    ws.train(&job, &[]);
    assert_weights_close(
        &o.join("model.safetensors"),
        &ws.path().join("rm2/model.safetensors"),
        0.0,
    );

    // herd score on comparisons: accuracy, margin, and one JSONL line per pair.
    let s = json_out(herd().current_dir(ws.path()).args([
        "score",
        "--model",
        "rm",
        "--data",
        "heldout_pairs.json",
        "--json",
        "--model-max-length",
        "64",
        "--out",
        "s/pairs.jsonl",
    ]));
    assert_eq!(s["pairs"], 16);
    let acc = s["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{s}");
    let last = evals[1]["eval_accuracy"].as_f64().unwrap();
    assert!(
        (acc - last).abs() < 1e-9,
        "herd score {acc} vs trainer eval {last}"
    );
    let lines = String::from_utf8(read(ws.path().join("s/pairs.jsonl"))).unwrap();
    assert_eq!(lines.lines().count(), 16);
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(first["reward_a"].is_number() && first["margin"].is_number());

    // herd score on instruction records: a reward per record, the record's fields kept.
    let r = json_out(herd().current_dir(ws.path()).args([
        "score",
        "--model",
        "rm",
        "--data",
        "prompts.json",
        "--json",
        "--out",
        "rec.jsonl",
    ]));
    assert_eq!(r["records"], 3);
    let rec: Value = serde_json::from_str(
        String::from_utf8(read(ws.path().join("rec.jsonl")))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(rec["reward"].is_number() && rec["task"].is_string());

    // Best-of-2 reranked by the reward model.
    let e = json_out(herd().current_dir(ws.path()).args([
        "eval",
        "--model",
        "demo/model",
        "--data",
        "prompts.json",
        "--best-of",
        "2",
        "--reward-model",
        "rm",
        "--temperature",
        "0.8",
        "--max-new-tokens",
        "4",
        "--json",
    ]));
    assert_eq!(e["best_of"], 2);
    assert_eq!(e["records"], 3);
    assert!(
        e["rouge_l"].is_number() && e["mean_reward"].is_number(),
        "{e}"
    );

    // Clear refusals.
    let err = run_err(herd().current_dir(ws.path()).args([
        "eval",
        "--model",
        "demo/model",
        "--data",
        "prompts.json",
        "--best-of",
        "2",
        "--reward-model",
        "rm",
    ]));
    assert!(err.contains("--temperature"), "{err}");
    let err = run_err(herd().current_dir(ws.path()).args([
        "score",
        "--model",
        "demo/model",
        "--data",
        "heldout_pairs.json",
    ]));
    assert!(err.contains("not a reward model"), "{err}");
    std::fs::write(
        ws.path().join("bad.jsonl"),
        "{\"user_input\":\"q\",\"completion_a\":\"a\",\"completion_b\":\"b\"}\n{\"user_input\":\"q\",\"completion_a\":\"a\"}\n",
    )
    .unwrap();
    let err = run_err(herd().current_dir(ws.path()).args([
        "score",
        "--model",
        "rm",
        "--data",
        "bad.jsonl",
    ]));
    assert!(
        err.contains("bad.jsonl: record 2 (line 2)") && err.contains("completion_b"),
        "{err}"
    );
}

#[test]
fn reward_training_on_two_workers_matches_one_process() {
    let ws = Workspace::new(8);
    subset(&ws, "demo/data/comparisons.json", 16, "pairs.json");
    let dp = reward_job(&ws, "dp.yaml", "dp", 2, "");
    let stderr = ws.run_workers(&dp, 2);
    assert!(stderr.contains("SUCCEEDED"));
    let one = reward_job(
        &ws,
        "one.yaml",
        "one",
        2,
        "gradient_accumulation_steps: 2\n",
    );
    ws.train(&one, &[]);
    let (a, b) = (ws.path().join("dp"), ws.path().join("one"));
    assert_weights_close(
        &a.join("model.safetensors"),
        &b.join("model.safetensors"),
        1e-5,
    );
    let acc = |d: &Path| trainer_state(d)["log_history"][0]["accuracy"].clone();
    assert_eq!(acc(&a), acc(&b));
}

/// `bf16: true` trains a reward model with the mixed-precision path (as a GPU rank would): the
/// logged losses track the f32 run's, eval runs on the bf16 weights, and the checkpoint keeps
/// the f32 master weights (`herd score` reads it).
#[test]
fn bf16_reward_training_tracks_f32() {
    let ws = Workspace::new(8);
    subset(&ws, "demo/data/comparisons.json", 32, "pairs.json");
    subset(
        &ws,
        "demo/data/eval_comparisons.json",
        8,
        "heldout_pairs.json",
    );
    let eval = "eval_strategy: steps\neval_steps: 4\neval_data_path: heldout_pairs.json\n";
    ws.train(&reward_job(&ws, "a.yaml", "f32", 4, eval), &[]);
    let bf16 = format!("{eval}bf16: true\n");
    ws.train(&reward_job(&ws, "b.yaml", "bf16", 4, &bf16), &[]);
    let metric = |dir: &str, key: &str| -> Vec<f64> {
        trainer_state(&ws.path().join(dir))["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e[key].as_f64())
            .collect()
    };
    for key in ["loss", "eval_loss"] {
        let (a, b) = (metric("f32", key), metric("bf16", key));
        assert!(!a.is_empty() && a.len() == b.len(), "{key}: {a:?} {b:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 0.02 * x.abs(),
                "{key}: f32 {a:?} vs bf16 {b:?}"
            );
        }
    }
    let scored = json_out(herd().current_dir(ws.path()).args([
        "score",
        "--model",
        "bf16/checkpoint-4",
        "--data",
        "heldout_pairs.json",
        "--json",
    ]));
    assert_eq!(scored["pairs"], 8, "{scored}");
}
