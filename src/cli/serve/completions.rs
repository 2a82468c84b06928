//! `POST /v1/completions`, OpenAI's plain text completion: the prompt goes to the model as it
//! is (no template; the tokenizer's bos in front, or token ids as sent) and the answer is the
//! continuation as it is, whitespace included, as base-model clients and evaluation harnesses
//! expect. `echo` puts the prompt in front of the answer and `logprobs` scores its tokens
//! (what lm-evaluation-harness's `local-completions` sends for log-likelihoods); several
//! prompts answer as one object with a choice each.

use super::api::{parse, usage, ApiError, Completion, OpenAiFields, Prompt, Shape};
use super::logprobs;
use serde::Deserialize;
use serde_json::{json, Value};

/// OpenAI's default `max_tokens` for text completions.
pub const DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Deserialize)]
struct CompletionBody {
    prompt: PromptField,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(flatten)]
    openai: OpenAiFields,
}

/// OpenAI's four prompt forms: a string, strings, token ids, lists of token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

/// Prompts one request may carry (each is decoded as its own request, all together).
pub const MAX_PROMPTS: usize = 64;

/// The request's prompts, each with the request's fields; several prompts answer as one
/// object with a choice per prompt, in order.
pub fn completion_prompts(body: &[u8]) -> Result<Vec<Prompt>, ApiError> {
    let b: CompletionBody = parse(body)?;
    let prompts: Vec<(String, Option<Vec<u32>>)> = match b.prompt {
        PromptField::One(t) => vec![(t, None)],
        PromptField::Many(v) => v.into_iter().map(|t| (t, None)).collect(),
        PromptField::Ids(ids) => vec![(String::new(), Some(ids))],
        PromptField::ManyIds(v) => v
            .into_iter()
            .map(|ids| (String::new(), Some(ids)))
            .collect(),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::bad(format!(
            "prompt: from 1 to {MAX_PROMPTS} prompts per request, got {}",
            prompts.len()
        )));
    }
    for (i, (text, ids)) in prompts.iter().enumerate() {
        let empty = ids.as_ref().map_or(text.is_empty(), Vec::is_empty);
        if empty {
            return Err(ApiError::bad(format!("prompt[{i}] must not be empty")));
        }
    }
    let echo = b.echo.unwrap_or(false);
    let logprobs = b.openai.text_logprobs()?;
    let shape = Shape {
        preferred_max: None,
        default_max: Some(DEFAULT_MAX_TOKENS),
        raw: true,
        zero_ok: echo,
        logprobs,
    };
    let first = b.openai.prompt(String::new(), shape)?;
    if first.stream && (echo || prompts.len() > 1) {
        return Err(ApiError::bad(
            "stream: a streamed answer takes one prompt and no echo; ask without `stream`",
        ));
    }
    Ok(prompts
        .into_iter()
        .map(|(text, ids)| Prompt {
            text,
            ids,
            echo,
            ..first.clone()
        })
        .collect())
}

