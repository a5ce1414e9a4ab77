//! What the emulator does with the work it is given: run it (the default), or only check its
//! shapes (`LLAMA_CPT_EMU_MODE=shapes`), to measure a real model's step without its memory.
//!
//! In the shapes mode device memory is address space only (reserved, never backed, never
//! touched: a stray access faults), every launch, GEMM, copy, memset and collective is checked as
//! in the full mode and then not executed, device-to-host copies deliver zeros, and an NCCL
//! communicator is a virtual world: this process is one rank of `nranks`, no peer needs to exist,
//! collectives check their buffers and move nothing. Events model a host that runs ahead of the
//! device, as it does on a GPU training a large model: a record is not seen complete by
//! `cuEventQuery` until the host has next waited for the device (any synchronize or blocking
//! copy), so a caching allocator that polls events measures the peak it would reach on the card.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every job runs: device memory is host memory, kernels execute.
    Full,
    /// Shapes are checked, nothing executes (module comment).
    Shapes,
}

/// The mode of this process, from `LLAMA_CPT_EMU_MODE` (`full`, the default, or `shapes`). An
/// unknown value stops the process: measuring in the wrong mode would mislead.
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("LLAMA_CPT_EMU_MODE").as_deref().map(str::trim) {
        Err(_) | Ok("") | Ok("full") => Mode::Full,
        Ok("shapes") => Mode::Shapes,
        Ok(other) => {
            eprintln!("emulated CUDA: LLAMA_CPT_EMU_MODE={other:?}: expected `full` or `shapes`");
            std::process::exit(2)
        }
    })
}

pub fn shapes_only() -> bool {
    mode() == Mode::Shapes
}

/// Host waits for the device so far (the shapes mode's event model).
static HOST_WAITS: AtomicU64 = AtomicU64::new(0);

/// Counts a completed host wait (stream, context or event synchronize; blocking copies).
pub fn host_waited() {
    HOST_WAITS.fetch_add(1, Ordering::AcqRel);
}

/// The number of host waits so far, stamped on each event record.
pub fn host_waits() -> u64 {
    HOST_WAITS.load(Ordering::Acquire)
}
