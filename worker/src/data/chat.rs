//! ShareGPT / Vicuna conversations: records, FastChat's Vicuna v1.1 template byte for byte, and
//! tokenization with loss only on the assistant turns.
//!
//! Record: `{"id"?: ..., "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`;
//! `"user"`/`"assistant"` are accepted for `"human"`/`"gpt"`, and a `"system"` turn (first only)
//! replaces the default system prompt. After the optional system turn the turns must alternate
//! human, gpt, human, ... starting with human, with at least one gpt turn (a trailing human turn is
//! allowed; it is rendered and masked, as FastChat does). Extra keys are ignored.
//!
//! Template (FastChat `vicuna_v1.1`, `SeparatorStyle.ADD_COLON_TWO`, sep " ", sep2 "</s>"):
//! `SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>`; a message that is "" renders as
//! `ROLE:` with no separator (FastChat's `if message:`). `</s>` is the literal text, as in FastChat.
//!
//! Masking (what FastChat's train.py `preprocess` intends; it gets there by re-tokenizing turn by
//! turn with a hard-coded `-2` for the LLaMA tokenizer): the trained span of an assistant turn is
//! the text after `ASSISTANT:` up to and including its `</s>` — i.e. `" a1</s>"`, so the answer's
//! first token carries its leading space `▁`. We find token boundaries by tokenizing the rendered
//! text's prefixes: a span of characters `[s, e)` covers the token positions
//! `[len(tok(text[..s])), len(tok(text[..e])))` of `tok(text)` (bos included in both). This is
//! exact whenever the tokenization is stable at the span's ends (no token crosses `:`|` ` or
//! `</s>`, true for LLaMA's SentencePiece vocabulary and the demo tokenizer). Every other position —
//! bos, system prompt, user turns, the `ASSISTANT:` prefixes, empty answers — is -100.
//!
//! Truncation: `input_ids` and `labels` are the first `max_len` positions of the untruncated
//! example (= HF `truncation=True` for a post-processor that only prepends bos), so every token
//! kept has exactly the label it has untruncated. An assistant turn cut by `max_len` keeps its
//! labels for the tokens still present (like Alpaca's cut response; its `</s>` is gone).

use serde_json::Value;

use herd_model::Tokenizer;

use super::encode::{EncodeInfo, Example, IGNORE_INDEX};
use super::records::describe;
use super::{DataError, Location, Result};

pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
pub const VICUNA_USER: &str = "USER";
pub const VICUNA_ASSISTANT: &str = "ASSISTANT";
pub const VICUNA_SEP: &str = " ";
pub const VICUNA_SEP2: &str = "</s>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::User => VICUNA_USER,
            Role::Assistant => VICUNA_ASSISTANT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub value: String,
}

/// One conversation: alternating user/assistant messages starting with the user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conversation {
    pub id: Option<String>,
    /// From a leading `"system"` turn; `None` uses [`VICUNA_SYSTEM`].
    pub system: Option<String>,
    pub messages: Vec<Message>,
}

impl Conversation {
    /// A conversation from (question, answer) pairs with the default system prompt.
    pub fn from_pairs<S: AsRef<str>>(pairs: &[(S, S)]) -> Self {
        let mut messages = Vec::new();
        for (q, a) in pairs {
            messages.push(Message {
                role: Role::User,
                value: q.as_ref().to_string(),
            });
            messages.push(Message {
                role: Role::Assistant,
                value: a.as_ref().to_string(),
            });
        }
        Conversation {
            id: None,
            system: None,
            messages,
        }
    }
}

/// The rendered text and the byte spans `[s, e)` that are trained (one per non-empty answer).
pub fn render(conv: &Conversation) -> (String, Vec<(usize, usize)>) {
    let mut text = String::new();
    text.push_str(conv.system.as_deref().unwrap_or(VICUNA_SYSTEM));
    text.push_str(VICUNA_SEP);
    let mut spans = Vec::new();
    for (i, m) in conv.messages.iter().enumerate() {
        let role = m.role.name();
        if m.value.is_empty() {
            text.push_str(role);
            text.push(':');
            continue;
        }
        text.push_str(role);
        text.push(':');
        let start = text.len();
        text.push(' ');
        text.push_str(&m.value);
        text.push_str(if i % 2 == 0 { VICUNA_SEP } else { VICUNA_SEP2 });
        if m.role == Role::Assistant {
            spans.push((start, text.len()));
        }
    }
    (text, spans)
}

/// The rendered text only.
pub fn render_text(conv: &Conversation) -> String {
    render(conv).0
}

fn bad_turn(at: &Location, turn: usize, reason: String) -> DataError {
    DataError::BadTurn {
        at: at.clone(),
        turn,
        reason,
    }
}

