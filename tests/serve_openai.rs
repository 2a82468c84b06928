//! `herd serve`'s OpenAI routes as OpenAI clients and lm-evaluation-harness meet them: the real
//! binary on loopback over raw HTTP. Chat and text completions have OpenAI's shapes, streamed or
//! whole; bad requests get a 400 naming the field; `echo` + `logprobs` score prompts with the
//! model's own numbers; `n` choices equal their seeds' answers alone.

mod common;
use common::serve::*;
use common::*;

#[test]
fn chat_completions_have_the_openai_shape_and_bad_requests_name_the_field() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &[]);
    let t = Some(srv.token.as_str());
    let body = r#"{"model": "x", "messages": [{"role": "user", "content": "How many words are there? cat dog"}], "max_tokens": 6, "seed": 1, "temperature": 0.8}"#;
    let (st, out) = http(&srv.addr, "POST", "/v1/chat/completions", t, body);
    assert_eq!(st, 200, "{out}");
    let v = json(&out);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&n) || v["choices"][0]["finish_reason"] == "stop");
    // Sampling is seeded: the same request gives the same answer.
    let (_, again) = http(&srv.addr, "POST", "/v1/chat/completions", t, body);
    assert_eq!(
        json(&again)["choices"][0]["message"],
        v["choices"][0]["message"]
    );

    let bad = |path: &str, body: &str| {
        let (st, out) = http(&srv.addr, "POST", path, t, body);
        assert_eq!(st, 400, "{out}");
        json(&out)["error"]["message"].as_str().unwrap().to_string()
    };
    assert!(bad("/v1/generate", r#"{"instruction": "x", "top_p": 2}"#).contains("top_p"));
    assert!(bad("/v1/generate", r#"{"instrction": "x"}"#).contains("unknown field `instrction`"));
    assert!(bad(
        "/v1/chat/completions",
        r#"{"messages": [{"role": "assistant", "content": "x"}]}"#
    )
    .contains("messages[0]"));
    // The demo model's context is 256 tokens.
    let long = "word ".repeat(300);
    let e = bad(
        "/v1/generate",
        &serde_json::json!({"instruction": long}).to_string(),
    );
    assert!(e.contains("context of 256 tokens"), "{e}");
    let (st, _) = http(&srv.addr, "GET", "/v1/nothing", t, "");
    assert_eq!(st, 404);
    // The model by name (the SDK's models.retrieve); a wrong method gets an OpenAI error body.
    let (st, out) = http(&srv.addr, "GET", "/v1/models/model", t, "");
    assert_eq!(st, 200, "{out}");
    assert!(json(&out)["created"].as_u64().unwrap() > 0, "{out}");
    let (st, out) = http(&srv.addr, "GET", "/v1/models/gpt-4", t, "");
    assert_eq!(st, 404, "{out}");
    assert_eq!(json(&out)["error"]["code"], "not_found");
    let (st, out) = http(&srv.addr, "GET", "/v1/chat/completions", t, "");
    assert_eq!(st, 405, "{out}");
    let e = &json(&out)["error"];
    assert!(
        e["message"].is_string() && e.get("param").is_some(),
        "{out}"
    );

    // What herd cannot do is refused, not silently skipped; asking for nothing is fine.
    let chat = |extra: serde_json::Value| {
        let mut b = serde_json::json!({"messages": [{"role": "user", "content": "cat dog"}],
                                       "max_tokens": 4, "temperature": 0});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        http(&srv.addr, "POST", "/v1/chat/completions", t, &b.to_string())
    };
    for (extra, names) in [
        (
            serde_json::json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            serde_json::json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            serde_json::json!({"presence_penalty": 0.5}),
            "presence_penalty",
        ),
        (serde_json::json!({"logit_bias": {"5": 10}}), "logit_bias"),
    ] {
        let (st, out) = chat(extra);
        assert_eq!(st, 400, "{out}");
        assert!(
            json(&out)["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(names),
            "{out}"
        );
    }
    for extra in [
        serde_json::json!({"presence_penalty": 0, "frequency_penalty": 0, "user": "u"}),
        serde_json::json!({"tools": [], "response_format": {"type": "text"}}),
    ] {
        let (st, out) = chat(extra);
        assert_eq!(st, 200, "{out}");
    }
    // Content as a list of text parts (joined by newlines, as vLLM does), and the `developer`
    // role, as current SDKs send them.
    let (_, plain) = chat(serde_json::json!({}));
    let (st, parts) = chat(serde_json::json!({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "cat"}, {"type": "text", "text": "dog"}]}]}));
    assert_eq!(st, 200, "{parts}");
    let (_, system) = chat(serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "cat\ndog"}]}));
    assert_eq!(json(&parts)["choices"], json(&system)["choices"]);
    assert_eq!(json(&plain)["object"], "chat.completion");

    // OpenAI's defaults: temperature 1 with a fresh seed per request, so two samples differ;
    // without max_tokens the answer may run to the end of the context.
    let sample = serde_json::json!({"messages": [{"role": "user", "content": "cat dog"}],
                                    "max_tokens": 8});
    let ask = || {
        let (_, out) = http(
            &srv.addr,
            "POST",
            "/v1/chat/completions",
            t,
            &sample.to_string(),
        );
        json(&out)["choices"][0]["message"]["content"].clone()
    };
    assert_ne!(ask(), ask(), "two unseeded samples gave one answer");
    let (st, out) = http(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        t,
        r#"{"messages": [{"role": "user", "content": "cat dog"}], "temperature": 0}"#,
    );
    assert_eq!(st, 200, "{out}");
    let v = json(&out);
    let used = v["usage"]["prompt_tokens"].as_u64().unwrap()
        + v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        v["choices"][0]["finish_reason"] == "stop" || used == 256,
        "{v}"
    );
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() > 128
            || v["choices"][0]["finish_reason"] == "stop",
        "{v}"
    );
    drop(srv);

    // --default-max-tokens caps an answer that asked for no length; a served name with a
    // slash (as vLLM users write them) is found by models.retrieve.
    let srv = start_server(
        ws.path(),
        &[
            "--default-max-tokens",
            "20",
            "--served-model-name",
            "org/tiny-llama",
        ],
    );
    let t = Some(srv.token.as_str());
    let (st, out) = http(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        t,
        r#"{"messages": [{"role": "user", "content": "cat dog"}], "temperature": 0}"#,
    );
    assert_eq!(st, 200, "{out}");
    let v = json(&out);
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() <= 20,
        "{v}"
    );
    assert_eq!(v["model"], "org/tiny-llama");
    let (st, out) = http(&srv.addr, "GET", "/v1/models/org/tiny-llama", t, "");
    assert_eq!(st, 200, "{out}");
    assert_eq!(json(&out)["id"], "org/tiny-llama");
}

