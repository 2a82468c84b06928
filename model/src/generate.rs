//! Incremental decoding with a KV cache: the prompt is run once, then one token per step, each
//! attending to the cached keys/values. Runs on detached weights, so no graph is built.
//! Greedy when temperature == 0, else temperature + nucleus (top-p) sampling driven by
//! `SplitMix64(seed)`, so a (model, prompt, options) triple always yields the same text.

use candle_core::{DType, Device, Tensor, D};

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
    /// Report each chosen token's log-probability and this many most likely alternatives
    /// (`decode::DecodeBatch` only; `logprob`); None: no report.
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            logprobs: None,
        }
    }
}

/// Returns the generated ids after `prompt_ids`, stopping before any of `stop` (the eos ids) or
/// after `max_new_tokens`.
pub fn generate(
    model: &Llama,
    prompt_ids: &[u32],
    stop: &[u32],
    opts: &GenerateOptions,
) -> Result<Vec<u32>> {
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".into()));
    }
    check_options(opts)?;
    let net = model.inference_net();
    let mut caches = vec![LayerCache::default(); net.num_layers()];
    let mut rng = SplitMix64::new(opts.seed);
    let mut out = Vec::new();
    let mut input = prompt_ids.to_vec();
    let device = model.device();
    while out.len() < opts.max_new_tokens {
        let ids = Tensor::from_vec(input.clone(), (1, input.len()), &device)?;
        let logits = net.forward(&ids, Some(&mut caches))?; // [1, t, vocab]
        let last = host_f32(&logits.narrow(1, input.len() - 1, 1)?.flatten_all()?)?;
        let next = choose(&last, opts, &mut rng)?;
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    Ok(out)
}

pub(crate) fn check_options(opts: &GenerateOptions) -> Result<()> {
    // Written so that NaN fails both checks.
    let valid = opts.temperature >= 0.0 && opts.top_p > 0.0 && opts.top_p <= 1.0;
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "temperature {} must be >= 0 and top_p {} in (0, 1]",
            opts.temperature, opts.top_p
        )));
    }
    Ok(())
}

/// [`generate`] for several prompts at once, prompt i with `opts[i]` (its own seed): the same
/// answers as one call per prompt, in one forward per new token for the whole batch.
///
/// The prompts run as one left-padded prefill, then decode together in a
/// [`DecodeBatch`](crate::decode::DecodeBatch), which a row leaves as soon as it has stopped.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    stop: &[u32],
    opts: &[GenerateOptions],
) -> Result<Vec<Vec<u32>>> {
    if prompts.len() != opts.len() {
        return Err(Error::InvalidArgument(format!(
            "{} prompts but {} option sets",
            prompts.len(),
            opts.len()
        )));
    }
    let requests: Vec<(&[u32], GenerateOptions)> = prompts
        .iter()
        .zip(opts)
        .map(|(p, o)| (p.as_slice(), o.clone()))
        .collect();
    let mut batch = crate::decode::DecodeBatch::new(model, stop);
    let mut out: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    let mut row_of = std::collections::HashMap::new();
    for (i, e) in batch.admit_all(&requests)?.into_iter().enumerate() {
        row_of.insert(e.seq, i);
        out[i].extend(e.token);
    }
    while !batch.is_empty() {
        for e in batch.step()? {
            out[row_of[&e.seq]].extend(e.token);
        }
    }
    Ok(out)
}

/// The prefill of prompts left-padded to the longest (`width`): ids [b, width] (pads are id 0),
/// positions counted from each row's first real token (max(j - pad, 0)), and an additive causal
/// mask without pad keys [b, 1, width, width] (a pad query sees only itself, which keeps its
/// softmax finite; no real token reads it).
pub(crate) fn left_padded(
    prompts: &[Vec<u32>],
    device: &Device,
) -> Result<(Tensor, Vec<u32>, Tensor)> {
    let (b, width) = (
        prompts.len(),
        prompts.iter().map(Vec::len).max().unwrap_or(0),
    );
    let mut ids = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width * width);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
        positions.extend((0..width).map(|j| j.saturating_sub(pad) as u32));
        for i in 0..width {
            mask.extend((0..width).map(|j| {
                let visible = j <= i && (j >= pad || j == i);
                if visible {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, width), device)?,
        positions,
        Tensor::from_vec(mask, (b, 1, width, width), device)?,
    ))
}

/// Logits to choose from: f32 on the host, whatever the weights' dtype and device.
pub(crate) fn host_f32(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// The next token from one row's f32 logits [vocab]: greedy at temperature 0, else sampled.
pub(crate) fn choose(logits: &Tensor, opts: &GenerateOptions, rng: &mut SplitMix64) -> Result<u32> {
    if opts.temperature == 0.0 {
        Ok(argmax(&logits.to_vec1::<f32>()?))
    } else {
        sample(logits, opts.temperature, opts.top_p, rng)
    }
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
