#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests of slurm/dpo.sbatch.
#
#   tests/slurm/local_slurm.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf       # then sbatch / squeue / scontrol talk to it
#   tests/slurm/local_slurm.sh stop DIR    # cancels its jobs, stops the three daemons
#
# Needs the Debian packages slurm-wlm and munge, and root (slurmd runs jobs as
# their owner). Everything lives in DIR, with its own munge key and socket and
# random ports, so it does not touch a system Slurm or munge. The node has a
# "gpu" gres backed by null devices, so that the sbatch file's GPU requests
# are satisfiable on a CPU machine.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd

cmd=${1:?usage: $0 start|stop DIR}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR}")
conf=$dir/slurm.conf
node=localhost  # no DNS needed: the rendezvous host is the node name
num_gpus=2  # one rank per "GPU": TP2 or DP2 on a 2-core machine

start() {
  trap stop ERR
  for tool in munged mungekey slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurm-wlm munge" >&2; exit 1; }
  done
  mkdir -p "$dir"/{ctld,slurmd}
  chmod 755 "$dir"
  mungekey --create --force --keyfile="$dir/munge.key"
  munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
  local port=$((20000 + RANDOM % 20000))
  cat >"$conf" <<EOF
ClusterName=dpotest
SlurmctldHost=$node
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it starts again (default 120 s).
AuthInfo=socket=$dir/munge.socket,cred_expire=5
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
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
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) Gres=gpu:$num_gpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # Slurm drops a GPU without a device file: null devices stand in for them.
  for i in $(seq 0 $((num_gpus - 1))); do mknod "$dir/gpu$i" c 1 3; done
  echo "NodeName=$node Name=gpu File=$dir/gpu[0-$((num_gpus - 1))]" >"$dir/gres.conf"
  export SLURM_CONF=$conf  # also locates gres.conf
  slurmctld
  slurmd -N "$node"
  for _ in $(seq 60); do
    if SLURM_CONF=$conf sinfo -h -n "$node" -o %t 2>/dev/null | grep -qx idle; then
      echo "export SLURM_CONF=$conf"
      return
    fi
    sleep 1
  done
  echo "Slurm did not come up within 60 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  stop
  exit 1
}

stop_daemon() {  # pid file: TERM, then KILL after 10 s
  [[ -f $1 ]] || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  if [[ -f $conf ]]; then
    SLURM_CONF=$conf scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 30); do
      [[ -z $(SLURM_CONF=$conf squeue -h -t R,CG 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  stop_daemon "$dir/munged.pid"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
