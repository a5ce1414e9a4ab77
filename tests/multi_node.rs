//! Several nodes on one machine: `tools/sim-nodes.sh` makes each node a network namespace with its
//! own address and host name, and the jobs go across them as on a cluster — `mpirun --host` with
//! its daemons started on the other node (an ssh stand-in), Open MPI's TCP transport and the NCCL
//! id rendezvous over the nodes' addresses, torchrun-style ranks started per node by
//! tools/launch/torchrun-style.sh. Needs root (network namespaces; CI runs as root), `--features
//! mpi` and Open MPI. What it cannot simulate: bandwidth, InfiniBand, GPUDirect; the nodes share
//! one file system and /dev/shm (the emulated NCCL's data path), so only the launch, the
//! rendezvous, MPI's traffic and the failure handling are really between nodes.
//!
//! The `#[ignore]`d tests run `pretrain --device cuda` (the emulated device in
//! tools/emu-check.sh, or GPUs).
#![cfg(feature = "mpi")]

mod mpi_common;

use mpi_common::*;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// 24 rows per step, 2 per micro-batch: divisible at 1, 2 and 3 ranks.
const COMMON: [&str; 5] = [
    "stages.0.steps=6",
    "stages.1.steps=4",
    "data.micro_batch_rows=2",
    "stages.0.global_batch_rows=24",
    "stages.1.global_batch_rows=24",
];

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout)
}

/// Each rank's start-up line says where it landed: (rank, local rank, host).
fn placement(text: &str, world: usize) -> Vec<(usize, usize, String)> {
    let mut found: Vec<(usize, usize, String)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("rank ")?;
            let (rank, rest) = rest.split_once(&format!(" of {world}: local rank "))?;
            let (local, rest) = rest.split_once(" on ")?;
            let host = rest.split_once(" (")?.0;
            Some((rank.parse().ok()?, local.parse().ok()?, host.to_string()))
        })
        .collect();
    found.sort();
    found
}

/// Where `world` ranks land when each node takes `per_node` consecutive ranks: (rank, local rank, host).
fn node_by_node(world: usize, per_node: usize) -> Vec<(usize, usize, String)> {
    (0..world).map(|r| (r, r % per_node, format!("node{}", r / per_node))).collect()
}

fn with(more: &[&str]) -> Vec<String> {
    COMMON.iter().chain(more).map(|s| s.to_string()).collect()
}

#[test]
fn three_ranks_on_two_nodes_train_like_one_process_and_resume_on_one_node() {
    let _serial = serial();
    let one = root().join("one-process");
    let _ = std::fs::remove_dir_all(&one);
    run(1, &one, &strs(&with(&[])));
    let want = losses(&one);
    let want_params = final_params(&one);
    let cluster = Cluster::up(root().join("cluster-train"), 2);
    let mut report = Vec::new();
    for z in [1, 2] {
        let out = root().join(format!("two-nodes-z{z}"));
        let _ = std::fs::remove_dir_all(&out);
        let zero = format!("parallel.zero_stage={z}");
        let t0 = Instant::now();
        let o = finished(mpirun_on(&cluster, "node0:2,node1:1", &out, &strs(&with(&[&zero]))), "mpirun on 2 nodes");
        let secs = t0.elapsed().as_secs_f64();
        let where_ = placement(&text(&o), 3);
        let want_where = node_by_node(3, 2);
        assert_eq!(where_, want_where, "ranks, local ranks and hosts:\n{}", text(&o));
        let what = format!("MPI 3 ranks on 2 nodes, ZeRO-{z}");
        let loss_err = assert_losses_agree(&what, &losses(&out), &want);
        let param_err = assert_params_agree(&what, &final_params(&out), &want_params);
        report.push(format!("{what}: loss ≤ {loss_err:.1e}, params ≤ {param_err:.1e} ({secs:.0} s)"));
    }
    // Saved by 3 ranks on 2 nodes (ZeRO-2), resumed by 2 ranks on one node (ZeRO-1).
    let out = root().join("relayout");
    let _ = std::fs::remove_dir_all(&out);
    finished(
        mpirun_on(
            &cluster,
            "node0:2,node1:1",
            &out,
            &strs(&with(&["parallel.zero_stage=2", "run.stop_after_steps=4"])),
        ),
        "mpirun on 2 nodes, stopped after step 4",
    );
    let o = finished(mpirun_on(&cluster, "node0:2", &out, &strs(&with(&["parallel.zero_stage=1"]))), "resume on node0");
    assert!(text(&o).contains("resum"), "the second job resumed:\n{}", text(&o));
    let what = "saved by 3 ranks on 2 nodes (ZeRO-2), resumed by 2 ranks on 1 node (ZeRO-1)";
    let loss_err = assert_losses_agree(what, &losses(&out), &want);
    report.push(format!("{what}: loss ≤ {loss_err:.1e}"));
    eprintln!("{}", report.join("\n"));
}

