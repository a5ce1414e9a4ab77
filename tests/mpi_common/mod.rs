//! What the MPI tests share (tests/parallel_mpi.rs, tests/multi_node.rs): the embedded default's
//! config, `mpirun` on this host or across simulated nodes, the runs' metrics and final
//! parameters, and the bounds one process and N ranks agree within.
#![allow(dead_code)]

use llama_cpt::train::default_run;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod cluster;
pub use cluster::Cluster;

/// Loss trajectories at any world size and ZeRO stage agree with one process within this relative
/// error: only the order of f32 sums differs (measured: ≤ 5e-7).
pub const LOSS_RTOL: f64 = 1e-5;
/// Parameters after the run, max |Δ| relative to the tensor's max |p|. Adam divides each gradient
/// by its own running RMS, so an element whose gradient is near zero — where summation order
/// decides its sign — can move by up to lr per step either way; measured ≤ 8e-5 over 10 steps.
pub const PARAM_RTOL: f32 = 5e-4;

/// One MPI job at a time: the machine has two cores, and the fault test looks processes up by rank.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// This test binary's folder under cargo's target/tmp (one per test file, so that two files'
/// runs never share an output).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(env!("CARGO_CRATE_NAME"))
}

/// The embedded default's data and config, generated once for all tests.
pub fn config() -> &'static Path {
    static CONFIG: OnceLock<PathBuf> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let base = root().join("data-src");
        let _ = std::fs::remove_dir_all(&base);
        default_run::prepare(&base, &[]).unwrap();
        default_run::config_path(&base)
    })
}

/// Variables the ranks need from this environment when they are set: where the CUDA libraries
/// are (the emulated ones under tools/emu-check.sh), the emulator's settings, and which attention
/// kernels run (tools/emu-nccl-check.sh picks the f32 ones).
pub const FORWARDED_ENV: [&str; 5] =
    ["LD_LIBRARY_PATH", "LLAMA_CPT_EMU_GPUS", "LLAMA_CPT_EMU_DEVICE", "LLAMA_CPT_EMU_NCCL_TIMEOUT_S", "LLAMA_CPT_ATTN"];

pub fn mpirun(np: usize, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string()]);
    // NCCL's unique id goes from rank 0 to the others through the TCP rendezvous.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    job_args(&mut c, "127.0.0.1", port, out, extra);
    c
}

/// `mpirun --host HOSTS` started on node0 of `cluster`, its daemons on the other nodes through the
/// cluster's ssh stand-in, Open MPI's own traffic (daemons, TCP transport) on the cluster's subnet;
/// the NCCL rendezvous at node0 (rank 0 is the first slot of HOSTS, which must name node0 first).
pub fn mpirun_on(cluster: &Cluster, hosts: &str, out: &Path, extra: &[&str]) -> Command {
    assert!(hosts.starts_with("node0:"), "{hosts}: rank 0 runs on node0, where mpirun starts");
    let np: usize = hosts.split(',').map(|h| h.split(':').nth(1).unwrap().parse::<usize>().unwrap()).sum();
    let mut c = cluster.exec("node0");
    c.args(["mpirun", "-np", &np.to_string(), "--host", hosts, "--mca", "plm_rsh_agent"]);
    c.arg(cluster.rsh());
    for (k, v) in
        [("btl", "self,vader,tcp"), ("btl_tcp_if_include", cluster.subnet()), ("oob_tcp_if_include", cluster.subnet())]
    {
        c.args(["--mca", k, v]);
    }
    // A fresh namespace has every port free.
    job_args(&mut c, "node0", 29500, out, extra);
    c
}

/// The flags every job shares, then `pretrain`'s command line.
fn job_args(c: &mut Command, master_addr: &str, port: u16, out: &Path, extra: &[&str]) {
    c.args(["--oversubscribe", "--allow-run-as-root", "-x", "RAYON_NUM_THREADS=1", "-x", "RUST_BACKTRACE=0"]);
    c.args(["-x", &format!("MASTER_ADDR={master_addr}"), "-x", &format!("MASTER_PORT={port}")]);
    for var in FORWARDED_ENV.iter().filter(|v| std::env::var_os(v).is_some()) {
        c.args(["-x", var]);
    }
    c.arg(env!("CARGO_BIN_EXE_pretrain"));
    pretrain_args(c, out, extra);
}

/// `--config`, the output folder and the overrides of the tests' runs (`--flag=value` goes to
/// pretrain as it is; everything else is a config override).
pub fn pretrain_args(c: &mut Command, out: &Path, extra: &[&str]) {
    c.arg("--config").arg(config());
    overrides(c, out, extra);
}

/// [`pretrain_args`] without `--config` (for launch scripts that pass it themselves).
pub fn overrides(c: &mut Command, out: &Path, extra: &[&str]) {
    c.arg("--set").arg(format!("run.out_dir={:?}", out.display().to_string()));
    for s in ["run.eval_every=0", "run.log_every=1", "parallel.bucket_mib=0.05"].iter().chain(extra) {
        if s.starts_with("--") {
            c.arg(s);
        } else {
            c.args(["--set", s]);
        }
    }
}

pub fn run(np: usize, out: &Path, extra: &[&str]) -> Output {
    finished(mpirun(np, out, extra), &format!("mpirun -np {np}"))
}

/// Runs `c` to the end; panics with its output unless it succeeded.
pub fn finished(mut c: Command, what: &str) -> Output {
    let o = c.output().expect("mpirun (Open MPI) must be installed: apt-get install openmpi-bin libopenmpi-dev");
    let text = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{what} failed:\n{text}");
    o
}

pub fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out).iter().map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap())).collect()
}

/// Every parameter of a run's final model, by name.
pub type Params = Vec<(String, Vec<f32>)>;

pub fn final_params(out: &Path) -> Params {
    let bytes = std::fs::read(out.join("stage-knowledge-replay/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn assert_losses_agree(what: &str, got: &[(u64, f64)], want: &[(u64, f64)]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: steps logged");
    let mut worst: f64 = 0.0;
    for ((s, a), (t, b)) in got.iter().zip(want) {
        assert_eq!(s, t);
        let rel = (a - b).abs() / b.abs();
        assert!(rel <= LOSS_RTOL, "{what}: step {s} loss {a} vs {b} (relative {rel:.2e})");
        worst = worst.max(rel);
    }
    worst
}

/// Each final parameter of `got` against `want`'s, as a fraction of that tensor's largest
/// magnitude, held to PARAM_RTOL; returns the worst.
pub fn assert_params_agree(what: &str, got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: parameters");
    let mut worst: f32 = 0.0;
    for ((name, a), (_, b)) in got.iter().zip(want) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(d <= PARAM_RTOL, "{what}: {name} differs by {d:.2e} of its max");
        worst = worst.max(d);
    }
    worst
}

/// The pid of the `pretrain` process writing to `out` with the given MPI rank.
pub fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains(env!("CARGO_BIN_EXE_pretrain")) || !cmd.contains(&out.display().to_string()) {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else { continue };
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}
