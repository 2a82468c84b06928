//! Log-probabilities in OpenAI's two shapes: the text completion's `{tokens, token_logprobs,
//! top_logprobs, text_offset}` (what lm-evaluation-harness's `local-completions` reads with
//! `echo` for log-likelihoods) and the chat completion's `{content: [{token, logprob, bytes,
//! top_logprobs}]}`. The numbers come from `herd_model::logprob`; this module only names the
//! tokens and lays them out (pure functions).

use herd_model::logprob::TokenLogprob;
use serde_json::{json, Map, Value};

/// Most alternatives a request may ask for per token (OpenAI allows 5 on text completions and
/// 20 on chat; herd allows 20 on both).
pub const MAX_TOP: usize = 20;

/// One token of an answer (or of an echoed prompt) with its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub text: String,
    /// None for a prompt's first token, which nothing comes before.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position and their log-probabilities, most likely first.
    pub top: Vec<(String, f32)>,
}

/// The text a token adds after `prev`: decoding the pair minus decoding `prev` alone, so that a
/// SentencePiece word start keeps its space (decoders strip the leading space of a whole text);
/// without `prev`, or where the pair's text does not extend prev's (byte-fallback pieces of one
/// character), the token decoded alone.
pub fn token_text(prev: Option<u32>, token: u32, decode: &impl Fn(&[u32]) -> String) -> String {
    if let Some(p) = prev {
        let before = decode(&[p]);
        if let Some(rest) = decode(&[p, token]).strip_prefix(&before) {
            return rest.to_string();
        }
    }
    decode(&[token])
}

/// The text each of `tokens` adds to their decoded text, so the pieces join to exactly
/// `decode(tokens)`: decoding ever longer prefixes and taking what each adds. A run of
/// byte-fallback tokens renders only as a whole (a byte that is no character alone turns the
/// run into U+FFFDs), so the run's text goes to its last token and the others get "".
pub fn texts(
    tokens: &[u32],
    decode: &impl Fn(&[u32]) -> String,
    is_byte: impl Fn(u32) -> bool,
) -> Vec<String> {
    let mut out = vec![String::new(); tokens.len()];
    let mut done = String::new();
    for (i, &t) in tokens.iter().enumerate() {
        if is_byte(t) && tokens.get(i + 1).is_some_and(|&next| is_byte(next)) {
            continue;
        }
        let full = decode(&tokens[..=i]);
        out[i] = match full.strip_prefix(&done) {
            Some(added) => added.to_string(),
            None => decode(&[t]),
        };
        done = full;
    }
    out
}

/// The scored tokens with their texts (from [`texts`]) and their alternatives named by
/// [`token_text`] after the token before them (`prev` before the first).
pub fn name(
    texts: Vec<String>,
    prev: Option<u32>,
    scores: &[TokenLogprob],
    decode: &impl Fn(&[u32]) -> String,
) -> Vec<Scored> {
    let mut prev = prev;
    texts
        .into_iter()
        .zip(scores)
        .map(|(text, s)| {
            let top = s
                .top
                .iter()
                .map(|&(t, lp)| (token_text(prev, t, decode), lp))
                .collect();
            prev = Some(s.token);
            Scored {
                text,
                logprob: Some(s.logprob),
                top,
            }
        })
        .collect()
}

/// The tokens whose text starts within the first `len` bytes of their joined text: what is
/// left of an answer cut at a stop sequence.
pub fn within(scored: Vec<Scored>, len: usize) -> Vec<Scored> {
    let mut at = 0;
    scored
        .into_iter()
        .take_while(|s| {
            let starts = at;
            at += s.text.len();
            starts < len || (starts == len && s.text.is_empty())
        })
        .collect()
}

