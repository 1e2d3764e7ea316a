#!/usr/bin/env bash
# A small multi-node Slurm cluster on this machine, for tests of slurm/dpo.sbatch.
#
#   tests/slurm/local_slurm.sh start DIR [NODES]  # NODES nodes (default 2): writes DIR/slurm.conf, starts them
#   export SLURM_CONF=DIR/slurm.conf              # then sbatch / squeue / scontrol talk to it
#   tests/slurm/local_slurm.sh crash DIR NODE     # SIGKILL every job process on NODE (its slurmd stays up)
#   tests/slurm/local_slurm.sh stop DIR           # cancels its jobs, stops the daemons, removes the network
#
# Each node is a network namespace with its own UTS namespace (hostname = node name) and its own
# /etc/hosts (a bind mount inside the node, naming every node), joined to the others by a veth pair on
# a bridge of the host; its slurmd runs there, so the jobs it starts do too. The host holds munged and
# slurmctld and the bridge's address. Traffic between nodes (srun, torchrun's rendezvous, gloo) thus
# crosses real interfaces between distinct addresses, as on a cluster. The subnet is a random private
# 10.x.y.0/24 not routed on this machine; the namespaces have no default route, so nothing they send
# leaves the machine.
#
# Needs the Debian packages slurm-wlm, munge and iproute2, and root (network namespaces; slurmd runs
# jobs as their owner). Everything else lives in DIR, with its own munge key and socket and random
# ports, so it does not touch a system Slurm or munge. Nodes have a "gpu" gres backed by null devices,
# so that the sbatch file's GPU requests are satisfiable on a CPU machine. `stop` also runs when `start`
# fails; it is bounded (about 60 s) and safe to run twice.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd, ip

cmd=${1:?usage: $0 start|crash|stop DIR ...}
dir=$(realpath -m "${2:?usage: $0 start|crash|stop DIR ...}")
conf=$dir/slurm.conf
num_gpus=1  # "GPUs" per node, one rank each: two nodes make the two ranks a 2-core machine can run

start() {
  local num_nodes=${1:-2}
  for tool in munged mungekey slurmctld slurmd sbatch ip nsenter unshare; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurm-wlm munge iproute2" >&2; exit 1; }
  done
  mkdir -p "$dir"/ctld
  chmod 755 "$dir"
  trap 'stop' EXIT  # a start that fails (or times out) leaves nothing behind
  make_network "$num_nodes"
  # shellcheck source=/dev/null
  source "$dir/network.env"
  mungekey --create --force --keyfile="$dir/munge.key"
  munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
  write_conf "$num_nodes"
  export SLURM_CONF=$conf  # also locates gres.conf
  slurmctld
  local i
  for i in $(seq "$num_nodes"); do
    # In the node's network namespace (nsenter: `ip netns exec` would hide the host's cgroup mount, which
    # slurmd needs), a UTS and mount namespace of its own: the node's hostname, its hosts file.
    mkdir -p "$dir/slurmd-n$i"
    nsenter --net="/run/netns/$tag-n$i" unshare --uts --mount sh -c \
      "mount --bind '$dir/hosts' /etc/hosts && hostname n$i && exec slurmd -N n$i"
  done
  for _ in $(seq 60); do
    if [[ $(sinfo -h -o %t 2>/dev/null | sort -u) == idle && $(sinfo -h -o %D 2>/dev/null) == "$num_nodes" ]]; then
      trap - EXIT
      echo "export SLURM_CONF=$conf"
      return
    fi
    sleep 1
  done
  echo "Slurm did not come up within 60 s; see $dir/*.log" >&2
  exit 1
}

