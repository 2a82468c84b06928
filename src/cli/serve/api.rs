//! The HTTP API's requests and answers as plain data, and the checks that turn a request body
//! into a prompt and decoding options (pure functions; the server around them is thin): what
//! every route shares (`Prompt`, `Completion`, `ApiError`, the OpenAI fields, `n` and `usage`)
//! and `POST /v1/generate` (`{instruction, input?, max_new_tokens?, temperature?, top_p?,
//! seed?, stop?, stream?}`, the Alpaca prompt as `herd generate` builds it; answers `{output,
//! finish_reason, usage}`). The chat route is in `chat`, the text completion in `completions`.

use super::logprobs::{Scored, MAX_TOP};
use herd_model::generate::GenerateOptions;
use herd_worker::data::{source_text, AlpacaRecord};
use serde::Deserialize;
use serde_json::{json, Value};

/// Defaults when a request leaves a field out (as `herd generate`'s flags).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 128;

/// A request the server refuses, with the HTTP status and a message naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// OpenAI's error body.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            401 => "authentication_error",
            404 => "not_found_error",
            503 => "server_error",
            500 => "server_error",
            _ => "invalid_request_error",
        };
        let code = match self.status {
            401 => json!("invalid_api_key"),
            404 => json!("not_found"),
            _ => Value::Null,
        };
        json!({"error": {"message": self.message, "type": kind, "param": null, "code": code}})
    }
}

/// What the model thread decodes for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub text: String,
    pub options: GenerateOptions,
    /// The answer goes out in pieces as it is decoded (server-sent events).
    pub stream: bool,
    /// A streamed chat answer ends with a chunk carrying `usage` (OpenAI's
    /// `stream_options.include_usage`).
    pub include_usage: bool,
    /// The answer ends before the first of these strings (which is not part of it).
    pub stop: Vec<String>,
    /// The text is the model's continuation as it is (`/v1/completions`), not trimmed of
    /// whitespace at its ends as an instruction's answer is.
    pub raw: bool,
    /// The prompt as token ids, used as they are (no bos added; `text` is then unused).
    pub ids: Option<Vec<u32>>,
    /// The answer starts with the prompt (`echo`), and with `options.logprobs` so do its
    /// log-probabilities.
    pub echo: bool,
    /// Answers wanted (OpenAI's `n`): copy i decodes with seed + i, so sampled choices differ.
    pub choices: usize,
    /// No length was asked for: the answer may fill the context (`options.max_new_tokens` is
    /// set from the prompt's length when it is admitted).
    pub fill_context: bool,
}

/// Most choices (`n`) per prompt.
pub const MAX_CHOICES: usize = 16;

/// Each prompt as many times as it asks for choices, copy i with seed + i (OpenAI's order:
/// the choices of the first prompt, then of the next).
pub fn expand(prompts: Vec<Prompt>) -> Vec<Prompt> {
    prompts
        .into_iter()
        .flat_map(|p| {
            (0..p.choices).map(move |i| {
                let mut copy = p.clone();
                copy.options.seed = p.options.seed.wrapping_add(i as u64);
                copy.choices = 1;
                copy
            })
        })
        .collect()
}

/// OpenAI's usage of several answers: the prompt counted once per prompt (`n` choices share
/// it), every answer's tokens.
pub fn usage(cs: &[Completion], n: usize) -> Value {
    let prompt: usize = cs.iter().step_by(n.max(1)).map(|c| c.prompt_tokens).sum();
    let completion: usize = cs.iter().map(|c| c.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    instruction: String,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stop: Option<Stop>,
}

/// OpenAI's `stop`: one string or a list (up to [`MAX_STOPS`]).
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

fn stops(stop: Option<Stop>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad(format!(
            "stop: at most {MAX_STOPS} sequences, got {}",
            stops.len()
        )));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop: a stop sequence must not be empty"));
    }
    Ok(stops)
}

