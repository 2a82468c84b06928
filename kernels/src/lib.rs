//! `herd-kernels`: fused training kernels as candle custom ops, each with its backward so
//! gradients flow through them (candle-nn's fused ops record none).
//!
//! | op | forward | backward |
//! | --- | --- | --- |
//! | [`add_rms_norm`] | h = x + r, y = RMSNorm(h)·w (no r: y alone, h is x) | dx = dr, dw |
//! | [`norm_linear_group`] | RMSNorm(x)·g·W_iᵀ for several W_i, the norm not held | dx, dg once per group (the norm recomputed), dW_i |
//! | [`linear_residual`] | h = x + a·Wᵀ, a·Wᵀ not held by the graph | dx = dh, da, dW |
//! | [`pullback`], [`pullback_one`] | a scalar root | a and b get g: the backward of sum((a + b)·g) without it |
//! | [`swiglu_linear_pullback`] | a scalar root | swiglu_linear's backward for dy = g, its output never held |
//! | [`rope`] | x·cos + rotate_half(x)·sin | the same map with −sin |
//! | [`swiglu`] | silu(g)·u | dg, du |
//! | [`causal_softmax`] | softmax(scale·S) over keys ≤ query | scale·P(dP − rowsum(P dP)) |
//! | [`fused_linear_cross_entropy`] | Σ NLL of h Wᵀ, chunked: full logits never stored | dh, dW computed in the forward |
//! | [`FusedAdamW`] | torch AdamW over all parameters in one launch, the bf16 weights updated in place as the f32 master's high halves | — |
//! | [`accumulate`] | flat f32 gradient sum += a parameter's gradient, in place | — |
//! | [`sum_squares`] | Σ x² in a fixed order (the gradient norm) | — |
//!
//! Every op's `cpu_fwd` is plain Rust over f32 (bf16 converted), the reference the CUDA kernels
//! (cuda/*.cu, built by nvcc in build.rs with the `cuda` feature) are tested against. Inputs are
//! made contiguous by the public functions; kernels compute in f32 whatever the storage dtype.

pub mod adamw;
pub mod attention;
mod cpu;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
pub mod dispatch;
pub mod dropout;
pub mod error;
pub mod grad;
pub mod launch;
pub mod master;
pub mod norm_linear;
pub mod pullback;
pub mod residual;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
pub mod table;
// The .cu parser of both build scripts, here for its unit tests.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../cuda/signatures.rs"]
mod signatures;
#[cfg(test)]
mod testutil;

pub use adamw::{AdamWHyper, FusedAdamW, Grad, HostState};
pub use attention::{causal_attention, rope_causal_attention};
pub use cross_entropy::fused_linear_cross_entropy;
pub use dispatch::{fused, FusedOnCpu};
pub use dropout::dropout_mul;
pub use error::{Error, Result};
pub use grad::{accumulate, sum_squares, sum_squares_of};
pub use norm_linear::norm_linear_group;
pub use pullback::{pullback, pullback_one};
pub use residual::linear_residual;
pub use rms_norm::add_rms_norm;
pub use rope::rope;
pub use softmax::causal_softmax;
pub use swiglu::{swiglu, swiglu_linear, swiglu_linear_pullback};
pub use table::GradTable;
