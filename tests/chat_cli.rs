//! Conversation data end to end: a job mixing the demo's Alpaca records and ShareGPT chats
//! (`data_path` as a list) previews with per-file counts and trains with `herd train`.

mod common;
use common::*;

fn chats(ws: &Workspace, n: usize) {
    let all: Vec<serde_json::Value> =
        serde_json::from_slice(&read(ws.path().join("demo/data/conversations.json"))).unwrap();
    std::fs::write(
        ws.path().join("chats.json"),
        serde_json::to_string(&all[..n]).unwrap(),
    )
    .unwrap();
}

#[test]
fn mixture_job_previews_and_trains() {
    let ws = Workspace::new(40);
    chats(&ws, 24);
    // The Workspace job names small.json; replace data_path by a mixture.
    let job = ws.job("job.yaml", "out", "max_steps: 4\nsave_steps: 2\n");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "data_path: small.json\n",
        "data_path:\n  - path: small.json\n    weight: 0.5\n  - {path: chats.json, format: sharegpt}\n",
    );
    std::fs::write(&job, text).unwrap();

    let out = run_ok(
        herd()
            .current_dir(ws.path())
            .args(["data", "preview"])
            .arg(&job)
            .args(["-n", "1"]),
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("44 examples from 2 file(s)"), "{s}");
    assert!(
        s.contains("small.json: alpaca, weight 0.5, 40 records, 20 examples"),
        "{s}"
    );
    assert!(
        s.contains("chats.json: sharegpt, weight 1, 24 records, 24 examples"),
        "{s}"
    );
    assert!(
        s.contains("(conversation)") && s.contains("ASSISTANT:»"),
        "{s}"
    );

    ws.train(&job, &[]);
    let st = trainer_state(&ws.path().join("out"));
    assert_eq!(st["global_step"].as_u64().unwrap(), 4);
    assert!(ws.path().join("out/model.safetensors").is_file());
    // The saved training args keep the list form.
    let args =
        String::from_utf8_lossy(&read(ws.path().join("out/training_args.yaml"))).into_owned();
    assert!(
        args.contains("chats.json") && args.contains("sharegpt"),
        "{args}"
    );
}

#[test]
fn bad_conversation_names_file_and_record() {
    let ws = Workspace::new(8);
    std::fs::write(
        ws.path().join("bad.jsonl"),
        "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n\
         {\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"human\", \"value\": \"q\"}]}\n",
    )
    .unwrap();
    let job = ws.job("job.yaml", "out", "max_steps: 1\n");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "data_path: small.json\n",
        "data_path: [small.json, bad.jsonl]\n",
    );
    std::fs::write(&job, text).unwrap();
    let err = run_err(
        herd()
            .current_dir(ws.path())
            .arg("train")
            .arg(&job)
            .arg("--no-progress"),
    );
    assert!(
        err.contains("bad.jsonl: record 2 (line 2): turn 2: expected a gpt turn"),
        "{err}"
    );
    // A file declared with the wrong format is named.
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "data_path: [small.json, bad.jsonl]\n",
        "data_path: [{path: small.json, format: sharegpt}]\n",
    );
    std::fs::write(&job, text).unwrap();
    let err = run_err(
        herd()
            .current_dir(ws.path())
            .arg("train")
            .arg(&job)
            .arg("--no-progress"),
    );
    assert!(err.contains("small.json: declared sharegpt"), "{err}");
}