/// The `text_completion` objects: the whole answer, or a stream's chunks (the pieces as
/// `choices[0].text`, then the finish reason, then with `include_usage` the usage).
pub struct TextChunks {
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl TextChunks {
    fn object(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One choice per answer, in order (`n` per prompt), and the usage of them all.
    pub fn answer(&self, cs: &[Completion], n: usize) -> Value {
        let choices: Vec<Value> = cs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"index": i, "text": c.text,
                       "logprobs": c.logprobs.as_deref().map(logprobs::text_completion),
                       "finish_reason": c.finish_reason()})
            })
            .collect();
        let mut v = self.object(Value::Array(choices));
        v["usage"] = usage(cs, n);
        v
    }

    pub fn piece(&self, text: &str) -> Value {
        self.object(json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": null}]))
    }

    pub fn end(&self, c: &Completion, include_usage: bool) -> Vec<Value> {
        let mut out = vec![
            self.object(json!([{"index": 0, "text": "", "logprobs": null,
                                               "finish_reason": c.finish_reason()}])),
        ];
        if include_usage {
            let mut last = self.object(json!([]));
            last["usage"] = c.usage();
            out.push(last);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(body: &str) -> Prompt {
        let mut v = completion_prompts(body.as_bytes()).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    #[test]
    fn the_prompt_is_sent_as_it_is_and_bad_requests_say_why() {
        let p = one(r#"{"model": "m", "prompt": "Once upon", "stop": "\n"}"#);
        assert_eq!(p.text, "Once upon");
        assert!(p.raw && !p.stream && !p.echo && p.ids.is_none());
        assert_eq!(p.options.max_new_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(p.options.logprobs, None);
        assert_eq!(p.stop, ["\n"]);
        let p = one(r#"{"prompt": ["a b"], "max_tokens": 3, "stream": true}"#);
        assert_eq!(
            (p.text.as_str(), p.options.max_new_tokens, p.stream),
            ("a b", 3, true)
        );
        let e = |b: &str| completion_prompts(b.as_bytes()).unwrap_err().message;
        assert!(e(r#"{"prompt": []}"#).contains("from 1 to 64 prompts per request, got 0"));
        assert!(e(r#"{"prompt": ""}"#).contains("prompt[0] must not be empty"));
        assert!(e(r#"{"prompt": [[1, 2], []]}"#).contains("prompt[1] must not be empty"));
        assert!(e(r#"{"prompt": "x", "max_tokens": 0}"#).contains("max_tokens"));
        assert!(e(r#"{"max_tokens": 3}"#).contains("missing field `prompt`"));
        assert!(e(r#"{"prompt": "x", "logprobs": 21}"#).contains("from 0 to 20"));
        assert!(e(r#"{"prompt": "x", "logprobs": true}"#).contains("an integer"));
        assert!(e(r#"{"prompt": "x", "logprobs": 1, "stream": true}"#).contains("streamed"));
        assert!(e(r#"{"prompt": ["x", "y"], "stream": true}"#).contains("one prompt"));
        assert!(e(r#"{"prompt": "x", "echo": true, "stream": true}"#).contains("no echo"));
    }

    #[test]
    fn several_prompts_token_ids_echo_and_logprobs_as_lm_eval_sends_them() {
        // lm-evaluation-harness's loglikelihood request: token ids, echo, one logprob, one token.
        let v = completion_prompts(
            br#"{"model": "m", "prompt": [[1, 5, 9], [1, 7]], "temperature": 0,
                 "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}"#,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].ids.as_deref(), Some(&[1u32, 5, 9][..]));
        assert_eq!(v[1].ids.as_deref(), Some(&[1u32, 7][..]));
        assert!(v.iter().all(|p| p.echo && p.options.logprobs == Some(1)));
        assert_eq!(v[1].options.seed, 1234);
        // Scoring only: max_tokens 0 is allowed with echo.
        let p = one(r#"{"prompt": "a b", "max_tokens": 0, "echo": true, "logprobs": 0}"#);
        assert_eq!((p.options.max_new_tokens, p.options.logprobs), (0, Some(0)));
        let v = completion_prompts(br#"{"prompt": ["a", "b", "c"]}"#).unwrap();
        let texts: Vec<&str> = v.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["a", "b", "c"]);
    }

    #[test]
    fn answers_and_chunks_have_the_openai_shape() {
        let t = TextChunks {
            id: "cmpl-1".into(),
            model: "demo".into(),
            created: 5,
        };
        let c = Completion {
            text: " there".into(),
            prompt_tokens: 2,
            completion_tokens: 1,
            hit_limit: true,
            logprobs: None,
        };
        let v = t.answer(std::slice::from_ref(&c), 1);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], " there");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 3);
        assert_eq!(t.piece(" th")["choices"][0]["text"], " th");
        let end = t.end(&c, true);
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[1]["usage"]["completion_tokens"], 1);
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        let scored = Completion {
            text: "a b".into(),
            completion_tokens: 0,
            logprobs: Some(vec![logprobs::Scored {
                text: "a b".into(),
                logprob: None,
                top: vec![],
            }]),
            ..c.clone()
        };
        let v = t.answer(&[c, scored], 1);
        assert_eq!(v["choices"][1]["index"], 1);
        assert_eq!(v["choices"][1]["logprobs"]["token_logprobs"], json!([null]));
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(v["usage"]["completion_tokens"], 1);
    }
}
