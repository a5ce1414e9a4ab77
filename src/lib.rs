//! llama-cpt: continual pre-training of LLaMA-family models.
//!
//! See ARCHITECTURE.md for how the crates fit together.
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
pub mod autograd;
pub mod backend;
pub mod batch;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod optim;
pub mod tensor;
pub mod train;
pub mod vocab;
pub mod weights;
