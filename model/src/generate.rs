//! Incremental decoding with a KV cache: the prompt is run once, then one token per step, each
//! attending to the cached keys/values. Runs on detached weights, so no graph is built.
//! Greedy when temperature == 0, else temperature + nucleus (top-p) sampling driven by
//! `SplitMix64(seed)`, so a (model, prompt, options) triple always yields the same text.

use candle_core::{Device, Tensor, D};

use crate::attention::LayerCache;
use crate::error::{Error, Result};
use crate::init::SplitMix64;
use crate::llama::Llama;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax, lowest id on ties as torch.argmax).
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 = sample from the full distribution.
    pub top_p: f64,
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Returns the generated ids after `prompt_ids`, stopping before `eos_id` or after
/// `max_new_tokens`.
pub fn generate(
    model: &Llama,
    prompt_ids: &[u32],
    eos_id: Option<u32>,
    opts: &GenerateOptions,
) -> Result<Vec<u32>> {
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".into()));
    }
    // Written so that NaN fails both checks.
    let valid = opts.temperature >= 0.0 && opts.top_p > 0.0 && opts.top_p <= 1.0;
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "temperature {} must be >= 0 and top_p {} in (0, 1]",
            opts.temperature, opts.top_p
        )));
    }
    let net = model.inference_net();
    let mut caches = vec![LayerCache::default(); net.num_layers()];
    let mut rng = SplitMix64::new(opts.seed);
    let mut out = Vec::new();
    let mut input = prompt_ids.to_vec();
    while out.len() < opts.max_new_tokens {
        let ids = Tensor::from_vec(input.clone(), (1, input.len()), &Device::Cpu)?;
        let logits = net.forward(&ids, Some(&mut caches))?; // [1, t, vocab]
        let last = logits.narrow(1, input.len() - 1, 1)?.flatten_all()?;
        let next = if opts.temperature == 0.0 {
            argmax(&last.to_vec1::<f32>()?)
        } else {
            sample(&last, opts.temperature, opts.top_p, &mut rng)?
        };
        if Some(next) == eos_id {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    Ok(out)
}

/// Index of the largest value, the first on ties (NaN never wins).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// softmax(logits / temperature), keep the most probable tokens until their mass reaches top_p
/// (at least one, as transformers' TopPLogitsWarper), renormalize, draw one.
fn sample(logits: &Tensor, temperature: f64, top_p: f64, rng: &mut SplitMix64) -> Result<u32> {
    let scaled = (logits / temperature)?;
    let max = scaled.max_keepdim(D::Minus1)?;
    let probs = scaled.broadcast_sub(&max)?.exp()?;
    let probs: Vec<f64> = probs.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Descending probability, ascending id on ties: a total order, so sampling is reproducible.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for &i in &order {
        kept.push(i);
        mass += probs[i] / total;
        if mass >= top_p {
            break;
        }
    }
    let kept_mass: f64 = kept.iter().map(|&i| probs[i]).sum();
    let mut target = rng.next_f64() * kept_mass;
    for &i in &kept {
        target -= probs[i];
        if target < 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(*kept.last().expect("at least one token kept") as u32)
}