#[test]
fn text_completions_continue_the_prompt_as_it_is() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &[]);
    let t = Some(srv.token.as_str());
    let ask =
        serde_json::json!({"model": "x", "prompt": "cat dog", "max_tokens": 12, "temperature": 0});
    let (st, body) = http(&srv.addr, "POST", "/v1/completions", t, &ask.to_string());
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "text_completion");
    // No template: bos, `cat`, `▁dog`.
    assert_eq!(v["usage"]["prompt_tokens"], 3, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let mut streamed = ask.clone();
    streamed["stream"] = true.into();
    let (_, body) = http(
        &srv.addr,
        "POST",
        "/v1/completions",
        t,
        &streamed.to_string(),
    );
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|d| json(d)).collect();
    let joined: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text, "the pieces join to the untrimmed text");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    // Several prompts: one choice each, in order, each what it gets alone.
    let many = serde_json::json!({"prompt": ["sun", "cat dog", "red"], "max_tokens": 12, "temperature": 0});
    let (st, body) = http(&srv.addr, "POST", "/v1/completions", t, &many.to_string());
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["choices"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][1]["text"], text.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 36);
    let (st, body) = http(
        &srv.addr,
        "POST",
        "/v1/completions",
        t,
        r#"{"prompt": ["a", "b"], "stream": true}"#,
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("one prompt"), "{body}");
}

