//! `POST /v1/chat/completions`: OpenAI's chat request (`messages` of `{role, content}`, roles
//! `system` (first only), `user`, `assistant`, ending with a user message) rendered with the
//! Vicuna v1.1 template the chat recipe trains with, and the `chat.completion` answer and
//! `chat.completion.chunk`s of a stream (pure functions).

use super::api::{parse, usage, ApiError, Completion, OpenAiFields, Prompt, Shape};
use super::logprobs;
use herd_worker::data::chat::{render_text, Conversation, Message, Role};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    openai: OpenAiFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    content: Content,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

/// A message's content as OpenAI clients send it: a string, or a list of parts of which herd
/// reads the text ones (`{"type": "text", "text": ...}`; current SDKs and LangChain send this).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self, i: usize) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .enumerate()
                .map(|(j, p)| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(ApiError::bad(format!(
                        "messages[{i}].content[{j}]: a part of type `{kind}`; herd's models \
                         read text parts only (`{{\"type\": \"text\", \"text\": ...}}`)"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                // As vLLM joins a message's text parts.
                .map(|texts| texts.join("\n")),
        }
    }
}

/// `POST /v1/chat/completions`: the Vicuna v1.1 prompt of the conversation, ending in
/// `ASSISTANT:` for the model to go on.
pub fn chat_prompt(body: &[u8]) -> Result<Prompt, ApiError> {
    let b: ChatBody = parse(body)?;
    let mut conv = Conversation::default();
    for (i, m) in b.messages.iter().enumerate() {
        let content = m.content.text(i)?;
        let expected = if conv.messages.len() % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        // OpenAI's newer name for the system role is `developer`.
        let role = match m.role.as_str() {
            "system" | "developer" if i == 0 => {
                conv.system = Some(content);
                continue;
            }
            "system" | "developer" => {
                return Err(ApiError::bad(format!(
                    "messages[{i}]: a system message may only come first"
                )))
            }
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::bad(format!(
                    "messages[{i}]: role `{other}` is not one of system (or developer), user, \
                     assistant"
                )))
            }
        };
        if role != expected {
            return Err(ApiError::bad(format!(
                "messages[{i}]: expected a {} message (after the optional system message, \
                 user and assistant alternate, starting with user)",
                if expected == Role::User {
                    "user"
                } else {
                    "assistant"
                }
            )));
        }
        conv.messages.push(Message {
            role,
            value: content,
        });
    }
    if conv.messages.last().map(|m| m.role) != Some(Role::User) {
        return Err(ApiError::bad(
            "messages must end with a user message for the assistant to answer",
        ));
    }
    // FastChat's generation prompt: the open assistant turn renders as `ASSISTANT:`.
    conv.messages.push(Message {
        role: Role::Assistant,
        value: String::new(),
    });
    let logprobs = b.openai.chat_logprobs()?;
    b.openai.prompt(
        render_text(&conv),
        Shape {
            preferred_max: b.max_completion_tokens,
            // Without a limit the answer may fill the context, as OpenAI and vLLM let it.
            default_max: None,
            raw: false,
            zero_ok: false,
            logprobs,
        },
    )
}

/// A `chat.completion` object: one choice per answer, `n` answers per prompt.
pub fn chat_answer(cs: &[Completion], n: usize, id: &str, model: &str, created: u64) -> Value {
    let choices: Vec<Value> = cs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": c.logprobs.as_deref().map(logprobs::chat),
                "finish_reason": c.finish_reason(),
            })
        })
        .collect();
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(cs, n),
    })
}

