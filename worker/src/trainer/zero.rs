//! ZeRO stages 1 and 2 (`zero_stage: 1 | 2`), as DeepSpeed's `zero_optimization.stage`.
//!
//! Stage 1 shards the optimizer state across the ranks. Each rank owns a contiguous run of
//! whole parameters (as torch's `ZeroRedundancyOptimizer` partitions them) and keeps AdamW's
//! moments — and under mixed precision the master weights' low halves — for those alone; after
//! the usual gradient all-reduce and clipping it updates only its own parameters, then every
//! rank broadcasts the parameters it updated to the others, in buckets ([`BUCKET_ELEMS`]) and
//! in the weights' dtype (under mixed precision bf16, which is all the others need).
//!
//! Nothing else changes: the gradient, its norm and each parameter's update are computed from
//! the same all-reduced sum with the same formula, only on one rank instead of all, and a
//! broadcast copies bits exactly. So a ZeRO-1 run equals the unsharded run at the same world size
//! bit for bit (the CLI test checks it), and checkpoints keep the unsharded format: at a save
//! the shards travel to rank 0, which writes one `optimizer.safetensors` as before, so a job can
//! resume at any world size, with or without ZeRO.
//!
//! Stage 2 shards the gradient sum as well: after each micro-batch every rank reduces its
//! gradients, one part at a time, into the rank that owns that part (`Collective::reduce`,
//! DeepSpeed's reduce-scatter by buckets), which adds them to a sum covering its own part only.
//! The clipping norm is the ranks' sums of squares of their parts, added in the all-reduce of
//! the step's totals. With two ranks and one micro-batch each element's sum is the same single
//! addition as in the all-reduce, so such a run equals stage 0 bit for bit without clipping;
//! with clipping the norm may differ in its last bits (f32 partial sums), and with accumulation
//! the micro-batches are summed in another order (the tests bound both). The traffic grows with the accumulation steps (one reduce per micro-batch) as in
//! DeepSpeed.
//!
//! Device memory per parameter (DeepSpeed's table, herd's mixed precision): 2 (bf16 weights) +
//! 2 (bf16 gradients) + 4 (the f32 gradient sum) + 10 / N (moments and low halves) = 18 without
//! sharding; stage 1 keeps 8 + 10 / N, stage 2 4 + 14 / N (plus one bucket of f32 gradients
//! in flight). A LLaMA-7B on 16 ranks needs about 121 GB for that state unsharded, 58 GB at
//! stage 1 and 34 GB at stage 2.

use std::ops::Range;

use super::objective::Fed;
use crate::collective::Collective;
use crate::Result;

/// Which rank owns which parameters (indices into `trainable()`): a pure function of the
/// parameter sizes and the world size, so every rank computes the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    /// Rank r owns parameters `parts[r]`; the parts are contiguous, in rank order, and cover
    /// every parameter (a part may be empty when there are fewer parameters than ranks).
    pub parts: Vec<Range<usize>>,
    /// Elements of each rank's part.
    pub elems: Vec<usize>,
}

impl Shard {
    pub fn new(sizes: &[usize], rank: usize, world: usize) -> Self {
        let parts = partition(sizes, world);
        let elems = parts
            .iter()
            .map(|p| sizes[p.clone()].iter().sum())
            .collect();
        Shard { rank, parts, elems }
    }

    /// This rank's parameters.
    pub fn owned(&self) -> Range<usize> {
        self.parts[self.rank].clone()
    }

    pub fn world(&self) -> usize {
        self.parts.len()
    }
}

