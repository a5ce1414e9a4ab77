//! Choosing the backend a binary runs on (`--device cpu|cuda`), in one place.
use crate::backend::Backend;
use crate::cpu::Cpu;
use anyhow::{bail, Result};

/// Work that can run on any backend (a generic function packaged as a value).
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, backend: &B) -> Result<Self::Output>;
}

/// Runs `task` on the named device: `cpu`, or `cuda` (GPU 0; needs `--features cuda`).
pub fn on_device<T: OnBackend>(device: &str, task: T) -> Result<T::Output> {
    on_device_index(device, 0, task)
}

/// [`on_device`] on GPU `gpu` (a data-parallel rank's local rank).
pub fn on_device_index<T: OnBackend>(device: &str, gpu: usize, task: T) -> Result<T::Output> {
    let _ = gpu;
    match device {
        "cpu" => task.run(&Cpu),
        #[cfg(feature = "cuda")]
        "cuda" => task.run(&crate::cuda::Cuda::new(gpu)?),
        other => bail!("--device {other:?}: expected cpu{}", if cfg!(feature = "cuda") { " or cuda" } else { " (cuda needs a build with --features cuda)" }),
    }
}
