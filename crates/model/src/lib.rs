//! preftune's model layer: transformer architectures we can train (Llama family, GPT-2), weights in
//! and out (safetensors, GGUF), tokenizer and chat templates, generation and sequence log-probs.
//! It knows nothing about training; the `train` crate builds on it.
pub mod adamw;
pub mod batcher;
pub mod bench;
mod checkpointing;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod decode_graph;
pub mod device;
pub mod error;
pub mod flash;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod io;
pub mod kernel_check;
pub mod kernels;
pub mod logprobs;
pub mod lora;
pub mod lse_gather;
pub mod mem;
pub mod model;
pub mod moe;
pub mod ops;
pub mod pretrained;
pub mod reward;
mod sampling;
pub mod tokenizer;
pub mod weights;

/// Which numerics a forward pass has: raised whenever a change moves the numbers the same model,
/// inputs and options give (2: attention's tiles multiply in bf16 under `bf16 = true`; 3: their
/// probabilities take a faster `exp`, and the LM head's exp changed within its 2 ulp; 4: a
/// reference is scored with the policy's training products, `ops::TrainingProducts`). Caches of
/// computed values (DPO's precomputed reference log-probs) carry it in their key, so an upgrade
/// recomputes them instead of mixing two versions' numbers.
pub const NUMERICS: u32 = 4;

pub use config::{Arch, ModelConfig, MoeConfig, MoeNames};
pub use device::{DeviceError, DeviceSpec};
pub use error::{Error, Result};
pub use generate::{generate, generate_on, DrawOn, Generation, SamplingConfig};
pub use logprobs::{token_logprobs, TokenLogprobs};
pub use lora::LoraConfig;
pub use model::{KvCache, Model};
pub use pretrained::{parse_dtype, LoadOptions, Pretrained};
pub use tokenizer::{Message, Tokenizer};
