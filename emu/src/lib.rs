//! An emulated CUDA device for machines without a GPU (see emu/README.md).
//!
//! This crate builds one shared object that exports the driver API (`cu*`), cuBLASLt
//! (`cublasLt*`) and NCCL (`nccl*`) entry points the llama-cpt CUDA backend calls through cudarc's
//! dynamic loading. `tools/emu-check.sh` links it as `libcuda.so`, `libcublasLt.so` and
//! `libnccl.so` in one folder on `LD_LIBRARY_PATH`; the dynamic loader maps one file once, so the
//! three libraries share this crate's state. "Device" memory is host memory: a `CUdeviceptr` is a
//! host address. Kernels are llama-cpt's own `cuda/*.cu`, compiled for the host (emu/cxx/).
#![warn(clippy::too_many_lines)] // no function over 80 code lines (clippy.toml)
pub mod blaslt;
pub mod driver;
pub mod kernels;
pub mod launch_log;
pub mod mode;
pub mod nccl;
pub mod stream;
