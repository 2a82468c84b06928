#[test]
fn write() {
    let dir = std::path::Path::new("/tmp/demo_check");
    let _ = std::fs::remove_dir_all(dir);
    let s = herd_worker::demo::write_demo_assets(dir, 1).unwrap();
    let tok = herd_model::Tokenizer::from_dir(&s.model_dir).unwrap();
    let texts = ["cat sun", "Below is an instruction that describes a task.\n\n### Response:42</s>", "  lead", "中文 🦙 ΩΣ", "What is 12 + 7?", "tree SUN cat[PAD]x"];
    let mut out = vec![];
    for t in texts { out.push(serde_json::json!({"text": t, "ids": tok.encode(t).unwrap(), "dec": tok.decode(&tok.encode(t).unwrap(), false).unwrap(), "trunc5": tok.encode_truncated(t, 5).unwrap()})); }
    std::fs::write(dir.join("rust.json"), serde_json::to_string(&out).unwrap()).unwrap();
    let mut t2 = tok.clone();
    t2.add_missing_special_tokens();
    t2.save(&dir.join("tok_padded")).unwrap();
    let mut out = vec![];
    for t in texts { out.push(serde_json::json!({"text": t, "ids": t2.encode(t).unwrap()})); }
    std::fs::write(dir.join("rust_padded.json"), serde_json::to_string(&out).unwrap()).unwrap();
    println!("{:?}", s);
}
