#!/usr/bin/env bash
# Simulated cluster nodes on one machine: each node is a network namespace with its own address
# on a private bridge, its own host name (a UTS namespace per command) and an /etc/hosts naming
# every node (bound over /etc/hosts in a mount namespace per command), so that launchers and
# rendezvous really go from one address to another. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN),
# iproute2 and util-linux (nsenter, unshare). Used by tests/multi_node.rs.
#
#   tools/sim-nodes.sh up DIR N          N nodes node0…node{N-1}; DIR keeps the cluster's state
#   tools/sim-nodes.sh exec DIR NODE CMD…  run CMD on NODE (its namespace, host name and hosts file)
#   tools/sim-nodes.sh kill DIR NODE      SIGKILL every process of NODE (a node that dies)
#   tools/sim-nodes.sh link DIR NODE up|down   bring NODE's link up or down (a lost network)
#   tools/sim-nodes.sh slurm DIR [GPUS]   a Slurm cluster on the nodes (below)
#   tools/sim-nodes.sh down DIR           kill what runs on the nodes, remove namespaces, bridge, files
#
# `slurm` starts Debian's slurm-wlm on the nodes: slurmctld on node0, one slurmd per node (named
# after it, at its address), each node with its CPUs and GPUS [2] generic "gpu" resources (device
# files that are /dev/null's twins: Slurm counts them and sets CUDA_VISIBLE_DEVICES, nothing more),
# auth/none (no munge: the daemons trust every caller, fine on private addresses only), no cgroups,
# no accounting. State, logs and DIR/slurm/slurm.conf stay in DIR/slurm; run sbatch, srun,
# squeue, scancel on a node with SLURM_CONF=DIR/slurm/slurm.conf. It returns once every node is idle.
#
# `up` writes DIR/env (SIM_NODES, SIM_SUBNET, SIM_ADDR_nodeK) and DIR/rsh, an ssh stand-in for
# Open MPI (`--mca plm_rsh_agent DIR/rsh`): `rsh [options] NODE COMMAND…` runs the command line on
# NODE through sh, as ssh would. The namespaces are named lcpt<owner pid>n<K>: `up` first removes
# those of owners that no longer run, so a killed test leaves nothing behind for long.
#
# What this does not simulate: bandwidth or latency (veth is a memory copy), InfiniBand, RDMA,
# GPUDirect; all nodes share one file system, /dev/shm, one process table and the same CPUs.
set -euo pipefail

