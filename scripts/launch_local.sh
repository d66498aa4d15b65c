#!/usr/bin/env bash
# Start N `jaxlm train` processes on this machine, as a multi-host job would run on N hosts.
#
#   scripts/launch_local.sh N [jaxlm train arguments...]
#   scripts/launch_local.sh 2 configs/tiny.yaml train.steps=20 checkpoint.dir=runs/two
#
# Each process gets its own simulated CPU devices (LOCAL_DEVICES, default 2) and the explicit
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID that jax.distributed.initialize reads;
# the coordinator listens on a free port of 127.0.0.1. The script waits for every process; when
# one fails it stops the others and exits with the failing process's status.
#
# Environment: PYTHON (default: python3), LOCAL_DEVICES (default 2), JAXLM_HEARTBEAT_TIMEOUT_S
# and JAXLM_INIT_TIMEOUT_S (passed through; see docs/cluster.md). SIGTERM to any one process stops
# all of them after the same step, with one checkpoint; the same command resumes.
set -u

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 N [jaxlm train arguments...]  (N = number of processes)" >&2
    exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python3}
local_devices=${LOCAL_DEVICES:-2}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
flags=$(printf '%s\n' ${XLA_FLAGS:-} | grep -v host_platform_device_count | tr '\n' ' ')

pids=()
stop_all() {  # TERM first (a clean stop), KILL whatever is left 10 s later
    kill "${pids[@]}" 2>/dev/null
    (sleep 10; kill -9 "${pids[@]}" 2>/dev/null) &
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
    JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$num_processes JAX_PROCESS_ID=$i \
        JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
        XLA_FLAGS="$flags --xla_force_host_platform_device_count=$local_devices" \
        "$python" -m jaxlm.cli train "$@" &
    pids+=($!)
done

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
    wait -n -p done_pid "${running[@]}"
    rc=$?
    for ((i = 0; i < num_processes; i++)); do
        [[ ${pids[$i]} == "$done_pid" ]] && rank=$i
    done
    running=($(printf '%s\n' "${running[@]}" | grep -vx "$done_pid"))
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
        echo "launch_local: process $rank (pid $done_pid) exited with status $rc; stopping the others" >&2
        status=$rc
        stop_all
    fi
done
exit $status