/// Turn one parsed JSON value into a conversation, or say precisely what is wrong with it.
pub fn conversation_from_value(v: &Value, at: &Location) -> Result<Conversation> {
    let obj = v.as_object().ok_or_else(|| DataError::NotAChat {
        at: at.clone(),
        found: describe(Some(v)),
    })?;
    let turns = match obj.get("conversations") {
        Some(Value::Array(a)) => a,
        other => {
            return Err(DataError::BadField {
                at: at.clone(),
                field: "conversations",
                expected: "an array of {\"from\", \"value\"} turns",
                found: describe(other),
            })
        }
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let mut conv = Conversation {
        id,
        system: None,
        messages: Vec::new(),
    };
    for (i, t) in turns.iter().enumerate() {
        let n = i + 1;
        let t = t.as_object().ok_or_else(|| {
            bad_turn(
                at,
                n,
                format!(
                    "expected an object {{\"from\", \"value\"}}, found {}",
                    describe(Some(t))
                ),
            )
        })?;
        let from = match t.get("from") {
            Some(Value::String(s)) => s.as_str(),
            other => {
                return Err(bad_turn(
                    at,
                    n,
                    format!("\"from\" must be a string, found {}", describe(other)),
                ))
            }
        };
        let value = match t.get("value") {
            Some(Value::String(s)) => s.clone(),
            other => {
                return Err(bad_turn(
                    at,
                    n,
                    format!("\"value\" must be a string, found {}", describe(other)),
                ))
            }
        };
        let role = match from {
            "human" | "user" => Role::User,
            "gpt" | "assistant" => Role::Assistant,
            "system" if i == 0 => {
                conv.system = Some(value);
                continue;
            }
            "system" => return Err(bad_turn(at, n, "a \"system\" turn may only come first".into())),
            other => {
                return Err(bad_turn(at, n, format!("unknown role {other:?} (expected human/user, gpt/assistant or a leading system)")))
            }
        };
        let expected = if conv.messages.len().is_multiple_of(2) {
            Role::User
        } else {
            Role::Assistant
        };
        if role != expected {
            let (want, got) = match expected {
                Role::User => ("human", "gpt"),
                Role::Assistant => ("gpt", "human"),
            };
            return Err(bad_turn(at, n, format!("expected a {want} turn (turns alternate human, gpt, ... starting with human), found {got} ({from:?})")));
        }
        conv.messages.push(Message { role, value });
    }
    if conv.messages.len() < 2 {
        return Err(DataError::BadField {
            at: at.clone(),
            field: "conversations",
            expected: "at least one human turn followed by a gpt turn",
            found: format!("{} turn(s) without an answer", turns.len()),
        });
    }
    Ok(conv)
}

/// Tokenize a conversation with loss only on the assistant spans (see the module docs).
pub fn encode_conversation_with_info(
    tok: &Tokenizer,
    conv: &Conversation,
    max_len: usize,
) -> Result<(Example, EncodeInfo)> {
    if max_len == 0 {
        return Err(DataError::ZeroMaxLen);
    }
    let (text, spans) = render(conv);
    let ids = tok.encode(&text)?;
    let full_len = ids.len();
    let mut labels = vec![IGNORE_INDEX; full_len];
    for (s, e) in spans {
        let a = tok.encode(&text[..s])?.len().min(full_len);
        let b = tok.encode(&text[..e])?.len().min(full_len);
        for p in a..b {
            labels[p] = ids[p] as i64;
        }
    }
    let untrained = labels.iter().filter(|&&l| l == IGNORE_INDEX).count();
    let keep = full_len.min(max_len);
    let input_ids = ids[..keep].to_vec();
    labels.truncate(keep);
    let masked = labels.iter().filter(|&&l| l == IGNORE_INDEX).count();
    Ok((
        Example { input_ids, labels },
        EncodeInfo {
            full_len,
            source_len: untrained,
            masked,
        },
    ))
}

pub fn encode_conversation(
    tok: &Tokenizer,
    conv: &Conversation,
    max_len: usize,
) -> Result<Example> {
    Ok(encode_conversation_with_info(tok, conv, max_len)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn at() -> Location {
        Location {
            path: PathBuf::from("chat.jsonl"),
            record: 3,
            line: Some(4),
        }
    }

    fn tok() -> Tokenizer {
        let mut words: Vec<&str> = VICUNA_SYSTEM.split_whitespace().collect();
        words.extend(["USER:", "ASSISTANT:", "cat", "sun", "dog", "hi"]);
        let mut t = Tokenizer::demo(&words).unwrap();
        t.add_missing_special_tokens();
        t
    }

    #[test]
    fn template_byte_for_byte() {
        let c = Conversation::from_pairs(&[("Say hi.", "hi"), ("Say cat.", "cat sun")]);
        let (text, spans) = render(&c);
        // Hand-written from FastChat's get_prompt for vicuna_v1.1.
        let expected = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Say hi. ASSISTANT: hi</s>USER: Say cat. ASSISTANT: cat sun</s>";
        assert_eq!(text, expected);
        let trained: Vec<&str> = spans.iter().map(|&(s, e)| &text[s..e]).collect();
        assert_eq!(trained, vec![" hi</s>", " cat sun</s>"]);
        // A system turn replaces the default; an empty message renders "ROLE:" without separator.
        let mut c = Conversation::from_pairs(&[("q", "")]);
        c.system = Some("Be brief.".into());
        let (text, spans) = render(&c);
        assert_eq!(text, "Be brief. USER: q ASSISTANT:");
        assert!(spans.is_empty());
    }

    #[test]
    fn parses_roles_and_rejects_bad_orders() {
        let v: Value = serde_json::json!({"id": "x1", "conversations": [
            {"from": "system", "value": "S"}, {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"}]});
        let c = conversation_from_value(&v, &at()).unwrap();
        assert_eq!(c.id.as_deref(), Some("x1"));
        assert_eq!(c.system.as_deref(), Some("S"));
        assert_eq!(c.messages.len(), 4);
        assert_eq!(
            render_text(&c),
            "S USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>"
        );
        let cases = [
            (
                serde_json::json!({"conversations": [{"from": "gpt", "value": "a"}]}),
                "turn 1: expected a human turn",
            ),
            (
                serde_json::json!({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}),
                "turn 2: expected a gpt turn",
            ),
            (
                serde_json::json!({"conversations": []}),
                "\"conversations\" must be at least one human turn",
            ),
            (
                serde_json::json!({"conversations": [{"from": "human", "value": "q"}]}),
                "without an answer",
            ),
            (
                serde_json::json!({"conversations": [{"from": "human", "value": 5}]}),
                "turn 1: \"value\" must be a string, found a number (5)",
            ),
            (
                serde_json::json!({"conversations": [{"from": "bot", "value": "x"}]}),
                "unknown role \"bot\"",
            ),
            (
                serde_json::json!({"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]}),
                "may only come first",
            ),
            (
                serde_json::json!({"conversations": "hi"}),
                "\"conversations\" must be an array",
            ),
            (
                serde_json::json!([1]),
                "expected a JSON object with \"conversations\"",
            ),
        ];
        for (v, want) in cases {
            let e = conversation_from_value(&v, &at()).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("chat.jsonl: record 3 (line 4)"), "{msg}");
            assert!(msg.contains(want), "{msg} lacks {want}");
            assert!(e.location().is_some());
        }
    }

    /// Tokens of `ids`, for hand-checking.
    fn pieces(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect()
    }

    #[test]
    fn masks_only_assistant_turns_hand_checked() {
        let t = tok();
        let mut c = Conversation::from_pairs(&[("cat", "dog"), ("sun", "cat sun")]);
        c.system = Some("hi".into());
        let ex = encode_conversation(&t, &c, 512).unwrap();
        let p = pieces(&t, &ex.input_ids);
        // "hi USER: cat ASSISTANT: dog</s>USER: sun ASSISTANT: cat sun</s>"
        let s = "\u{2581}";
        let expected: Vec<String> = [
            "<s>",
            "▁hi",
            "▁USER:",
            "▁cat",
            "▁ASSISTANT:",
            "▁dog",
            "</s>",
            "▁USER:",
            "▁sun",
            "▁ASSISTANT:",
            "▁cat",
            "▁sun",
            "</s>",
        ]
        .iter()
        .map(|x| x.replace('▁', s))
        .collect();
        assert_eq!(p, expected);
        let trained: Vec<bool> = ex.labels.iter().map(|&l| l != IGNORE_INDEX).collect();
        let want = [
            false, false, false, false, false, true, true, false, false, false, true, true, true,
        ];
        assert_eq!(trained, want);
        for (l, &i) in ex.labels.iter().zip(&ex.input_ids) {
            assert!(*l == IGNORE_INDEX || *l == i as i64);
        }
        // The decoded trained spans are exactly the answers with their </s>.
        assert_eq!(t.decode(&ex.input_ids[5..7], false).unwrap(), "dog</s>");
    }

    #[test]
    fn truncation_keeps_each_tokens_label() {
        let t = tok();
        let c = Conversation::from_pairs(&[("cat", "dog sun cat"), ("sun", "cat sun")]);
        let (full, info) = encode_conversation_with_info(&t, &c, 100_000).unwrap();
        assert_eq!(info.full_len, full.len());
        assert_eq!(info.masked, info.source_len);
        for n in 1..=full.len() {
            let (ex, info) = encode_conversation_with_info(&t, &c, n).unwrap();
            assert_eq!(ex.input_ids, full.input_ids[..n]);
            assert_eq!(ex.labels, full.labels[..n], "cut at {n}");
            assert_eq!(info.truncated(n), n < full.len());
        }
        // A cut inside the first answer keeps the labels of its tokens present.
        let first = full.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
        let ex = encode_conversation(&t, &c, first + 2).unwrap();
        assert_eq!(ex.target_tokens(), 2);
        assert!(matches!(
            encode_conversation(&t, &c, 0),
            Err(DataError::ZeroMaxLen)
        ));
    }
}
