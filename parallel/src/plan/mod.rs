//! The memory and communication model of data parallelism with ZeRO: what the engine sends per
//! step ([`step_payload`], checked against [`crate::Communicator::traffic`] by the trainer's MPI
//! tests) and the planning model behind the `zero-plan` tool ([`plan`]): per-rank memory, ring
//! wire bytes and times over NVLink/InfiniBand, compute time from FLOPs, and the share of the
//! step that communication leaves exposed. docs/parallel-plan.md derives every formula and gives
//! the answer for LLaMA-2-7B on 64 A800s and 64 H100s.
//!
//! Units: element counts and bytes are `u64`; times are seconds and rates bytes (or FLOPs) per
//! second as `f64`. "GB" is 10⁹ bytes, "GiB" 2³⁰.

mod estimate;
mod links;
mod payload;
mod shapes;

pub use estimate::*;
pub use links::*;
pub use payload::*;
pub use shapes::*;

use crate::{Collective, TrafficCount};
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[cfg(test)]
mod tests;

#[cfg(all(test, feature = "mpi"))]
mod mpi_check;
