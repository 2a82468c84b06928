//! `herd serve` as a client meets it: the real binary on loopback, plain HTTP/1.1 over a socket.
//! Its answers equal `herd generate`'s, alone and when concurrent requests share a batch, whole
//! or streamed; a short request joins a long one's batch instead of waiting for it; nothing is
//! answered without the token; bad requests get a 400 that names the field.

mod common;
use common::serve::*;
use common::*;
use std::io::Read;
use std::net::TcpStream;
use std::path::Path;

fn cli_answer(dir: &Path, instruction: &str, input: &str, max_new_tokens: usize) -> String {
    let out = run_ok(herd().current_dir(dir).args([
        "generate",
        "--model",
        "demo/model",
        "--instruction",
        instruction,
        "--input",
        input,
        "--max-new-tokens",
        &max_new_tokens.to_string(),
    ]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const ASKS: [(&str, &str); 4] = [
    ("Repeat the words.", "cat dog sun"),
    ("How many words are there?", "moon kite"),
    ("What is the first word?", "river cloud rose owl"),
    ("Write the words in capital letters.", "frog"),
];

#[test]
fn answers_equal_herd_generate_alone_and_batched_and_need_the_token() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &["--max-batch", "4"]);
    let ask = |(instruction, input): (&str, &str)| {
        serde_json::json!({"instruction": instruction, "input": input, "max_new_tokens": 10})
            .to_string()
    };

    // Open routes, and the token on everything else.
    let (st, body) = http(&srv.addr, "GET", "/health", None, "");
    assert_eq!((st, body.trim()), (200, "ok"));
    let (st, page) = http(&srv.addr, "GET", "/", None, "");
    assert!(
        st == 200 && page.contains("<title>herd serve</title>"),
        "{st}"
    );
    let (st, body) = http(&srv.addr, "POST", "/v1/generate", None, &ask(ASKS[0]));
    assert_eq!(st, 401, "{body}");
    assert!(json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer"));
    let (st, _) = http(
        &srv.addr,
        "POST",
        "/v1/generate",
        Some("wrong"),
        &ask(ASKS[0]),
    );
    assert_eq!(st, 401);
    let (st, _) = http(&srv.addr, "GET", "/v1/models", None, "");
    assert_eq!(st, 401);
    let (st, body) = http(&srv.addr, "GET", "/v1/models", Some(&srv.token), "");
    assert_eq!(st, 200);
    assert_eq!(json(&body)["data"][0]["id"], "model");

    // Alone: the answer `herd generate` prints.
    let expected: Vec<String> = ASKS
        .iter()
        .map(|(i, x)| cli_answer(ws.path(), i, x, 10))
        .collect();
    let (st, body) = http(
        &srv.addr,
        "POST",
        "/v1/generate",
        Some(&srv.token),
        &ask(ASKS[0]),
    );
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["output"], expected[0].as_str(), "{body}");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n <= 10);
    assert_eq!(v["finish_reason"], if n == 10 { "length" } else { "stop" });

    // Together: the requests arrive at once and are decoded as batches; each answer is still
    // its own (rounds of four, so some land in one batch whatever the timing).
    for _ in 0..2 {
        let answers: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = ASKS
                .iter()
                .map(|&a| {
                    let (addr, token, body) = (&srv.addr, &srv.token, ask(a));
                    sc.spawn(move || http(addr, "POST", "/v1/generate", Some(token), &body))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    let (st, body) = h.join().unwrap();
                    assert_eq!(st, 200, "{body}");
                    json(&body)["output"].as_str().unwrap().to_string()
                })
                .collect()
        });
        assert_eq!(answers, expected);
    }
    let log = srv._proc.log_text();
    assert!(
        log.contains("decoding=2") || log.contains("decoding=3") || log.contains("decoding=4"),
        "no request joined a batch already decoding: {log}"
    );
}

