//! Choosing the backend a binary runs on (`--device cpu|cuda`), in one place.
use crate::backend::Backend;
use crate::cpu::Cpu;
use anyhow::{bail, Result};

/// Work that can run on any backend (a generic function packaged as a value).
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, backend: &B) -> Result<Self::Output>;
}

/// Arithmetic of a training run: all f32, or mixed precision (bf16 parameters and activations,
/// fp32 masters, moments, gradients and accumulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// What a training run on `device` uses unless told: mixed precision on a GPU (f32 GEMMs
    /// there run without tensor cores), f32 on the CPU, where bf16 is only emulated.
    pub fn default_for(device: &str) -> Precision {
        if device == "cuda" {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

/// Runs `task` on the named device: `cpu`, or `cuda` (GPU 0; needs `--features cuda`).
pub fn on_device<T: OnBackend>(device: &str, task: T) -> Result<T::Output> {
    on_device_index(device, 0, Precision::F32, task)
}

/// [`on_device`] on GPU `gpu` (a data-parallel rank's local rank), in `precision` (on the CPU,
/// bf16 is emulated: [`Cpu::bf16`]).
pub fn on_device_index<T: OnBackend>(device: &str, gpu: usize, precision: Precision, task: T) -> Result<T::Output> {
    let _ = gpu;
    let mixed = precision == Precision::Bf16;
    match device {
        "cpu" => {
            crate::cpu::retain_freed_memory();
            task.run(&if mixed { Cpu::bf16() } else { Cpu })
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            let gpu = crate::cuda::Cuda::new(gpu)?;
            gpu.set_mixed_precision(mixed);
            task.run(&gpu)
        }
        other => bail!(
            "--device {other:?}: expected cpu{}",
            if cfg!(feature = "cuda") { " or cuda" } else { " (cuda needs a build with --features cuda)" }
        ),
    }
}