/// OpenAI allows 4; lm-evaluation-harness's `local-completions` passes a task's `until` list
/// whole (often more), and vLLM takes any number, so herd takes up to 16.
pub const MAX_STOPS: usize = 16;

/// The fields OpenAI's chat and text completions share. OpenAI clients also send `model`; one
/// model is served, so any name is accepted. Fields that only describe the caller (`user`,
/// `metadata`, ...) are ignored; those asking for a behaviour herd does not have (tools, JSON
/// output, penalties) are refused unless they ask for nothing, so no answer silently lacks it.
#[derive(Deserialize)]
pub(super) struct OpenAiFields {
    #[serde(default)]
    tools: Option<Vec<Value>>,
    /// The older form of `tools`.
    #[serde(default)]
    functions: Option<Vec<Value>>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    best_of: Option<usize>,
    #[serde(default)]
    suffix: Option<String>,
    /// An integer on text completions, a boolean on chat (with `top_logprobs`).
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Option<Stop>,
}

/// How a route reads the shared fields.
pub(super) struct Shape {
    /// The route's own length field (chat's `max_completion_tokens`), before `max_tokens`.
    pub preferred_max: Option<usize>,
    /// Without a length field: this many tokens, or `None` to fill the context.
    pub default_max: Option<usize>,
    /// As [`Prompt::raw`].
    pub raw: bool,
    /// `max_tokens: 0` is allowed (text completions with `echo`: scoring the prompt only).
    pub zero_ok: bool,
    /// Alternatives per token asked for, if log-probabilities are.
    pub logprobs: Option<usize>,
}

impl OpenAiFields {
    /// The prompt of `text` with these fields checked.
    pub(super) fn prompt(self, text: String, shape: Shape) -> Result<Prompt, ApiError> {
        self.refuse_what_herd_lacks()?;
        let choices = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&choices) {
            return Err(ApiError::bad(format!(
                "n: from 1 to {MAX_CHOICES} choices, got {choices}"
            )));
        }
        let stream = self.stream.unwrap_or(false);
        if stream && choices > 1 {
            return Err(ApiError::bad(
                "n: a streamed answer has one choice; ask without `stream`",
            ));
        }
        if stream && shape.logprobs.is_some() {
            return Err(ApiError::bad(
                "logprobs: not available on a streamed answer yet; ask without `stream`",
            ));
        }
        let asked = shape.preferred_max.or(self.max_tokens);
        let fill_context = asked.is_none() && shape.default_max.is_none();
        // Filling the context: the length is set once the prompt's is known (at least 1).
        let max = asked.or(shape.default_max).unwrap_or(1);
        // OpenAI's defaults: temperature 1, and a fresh seed for each request that gives none
        // (a client sampling many times must not get one answer again and again).
        let temperature = self.temperature.or(Some(1.0));
        let seed = Some(self.seed.unwrap_or_else(fresh_seed));
        let mut options = if max == 0 && shape.zero_ok {
            GenerateOptions {
                max_new_tokens: 0,
                ..options(Some(1), "max_tokens", temperature, self.top_p, seed)?
            }
        } else {
            options(Some(max), "max_tokens", temperature, self.top_p, seed)?
        };
        options.logprobs = shape.logprobs;
        Ok(Prompt {
            text,
            options,
            stream,
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            stop: stops(self.stop)?,
            raw: shape.raw,
            ids: None,
            echo: false,
            choices,
            fill_context,
        })
    }

    fn refuse_what_herd_lacks(&self) -> Result<(), ApiError> {
        let tool_choice_none = matches!(&self.tool_choice, Some(Value::String(s)) if s == "none");
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) && !tool_choice_none {
            return Err(ApiError::bad(
                "tools: herd serves the model as a plain chat model, without function calling; \
                 ask without `tools` (or with `tool_choice: \"none\"`)",
            ));
        }
        let function_call_none =
            matches!(&self.function_call, Some(Value::String(s)) if s == "none");
        if self.functions.as_ref().is_some_and(|f| !f.is_empty()) && !function_call_none {
            return Err(ApiError::bad(
                "functions: herd serves the model as a plain chat model, without function \
                 calling; ask without `functions`",
            ));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::bad(
                    "response_format: herd does not constrain the output to JSON; ask without \
                     it (or with {\"type\": \"text\"})",
                ));
            }
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad(format!(
                    "{name}: not implemented by herd; ask with 0 or without it"
                )));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::bad(
                "logit_bias: not implemented by herd; ask without it",
            ));
        }
        if self.best_of.is_some_and(|b| b > self.n.unwrap_or(1)) {
            return Err(ApiError::bad(
                "best_of: not implemented by herd (ask for `n` answers and rank them)",
            ));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad(
                "suffix: herd's models continue a prompt, they do not fill in; ask without it",
            ));
        }
        Ok(())
    }

    /// Text completions' `logprobs`: how many alternatives per token (0 is the chosen token's
    /// value alone), or null.
    pub(super) fn text_logprobs(&self) -> Result<Option<usize>, ApiError> {
        match &self.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n as usize <= MAX_TOP => Ok(Some(n as usize)),
                _ => Err(ApiError::bad(format!(
                    "logprobs: an integer from 0 to {MAX_TOP} (alternatives per token), got {v}"
                ))),
            },
        }
    }

    /// Chat's `logprobs: true` with `top_logprobs` alternatives per token.
    pub(super) fn chat_logprobs(&self) -> Result<Option<usize>, ApiError> {
        let on = match &self.logprobs {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::bad(format!(
                    "logprobs: true or false on chat completions, got {v}"
                )))
            }
        };
        match self.top_logprobs {
            Some(n) if n > MAX_TOP => Err(ApiError::bad(format!(
                "top_logprobs: at most {MAX_TOP}, got {n}"
            ))),
            Some(_) if !on => Err(ApiError::bad("top_logprobs needs logprobs: true")),
            n => Ok(on.then(|| n.unwrap_or(0))),
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

pub(super) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "the request body is not a JSON object"
            }
            _ => "the request body",
        };
        ApiError::bad(format!("{what}: {e}"))
    })
}

