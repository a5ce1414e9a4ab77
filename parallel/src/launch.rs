//! Rank, world size and local rank from the launcher's environment: torchrun-style
//! (`RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`), Open MPI's `mpirun`
//! (`OMPI_COMM_WORLD_*`), MPICH/Hydra and other PMI launchers (`PMI_RANK`/`PMI_SIZE`,
//! `MPI_LOCALRANKID`) and Slurm's `srun` (`SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`).
//! The GPU a rank uses is its local rank.
use anyhow::{bail, Context, Result};

/// [`Launch::launcher`] of [`Launch::virtual_world`].
pub const VIRTUAL_WORLD: &str = "virtual world";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Where rank 0 listens for the TCP rendezvous (`MASTER_ADDR`:`MASTER_PORT`), if given.
    pub master: Option<(String, u16)>,
    /// Which convention the values came from ("torchrun", "openmpi", "pmi", "slurm", "none").
    pub launcher: &'static str,
}

impl Launch {
    pub fn single() -> Self {
        Launch { rank: 0, world_size: 1, local_rank: 0, master: None, launcher: "none" }
    }
    /// Rank 0 of `world` ranks that are never started: a dry run measures one rank's step on a
    /// communicator that needs no peers (the emulated device's shapes mode,
    /// `LLAMA_CPT_EMU_MODE=shapes`). No rendezvous takes place.
    pub fn virtual_world(world: usize) -> Self {
        Launch { rank: 0, world_size: world, local_rank: 0, master: None, launcher: VIRTUAL_WORLD }
    }
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads variables through `var` (tests pass a map). The first convention whose rank variable
    /// is set wins: an explicit torchrun-style `RANK` overrides what the launcher set.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        const CONVENTIONS: [(&str, &str, &str, &str); 4] = [
            ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
            ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ];
        let number = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(s) => s
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .with_context(|| format!("environment variable {name}={s:?} is not a non-negative integer")),
            }
        };
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(addr), Some(port)) => Some((
                addr,
                port.trim()
                    .parse::<u16>()
                    .with_context(|| format!("environment variable MASTER_PORT={port:?} is not a port number"))?,
            )),
            (Some(_), None) => bail!("MASTER_ADDR is set but MASTER_PORT is not"),
            (None, Some(_)) => bail!("MASTER_PORT is set but MASTER_ADDR is not"),
            (None, None) => None,
        };
        for (launcher, rank_var, size_var, local_var) in CONVENTIONS {
            let Some(rank) = number(rank_var)? else { continue };
            let Some(world_size) = number(size_var)? else {
                bail!("{rank_var} is set ({launcher} launch) but {size_var} is not");
            };
            if world_size == 0 || rank >= world_size {
                bail!("{rank_var}={rank} is not below {size_var}={world_size}");
            }
            // Without a local rank (one process per node), the GPU is device 0.
            let local_rank = number(local_var)?.unwrap_or(0);
            return Ok(Launch { rank, world_size, local_rank, master, launcher });
        }
        Ok(Launch { master, ..Launch::single() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn each_launcher_convention_is_read() {
        assert_eq!(launch(&[]).unwrap(), Launch::single());
        let t = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!((t.rank, t.world_size, t.local_rank, t.launcher), (3, 8, 1, "torchrun"));
        assert_eq!(t.master, Some(("node0".to_string(), 29500)));
        let o = launch(&[
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "64"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "5"),
        ])
        .unwrap();
        assert_eq!((o.rank, o.world_size, o.local_rank, o.launcher), (5, 64, 5, "openmpi"));
        let p = launch(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")]).unwrap();
        assert_eq!((p.rank, p.world_size, p.local_rank, p.launcher), (1, 2, 0, "pmi"));
        let s = launch(&[("SLURM_PROCID", "9"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "1")]).unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank, s.launcher), (9, 16, 1, "slurm"));
        // torchrun-style variables override the launcher's.
        let both =
            launch(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("SLURM_PROCID", "9"), ("SLURM_NTASKS", "16")]).unwrap();
        assert_eq!(both.launcher, "torchrun");
    }

    #[test]
    fn inconsistent_environments_are_errors_naming_the_variable() {
        let e = |vars: &[(&str, &str)]| format!("{:#}", launch(vars).unwrap_err());
        assert!(e(&[("RANK", "1")]).contains("WORLD_SIZE"));
        assert!(e(&[("RANK", "4"), ("WORLD_SIZE", "4")]).contains("RANK=4"));
        assert!(e(&[("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "2")]).contains("OMPI_COMM_WORLD_RANK"));
        assert!(e(&[("MASTER_ADDR", "h")]).contains("MASTER_PORT"));
        assert!(e(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "http")]).contains("MASTER_PORT"));
    }
}