/// What lm-evaluation-harness's `local-completions` sends: token-id prompts with `echo` and
/// `logprobs`. The numbers are the model's own (scoring the sequence in this process with
/// `herd_model::logprob`, which the parity tests check against transformers), for decoded
/// tokens and echoed ones alike; greedy tokens are their own top alternative; the token texts
/// join to the answer; chat reports the same in its shape.
#[test]
fn echo_and_logprobs_score_prompts_as_lm_eval_asks() {
    let ws = Workspace::new(8);
    let srv = start_server(ws.path(), &[]);
    let t = Some(srv.token.as_str());
    let post = |path: &str, body: serde_json::Value| {
        let (st, b) = http(&srv.addr, "POST", path, t, &body.to_string());
        assert_eq!(st, 200, "{b}");
        json(&b)
    };
    let dir = ws.path().join("demo/model");
    let model = herd_model::Llama::load(&dir).unwrap();
    let tok = herd_model::Tokenizer::from_dir(&dir).unwrap();
    let prompt = tok.encode("cat dog").unwrap();
    let opts = herd_model::generate::GenerateOptions {
        max_new_tokens: 4,
        ..Default::default()
    };
    let answer =
        herd_model::generate::generate(&model, &prompt, tok.eos_id().as_slice(), &opts).unwrap();
    assert_eq!(
        answer.len(),
        4,
        "the untrained demo model runs to the length"
    );
    let whole: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    let want = herd_model::logprob::prompt_logprobs(&model, &whole, 2).unwrap();
    let close = |got: &serde_json::Value, want: f32, what: &str| {
        let g = got.as_f64().unwrap_or_else(|| panic!("{what}: {got}"));
        assert!((g - want as f64).abs() < 1e-4, "{what}: {g} vs {want}");
    };

    // Decoding: each new token's log-probability and its top 2.
    let v = post(
        "/v1/completions",
        serde_json::json!({"prompt": "cat dog", "max_tokens": 4, "logprobs": 2, "temperature": 0}),
    );
    let lp = &v["choices"][0]["logprobs"];
    let decoded = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(decoded.len(), 4, "{v}");
    for (i, got) in decoded.iter().enumerate() {
        close(got, want[prompt.len() - 1 + i].logprob, "decoded token");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        close(
            &best.into(),
            want[prompt.len() - 1 + i].logprob,
            "greedy is the top token",
        );
    }
    let pieces: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(pieces.concat(), v["choices"][0]["text"].as_str().unwrap());

    // Scoring only: echo with max_tokens 0 gives the prompt and its tokens' values.
    let echo = post(
        "/v1/completions",
        serde_json::json!({"prompt": "cat dog", "max_tokens": 0, "echo": true, "logprobs": 0}),
    );
    let c = &echo["choices"][0];
    assert_eq!(c["text"], "cat dog");
    let got = c["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), prompt.len());
    assert_eq!(
        got[0],
        serde_json::Value::Null,
        "nothing comes before the first token"
    );
    for i in 1..prompt.len() {
        close(&got[i], want[i - 1].logprob, "echoed prompt token");
    }
    assert_eq!(echo["usage"]["completion_tokens"], 0);

    // lm-eval's loglikelihood request: token ids, echo, one logprob, one more token, batched.
    let scored = post(
        "/v1/completions",
        serde_json::json!({"model": "m", "prompt": [whole.clone(), prompt.clone()],
                           "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                           "echo": true}),
    );
    let got = scored["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(
        got.len(),
        whole.len() + 1,
        "every prompt token and the new one"
    );
    for i in 1..whole.len() {
        close(&got[i], want[i - 1].logprob, "echoed token");
    }
    let short = scored["choices"][1]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(short.len(), prompt.len() + 1);
    close(
        &short[prompt.len()],
        want[prompt.len() - 1].logprob,
        "the next token",
    );

    // n: sampled choices, each the answer its own seed gives alone.
    let ask = |n: usize, seed: u64| {
        serde_json::json!({"messages": [{"role": "user", "content": "cat dog"}], "n": n,
                           "seed": seed, "temperature": 1.0, "max_tokens": 6})
    };
    let three = post("/v1/chat/completions", ask(3, 40));
    let texts: Vec<&str> = (0..3)
        .map(|i| three["choices"][i]["message"]["content"].as_str().unwrap())
        .collect();
    for (i, text) in texts.iter().enumerate() {
        let alone = post("/v1/chat/completions", ask(1, 40 + i as u64));
        assert_eq!(
            alone["choices"][0]["message"]["content"], *text,
            "choice {i}"
        );
        assert_eq!(three["choices"][i]["index"], i);
    }
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "sampled: {texts:?}"
    );
    let one = post("/v1/chat/completions", ask(1, 40));
    assert_eq!(
        three["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );

    // Chat: logprobs true with top_logprobs, in chat's shape.
    let chat = post(
        "/v1/chat/completions",
        serde_json::json!({"messages": [{"role": "user", "content": "cat dog"}],
                           "max_tokens": 3, "logprobs": true, "top_logprobs": 2,
                           "temperature": 0}),
    );
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!content.is_empty() && content.len() <= 3, "{chat}");
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(
        content[0]["top_logprobs"][0]["logprob"],
        content[0]["logprob"]
    );
    let bad = |body: serde_json::Value, says: &str| {
        let (st, b) = http(&srv.addr, "POST", "/v1/completions", t, &body.to_string());
        assert_eq!(st, 400, "{b}");
        assert!(b.contains(says), "{b}");
    };
    bad(
        serde_json::json!({"prompt": [1, 99999]}),
        "token 99999 (at 1) is outside",
    );
    bad(
        serde_json::json!({"prompt": "x", "logprobs": 50}),
        "from 0 to 20",
    );
}
