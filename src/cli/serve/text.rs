//! The text of an answer while it is decoded: where a stop sequence ends it, and which part of
//! it may be streamed yet (pure functions of the text decoded so far).

/// Where the answer ends: the start of the earliest stop sequence in `text`.
pub fn stop_at(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// The length of the longest end of `text` that could begin a stop sequence (a proper prefix
/// of one): those bytes may yet turn into the stop, so they are not streamed until decided.
fn could_begin_stop(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|stop| {
            (1..stop.len())
                .rev()
                .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        })
        .max()
        .unwrap_or(0)
}

/// How many of `tokens` have text that more tokens cannot change: all but a trailing run of
/// byte-fallback tokens (whose text depends on the bytes still to come: "f" alone, but two
/// U+FFFD when an invalid byte follows). The text of that many tokens is a prefix of every
/// later text.
pub fn settled(tokens: &[u32], is_byte: impl Fn(u32) -> bool) -> usize {
    tokens.len() - tokens.iter().rev().take_while(|&&t| is_byte(t)).count()
}

/// Hands out a growing answer's text in pieces whose concatenation is the finished answer's
/// trimmed text: whitespace at the start is dropped, and held back until more text follows it
/// or the answer ends are whitespace at the end, an unfinished character (U+FFFD: its bytes
/// are not all decoded yet), and an end that could begin a stop sequence.
///
/// A raw stream (`/v1/completions`) trims nothing: its pieces join to the text as it is, and
/// only unfinished characters and possible stops are held back.
#[derive(Debug, Default)]
pub struct TextStream {
    sent: String,
    stops: Vec<String>,
    raw: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>, raw: bool) -> Self {
        TextStream {
            sent: String::new(),
            stops,
            raw,
        }
    }

    /// The new piece, given the text of the [`settled`] tokens so far, or once the answer has
    /// ended (`done`) its whole text, already cut at a stop sequence.
    pub fn piece(&mut self, text: &str, done: bool) -> String {
        let text = if self.raw { text } else { text.trim_start() };
        let ready = if done {
            if self.raw {
                text
            } else {
                text.trim_end()
            }
        } else {
            let t = &text[..text.len() - could_begin_stop(text, &self.stops)];
            let raw = self.raw;
            t.trim_end_matches(|c: char| c == '\u{FFFD}' || (!raw && c.is_whitespace()))
        };
        // The text of more tokens extends the text of fewer with herd's decoders; were it ever
        // not so, nothing more is sent rather than a piece that contradicts the ones before.
        match ready.strip_prefix(self.sent.as_str()) {
            Some(rest) if !rest.is_empty() => {
                self.sent.push_str(rest);
                rest.to_string()
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeding the texts of a growing answer token by token, the pieces join to its trimmed
    /// text, and no piece is ever taken back.
    #[test]
    fn streamed_pieces_join_to_the_trimmed_answer() {
        let growing = [
            " ",
            " The",
            " The cat",
            " The cat ",
            " The cat \u{FFFD}",
            " The cat é",
            " The cat é\n",
            " The cat é\n sat",
            " The cat é\n sat  ",
        ];
        let mut s = TextStream::default();
        let pieces: Vec<String> = growing
            .iter()
            .enumerate()
            .map(|(i, t)| s.piece(t, i + 1 == growing.len()))
            .collect();
        assert_eq!(pieces.concat(), growing.last().unwrap().trim());
        assert_eq!(pieces[0], "", "leading whitespace is dropped");
        assert_eq!(pieces[3], "", "trailing whitespace waits");
        assert_eq!(pieces[4], "", "an unfinished character waits");
        assert_eq!(pieces[5], " é");
        assert_eq!(pieces[8], "", "the end drops trailing whitespace");
        let mut s = TextStream::default();
        assert_eq!(s.piece("abc", false), "abc");
        assert_eq!(
            s.piece("abd", false),
            "",
            "a contradicting text sends nothing"
        );
        assert_eq!(s.piece("abcd", true), "d");
    }

    #[test]
    fn the_answer_ends_before_the_earliest_stop() {
        let stops = vec!["USER:".to_string(), "\n\n".to_string()];
        assert_eq!(stop_at("fine.\n\nUSER: hi", &stops), Some(5));
        assert_eq!(stop_at("fine. USER: hi\n\n", &stops), Some(6));
        assert_eq!(stop_at("fine", &stops), None);
        assert_eq!(stop_at("fine", &[]), None);
    }

    /// What could still become a stop sequence is not streamed; once it cannot, it is.
    #[test]
    fn text_that_may_begin_a_stop_waits() {
        let stops = vec!["USER:".to_string(), "é!".to_string()];
        let mut s = TextStream::new(stops.clone(), false);
        assert_eq!(s.piece("Yes US", false), "Yes");
        assert_eq!(s.piece("Yes USA", false), " USA", "not a stop after all");
        assert_eq!(s.piece("Yes USA é", false), "", "é may begin é!");
        // The caller cut the text at the stop it found, and the answer ended there.
        let text = "Yes USA é USER: more";
        let cut = &text[..stop_at(text, &stops).unwrap()];
        assert_eq!(s.piece(cut, true), " é");
        assert_eq!(could_begin_stop("abcUSE", &stops), 3);
        assert_eq!(could_begin_stop("abc", &stops), 0);
        assert_eq!(could_begin_stop("xé", &stops), "é".len());
    }

    #[test]
    fn a_trailing_run_of_byte_tokens_is_not_settled() {
        let is_byte = |t: u32| t >= 100;
        assert_eq!(settled(&[1, 2, 100, 101], is_byte), 2);
        assert_eq!(settled(&[1, 100, 2], is_byte), 3);
        assert_eq!(settled(&[100], is_byte), 0);
        assert_eq!(settled(&[], is_byte), 0);
    }

    #[test]
    fn a_raw_stream_keeps_the_whitespace() {
        let mut s = TextStream::new(vec![], true);
        assert_eq!(s.piece(" a", false), " a");
        assert_eq!(s.piece(" a \u{FFFD}", false), " ");
        assert_eq!(s.piece(" a é\n", true), "é\n");
    }
}
