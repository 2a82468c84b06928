//! ROUGE-L as Google's `rouge-score` package computes it with
//! `RougeScorer(["rougeL"], use_stemmer=False)`: the default tokenizer lowercases (Unicode, as
//! Python's `str.lower`), replaces every run of characters outside `[a-z0-9]` with a space and
//! splits on whitespace, so non-ASCII letters and digits are dropped (a Kelvin sign `K` lowercases
//! to an ASCII `k` and survives, as in Python). The score is the sentence-level LCS:
//! precision = LCS / |prediction|, recall = LCS / |reference|, F = 2PR / (P + R); all three are 0
//! when either side has no tokens.

/// One ROUGE-L score.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

/// `rouge_score.tokenize.tokenize(text, stemmer=None)`.
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut tokens = Vec::new();
    let mut cur = String::new();
    for c in lower.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            cur.push(c);
        } else if !cur.is_empty() {
            tokens.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    tokens
}

/// Length of the longest common subsequence of two token lists (O(|a|·|b|) time, O(|b|) memory).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// `RougeScorer(["rougeL"]).score(target=reference, prediction=prediction)["rougeL"]`.
pub fn rouge_l(reference: &str, prediction: &str) -> RougeScore {
    let r = tokenize(reference);
    let p = tokenize(prediction);
    if r.is_empty() || p.is_empty() {
        return RougeScore::default();
    }
    let lcs = lcs_len(&r, &p) as f64;
    let precision = lcs / p.len() as f64;
    let recall = lcs / r.len() as f64;
    let fmeasure = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    RougeScore {
        precision,
        recall,
        fmeasure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_drops_punctuation_and_non_ascii() {
        assert_eq!(
            tokenize("Hello, World! café 42"),
            vec!["hello", "world", "caf", "42"]
        );
        assert_eq!(tokenize("  "), Vec::<String>::new());
        assert_eq!(tokenize("\u{212A}elvin"), vec!["kelvin"]);
    }

    #[test]
    fn lcs_scores() {
        let s = rouge_l("the cat sat on the mat", "the cat on the mat");
        assert_eq!(s.precision, 1.0);
        assert!((s.recall - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(rouge_l("", "x"), RougeScore::default());
        assert_eq!(rouge_l("a b", "a b").fmeasure, 1.0);
    }
}