/// Decoding options from the request's fields, checked.
fn options(
    max_new_tokens: Option<usize>,
    max_name: &str,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
) -> Result<GenerateOptions, ApiError> {
    let max_new_tokens = max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    if max_new_tokens == 0 {
        return Err(ApiError::bad(format!("{max_name} must be at least 1")));
    }
    let temperature = temperature.unwrap_or(0.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad(format!(
            "temperature must be a number >= 0 (0 is greedy), got {temperature}"
        )));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    Ok(GenerateOptions {
        max_new_tokens,
        temperature,
        top_p,
        seed: seed.unwrap_or(0),
        logprobs: None,
    })
}

/// `POST /v1/generate`: the Alpaca prompt of the instruction (and input).
pub fn generate_prompt(body: &[u8]) -> Result<Prompt, ApiError> {
    let b: GenerateBody = parse(body)?;
    if b.instruction.trim().is_empty() {
        return Err(ApiError::bad("instruction must not be empty"));
    }
    let rec = AlpacaRecord {
        instruction: b.instruction,
        input: b.input,
        output: String::new(),
    };
    Ok(Prompt {
        text: source_text(&rec),
        options: options(
            b.max_new_tokens,
            "max_new_tokens",
            b.temperature,
            b.top_p,
            b.seed,
        )?,
        stream: b.stream.unwrap_or(false),
        include_usage: false,
        stop: stops(b.stop)?,
        raw: false,
        ids: None,
        echo: false,
        choices: 1,
        fill_context: false,
    })
}

/// A seed from the OS for a request that gives none (the clock if the OS has no randomness).
fn fresh_seed() -> u64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    }
}

