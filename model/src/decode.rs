//! Continuous batching: sequences join a running batch and leave it between decoding steps, so a
//! short request never waits for a long one to finish (what a server needs; [`generate_batch`]
//! decodes a fixed set together, which suits a data file).
//!
//! The batch holds one KV cache per layer, [b, kv_heads, T, head_dim], row r's real keys in
//! its last columns and `pad_r` masked columns before them. The prompts that join at one step
//! run together as one left-padded prefill (as [`generate_batch`] runs them), then their caches
//! are left-padded to the batch's width (or the batch's to theirs) and stacked on. Keys carry
//! RoPE of their own positions, so a column's place in the cache does not matter; a step feeds
//! every row its last token at its own position with a mask hiding its pad columns. A finished
//! row leaves at once, and the pad columns every remaining row has are cut off.
//!
//! Each row gives the answer it gets alone: its keys are the same, and masked columns weigh
//! exactly 0 in the softmax (tests/decode.rs checks staggered joins against [`generate`]).
//!
//! [`generate`]: crate::generate::generate
//! [`generate_batch`]: crate::generate::generate_batch

use candle_core::{Device, Tensor, D};

use crate::attention::LayerCache;
use crate::error::{Error, Result};
use crate::generate::{check_options, choose, host_f32, left_padded, GenerateOptions};
use crate::init::SplitMix64;
use crate::logprob::{of_row, TokenLogprob};
use crate::net::Net;
use crate::Llama;

/// The caller's handle on a sequence in the batch.
pub type SeqId = u64;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced the end-of-sequence token (which is not emitted).
    Eos,
    /// `max_new_tokens` were produced.
    Length,
}

/// What one sequence produced in a call: a new token, its end, or both (the last token).
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub seq: SeqId,
    pub token: Option<u32>,
    pub finish: Option<Finish>,
    /// With `GenerateOptions::logprobs`: the chosen token's log-probability under the raw
    /// logits (also for the end-of-sequence token, which is not emitted) and the alternatives.
    pub logprob: Option<TokenLogprob>,
}

struct Row {
    seq: SeqId,
    opts: GenerateOptions,
    rng: SplitMix64,
    /// Masked cache columns before this row's keys.
    pad: usize,
    /// The position of `last`, the token the next step feeds.
    position: usize,
    last: u32,
    produced: usize,
}

pub struct DecodeBatch {
    net: Net,
    device: Device,
    /// The eos ids: a row stops before any of them.
    stop: Vec<u32>,
    rows: Vec<Row>,
    /// Per layer, [rows, kv_heads, width, head_dim]; empty when no row is in.
    caches: Vec<LayerCache>,
    next_seq: SeqId,
}

impl DecodeBatch {
    pub fn new(model: &Llama, stop: &[u32]) -> Self {
        let net = model.inference_net();
        let caches = vec![LayerCache::default(); net.num_layers()];
        DecodeBatch {
            net,
            device: model.device(),
            stop: stop.to_vec(),
            rows: Vec::new(),
            caches,
            next_seq: 0,
        }
    }

    /// Sequences still decoding.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Cache columns every row spans (its pads plus its tokens).
    pub fn width(&self) -> usize {
        self.caches.first().map_or(0, LayerCache::len)
    }

    /// Run `prompt` and choose its first token. The sequence joins the batch unless that token
    /// already ended it (EOS, or `max_new_tokens` of 1; with 0 it ends at once, unrun).
    pub fn admit(&mut self, prompt: &[u32], opts: GenerateOptions) -> Result<Emitted> {
        let mut out = self.admit_all(&[(prompt, opts)])?;
        out.pop()
            .ok_or_else(|| Error::InvalidArgument("admit_all answered no request".into()))
    }