/// Cuts parameters of `sizes` elements into `world` contiguous parts whose largest part is as
/// small as it can be (the linear-partition optimum: binary search on the capacity, greedy
/// packing). The parts come in rank order; once as many parameters are left as ranks without
/// a part, each gets one, so a rank is empty only when there are fewer parameters than ranks.
pub fn partition(sizes: &[usize], world: usize) -> Vec<Range<usize>> {
    assert!(world > 0, "a world has at least one rank");
    let n = sizes.len();
    // Fill each part up to `cap` (≥ the largest size); with `spread`, cut early to leave every
    // later rank a parameter.
    let greedy = |cap: usize, spread: bool| -> Vec<Range<usize>> {
        let mut parts = Vec::new();
        let (mut start, mut load) = (0, 0);
        for (i, &s) in sizes.iter().enumerate() {
            let ranks_left = world.saturating_sub(parts.len() + 1);
            if i > start && (load + s > cap || spread && n - i <= ranks_left) {
                parts.push(start..i);
                (start, load) = (i, 0);
            }
            load += s;
        }
        if start < n {
            parts.push(start..n);
        }
        parts
    };
    let total: usize = sizes.iter().sum();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let (mut lo, mut hi) = (largest.max(total.div_ceil(world)), total.max(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if greedy(mid, false).len() <= world {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut parts = greedy(lo.max(1), true);
    parts.resize(world, n..n);
    parts
}

/// ZeRO-2 reduces a part's gradients, and ZeRO-1 and 2 broadcast its updated weights, in
/// buckets of whole parameters of at most this many elements (a parameter larger than that is
/// a bucket of its own): 16 MB of f32 in flight instead of the whole part (DeepSpeed's
/// `reduce_bucket_size`, `allgather_bucket_size`).
pub const BUCKET_ELEMS: usize = 1 << 22;

/// Cuts the parameters `part` (whose sizes are `sizes[part]`) into consecutive buckets of
/// at most `cap` elements each, a parameter larger than `cap` alone in its bucket. Pure, so
/// every rank cuts alike; the buckets cover `part` in order.
pub fn buckets(sizes: &[usize], part: Range<usize>, cap: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut load) = (part.start, 0);
    for i in part.clone() {
        if i > start && load + sizes[i] > cap {
            out.push(start..i);
            (start, load) = (i, 0);
        }
        load += sizes[i];
    }
    if start < part.end {
        out.push(start..part.end);
    }
    out
}

/// Every rank's `mine` (rank r's holds `counts[r]` values), concatenated in rank order, on rank
/// 0; the other ranks get None. Each rank's part is broadcast in turn (only rank 0 keeps them),
/// so it costs one model-sized pass over the ring, at checkpoints only.
pub fn gather_to_first(
    c: &mut dyn Collective,
    mine: Vec<f32>,
    counts: &[usize],
) -> Result<Option<Vec<f32>>> {
    let rank = c.rank();
    let mut all = if rank == 0 {
        Vec::with_capacity(counts.iter().sum())
    } else {
        Vec::new()
    };
    let mut mine = Some(mine);
    for (root, &n) in counts.iter().enumerate() {
        let mut buf = if root == rank {
            mine.take().unwrap_or_default()
        } else {
            vec![0.0; n]
        };
        if buf.len() != n {
            return Err(crate::Error::Collective {
                backend: c.name(),
                reason: format!(
                    "rank {rank}: gathering {} values as rank {root}'s part of {n}",
                    buf.len()
                ),
            });
        }
        if root != 0 && n > 0 {
            c.broadcast(&mut buf, root)?;
        }
        if rank == 0 {
            all.extend_from_slice(&buf);
        }
    }
    Ok((rank == 0).then_some(all))
}

/// The step's agreement, in one small all-reduce: whether any rank was told to stop, and what
/// all ranks fed (`total_flos` and `num_input_tokens_seen` count it; f32 holds a sum exactly up
/// to 2^24 tokens per step, an estimate's precision beyond).
pub fn agree_step(c: &mut dyn Collective, stop: bool, fed: Fed) -> Result<(bool, Fed)> {
    if c.world_size() == 1 {
        return Ok((stop, fed));
    }
    let mut v = [
        stop as u8 as f32,
        fed.tokens as f32,
        fed.input_tokens as f32,
    ];
    c.all_reduce_sum(&mut v)?;
    let all = Fed {
        tokens: v[1].round() as usize,
        input_tokens: v[2].round() as usize,
    };
    Ok((v[0] > 0.0, all))
}

/// Whether any rank says yes (one tiny all-reduce): sharded ranks must agree on when to save,
/// since a save needs every rank's shard.
pub fn any_rank(c: &mut dyn Collective, yes: bool) -> Result<bool> {
    if c.world_size() == 1 {
        return Ok(yes);
    }
    let mut v = [yes as u8 as f32];
    c.all_reduce_sum(&mut v)?;
    Ok(v[0] > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_part_in_order_within_the_cap() {
        let sizes = [5, 3, 9, 1, 1, 4, 20, 2, 0, 6];
        for cap in [1, 4, 6, 10, 25, 100] {
            for part in [0..10, 2..7, 3..3, 6..7, 8..10] {
                let b = buckets(&sizes, part.clone(), cap);
                let joined: Vec<usize> = b.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(
                    joined,
                    part.clone().collect::<Vec<_>>(),
                    "cap {cap} {part:?}"
                );
                for r in &b {
                    assert!(!r.is_empty(), "cap {cap}: {b:?}");
                    let load: usize = sizes[r.clone()].iter().sum();
                    assert!(load <= cap || r.len() == 1, "cap {cap}: {r:?} holds {load}");
                }
                // Greedy: no bucket could have taken the next one's first parameter.
                for w in b.windows(2) {
                    let load: usize = sizes[w[0].clone()].iter().sum();
                    assert!(load + sizes[w[1].start] > cap, "cap {cap}: {b:?}");
                }
            }
        }
        assert_eq!(
            buckets(&sizes, 0..10, 10),
            vec![0..2, 2..4, 4..6, 6..7, 7..10]
        );
    }

    fn loads(sizes: &[usize], parts: &[Range<usize>]) -> Vec<usize> {
        parts
            .iter()
            .map(|p| sizes[p.clone()].iter().sum())
            .collect()
    }

    /// The smallest largest part over every way to cut `sizes` into at most `world` runs.
    fn brute_force_best(sizes: &[usize], world: usize) -> usize {
        fn go(sizes: &[usize], world: usize) -> usize {
            if sizes.is_empty() {
                return 0;
            }
            if world == 1 {
                return sizes.iter().sum();
            }
            (1..=sizes.len())
                .map(|k| {
                    let head: usize = sizes[..k].iter().sum();
                    head.max(go(&sizes[k..], world - 1))
                })
                .min()
                .unwrap()
        }
        go(sizes, world)
    }

    #[test]
    fn parts_cover_every_parameter_in_order_and_the_largest_is_optimal() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..300 {
            let n = (next() % 9) as usize;
            let sizes: Vec<usize> = (0..n).map(|_| 1 + (next() % 50) as usize).collect();
            let world = 1 + (next() % 5) as usize;
            let parts = partition(&sizes, world);
            assert_eq!(parts.len(), world, "{sizes:?} over {world}");
            let mut at = 0;
            for p in &parts {
                assert_eq!(p.start, at, "{sizes:?} over {world}: {parts:?}");
                at = p.end;
            }
            assert_eq!(at, n, "{sizes:?} over {world}: {parts:?}");
            let largest = loads(&sizes, &parts).into_iter().max().unwrap_or(0);
            assert_eq!(
                largest,
                brute_force_best(&sizes, world),
                "{sizes:?} over {world}: {parts:?}"
            );
        }
    }

    #[test]
    fn a_llama_shaped_model_splits_evenly_enough_over_sixteen_ranks() {
        // LLaMA-7B's trainable tensors in checkpoint order: embeddings, 32 × (4 attention, 3
        // MLP, 2 norms), the final norm and the lm_head.
        let (h, i, v) = (4096usize, 11008usize, 32000usize);
        let mut sizes = vec![v * h];
        for _ in 0..32 {
            sizes.extend([h * h, h * h, h * h, h * h, i * h, i * h, h * i, h, h]);
        }
        sizes.extend([h, v * h]);
        let parts = partition(&sizes, 16);
        let l = loads(&sizes, &parts);
        let total: usize = sizes.iter().sum();
        let largest = *l.iter().max().unwrap();
        // Whole parameters cost at most one parameter over the even split.
        assert!(largest <= total / 16 + v * h, "{l:?}");
        assert!(l.iter().all(|&x| x > 0), "every rank owns something: {l:?}");
    }

    #[test]
    fn fewer_parameters_than_ranks_leaves_the_last_ranks_empty() {
        let parts = partition(&[5, 7], 4);
        assert_eq!(parts, vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(partition(&[], 3), vec![0..0, 0..0, 0..0]);
        let shard = Shard::new(&[5, 7], 1, 4);
        assert_eq!(shard.owned(), 1..2);
        assert_eq!(shard.elems, vec![5, 7, 0, 0]);
    }
}