/// `generate` stops at every eos id of generation_config.json, as transformers does (Llama 3
/// instruct lists `<|eot_id|>` there): with every id of the vocabulary listed, the answer ends
/// before its first token, in `herd generate` and in `herd serve` alike.
#[test]
fn generation_stops_at_the_generation_configs_eos_ids() {
    let ws = Workspace::new(8);
    let free = cli_answer(ws.path(), ASKS[0].0, ASKS[0].1, 6);
    assert!(!free.is_empty());
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(ws.path().join("demo/model/config.json"))).unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap();
    let every: Vec<u64> = (0..vocab).collect();
    std::fs::write(
        ws.path().join("demo/model/generation_config.json"),
        serde_json::json!({"eos_token_id": every}).to_string(),
    )
    .unwrap();
    assert_eq!(cli_answer(ws.path(), ASKS[0].0, ASKS[0].1, 6), "");
    let srv = start_server(ws.path(), &[]);
    let body =
        serde_json::json!({"instruction": ASKS[0].0, "input": ASKS[0].1, "max_new_tokens": 6});
    let (st, body) = http(
        &srv.addr,
        "POST",
        "/v1/generate",
        Some(&srv.token),
        &body.to_string(),
    );
    assert_eq!(st, 200, "{body}");
    let answer = json(&body);
    assert_eq!(
        (answer["output"].as_str(), answer["finish_reason"].as_str()),
        (Some(""), Some("stop")),
        "{body}"
    );
}

#[test]
fn a_bad_model_dir_fails_at_start_naming_it() {
    let ws = Workspace::new(8);
    let out = run_err(herd_clean().current_dir(ws.path()).args([
        "serve",
        "--model",
        "no-such-model",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        "st",
    ]));
    assert!(out.contains("no-such-model"), "{out}");
}

#[test]
fn a_full_queue_is_answered_503_at_once_and_the_rest_are_served() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &["--max-queue", "1", "--max-batch", "1"]);
    // Each answer takes ~0.3 s here (100 tokens), so requests sent together overlap.
    let body = r#"{"instruction": "Repeat the words.", "input": "a b", "max_new_tokens": 100}"#;
    let out: Vec<(u16, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                let (addr, token) = (&srv.addr, &srv.token);
                sc.spawn(move || http(addr, "POST", "/v1/generate", Some(token), body))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<_> = out.iter().filter(|(st, _)| *st == 503).collect();
    assert!(out.iter().any(|(st, _)| *st == 200), "{out:?}");
    assert!(!busy.is_empty(), "no request was refused: {out:?}");
    assert!(busy[0].1.contains("--max-queue 1"), "{}", busy[0].1);
    assert!(
        out.iter().all(|(st, _)| *st == 200 || *st == 503),
        "{out:?}"
    );
    // The slots come back: a later request is served.
    let (st, body) = http(&srv.addr, "POST", "/v1/generate", Some(&srv.token), body);
    assert_eq!(st, 200, "{body}");
}

#[test]
fn streamed_answers_come_in_pieces_that_join_to_the_whole_answer() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &[]);
    let t = Some(srv.token.as_str());
    let ask = serde_json::json!({"instruction": "Repeat the words.", "input": "cat dog sun",
                                 "max_new_tokens": 20});
    let (st, whole) = http(&srv.addr, "POST", "/v1/generate", t, &ask.to_string());
    assert_eq!(st, 200, "{whole}");
    let whole = json(&whole);

    let mut streamed = ask.clone();
    streamed["stream"] = true.into();
    let (st, body) = http(&srv.addr, "POST", "/v1/generate", t, &streamed.to_string());
    assert_eq!(st, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let end = json(&data[data.len() - 2]);
    assert_eq!(end, whole, "the last event is the unstreamed answer");
    let pieces: Vec<String> = data[..data.len() - 2]
        .iter()
        .map(|d| json(d)["delta"].as_str().unwrap().to_string())
        .collect();
    assert!(pieces.len() > 1, "the answer came whole: {body}");
    assert_eq!(pieces.concat(), whole["output"].as_str().unwrap());

    // Chat: a role chunk, content chunks, the finish reason, the usage, [DONE].
    let chat = serde_json::json!({"messages": [{"role": "user", "content": "Repeat: a b c"}],
                                  "max_tokens": 12, "temperature": 0});
    let (_, plain) = http(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        t,
        &chat.to_string(),
    );
    let plain = json(&plain);
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = true.into();
    chat_stream["stream_options"] = serde_json::json!({"include_usage": true});
    let (st, body) = http(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        t,
        &chat_stream.to_string(),
    );
    assert_eq!(st, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|d| json(d)).collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let n = chunks.len();
    let content: String = chunks[1..n - 2]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        content,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        chunks[n - 2]["choices"][0]["finish_reason"],
        plain["choices"][0]["finish_reason"]
    );
    assert_eq!(chunks[n - 1]["usage"], plain["usage"]);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    // A prompt over the context is refused with its status, not inside a stream.
    let long = serde_json::json!({"instruction": "word ".repeat(300), "stream": true});
    let (st, body) = http(&srv.addr, "POST", "/v1/generate", t, &long.to_string());
    assert_eq!(st, 400, "{body}");
    assert!(json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("context of 256 tokens"));
}