die() { echo "sim-nodes: $*" >&2; exit 1; }
[[ $# -ge 2 ]] || die "usage: $0 up DIR N | exec DIR NODE CMD… | kill DIR NODE | link DIR NODE up|down | slurm DIR [GPUS] | down DIR"
cmd=$1 dir=$2
shift 2

ns_of() { echo "lcpt${OWNER}n${1#node}"; }
load() {
    [[ -f $dir/env ]] || die "$dir/env: no cluster there (run '$0 up $dir N' first)"
    # shellcheck source=/dev/null
    source "$dir/env"
}
node_ns() {
    local node=$1
    [[ $node =~ ^node[0-9]+$ ]] && (( ${node#node} < SIM_NODES )) || die "$node: not a node of $dir (node0…node$((SIM_NODES - 1)))"
    ns_of "$node"
}

# Remove one owner's namespaces and links; kills what still runs inside first.
teardown_owner() {
    local owner=$1 ns pid
    local all
    all=$(ip netns list | awk '{print $1}' | grep -E "^lcpt${owner}n[0-9]+$" || true)
    for ns in $all; do
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    # SIGKILL is delivered asynchronously: wait (up to 10 s) until nothing runs there any more.
    for ((try = 0; try < 100; try++)); do
        [[ -z $(for ns in $all; do ip netns pids "$ns" 2>/dev/null; done) ]] && break
        sleep 0.1
    done
    for ns in $all; do ip netns del "$ns" 2>/dev/null || true; done
    # The host ends of the veth pairs and the bridge (a namespace still held by a dying process
    # would keep its pair alive a little longer).
    for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^lcpt${owner}(v[0-9]+|br)$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
}

case $cmd in
up)
    n=${1:?usage: $0 up DIR N}
    (( n >= 1 && n <= 32 )) || die "N=$n: 1 to 32 nodes"
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
    command -v ip >/dev/null || die "needs iproute2 (ip)"
    # Leftovers of owners that are gone.
    for owner in $(ip netns list | awk '{print $1}' | sed -nE 's/^lcpt([0-9]+)n[0-9]+$/\1/p' | sort -u); do
        kill -0 "$owner" 2>/dev/null || teardown_owner "$owner"
    done
    OWNER=${SIM_NODES_OWNER:-$PPID}
    mkdir -p "$dir"
    # A /24 of 10.0.0.0/8 from the owner's pid: the root namespace holds no address on it, so it
    # cannot clash with the machine's own routes, only two live clusters could share it.
    subnet="10.$(( 100 + OWNER / 256 % 150 )).$(( OWNER % 256 ))"
    br="lcpt${OWNER}br"
    teardown_owner "$OWNER"
    trap 'teardown_owner "$OWNER"' ERR
    ip link add "$br" type bridge
    ip link set "$br" up
    {
        echo "127.0.0.1 localhost"
        for ((k = 0; k < n; k++)); do echo "$subnet.$((k + 1)) node$k"; done
    } >"$dir/hosts"
    {
        echo "OWNER=$OWNER"
        echo "SIM_NODES=$n"
        echo "SIM_SUBNET=$subnet.0/24"
        for ((k = 0; k < n; k++)); do echo "SIM_ADDR_node$k=$subnet.$((k + 1))"; done
    } >"$dir/env"
    for ((k = 0; k < n; k++)); do
        ns=$(ns_of "node$k")
        ip netns add "$ns"
        ip link add "lcpt${OWNER}v$k" type veth peer name "lcpt${OWNER}p$k"
        ip link set "lcpt${OWNER}v$k" master "$br" up
        ip link set "lcpt${OWNER}p$k" netns "$ns"
        ip -n "$ns" link set "lcpt${OWNER}p$k" name eth0
        ip -n "$ns" addr add "$subnet.$((k + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
    trap - ERR
    self=$(realpath "$0")
    cat >"$dir/rsh" <<EOF
#!/usr/bin/env bash
# ssh stand-in for Open MPI: [options] NODE COMMAND… runs COMMAND on NODE of $dir.
while [[ \${1:-} == -* ]]; do shift; done
node=\${1:?usage: \$0 NODE COMMAND…}
shift
exec "$self" exec "$dir" "\$node" sh -c "\$*"
EOF
    chmod +x "$dir/rsh"
    echo "sim-nodes: $n nodes on $subnet.0/24 ($(for ((k = 0; k < n; k++)); do printf 'node%d=%s.%d ' "$k" "$subnet" $((k + 1)); done))" >&2
    ;;
exec)
    load
    node=${1:?usage: $0 exec DIR NODE CMD…}
    shift
    ns=$(node_ns "$node")
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup file systems
    # slurmd needs. The hosts file is bound over /etc/hosts in a private mount namespace.
    exec nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
        sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"' "$node" "$dir/hosts" "$@"
    ;;
kill)
    load
    ns=$(node_ns "${1:?usage: $0 kill DIR NODE}")
    for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
    ;;
link)
    load
    ns=$(node_ns "${1:?usage: $0 link DIR NODE up|down}")
    state=${2:?usage: $0 link DIR NODE up|down}
    [[ $state == up || $state == down ]] || die "link state $state: up or down"
    ip -n "$ns" link set eth0 "$state"
    ;;
slurm)
    load
    gpus=${1:-2}
    for tool in slurmctld slurmd sinfo; do
        command -v $tool >/dev/null || die "needs Slurm ($tool): apt-get install slurmctld slurmd slurm-client"
    done
    s=$dir/slurm
    rm -rf "$s"
    mkdir -p "$s/state"
    cpus=$(nproc)
    nodes=$(for ((k = 0; k < SIM_NODES; k++)); do printf 'node%d,' "$k"; done)
    {
        echo "ClusterName=simnodes"
        echo "SlurmctldHost=node0(${SIM_ADDR_node0:?})"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/none"
        echo "CredType=cred/none"
        echo "StateSaveLocation=$s/state"
        echo "SlurmdSpoolDir=$s/spool-%n"
        echo "SlurmctldPidFile=$s/slurmctld.pid"
        echo "SlurmdPidFile=$s/slurmd-%n.pid"
        echo "SlurmctldLogFile=$s/slurmctld.log"
        echo "SlurmdLogFile=$s/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        # The nodes share one machine's CPUs: take the configuration as it is written.
        echo "SlurmdParameters=config_overrides"
        echo "MpiDefault=none"
        echo "ReturnToService=2"
        echo "JobCompType=jobcomp/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "GresTypes=gpu"
        # Time between SIGTERM and SIGKILL when a job is cancelled or requeued: the trainer
        # writes its checkpoint in it.
        echo "KillWait=60"
        for ((k = 0; k < SIM_NODES; k++)); do
            addr_var=SIM_ADDR_node$k
            echo "NodeName=node$k NodeAddr=${!addr_var} CPUs=$cpus Gres=gpu:$gpus State=UNKNOWN"
        done
        echo "PartitionName=sim Nodes=${nodes%,} Default=YES MaxTime=INFINITE State=UP"
    } >"$s/slurm.conf"
    echo "AutoDetect=off" >"$s/gres.conf"
    for ((k = 0; k < SIM_NODES; k++)); do
        mkdir -p "$s/spool-node$k" "$s/dev-node$k"
        for ((g = 0; g < gpus; g++)); do mknod "$s/dev-node$k/gpu$g" c 1 3; done
        echo "NodeName=node$k Name=gpu File=$s/dev-node$k/gpu[0-$((gpus - 1))]" >>"$s/gres.conf"
    done
    export SLURM_CONF=$s/slurm.conf
    self=$(realpath "$0")
    setsid "$self" exec "$dir" node0 slurmctld -D -f "$SLURM_CONF" >"$s/slurmctld.out" 2>&1 </dev/null &
    for ((k = 0; k < SIM_NODES; k++)); do
        setsid "$self" exec "$dir" "node$k" slurmd -D -N "node$k" -f "$SLURM_CONF" >"$s/slurmd-node$k.out" 2>&1 </dev/null &
    done
    for ((try = 0; try < 300; try++)); do
        idle=$("$self" exec "$dir" node0 sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l)
        (( idle == SIM_NODES )) && { echo "sim-nodes: Slurm up: $SIM_NODES nodes idle, $gpus GPUs each (SLURM_CONF=$SLURM_CONF)" >&2; exit 0; }
        sleep 0.1
    done
    "$self" exec "$dir" node0 sinfo -N -l >&2 || true
    tail -n 5 "$s"/*.log >&2 || true
    die "Slurm did not come up within 30 s (logs in $s)"
    ;;
down)
    [[ -f $dir/env ]] || exit 0
    load
    teardown_owner "$OWNER"
    rm -f "$dir/env" "$dir/rsh" "$dir/hosts"
    ;;
*) die "unknown command $cmd" ;;
esac