    /// [`admit`](Self::admit) for several prompts in one left-padded prefill (as
    /// `generate_batch` runs them); one `Emitted` per request, in order.
    pub fn admit_all(&mut self, requests: &[(&[u32], GenerateOptions)]) -> Result<Vec<Emitted>> {
        for (prompt, opts) in requests {
            if prompt.is_empty() {
                return Err(Error::InvalidArgument("empty prompt".into()));
            }
            check_options(opts)?;
        }
        let mut out = Vec::with_capacity(requests.len());
        let mut rows = Vec::new();
        let mut prompts = Vec::new();
        for (prompt, opts) in requests {
            let seq = self.next_seq;
            self.next_seq += 1;
            out.push(Emitted {
                seq,
                token: None,
                finish: Some(Finish::Length),
                logprob: None,
            });
            if opts.max_new_tokens > 0 {
                prompts.push(prompt.to_vec());
                rows.push((out.len() - 1, seq, opts.clone()));
            }
        }
        if rows.is_empty() {
            return Ok(out);
        }
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let (ids, positions, mask) = left_padded(&prompts, &self.device)?;
        let mut own = vec![LayerCache::default(); self.net.num_layers()];
        let logits = self.net.forward_decode(&ids, &positions, mask, &mut own)?; // [k, width, vocab]
        let last = host_f32(&logits.narrow(1, width - 1, 1)?.squeeze(1)?)?; // [k, vocab]
        let mut joining = Vec::with_capacity(rows.len());
        let mut keep = Vec::with_capacity(rows.len());
        for (j, (at, seq, opts)) in rows.into_iter().enumerate() {
            let mut row = Row {
                seq,
                rng: SplitMix64::new(opts.seed),
                opts,
                pad: width - prompts[j].len(),
                position: prompts[j].len(),
                last: 0,
                produced: 0,
            };
            out[at] = self.advance(&mut row, &last.get(j)?)?;
            keep.push(out[at].finish.is_none());
            if out[at].finish.is_none() {
                joining.push(row);
            }
        }
        if !joining.is_empty() {
            select_rows(&mut own, &keep, &self.device)?;
            self.join(joining, own)?;
        }
        Ok(out)
    }

