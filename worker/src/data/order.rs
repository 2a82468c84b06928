//! The example order of an epoch: a Fisher–Yates shuffle driven by SplitMix64, a pure function of
//! (seed, epoch, n). Nothing about it is saved in checkpoints: resuming recomputes it.

use herd_model::init::SplitMix64;

/// The stream seed for (seed, epoch): two SplitMix64 outputs mixed, so nearby seeds and epochs give
/// unrelated streams.
fn stream_seed(seed: u64, epoch: u64) -> u64 {
    let a = SplitMix64::new(seed).next_u64();
    let b = SplitMix64::new(epoch ^ 0xA076_1D64_78BD_642F).next_u64();
    a ^ b.rotate_left(17)
}

/// Uniform in [0, n) by Lemire's multiply-shift on one 64-bit draw.
fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    ((rng.next_u64() as u128 * n as u128) >> 64) as u64
}

/// A permutation of `0..n`: the order in which epoch `epoch` visits the examples.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(stream_seed(seed, epoch));
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_a_permutation() {
        let a = epoch_permutation(42, 0, 1000);
        assert_eq!(a, epoch_permutation(42, 0, 1000));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, epoch_permutation(42, 1, 1000));
        assert_ne!(a, epoch_permutation(43, 0, 1000));
    }

    #[test]
    fn pinned_values() {
        // Pinned so that a change of the order (which would break resume) is noticed.
        let p = epoch_permutation(1, 0, 10);
        assert_eq!(p, PINNED.to_vec(), "{p:?}");
    }
    const PINNED: [usize; 10] = [0, 5, 6, 1, 2, 4, 8, 3, 7, 9];

    #[test]
    fn small_sizes() {
        assert!(epoch_permutation(1, 2, 0).is_empty());
        assert_eq!(epoch_permutation(1, 2, 1), vec![0]);
    }

    #[test]
    fn roughly_uniform_first_position() {
        let mut counts = [0usize; 4];
        for epoch in 0..4000 {
            counts[epoch_permutation(7, epoch, 4)[0]] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }
}