/// Start a streamed request on a raw socket and wait for its first `data:` line.
fn open_stream(addr: &str, token: &str, body: &str) -> (TcpStream, String) {
    let mut s = send(addr, "POST", "/v1/generate", Some(token), body);
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before its first event: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    (s, seen)
}

/// What has arrived on the socket so far, without waiting for more.
fn arrived(s: &mut TcpStream) -> String {
    s.set_nonblocking(true).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    got
}

#[test]
fn a_short_request_joins_a_long_one_and_a_gone_client_stops_decoding() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &["--max-batch", "4"]);
    let long = r#"{"instruction": "Repeat the words.", "input": "a b", "max_new_tokens": 200, "stream": true}"#;
    let (mut a, _) = open_stream(&srv.addr, &srv.token, long);
    // While a decodes its 200 tokens, a 3-token request joins the batch and is answered first.
    let short =
        r#"{"instruction": "How many words are there?", "input": "moon", "max_new_tokens": 3}"#;
    let (st, body) = http(&srv.addr, "POST", "/v1/generate", Some(&srv.token), short);
    assert_eq!(st, 200, "{body}");
    let so_far = arrived(&mut a);
    assert!(
        !so_far.contains("[DONE]"),
        "the short request waited for the long one to end"
    );
    let mut rest = String::new();
    a.read_to_string(&mut rest).unwrap();
    let data = sse_data(&(so_far + &rest));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let end = json(&data[data.len() - 2]);
    assert_eq!(end["usage"]["completion_tokens"], 200, "{end}");
    let log = srv._proc.log_text();
    assert!(
        log.contains("decoding=2"),
        "no request joined a running batch: {log}"
    );

    // A client that hangs up mid-answer takes its request out of the batch.
    let (b, _) = open_stream(&srv.addr, &srv.token, long);
    drop(b);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !srv._proc.log_text().contains("a client went away") {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned request kept decoding: {}",
            srv._proc.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn an_answer_ends_before_its_stop_sequence_whole_and_streamed() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &[]);
    let t = Some(srv.token.as_str());
    let ask = serde_json::json!({"instruction": "Repeat the words.", "input": "cat dog sun",
                                 "max_new_tokens": 30});
    let (_, free) = http(&srv.addr, "POST", "/v1/generate", t, &ask.to_string());
    let free = json(&free)["output"].as_str().unwrap().to_string();
    // A stop taken from the middle of the unstopped answer: two ASCII letters, so it is whole
    // text at every step.
    let chars: Vec<char> = free.chars().collect();
    let at = (2..chars.len().saturating_sub(1))
        .find(|&i| chars[i].is_ascii_alphabetic() && chars[i + 1].is_ascii_alphabetic())
        .unwrap_or_else(|| panic!("no two letters in the answer {free:?}"));
    let stop: String = chars[at..at + 2].iter().collect();
    let expected = free[..free.find(&stop).unwrap()].trim().to_string();

    let mut stopped = ask.clone();
    stopped["stop"] = serde_json::json!([stop, "never-said"]);
    let (st, body) = http(&srv.addr, "POST", "/v1/generate", t, &stopped.to_string());
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["output"], expected.as_str(), "stop {stop:?} in {free:?}");
    assert_eq!(v["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 30);

    stopped["stream"] = true.into();
    let (_, body) = http(&srv.addr, "POST", "/v1/generate", t, &stopped.to_string());
    let data = sse_data(&body);
    let pieces: String = data[..data.len() - 2]
        .iter()
        .map(|d| json(d)["delta"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pieces, expected, "the stream never shows the stop");
    assert_eq!(json(&data[data.len() - 2]), v);
}