    /// One token for every sequence in the batch; the finished ones leave it.
    pub fn step(&mut self) -> Result<Vec<Emitted>> {
        if self.rows.is_empty() {
            return Ok(vec![]);
        }
        let b = self.rows.len();
        let total = self.width() + 1;
        let device = self.device.clone();
        let input = Tensor::from_vec(
            self.rows.iter().map(|r| r.last).collect::<Vec<_>>(),
            (b, 1),
            &device,
        )?;
        let positions: Vec<u32> = self.rows.iter().map(|r| r.position as u32).collect();
        let mask: Vec<f32> = self
            .rows
            .iter()
            .flat_map(|r| (0..total).map(move |j| if j < r.pad { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, total), &device)?;
        let logits = self
            .net
            .forward_decode(&input, &positions, mask, &mut self.caches)?; // [b, 1, vocab]
        let last = host_f32(&logits.squeeze(1)?)?; // [b, vocab]
        let mut rows = std::mem::take(&mut self.rows);
        let mut out = Vec::with_capacity(b);
        for (r, row) in rows.iter_mut().enumerate() {
            out.push(self.advance(row, &last.get(r)?)?);
        }
        self.rows = rows;
        let keep: Vec<bool> = out.iter().map(|e| e.finish.is_none()).collect();
        self.retain(&keep)?;
        Ok(out)
    }

    /// Drop a sequence (its client went away); false if it is not in the batch.
    pub fn cancel(&mut self, seq: SeqId) -> Result<bool> {
        let keep: Vec<bool> = self.rows.iter().map(|r| r.seq != seq).collect();
        if keep.iter().all(|&k| k) {
            return Ok(false);
        }
        self.retain(&keep)?;
        Ok(true)
    }

    /// Choose `row`'s next token from its logits [vocab] and count it.
    fn advance(&self, row: &mut Row, logits: &Tensor) -> Result<Emitted> {
        let token = choose(logits, &row.opts, &mut row.rng)?;
        let logprob = match row.opts.logprobs {
            Some(top) => Some(of_row(&logits.to_vec1::<f32>()?, token, top)?),
            None => None,
        };
        if self.stop.contains(&token) {
            return Ok(Emitted {
                seq: row.seq,
                token: None,
                finish: Some(Finish::Eos),
                logprob,
            });
        }
        if row.produced > 0 {
            row.position += 1;
        }
        row.produced += 1;
        row.last = token;
        let finish = (row.produced >= row.opts.max_new_tokens).then_some(Finish::Length);
        Ok(Emitted {
            seq: row.seq,
            token: Some(token),
            finish,
            logprob,
        })
    }

    /// Stack prefilled rows' own caches [k, kv, t, d] (their pads already counted) onto the
    /// batch's, left-padding whichever is narrower.
    fn join(&mut self, mut rows: Vec<Row>, own: Vec<LayerCache>) -> Result<()> {
        let (width, t) = (self.width(), own.first().map_or(0, LayerCache::len));
        if self.rows.is_empty() {
            self.caches = own;
        } else {
            let (old, new) = (t.saturating_sub(width), width.saturating_sub(t));
            self.rows.iter_mut().for_each(|r| r.pad += old);
            rows.iter_mut().for_each(|r| r.pad += new);
            for (batch, mine) in self.caches.iter_mut().zip(own) {
                let (Some((bk, bv)), Some((mk, mv))) = (batch.kv.take(), mine.kv) else {
                    return Err(Error::InvalidArgument("a layer cache is empty".into()));
                };
                let k = Tensor::cat(&[&left_pad(&bk, t)?, &left_pad(&mk, width)?], 0)?;
                let v = Tensor::cat(&[&left_pad(&bv, t)?, &left_pad(&mv, width)?], 0)?;
                batch.kv = Some((k, v));
            }
        }
        self.rows.extend(rows);
        self.cut_common_pad()
    }

    /// Keep the rows marked true (in order), then cut the pad columns all of them have.
    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let mut flags = keep.iter();
        self.rows.retain(|_| *flags.next().unwrap_or(&false));
        if self.rows.is_empty() {
            self.caches = vec![LayerCache::default(); self.net.num_layers()];
            return Ok(());
        }
        select_rows(&mut self.caches, keep, &self.device)?;
        self.cut_common_pad()
    }

    /// Drop the leading cache columns that are pads of every row.
    fn cut_common_pad(&mut self) -> Result<()> {
        let cut = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
        if cut == 0 {
            return Ok(());
        }
        self.rows.iter_mut().for_each(|r| r.pad -= cut);
        for cache in &mut self.caches {
            if let Some((k, v)) = cache.kv.take() {
                let width = k.dim(2)?;
                let trim = |x: Tensor| -> Result<Tensor> {
                    Ok(x.narrow(2, cut, width - cut)?.contiguous()?)
                };
                cache.kv = Some((trim(k)?, trim(v)?));
            }
        }
        Ok(())
    }
}

/// Keep the cache rows marked true (dim 0, in order).
fn select_rows(caches: &mut [LayerCache], keep: &[bool], device: &Device) -> Result<()> {
    if keep.iter().all(|&k| k) {
        return Ok(());
    }
    let kept: Vec<u32> = (0..keep.len() as u32)
        .filter(|&i| keep[i as usize])
        .collect();
    let kept = Tensor::new(kept.as_slice(), device)?;
    for cache in caches {
        if let Some((k, v)) = cache.kv.take() {
            cache.kv = Some((k.index_select(&kept, 0)?, v.index_select(&kept, 0)?));
        }
    }
    Ok(())
}

/// x [b, kv, t, d] with columns of zeros in front up to `width` (masked by the caller).
fn left_pad(x: &Tensor, width: usize) -> Result<Tensor> {
    let t = x.dim(2)?;
    if t >= width {
        return Ok(x.clone());
    }
    let (b, kv, _, d) = x.dims4()?;
    let zeros = Tensor::zeros((b, kv, width - t, d), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&zeros, x], D::Minus2)?)
}
