//! Launch shapes of the kernels, as plain numbers: the CUDA path turns them into cudarc's
//! `LaunchConfig`, and the kernel tests hand the same shapes to the host emulator
//! (herd-kernels-emu), so the CUDA C runs in CI under the grid it gets on the GPU.

/// A 1-D launch: `blocks` blocks of `threads` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub blocks: u32,
    pub threads: u32,
}

/// Threads per block of the one-thread-per-element kernels (as cudarc's `for_num_elems`).
const ELEMS_THREADS: u32 = 1024;

/// One block per row; threads a power of two from 32 to 1024, so a multiple of 32 as the block
/// reductions in common.cuh assume. Rows shorter than the block leave threads idle.
pub fn rows(rows: usize, cols: usize) -> Grid {
    Grid {
        blocks: rows as u32,
        threads: cols.next_power_of_two().clamp(32, 1024) as u32,
    }
}

/// One thread per element; the last block's surplus threads return at once. Counted in 64
/// bits: a 7B model's flat AdamW state has more than 2³² elements (the grid's x limit, 2³¹ − 1
/// blocks, is far away).
pub fn elems(n: usize) -> Grid {
    Grid {
        blocks: (n as u64).div_ceil(ELEMS_THREADS as u64) as u32,
        threads: ELEMS_THREADS,
    }
}

/// Most blocks of a reduction to per-block partial sums: enough to fill an H100's 132 SMs
/// several times over, few enough that the partials are a trivial second pass.
const MAX_PARTIALS: u64 = 512;

/// A grid-stride reduction over `n` elements: full blocks, at most [`MAX_PARTIALS`] of them,
/// at least one (n = 0 gives one zero partial).
pub fn partials(n: usize) -> Grid {
    Grid {
        blocks: (n as u64)
            .div_ceil(ELEMS_THREADS as u64)
            .clamp(1, MAX_PARTIALS) as u32,
        threads: ELEMS_THREADS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_are_warp_multiples_within_the_block_limit() {
        assert_eq!(
            rows(7, 1),
            Grid {
                blocks: 7,
                threads: 32
            }
        );
        assert_eq!(
            rows(3, 300),
            Grid {
                blocks: 3,
                threads: 512
            }
        );
        assert_eq!(
            rows(2, 32000),
            Grid {
                blocks: 2,
                threads: 1024
            }
        );
    }

    #[test]
    fn element_grids_cover_every_element_once() {
        assert_eq!(
            elems(1),
            Grid {
                blocks: 1,
                threads: 1024
            }
        );
        assert_eq!(
            elems(1024),
            Grid {
                blocks: 1,
                threads: 1024
            }
        );
        assert_eq!(
            elems(1025),
            Grid {
                blocks: 2,
                threads: 1024
            }
        );
        // LLaMA-7B's parameter count: 2^32 elements would wrap to 0 in u32.
        let n = 6_738_415_616usize;
        assert_eq!(elems(n).blocks as u64, (n as u64).div_ceil(1024));
    }

    #[test]
    fn reductions_use_between_one_and_max_partials_blocks() {
        assert_eq!(partials(0).blocks, 1);
        assert_eq!(partials(3000).blocks, 3);
        assert_eq!(partials(6_738_415_616).blocks, 512);
    }
}
