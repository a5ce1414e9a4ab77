//! llama-cpt: continual pre-training of LLaMA-family models.
//!
//! See ARCHITECTURE.md for how the crates fit together.
pub mod batch;
pub mod data;
pub mod autograd;
pub mod backend;
pub mod config;
pub mod cpu;
pub mod fsutil;
pub mod tensor;
pub mod model;
pub mod weights;
pub mod gguf;
pub mod optim;
pub mod dist;
#[cfg(feature = "cuda")] pub mod cuda;
pub mod train;
pub mod vocab;
pub mod generate;
pub mod eval;
pub mod device;
