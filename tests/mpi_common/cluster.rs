//! Simulated nodes for the multi-node tests: `tools/sim-nodes.sh` (network namespaces on a private
//! bridge), brought up by [`Cluster::up`] and torn down when the value drops, a failed test
//! included.
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

pub struct Cluster {
    dir: PathBuf,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/sim-nodes.sh")
}

impl Cluster {
    /// `nodes` nodes, node0…, their state in `dir`. Panics with the reason when this machine
    /// cannot make network namespaces (the tests need root, as in CI).
    pub fn up(dir: PathBuf, nodes: usize) -> Cluster {
        let _ = std::fs::remove_dir_all(&dir);
        let o = Command::new(script())
            .args(["up", &dir.display().to_string(), &nodes.to_string()])
            .env("SIM_NODES_OWNER", std::process::id().to_string())
            .output()
            .expect("running tools/sim-nodes.sh");
        assert!(
            o.status.success(),
            "simulated nodes (network namespaces: needs root and iproute2) could not be made:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        Cluster { dir, env }
    }

    /// A command run on `node` (in its namespace, with its host name).
    pub fn exec(&self, node: &str) -> Command {
        let mut c = Command::new(script());
        c.args(["exec", &self.dir.display().to_string(), node]);
        c
    }

    /// Open MPI's ssh stand-in for this cluster.
    pub fn rsh(&self) -> PathBuf {
        self.dir.join("rsh")
    }

    /// The nodes' subnet, as `a.b.c.0/24`.
    pub fn subnet(&self) -> &str {
        &self.env["SIM_SUBNET"]
    }

    pub fn addr(&self, node: &str) -> &str {
        &self.env[&format!("SIM_ADDR_{node}")]
    }

    /// SIGKILL to every process of `node`: the node dies.
    pub fn kill(&self, node: &str) {
        self.tool(&["kill", node]);
    }

    /// `node`'s link up or down.
    pub fn link(&self, node: &str, up: bool) {
        self.tool(&["link", node, if up { "up" } else { "down" }]);
    }

    /// Starts Slurm on the nodes (`tools/sim-nodes.sh slurm`, `gpus` GPUs per node); returns its
    /// SLURM_CONF.
    pub fn slurm(&self, gpus: usize) -> PathBuf {
        self.tool(&["slurm", &gpus.to_string()]);
        self.dir.join("slurm/slurm.conf")
    }

    fn tool(&self, args: &[&str]) {
        let dir = self.dir.display().to_string();
        let all: Vec<&str> = [args[0], dir.as_str()].into_iter().chain(args[1..].iter().copied()).collect();
        let o = Command::new(script()).args(&all).output().unwrap();
        assert!(o.status.success(), "sim-nodes {all:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["down", &self.dir.display().to_string()]).status();
    }
}