/// Waits for a checkpoint newer than the ones in `out` before, or panics with the job's output.
fn wait_for_new_checkpoint(out: &Path, before: &[std::path::PathBuf], child: &mut Child) {
    let t0 = Instant::now();
    while llama_cpt::train::checkpoint::complete_checkpoints(out).unwrap().last() == before.last() {
        if t0.elapsed() > Duration::from_secs(300) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("no new checkpoint appeared in {}", out.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits at most `limit` for `child`; kills it after that. Returns its output and whether it
/// ended on its own.
fn wait_bounded(mut child: Child, limit: Duration) -> (Output, bool) {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            return (child.wait_with_output().unwrap(), false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), true)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn a_node_that_dies_or_loses_its_link_stops_the_job_and_it_resumes() {
    let _serial = serial();
    let cluster = Cluster::up(root().join("cluster-fault"), 2);
    let out = root().join("node-fault");
    let _ = std::fs::remove_dir_all(&out);
    let timeout_s = 5;
    let args = ["stages.0.steps=40", "stages.1.steps=2", "data.micro_batch_rows=4", "run.checkpoint_every=3"];
    let timeout = format!("parallel.timeout_s={timeout_s}");
    let with_timeout: Vec<&str> = args.iter().copied().chain([timeout.as_str()]).collect();
    let start = || {
        mpirun_on(&cluster, "node0:1,node1:1", &out, &with_timeout)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut report = Vec::new();

    // node1 dies (every process of it, Open MPI's daemon included): mpirun notices the lost
    // daemon and ends the job.
    let before = llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap();
    let mut child = start();
    wait_for_new_checkpoint(&out, &before, &mut child);
    cluster.kill("node1");
    let t0 = Instant::now();
    let (o, ended) = wait_bounded(child, Duration::from_secs(60));
    let waited = t0.elapsed();
    assert!(ended && !o.status.success(), "node1 killed: the job must fail on its own:\n{}", text(&o));
    assert!(text(&o).contains("node1"), "the launcher names the lost node:\n{}", text(&o));
    let t = text(&o);
    let said: Vec<&str> = t.lines().filter(|l| l.contains("node1")).take(2).map(str::trim).collect();
    report.push(format!("node1 killed: mpirun ended the job after {waited:.1?}: {}", said.join(" | ")));

    // node1's link goes down: its processes live on, unreachable. The rank on node0 stops on its
    // own when the collective does not complete within the timeout, naming the collective and
    // the step; node1 is then killed so that mpirun can end.
    let before = llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap();
    let mut child = start();
    wait_for_new_checkpoint(&out, &before, &mut child);
    let rank0 = rank_pid(&out, 0).expect("rank 0's process");
    cluster.link("node1", false);
    let t0 = Instant::now();
    while pid_alive(rank0) && t0.elapsed() < Duration::from_secs(timeout_s + 60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = t0.elapsed();
    assert!(!pid_alive(rank0), "rank 0 did not stop within {waited:?} of node1's link going down");
    cluster.link("node1", true);
    cluster.kill("node1");
    let (o, _) = wait_bounded(child, Duration::from_secs(60));
    let t = text(&o);
    assert!(!o.status.success(), "link down: the job must fail:\n{t}");
    assert!(t.contains(&format!("did not complete within {timeout_s} s")), "link down: the timeout's error:\n{t}");
    assert!(t.contains("Error: step "), "link down: the error names the step:\n{t}");
    let said = t.lines().find(|l| l.contains("did not complete within")).unwrap_or_default().trim();
    report.push(format!("node1's link down: rank 0 stopped after {waited:.1?} (timeout {timeout_s} s): {said}"));

    // The last checkpoint is intact: the same job resumes from it and logs every step once.
    let last = llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap();
    assert!(!last.is_empty());
    let o = finished(mpirun_on(&cluster, "node0:1,node1:1", &out, &args), "resume on 2 nodes");
    assert!(text(&o).contains("resum"), "{}", text(&o));
    let steps: Vec<u64> = metrics(&out).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=42).collect::<Vec<_>>(), "every step logged once");
    eprintln!("{}", report.join("\n"));
}

#[test]
fn cpu_ranks_without_mpi_say_that_they_need_it() {
    let out = root().join("no-mpi");
    let mut c = Command::new(env!("CARGO_BIN_EXE_pretrain"));
    pretrain_args(&mut c, &out, &["stages.0.steps=1"]);
    let o = c
        .envs([
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1"),
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("mpirun or srun") && t.contains("--device cuda"), "{t}");
}

/// The CUDA runs, as short as the emulated device needs (see tests/parallel_mpi.rs), 12 rows per
/// step so that 1 and 4 ranks divide it.
#[cfg(feature = "cuda")]
const CUDA_SHORT: [&str; 8] = [
    "--precision=f32",
    "data.seq_len=32",
    "stages.0.steps=2",
    "stages.1.steps=1",
    "data.micro_batch_rows=1",
    "stages.0.global_batch_rows=12",
    "stages.1.global_batch_rows=12",
    "parallel.zero_stage=2",
];

#[cfg(feature = "cuda")]
fn cuda_one_process(name: &str, more: &[&str]) -> (Vec<(u64, f64)>, Params) {
    let out = root().join(name);
    let _ = std::fs::remove_dir_all(&out);
    let args: Vec<&str> = ["--device=cuda"].iter().chain(&CUDA_SHORT).chain(more).copied().collect();
    run(1, &out, &args);
    (losses(&out), final_params(&out))
}

/// tools/launch/multi-node.sh as a user runs it on the first node: a hostfile of node0 and node1
/// with 2 slots each, Open MPI's traffic on `eth0` (each simulated node's interface), its daemon on
/// node1 started through the cluster's ssh stand-in.
#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs 2 CUDA GPUs per node and libnccl, or the emulated device (tools/emu-check.sh)"]
fn nccl_multi_node_script_on_two_nodes_follows_one_process() {
    let _serial = serial();
    let (want, want_params) = cuda_one_process("nccl-one", &[]);
    let cluster = Cluster::up(root().join("cluster-nccl"), 2);
    let out = root().join("nccl-two-nodes");
    let _ = std::fs::remove_dir_all(&out);
    let hostfile = root().join("cluster-nccl-hosts");
    std::fs::write(&hostfile, "# the simulated nodes\nnode0 slots=2\nnode1 slots=2\n").unwrap();
    let mut c = cluster.exec("node0");
    c.arg("bash").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/launch/multi-node.sh"));
    overrides(&mut c, &out, &CUDA_SHORT);
    let rsh = cluster.rsh();
    c.envs([
        ("HOSTFILE", hostfile.display().to_string()),
        ("CONFIG", config().display().to_string()),
        ("GPUS_PER_NODE", "2".into()),
        ("DEVICE", "cuda".into()),
        ("ZERO_STAGE", "2".into()),
        ("BIN", env!("CARGO_BIN_EXE_pretrain").into()),
        ("MPI_IFACE", "eth0".into()),
        ("NCCL_SOCKET_IFNAME", "eth0".into()),
        (
            "MPIRUN_ARGS",
            format!("--allow-run-as-root --oversubscribe --mca plm_rsh_agent {} -x RAYON_NUM_THREADS=1", rsh.display()),
        ),
        ("RUST_BACKTRACE", "0".into()),
    ]);
    let t0 = Instant::now();
    let o = finished(c, "tools/launch/multi-node.sh on 2 nodes");
    let t = text(&o);
    assert!(t.contains("nccl (4 ranks)") && t.contains("rendezvous at node0:29500"), "{t}");
    let want_where = node_by_node(4, 2);
    assert_eq!(placement(&t, 4), want_where, "{t}");
    let what = "NCCL 4 ranks on 2 nodes (multi-node.sh), ZeRO-2";
    let loss_err = assert_losses_agree(what, &losses(&out), &want);
    let param_err = assert_params_agree(what, &final_params(&out), &want_params);
    eprintln!("{what}: loss ≤ {loss_err:.1e}, params ≤ {param_err:.1e} ({:.0} s)", t0.elapsed().as_secs_f64());
}

/// tools/launch/torchrun-style.sh started on each node as a user would: NNODES=2, this node's
/// NODE_RANK, MASTER_ADDR=node0.
#[cfg(feature = "cuda")]
fn torchrun_style_node(cluster: &Cluster, node: usize, master: (&str, u16), out: &Path, more: &[&str]) -> Child {
    let mut c = cluster.exec(&format!("node{node}"));
    c.arg("bash").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/launch/torchrun-style.sh"));
    let args: Vec<&str> = CUDA_SHORT.iter().chain(more).copied().collect();
    overrides(&mut c, out, &args);
    c.envs([
        ("CONFIG", config().display().to_string()),
        ("NNODES", "2".into()),
        ("NODE_RANK", node.to_string()),
        ("NPROC_PER_NODE", "2".into()),
        ("MASTER_ADDR", master.0.to_string()),
        ("MASTER_PORT", master.1.to_string()),
        ("DEVICE", "cuda".into()),
        ("ZERO_STAGE", "2".into()),
        ("BIN", env!("CARGO_BIN_EXE_pretrain").into()),
        ("LOG_DIR", out.join(format!("launch-node{node}")).display().to_string()),
        ("RAYON_NUM_THREADS", "1".into()),
        ("RUST_BACKTRACE", "0".into()),
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

#[cfg(feature = "cuda")]
fn rank_logs(out: &Path) -> String {
    let mut all = String::new();
    for node in 0..2 {
        for rank in 0..4 {
            if let Ok(t) = std::fs::read_to_string(out.join(format!("launch-node{node}/rank-{rank}.log"))) {
                all += &format!("--- node{node} rank {rank}\n{t}");
            }
        }
    }
    all
}

#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs 2 CUDA GPUs per node and libnccl, or the emulated device (tools/emu-check.sh)"]
fn torchrun_style_on_two_nodes_trains_names_a_dead_node_and_resumes() {
    let _serial = serial();
    let (want, want_params) = cuda_one_process("torchrun-one", &[]);
    let cluster = Cluster::up(root().join("cluster-torchrun"), 2);
    let mut report = Vec::new();

    // Four ranks, two per node, no MPI anywhere.
    let out = root().join("torchrun-two-nodes");
    let _ = std::fs::remove_dir_all(&out);
    let t0 = Instant::now();
    let nodes: Vec<Child> = (0..2).map(|n| torchrun_style_node(&cluster, n, ("node0", 29500), &out, &[])).collect();
    for (n, child) in nodes.into_iter().enumerate() {
        let (o, ended) = wait_bounded(child, Duration::from_secs(300));
        assert!(ended && o.status.success(), "node{n}: {}\n{}", text(&o), rank_logs(&out));
    }
    let logs = rank_logs(&out);
    let want_where = node_by_node(4, 2);
    assert_eq!(placement(&logs, 4), want_where, "{logs}");
    let what = "NCCL 4 ranks on 2 nodes (torchrun-style), ZeRO-2";
    let loss_err = assert_losses_agree(what, &losses(&out), &want);
    let param_err = assert_params_agree(what, &final_params(&out), &want_params);
    report
        .push(format!("{what}: loss ≤ {loss_err:.1e}, params ≤ {param_err:.1e} ({:.0} s)", t0.elapsed().as_secs_f64()));

    // node1 dies mid-run: node0's ranks notice on their own (no launcher spans the nodes) and say
    // which rank is gone; node0's script stops and fails.
    let out = root().join("torchrun-node-dies");
    let _ = std::fs::remove_dir_all(&out);
    let long = ["stages.0.steps=200", "run.checkpoint_every=1", "parallel.timeout_s=120"];
    let mut nodes: Vec<Child> =
        (0..2).map(|n| torchrun_style_node(&cluster, n, ("node0", 29501), &out, &long)).collect();
    let t0 = Instant::now();
    while llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap().len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(300) && nodes.iter_mut().all(|c| c.try_wait().unwrap().is_none()),
            "the job did not get to its second checkpoint:\n{}",
            rank_logs(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.kill("node1");
    let t1 = Instant::now();
    let node0 = nodes.remove(0);
    let (o, ended) = wait_bounded(node0, Duration::from_secs(100));
    let waited = t1.elapsed();
    let _ = nodes.remove(0).wait();
    let logs = rank_logs(&out);
    assert!(ended && !o.status.success(), "node0's script must fail on its own:\n{}\n{logs}", text(&o));
    let node0_logs: String = [0, 1]
        .map(|r| std::fs::read_to_string(out.join(format!("launch-node0/rank-{r}.log"))).unwrap_or_default())
        .concat();
    assert!(
        node0_logs.contains("NCCL communicator aborted") && node0_logs.contains("Error: step "),
        "node0's ranks say a rank is gone and at which step:\n{node0_logs}"
    );
    assert!(waited < Duration::from_secs(60), "far below the 120 s timeout: {waited:?}");
    let said = node0_logs.lines().find(|l| l.contains("NCCL communicator aborted")).unwrap_or_default().trim();
    report.push(format!("node1 killed (torchrun-style): node0's ranks stopped after {waited:.1?}: {said}"));

    // A relaunch on both nodes resumes from the last checkpoint: no step logged twice or missed.
    let last = llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap();
    let resumed_at: u64 =
        last.last().unwrap().file_name().unwrap().to_string_lossy().trim_start_matches("step-").parse().unwrap();
    let stop = format!("run.stop_after_steps={}", resumed_at + 2);
    let nodes: Vec<Child> = (0..2)
        .map(|n| torchrun_style_node(&cluster, n, ("node0", 29502), &out, &[&long[..], &[stop.as_str()]].concat()))
        .collect();
    for (n, child) in nodes.into_iter().enumerate() {
        let (o, ended) = wait_bounded(child, Duration::from_secs(300));
        assert!(ended && o.status.success(), "relaunch, node{n}: {}\n{}", text(&o), rank_logs(&out));
    }
    let steps: Vec<u64> = metrics(&out).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(
        steps,
        (1..=resumed_at + 2).collect::<Vec<_>>(),
        "every step logged once, the relaunch from step {resumed_at}"
    );
    report.push(format!("relaunch on 2 nodes resumed from step {resumed_at}"));
    eprintln!("{}", report.join("\n"));
}

#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs 2 CUDA GPUs per node and libnccl, or the emulated device (tools/emu-check.sh)"]
fn a_node_that_never_joins_is_named_not_waited_for() {
    let _serial = serial();
    let cluster = Cluster::up(root().join("cluster-never"), 2);
    let out = root().join("never-joins");
    let _ = std::fs::remove_dir_all(&out);
    // node1 is told the wrong port, then an address where no node is: it never reaches rank 0's
    // rendezvous, and both sides say so within the timeout.
    let timeout_s = 5;
    let short = format!("parallel.timeout_s={timeout_s}");
    let nowhere = format!("{}.200", cluster.addr("node0").rsplit_once('.').unwrap().0);
    let mut report = Vec::new();
    for (what, master) in [("wrong MASTER_PORT", ("node0", 29999)), ("wrong MASTER_ADDR", (nowhere.as_str(), 29500))] {
        let out = root().join("never-joins");
        let _ = std::fs::remove_dir_all(&out);
        let t0 = Instant::now();
        let node0 = torchrun_style_node(&cluster, 0, ("node0", 29500), &out, &[&short]);
        let node1 = torchrun_style_node(&cluster, 1, master, &out, &[&short]);
        let (o0, ended0) = wait_bounded(node0, Duration::from_secs(timeout_s + 60));
        let waited0 = t0.elapsed();
        let (o1, ended1) = wait_bounded(node1, Duration::from_secs(timeout_s + 60));
        let waited1 = t0.elapsed();
        let logs = rank_logs(&out);
        assert!(
            ended0 && !o0.status.success() && ended1 && !o1.status.success(),
            "{what}: both nodes fail on their own:\n{logs}"
        );
        assert!(logs.contains("ranks [2, 3] of 4 never arrived"), "{what}: rank 0 names the missing ranks:\n{logs}");
        let reach = format!("could not reach rank 0 at {}:{}", master.0, master.1);
        assert!(
            logs.contains(&format!("rank 2 of 4 {reach}")),
            "{what}: node1's ranks say whom they could not reach:\n{logs}"
        );
        report.push(format!(
            "node1 never joins ({what}): node0 stopped after {waited0:.1?}, node1 after {waited1:.1?} (timeout {timeout_s} s): rank 0 names ranks 2 and 3, they say they {reach}"
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// A Slurm command (sbatch, squeue, scancel, scontrol) on node0 of the cluster.
#[cfg(feature = "cuda")]
fn slurm_cmd(cluster: &Cluster, conf: &Path, tool: &str) -> Command {
    let mut c = cluster.exec("node0");
    c.arg(tool).env("SLURM_CONF", conf);
    c
}

/// `sbatch tools/launch/slurm.sbatch` as a user submits it (2 nodes × 2 tasks here instead of the
/// script's 8 × 8, its other directives kept); returns the job id, or waits for the end with `wait`.
#[cfg(feature = "cuda")]
fn sbatch(cluster: &Cluster, conf: &Path, out: &Path, more: &[&str], wait: bool) -> (u64, Output) {
    let logs = root().join("slurm-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut c = slurm_cmd(cluster, conf, "sbatch");
    c.args(["--parsable", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=30"]);
    c.arg(format!("--output={}/%j.out", logs.display()));
    if wait {
        c.arg("--wait");
    }
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/launch/slurm.sbatch"));
    let args: Vec<&str> = CUDA_SHORT.iter().chain(more).copied().collect();
    overrides(&mut c, out, &args);
    c.envs([
        ("CONFIG", config().display().to_string()),
        ("DEVICE", "cuda".into()),
        ("ZERO_STAGE", "2".into()),
        ("BIN", env!("CARGO_BIN_EXE_pretrain").into()),
        ("RAYON_NUM_THREADS", "1".into()),
        ("RUST_BACKTRACE", "0".into()),
    ]);
    let o = c.output().unwrap();
    let id = String::from_utf8_lossy(&o.stdout).lines().next().and_then(|l| l.split(';').next()?.trim().parse().ok());
    let Some(id) = id else { panic!("sbatch gave no job id:\n{}", text(&o)) };
    (id, o)
}

#[cfg(feature = "cuda")]
fn slurm_log(id: u64) -> String {
    std::fs::read_to_string(root().join(format!("slurm-logs/{id}.out"))).unwrap_or_default()
}

/// Waits until job `id` has left the queue; returns `scontrol show job`'s line of it.
#[cfg(feature = "cuda")]
fn wait_for_job(cluster: &Cluster, conf: &Path, id: u64, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let o = slurm_cmd(cluster, conf, "squeue").args(["-h", "-j", &id.to_string(), "-o", "%T"]).output().unwrap();
        if String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            break;
        }
        assert!(t0.elapsed() < limit, "job {id} still queued after {limit:?}:\n{}", slurm_log(id));
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = slurm_cmd(cluster, conf, "scontrol").args(["show", "job", "-o", &id.to_string()]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
#[cfg(feature = "cuda")]
#[ignore = "needs Slurm (slurmctld, slurmd), 2 CUDA GPUs per node and libnccl, or the emulated device (tools/emu-check.sh)"]
fn slurm_sbatch_trains_and_resumes_after_a_cancel_and_a_requeue() {
    let _serial = serial();
    let steps = ["stages.0.steps=8", "run.checkpoint_every=2"];
    let (want, _) = cuda_one_process("slurm-one", &steps);
    let cluster = Cluster::up(root().join("cluster-slurm"), 2);
    let conf = cluster.slurm(2);
    // A fresh Slurm numbers its jobs from 1 again, and the script appends to its output file.
    let _ = std::fs::remove_dir_all(root().join("slurm-logs"));
    let mut report = Vec::new();

    // Uninterrupted: srun's SLURM_PROCID / SLURM_LOCALID are the ranks, the rendezvous at the
    // allocation's first node.
    let full = root().join("slurm-full");
    let _ = std::fs::remove_dir_all(&full);
    let t0 = Instant::now();
    let (id, o) = sbatch(&cluster, &conf, &full, &steps, true);
    let log = slurm_log(id);
    assert!(o.status.success(), "sbatch --wait: job {id} failed:\n{}\n{log}", text(&o));
    let want_where = node_by_node(4, 2);
    assert_eq!(placement(&log, 4), want_where, "{log}");
    assert!(log.contains("(slurm launch)") && log.contains("nccl (4 ranks)"), "{log}");
    let what = "Slurm: 4 ranks on 2 nodes (sbatch → srun), ZeRO-2";
    let loss_err = assert_losses_agree(what, &losses(&full), &want);
    let want_params = final_params(&full);
    report.push(format!("{what}: loss ≤ {loss_err:.1e} against one process ({:.0} s)", t0.elapsed().as_secs_f64()));

    // scancel mid-run (SIGTERM: the ranks write a checkpoint), then the same sbatch again; and a
    // requeue mid-run, which Slurm restarts by itself.
    for how in ["scancel", "requeue"] {
        let out = root().join(format!("slurm-{how}"));
        let _ = std::fs::remove_dir_all(&out);
        let (id, _) = sbatch(&cluster, &conf, &out, &steps, false);
        let t0 = Instant::now();
        while llama_cpt::train::checkpoint::complete_checkpoints(&out).unwrap().len() < 2 {
            assert!(t0.elapsed() < Duration::from_secs(300), "job {id}: no second checkpoint:\n{}", slurm_log(id));
            std::thread::sleep(Duration::from_millis(50));
        }
        let t1 = Instant::now();
        let o = match how {
            "scancel" => slurm_cmd(&cluster, &conf, "scancel").arg(id.to_string()).output().unwrap(),
            _ => slurm_cmd(&cluster, &conf, "scontrol").args(["requeue", &id.to_string()]).output().unwrap(),
        };
        assert!(o.status.success(), "{how} {id}: {}", text(&o));
        if how == "requeue" {
            // Slurm holds a requeued job back for two minutes (its begin time, set once the job
            // is pending again); a test need not wait for that.
            let t = Instant::now();
            loop {
                let o = slurm_cmd(&cluster, &conf, "squeue")
                    .args(["-h", "-j", &id.to_string(), "-o", "%T"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&o.stdout).trim() == "PENDING" {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(120), "job {id} was not requeued:\n{}", slurm_log(id));
                std::thread::sleep(Duration::from_millis(100));
            }
            let o = slurm_cmd(&cluster, &conf, "scontrol")
                .args(["update", &format!("JobId={id}"), "StartTime=now"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", text(&o));
        }
        if how == "scancel" {
            let state = wait_for_job(&cluster, &conf, id, Duration::from_secs(120));
            let stopped = t1.elapsed();
            let log = slurm_log(id);
            assert!(state.contains("JobState=CANCELLED"), "{state}");
            assert!(log.contains("interrupt: writing a checkpoint"), "the ranks checkpoint on SIGTERM:\n{log}");
            let at = metrics(&out).last().unwrap()["step"].as_u64().unwrap();
            assert!(at < 9, "cancelled before the end: {log}");
            report.push(format!("scancel at step {at}: the job was gone after {stopped:.1?}"));
            let (id, o) = sbatch(&cluster, &conf, &out, &steps, true);
            assert!(o.status.success(), "resubmitted job {id} failed:\n{}", slurm_log(id));
            assert!(slurm_log(id).contains("resum"), "{}", slurm_log(id));
        } else {
            let state = wait_for_job(&cluster, &conf, id, Duration::from_secs(300));
            assert!(state.contains("JobState=COMPLETED") && state.contains("Restarts=1"), "{state}\n{}", slurm_log(id));
            assert!(slurm_log(id).contains("resum"), "the requeued run resumed:\n{}", slurm_log(id));
            report.push(format!(
                "scontrol requeue: Slurm restarted the job, which resumed and finished ({:.1?})",
                t1.elapsed()
            ));
        }
        let logged: Vec<u64> = metrics(&out).iter().map(|m| m["step"].as_u64().unwrap()).collect();
        assert_eq!(logged, (1..=9).collect::<Vec<_>>(), "{how}: every step logged once");
        let what = format!("{how} and resume");
        assert_losses_agree(&what, &losses(&out), &losses(&full));
        let same = final_params(&out) == want_params;
        let param_err = assert_params_agree(&what, &final_params(&out), &want_params);
        report.push(format!(
            "{what}: final parameters {} the uninterrupted job's (≤ {param_err:.1e})",
            if same { "bit-identical to" } else { "within bounds of" }
        ));
    }
    eprintln!("{}", report.join("\n"));
}
