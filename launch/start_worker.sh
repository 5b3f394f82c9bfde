#!/usr/bin/env bash
# Join this machine to a running dist_ptq Ray cluster as a worker node.
#
# Usage: start_worker.sh HEAD_ADDR     (HOST:PORT, as printed by start_head.sh; default $RAY_ADDRESS)
#
# Expects in its environment:
#   PATH               with `ray` and `python` of the same environment as the head (same versions).
#   NODE_IP            optional: this node's address on the cluster network. Default: the interface
#                      Ray uses to reach the head. A loopback value is left to Ray, which then
#                      derives 127.0.0.1 from a loopback head.
#   RAY_NUM_CPUS       optional, default: all cores (`nproc`). Each NPU actor takes 1 CPU.
#   DIST_PTQ_NPUS      optional: NPUs to advertise. Default: the count of /dev/davinci[0-9]*, else
#                      `npu-smi info -l`'s Total Count, else 0. Ray sets ASCEND_RT_VISIBLE_DEVICES
#                      in each actor from the NPU it assigns.
#   RAY_OBJECT_STORE_MEMORY optional: object store bytes.
#   RAY_BLOCK=1        optional: stay in the foreground until Ray stops (`ray start --block`), as a
#                      Slurm step must.
#   Ports (defaults): RAY_NODE_MANAGER_PORT 6380, RAY_OBJECT_MANAGER_PORT 6381,
#     RAY_RUNTIME_ENV_AGENT_PORT 6382, RAY_DASHBOARD_AGENT_GRPC_PORT 6383,
#     RAY_DASHBOARD_AGENT_LISTEN_PORT 52365, RAY_METRICS_EXPORT_PORT 6384,
#     RAY_MIN_WORKER_PORT..RAY_MAX_WORKER_PORT 10002..19999. Two nodes on one machine need
#     different values.
#   Token authentication: the head's token, in RAY_AUTH_TOKEN, or a file named by
#     RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. RAY_AUTH_MODE defaults to token here: Ray sends the
#     token on `ray start --address` only in that mode. RAY_AUTH_MODE=disabled if the head has it.
#   A loopback head (127.0.0.1:PORT, a one-machine trial) is joined through a host name of 127.0.0.1
#     (Ray would otherwise swap the loopback address for the routable one, where the head does not
#     listen); this machine's name is used when /etc/hosts maps it there.
#   Ray's session directory is the head's (RAY_TEMP_DIR on the head); it is not set here.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
[[ $# -le 1 ]] || { usage >&2; exit 2; }
head_addr="${1:-${RAY_ADDRESS:-}}"
[[ -n "$head_addr" ]] || { usage >&2; echo "$(basename "$0"): error: give the head address HOST:PORT" >&2; exit 2; }

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require_command ray
require_command python

npus=$(detect_npus)
setup_auth worker
head_addr=$(reachable_head_address "$head_addr")

mapfile -t opts < <(node_options "$npus")
opts+=(--address "$head_addr")
if [[ -n "${NODE_IP:-}" ]] && ! is_loopback "$NODE_IP"; then
    opts+=(--node-ip-address "$NODE_IP")
fi

echo "joining the Ray cluster at $head_addr: NPU ${npus}" >&2
[[ "${RAY_BLOCK:-0}" == 1 ]] && exec ray start "${opts[@]}" --block >&2
ray start "${opts[@]}" >&2
echo "joined $head_addr as a worker node with NPU ${npus}"