make_network() {  # a bridge on the host, a namespace per node; writes DIR/network.env and DIR/hosts
  local num_nodes=$1 tag subnet i
  tag=dpo$(printf %04x $((RANDOM % 65536)))  # interface names: at most 15 characters
  for _ in $(seq 20); do
    subnet=10.$((200 + RANDOM % 50)).$((RANDOM % 256))
    ip -4 route show | grep -q "^$subnet\." || break
  done
  printf 'tag=%s\nsubnet=%s\nnum_nodes=%s\n' "$tag" "$subnet" "$num_nodes" >"$dir/network.env"
  printf '127.0.0.1 localhost\n' >"$dir/hosts"
  ip link add "$tag-br" type bridge
  ip addr add "$subnet.1/24" dev "$tag-br"
  ip link set "$tag-br" up
  for i in $(seq "$num_nodes"); do
    ip netns add "$tag-n$i"
    ip link add "$tag-v$i" type veth peer name eth0 netns "$tag-n$i"
    ip link set "$tag-v$i" master "$tag-br" up
    ip -n "$tag-n$i" addr add "$subnet.$((10 + i))/24" dev eth0
    ip -n "$tag-n$i" link set eth0 up
    ip -n "$tag-n$i" link set lo up
    printf '%s n%s\n' "$subnet.$((10 + i))" "$i" >>"$dir/hosts"
  done
}

write_conf() {
  local num_nodes=$1 port=$((20000 + RANDOM % 20000))
  cat >"$conf" <<EOF
ClusterName=dpotest
# The controller listens on every address of the host; the nodes reach it on the bridge.
SlurmctldHost=localhost($subnet.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it starts again (default 120 s).
AuthInfo=socket=$dir/munge.socket,cred_expire=5
# Test pacing: a requeued job starts again within about a second rather than at the next scheduler pass
# (60 s) or backfill pass (30 s); sbatch --wait polls every 8 s rather than 32 s (it waits up to
# MinJobAge/2 between polls), and scontrol show job still finds a job that ended 16 s ago.
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=16
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName=n[1-$num_nodes] NodeAddr=$(seq -s, -f "$subnet.%g" 11 $((10 + num_nodes))) CPUs=$(nproc) Gres=gpu:$num_gpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # Slurm drops a GPU without a device file: null devices stand in for them.
  local i
  for i in $(seq 0 $((num_gpus - 1))); do mknod "$dir/gpu$i" c 1 3; done
  echo "NodeName=n[1-$num_nodes] Name=gpu File=$dir/gpu[0-$((num_gpus - 1))]" >"$dir/gres.conf"
}

job_processes() {  # pids in node $1's namespace other than its slurmd and slurmstepd
  local pid
  for pid in $(ip netns pids "$tag-n$1" 2>/dev/null); do
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurm* ]] || echo "$pid"
  done
}

crash() {
  # shellcheck source=/dev/null
  source "$dir/network.env"
  local pids
  pids=$(job_processes "${1#n}")
  [[ -n $pids ]] || { echo "no job processes on $1" >&2; exit 1; }
  # shellcheck disable=SC2086
  kill -9 $pids
  echo "killed $(wc -w <<<"$pids") process(es) on $1"
}

stop_daemons() {  # pid files: TERM, then KILL what is left after 10 s
  local pids=() file pid
  for file in "$@"; do
    [[ -f $file ]] && pid=$(cat "$file") && kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 20); do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
    [[ -z ${pid:-} ]] && return 0
    sleep 0.5
  done
  kill -9 "${pids[@]}" 2>/dev/null
}

stop() {
  set +e
  if [[ -f $conf ]] && [[ -f $dir/slurmctld.pid ]]; then
    SLURM_CONF=$conf timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null
    for _ in $(seq 30); do
      [[ -z $(SLURM_CONF=$conf timeout 5 squeue -h -t R,CG,CF 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  stop_daemons "$dir"/slurmd-*.pid "$dir/slurmctld.pid"
  stop_daemons "$dir/munged.pid"  # last: the others authenticate through it until they exit
  [[ -f $dir/network.env ]] || return 0
  # shellcheck source=/dev/null
  source "$dir/network.env"
  local i pids
  for i in $(seq "$num_nodes"); do
    # Anything left in a node (a stray rank) would keep its namespace and veth alive.
    pids=$(ip netns pids "$tag-n$i" 2>/dev/null)
    # shellcheck disable=SC2086
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null
    ip link del "$tag-v$i" 2>/dev/null  # both ends of the pair
    ip netns del "$tag-n$i" 2>/dev/null
  done
  ip link del "$tag-br" 2>/dev/null
  rm -f "$dir/network.env"
  return 0
}

case $cmd in
  start) start "${3:-2}" ;;
  crash) crash "${3:?usage: $0 crash DIR NODE}" ;;
  stop) stop ;;
  *) echo "usage: $0 start|crash|stop DIR ..." >&2; exit 2 ;;
esac