/// What the model produced for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// It stopped at `max_new_tokens` rather than at the end-of-sequence token or a stop
    /// sequence.
    pub hit_limit: bool,
    /// The tokens of `text` and their log-probabilities, when the request asked for them.
    pub logprobs: Option<Vec<Scored>>,
}

impl Completion {
    pub(super) fn finish_reason(&self) -> &'static str {
        if self.hit_limit {
            "length"
        } else {
            "stop"
        }
    }

    pub(super) fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    pub fn generate_answer(&self) -> Value {
        json!({
            "output": self.text,
            "finish_reason": self.finish_reason(),
            "usage": self.usage(),
        })
    }
}

/// Refuse a prompt that, with the answer asked for, would not fit the model's context.
pub fn check_length(
    prompt_tokens: usize,
    max_new_tokens: usize,
    context: usize,
) -> Result<(), ApiError> {
    // Saturating: a max_new_tokens near 2^64 must not wrap around into "fits".
    if prompt_tokens.saturating_add(max_new_tokens) > context {
        return Err(ApiError::bad(format!(
            "the prompt is {prompt_tokens} tokens and {max_new_tokens} more were asked for, \
             over the model's context of {context} tokens (max_position_embeddings); \
             shorten the prompt or ask for fewer tokens"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::chat::chat_answer;
    use super::*;

    #[test]
    fn generate_uses_the_alpaca_prompt_and_defaults() {
        let p = generate_prompt(br#"{"instruction": "Add.", "input": "2 3"}"#).unwrap();
        assert_eq!(
            p.text,
            source_text(&AlpacaRecord {
                instruction: "Add.".into(),
                input: Some("2 3".into()),
                output: String::new(),
            })
        );
        assert_eq!(p.options, GenerateOptions::default());
        let p = generate_prompt(
            br#"{"instruction": "x", "max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3}"#,
        )
        .unwrap();
        assert_eq!(
            p.options,
            GenerateOptions {
                max_new_tokens: 5,
                temperature: 0.7,
                top_p: 0.9,
                seed: 3,
                logprobs: None,
            }
        );
    }

    #[test]
    fn bad_generate_requests_name_the_field() {
        let e = |b: &str| generate_prompt(b.as_bytes()).unwrap_err().message;
        assert!(e(r#"{"input": "x"}"#).contains("missing field `instruction`"));
        assert!(
            e(r#"{"instruction": "x", "temprature": 1}"#).contains("unknown field `temprature`")
        );
        assert!(e(r#"{"instruction": "  "}"#).contains("instruction must not be empty"));
        assert!(e(r#"{"instruction": "x", "top_p": 0}"#).contains("top_p must be in (0, 1]"));
        assert!(e(r#"{"instruction": "x", "temperature": -1}"#).contains("temperature"));
        assert!(e(r#"{"instruction": "x", "max_new_tokens": 0}"#).contains("max_new_tokens"));
        assert!(e(r#"{"instruction": 5}"#).contains("invalid type"));
        assert!(e("not json").contains("the request body"));
    }

    #[test]
    fn answers_have_the_openai_shape() {
        let c = Completion {
            text: "3".into(),
            prompt_tokens: 10,
            completion_tokens: 2,
            hit_limit: false,
            logprobs: None,
        };
        let v = chat_answer(std::slice::from_ref(&c), 1, "chatcmpl-1", "demo", 5);
        assert_eq!(v["choices"][0]["message"]["content"], "3");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 12);
        let v = Completion {
            hit_limit: true,
            ..c
        }
        .generate_answer();
        assert_eq!(v["finish_reason"], "length");
        assert_eq!(v["output"], "3");
    }

    #[test]
    fn a_prompt_over_the_context_is_refused() {
        assert!(check_length(100, 28, 128).is_ok());
        let e = check_length(100, 29, 128).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("context of 128 tokens"), "{}", e.message);
        let e = check_length(100, usize::MAX - 50, 128).unwrap_err();
        assert_eq!(e.status, 400);
    }
}