/// The `chat.completion.chunk`s of a streamed chat answer (OpenAI's shape): the first says
/// the role, each piece of text is a `delta.content`, the last has the finish reason, and with
/// `include_usage` one more with empty `choices` carries the usage.
pub struct ChatChunks {
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl ChatChunks {
    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    pub fn role(&self) -> Value {
        self.chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                           "finish_reason": null}]),
        )
    }

    pub fn content(&self, piece: &str) -> Value {
        self.chunk(json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]))
    }

    pub fn end(&self, c: &Completion, include_usage: bool) -> Vec<Value> {
        let mut out = vec![
            self.chunk(json!([{"index": 0, "delta": {}, "finish_reason": c.finish_reason()}]))
        ];
        if include_usage {
            let mut last = self.chunk(json!([]));
            last["usage"] = c.usage();
            out.push(last);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::api::{expand, generate_prompt};
    use super::*;

    #[test]
    fn chat_renders_vicuna_with_an_open_assistant_turn() {
        let p = chat_prompt(
            br#"{"model": "any", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "count: a b"}], "max_tokens": 7}"#,
        )
        .unwrap();
        assert_eq!(
            p.text,
            format!(
                "{} USER: hi ASSISTANT: hello</s>USER: count: a b ASSISTANT:",
                herd_worker::data::chat::VICUNA_SYSTEM
            )
        );
        assert_eq!(p.options.max_new_tokens, 7);
        let p = chat_prompt(
            br#"{"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "q"}]}"#,
        )
        .unwrap();
        assert_eq!(p.text, "Be brief. USER: q ASSISTANT:");
    }

    #[test]
    fn bad_chat_requests_say_what_is_wrong() {
        let e = |b: &str| chat_prompt(b.as_bytes()).unwrap_err().message;
        assert!(e(r#"{"messages": []}"#).contains("must end with a user message"));
        assert!(
            e(r#"{"messages": [{"role": "assistant", "content": "x"}]}"#)
                .contains("messages[0]: expected a user message")
        );
        assert!(e(r#"{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}"#)
            .contains("messages[1]: a system message may only come first"));
        assert!(e(r#"{"messages": [{"role": "tool", "content": "x"}]}"#).contains("role `tool`"));
        assert!(e(r#"{"messages": [{"role": "user", "content": "x"}], "n": 17}"#).contains("n:"));
        assert!(e(r#"{"messages": [{"role": "user"}]}"#).contains("missing field `content`"));
    }

    #[test]
    fn chat_chunks_have_the_openai_shape() {
        let ch = ChatChunks {
            id: "chatcmpl-1".into(),
            model: "demo".into(),
            created: 5,
        };
        let v = ch.role();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(ch.content("hi")["choices"][0]["delta"]["content"], "hi");
        let c = Completion {
            text: "hi".into(),
            prompt_tokens: 3,
            completion_tokens: 1,
            hit_limit: true,
            logprobs: None,
        };
        let end = ch.end(&c, false);
        assert_eq!(end.len(), 1);
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[0]["choices"][0]["delta"], serde_json::json!({}));
        let end = ch.end(&c, true);
        assert_eq!(end[1]["choices"], serde_json::json!([]));
        assert_eq!(end[1]["usage"]["total_tokens"], 4);
    }

    #[test]
    fn stream_flags_are_read() {
        let p = chat_prompt(
            br#"{"messages": [{"role": "user", "content": "x"}], "stream": true,
                 "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        assert!(p.stream && p.include_usage);
        let p = chat_prompt(br#"{"messages": [{"role": "user", "content": "x"}]}"#).unwrap();
        assert!(!p.stream && !p.include_usage && p.stop.is_empty());
        let p =
            chat_prompt(br#"{"messages": [{"role": "user", "content": "x"}], "stop": "USER:"}"#)
                .unwrap();
        assert_eq!(p.stop, ["USER:"]);
        let p = generate_prompt(br#"{"instruction": "x", "stop": ["a", "b"]}"#).unwrap();
        assert_eq!(p.stop, ["a", "b"]);
        let e = |b: &str| generate_prompt(b.as_bytes()).unwrap_err().message;
        assert!(e(&format!(
            r#"{{"instruction": "x", "stop": {:?}}}"#,
            ["s"; 17]
        ))
        .contains("at most 16"));
        assert!(e(r#"{"instruction": "x", "stop": [""]}"#).contains("must not be empty"));
        assert!(
            generate_prompt(br#"{"instruction": "x", "stream": true}"#)
                .unwrap()
                .stream
        );
    }

    #[test]
    fn n_choices_are_copies_with_consecutive_seeds_and_the_prompt_counts_once() {
        let p = chat_prompt(
            br#"{"messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 7,
                 "temperature": 0.8}"#,
        )
        .unwrap();
        assert_eq!(p.choices, 3);
        let copies = expand(vec![p.clone(), Prompt { choices: 1, ..p }]);
        let seeds: Vec<u64> = copies.iter().map(|c| c.options.seed).collect();
        assert_eq!(seeds, [7, 8, 9, 7]);
        assert!(copies.iter().all(|c| c.choices == 1));
        let c = |prompt_tokens, completion_tokens| Completion {
            text: String::new(),
            prompt_tokens,
            completion_tokens,
            hit_limit: false,
            logprobs: None,
        };
        let u = usage(&[c(5, 1), c(5, 2), c(9, 3), c(9, 4)], 2);
        assert_eq!(u["prompt_tokens"], 14);
        assert_eq!(u["completion_tokens"], 10);
        let e = |b: &str| chat_prompt(b.as_bytes()).unwrap_err().message;
        let m = r#""messages": [{"role": "user", "content": "hi"}]"#;
        assert!(e(&format!("{{{m}, \"n\": 0}}")).contains("from 1 to 16"));
        assert!(e(&format!("{{{m}, \"n\": 2, \"stream\": true}}")).contains("one choice"));
        assert!(e(&format!("{{{m}, \"top_logprobs\": 2}}")).contains("needs logprobs: true"));
        assert!(e(&format!("{{{m}, \"logprobs\": 3}}")).contains("true or false"));
        let p = chat_prompt(format!("{{{m}, \"logprobs\": true}}").as_bytes()).unwrap();
        assert_eq!(p.options.logprobs, Some(0));
    }
}
