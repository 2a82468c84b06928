//! Log-probabilities of tokens, as OpenAI's `logprobs` reports them: log softmax of the model's
//! raw logits (no temperature, no top-p), the chosen token's value and the most likely
//! alternatives. Used for scoring a prompt (`echo`) and for each generated token.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::Llama;

/// One position's log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// log p(token | what came before).
    pub logprob: f32,
    /// The `top` most likely tokens, most likely first (the lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

/// log softmax(logits)[token] and the `top` largest entries of one row of f32 logits [vocab].
/// The log-sum-exp is taken in f64 from the row's maximum, so large logits do not overflow.
pub fn of_row(logits: &[f32], token: u32, top: usize) -> Result<TokenLogprob> {
    let Some(&chosen) = logits.get(token as usize) else {
        return Err(Error::InvalidArgument(format!(
            "token {token} is outside the vocabulary of {}",
            logits.len()
        )));
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    let lp = |x: f32| (x as f64 - log_z) as f32;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = top.min(order.len());
    let by_value = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_value);
    }
    order.truncate(k);
    order.sort_by(by_value);
    Ok(TokenLogprob {
        token,
        logprob: lp(chosen),
        top: order
            .into_iter()
            .map(|t| (t, lp(logits[t as usize])))
            .collect(),
    })
}

/// Every token of `ids` after the first, scored by the model given the tokens before it (one
/// forward pass without cache): entry i is token i + 1. What `echo` with `logprobs` reports for
/// a prompt, and what lm-evaluation-harness sums for a log-likelihood.
pub fn prompt_logprobs(model: &Llama, ids: &[u32], top: usize) -> Result<Vec<TokenLogprob>> {
    if ids.len() < 2 {
        return Ok(vec![]);
    }
    let input = Tensor::new(ids, &model.device())?.unsqueeze(0)?;
    let logits = model
        .forward(&input)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?; // [t, vocab]
    let rows = logits.to_vec2::<f32>()?;
    ids[1..]
        .iter()
        .zip(&rows)
        .map(|(&token, row)| of_row(row, token, top))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_gives_log_softmax_and_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let want = |x: f32| (x as f64 - z.ln()) as f32;
        let r = of_row(&logits, 2, 3).unwrap();
        assert_eq!(r.token, 2);
        assert!((r.logprob - want(2.0)).abs() < 1e-6);
        // Ties keep the lower id first; the 1.0 is left out.
        let ids: Vec<u32> = r.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!((r.top[0].1 - want(3.0)).abs() < 1e-6);
        // The probabilities of the whole row sum to one.
        let all = of_row(&logits, 0, 10).unwrap();
        assert_eq!(all.top.len(), 4);
        let mass: f64 = all.top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6);
        assert!(of_row(&logits, 0, 0).unwrap().top.is_empty());
    }

    #[test]
    fn large_logits_do_not_overflow_and_bad_tokens_are_refused() {
        let r = of_row(&[1000.0, 1000.0], 1, 1).unwrap();
        assert!((r.logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);
        let e = of_row(&[0.0; 4], 4, 1).unwrap_err().to_string();
        assert!(e.contains("token 4 is outside the vocabulary of 4"), "{e}");
    }
}
