//! `POST /v1/completions`, OpenAI's plain text completion: the prompt goes to the model as it
//! is (no template; the tokenizer's bos in front) and the answer is the continuation as it is,
//! whitespace included, as base-model clients and evaluation harnesses expect.

use super::api::{parse, ApiError, Completion, OpenAiFields, Prompt};
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

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

pub fn completion_prompt(body: &[u8]) -> Result<Prompt, ApiError> {
    let b: CompletionBody = parse(body)?;
    let text = match b.prompt {
        PromptField::One(t) => t,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(v) => {
            return Err(ApiError::bad(format!(
                "prompt: one prompt per request, got {} (send them as separate requests; \
                 they are decoded together)",
                v.len()
            )))
        }
    };
    if text.is_empty() {
        return Err(ApiError::bad("prompt must not be empty"));
    }
    if b.echo == Some(true) {
        return Err(ApiError::bad("echo: true is not supported"));
    }
    b.openai.prompt(text, None, DEFAULT_MAX_TOKENS, true)
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

    pub fn answer(&self, c: &Completion) -> Value {
        let mut v = self.object(json!([{"index": 0, "text": c.text, "logprobs": null,
                                         "finish_reason": c.finish_reason()}]));
        v["usage"] = c.usage();
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

    #[test]
    fn the_prompt_is_sent_as_it_is_and_bad_requests_say_why() {
        let p =
            completion_prompt(br#"{"model": "m", "prompt": "Once upon", "stop": "\n"}"#).unwrap();
        assert_eq!(p.text, "Once upon");
        assert!(p.raw && !p.stream);
        assert_eq!(p.options.max_new_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(p.stop, ["\n"]);
        let p =
            completion_prompt(br#"{"prompt": ["a b"], "max_tokens": 3, "stream": true}"#).unwrap();
        assert_eq!(
            (p.text.as_str(), p.options.max_new_tokens, p.stream),
            ("a b", 3, true)
        );
        let e = |b: &str| completion_prompt(b.as_bytes()).unwrap_err().message;
        assert!(e(r#"{"prompt": ["a", "b"]}"#).contains("one prompt per request, got 2"));
        assert!(e(r#"{"prompt": ""}"#).contains("must not be empty"));
        assert!(e(r#"{"prompt": "x", "echo": true}"#).contains("echo"));
        assert!(e(r#"{"prompt": "x", "max_tokens": 0}"#).contains("max_tokens"));
        assert!(e(r#"{"max_tokens": 3}"#).contains("missing field `prompt`"));
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
        };
        let v = t.answer(&c);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], " there");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 3);
        assert_eq!(t.piece(" th")["choices"][0]["text"], " th");
        let end = t.end(&c, true);
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[1]["usage"]["completion_tokens"], 1);
    }
}
