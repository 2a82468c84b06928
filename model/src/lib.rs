//! `herd-model`: LLaMA as `transformers`' `LlamaForCausalLM` computes it, built only from candle
//! primitives that record a backward pass (candle-nn's fused norm/rope/softmax do not), plus the
//! I/O of the Hugging Face formats: `config.json`, safetensors (single or sharded), `tokenizer.json`.
//!
//! Invariants: this crate knows nothing about jobs, data files, optimizers or networks. Parameter
//! names are exactly the HF checkpoint names, so what we write `transformers` loads.

pub mod attention;
pub mod config;
pub mod decode;
pub mod error;
pub mod generate;
pub mod generation_config;
pub mod init;
pub mod layout;
pub mod llama;
pub mod logprob;
pub mod lora;
pub mod loss;
pub mod mlp;
pub mod neftune;
pub mod net;
pub mod norm;
pub mod recompute;
pub mod reward;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use layout::Layout;
pub use llama::Llama;
pub use reward::RewardModel;
pub use tokenizer::Tokenizer;