/// The text completion's `logprobs` object; `text_offset` counts characters from the start of
/// the choice's text.
pub fn text_completion(scored: &[Scored]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::with_capacity(scored.len());
    for s in scored {
        offsets.push(offset);
        offset += s.text.chars().count();
    }
    json!({
        "tokens": scored.iter().map(|s| s.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": scored.iter().map(|s| s.logprob).collect::<Vec<_>>(),
        "top_logprobs": scored.iter().map(|s| s.logprob.map(|_| top_map(&s.top))).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// `{text: logprob}` of the alternatives; two tokens with the same text keep the more likely
/// (the first, as `top` is most likely first), so the map's largest value stays the top one.
fn top_map(top: &[(String, f32)]) -> Value {
    let mut m = Map::new();
    for (text, lp) in top {
        if !m.contains_key(text) {
            m.insert(text.clone(), json!(lp));
        }
    }
    Value::Object(m)
}

/// The chat completion's `logprobs` object.
pub fn chat(scored: &[Scored]) -> Value {
    let entry =
        |text: &str, lp: f32| json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    json!({
        "content": scored
            .iter()
            .map(|s| {
                let mut e = entry(&s.text, s.logprob.unwrap_or(0.0));
                e["top_logprobs"] = s.top.iter().map(|(t, lp)| entry(t, *lp)).collect();
                e
            })
            .collect::<Vec<_>>(),
        "refusal": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-like decoder: ids 1..=3 are "▁a", "b", "▁c"; the leading space of the
    /// whole text is stripped, as LLaMA's decoder does.
    fn decode(ids: &[u32]) -> String {
        let s: String = ids
            .iter()
            .map(|&i| match i {
                1 => " a",
                2 => "b",
                3 => " c",
                _ => "?",
            })
            .collect();
        s.strip_prefix(' ').map(str::to_string).unwrap_or(s)
    }

    fn lp(token: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
        TokenLogprob {
            token,
            logprob,
            top: top.to_vec(),
        }
    }

    #[test]
    fn tokens_keep_their_spaces_and_join_to_the_text() {
        assert_eq!(token_text(None, 1, &decode), "a");
        assert_eq!(token_text(Some(1), 3, &decode), " c");
        assert_eq!(token_text(Some(1), 2, &decode), "b");
        let scores = [
            lp(2, -0.5, &[(2, -0.5), (3, -1.0)]),
            lp(3, -2.0, &[(1, -0.1)]),
        ];
        let named = name(
            texts(&[2, 3], &decode, |_| false),
            Some(1),
            &scores,
            &decode,
        );
        let pieces: Vec<&str> = named.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(pieces, ["b", " c"]);
        assert_eq!(
            named[0].top,
            [("b".to_string(), -0.5), (" c".to_string(), -1.0)]
        );
        // The alternatives at the second position follow the first token ("b").
        assert_eq!(named[1].top, [(" a".to_string(), -0.1)]);
    }

    #[test]
    fn a_run_of_byte_tokens_gets_its_text_at_its_end_and_the_pieces_join() {
        // Ids 10.. are bytes; 0xE2 0x82 0xAC is "€", 0x3E is ">"; a run renders as a whole,
        // and a byte that is no character makes U+FFFD (as HF's ByteFallback).
        let byte = |t: u32| t >= 10;
        let decode = |ids: &[u32]| {
            let mut out = String::new();
            let mut run: Vec<u8> = vec![];
            let flush = |run: &mut Vec<u8>, out: &mut String| {
                match std::str::from_utf8(run) {
                    Ok(s) => out.push_str(s),
                    Err(_) => run.iter().for_each(|_| out.push('\u{FFFD}')),
                }
                run.clear();
            };
            for &i in ids {
                if byte(i) {
                    run.push([0xE2, 0x82, 0xAC, 0x3E, 0xFF][(i - 10) as usize]);
                } else {
                    flush(&mut run, &mut out);
                    out.push_str(["", " a", "b"][i as usize]);
                }
            }
            flush(&mut run, &mut out);
            out
        };
        for seq in [
            vec![1u32, 10, 11, 12, 2],
            vec![1, 13, 14, 2],
            vec![13],
            vec![2, 10, 11],
        ] {
            let pieces = texts(&seq, &decode, byte);
            assert_eq!(pieces.concat(), decode(&seq), "{seq:?}: {pieces:?}");
        }
        assert_eq!(
            texts(&[1, 10, 11, 12, 2], &decode, byte),
            [" a", "", "", "€", "b"]
        );
        // ">" then an invalid byte: both U+FFFD, not ">" and one U+FFFD.
        assert_eq!(texts(&[13, 14], &decode, byte), ["", "\u{FFFD}\u{FFFD}"]);
    }

    #[test]
    fn the_text_completion_shape_has_offsets_and_a_null_first_prompt_token() {
        let scored = vec![
            Scored {
                text: "héllo".into(),
                logprob: None,
                top: vec![],
            },
            Scored {
                text: " x".into(),
                logprob: Some(-1.5),
                top: vec![
                    (" x".into(), -1.5),
                    (" y".into(), -2.0),
                    (" x".into(), -3.0),
                ],
            },
        ];
        let v = text_completion(&scored);
        assert_eq!(v["tokens"], json!(["héllo", " x"]));
        assert_eq!(v["token_logprobs"], json!([null, -1.5]));
        assert_eq!(v["top_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][1], json!({" x": -1.5, " y": -2.0}));
        assert_eq!(v["text_offset"], json!([0, 5]), "characters, not bytes");
        let c = chat(&scored[1..]);
        assert_eq!(c["content"][0]["token"], " x");
        assert_eq!(c["content"][0]["bytes"], json!([32, 120]));
        assert_eq!(c["content"][0]["top_logprobs"][1]["logprob"], -2.0);
    }

    #[test]
    fn an_answer_cut_at_a_stop_keeps_the_tokens_that_start_before_the_cut() {
        let s = |t: &str| Scored {
            text: t.into(),
            logprob: Some(-1.0),
            top: vec![],
        };
        let all = vec![s("ab"), s("c\n"), s("de")];
        // "abc\nde" cut at "\n" (byte 3): "c\n" starts at 2, kept; "de" starts at 4, dropped.
        let kept: Vec<String> = within(all.clone(), 3).into_iter().map(|x| x.text).collect();
        assert_eq!(kept, ["ab", "c\n"]);
        assert!(within(all.clone(), 0).is_empty());
        assert_eq!(within(all, 100).len(), 3);
    }
}
