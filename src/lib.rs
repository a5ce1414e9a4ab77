//! llama-cpt: continual pre-training of LLaMA-family models.
//!
//! See ARCHITECTURE.md for how the crates fit together.
pub mod batch;
pub mod data;
