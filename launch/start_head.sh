#!/usr/bin/env bash
# Start the Ray head node of a dist_ptq cluster on this machine.
#
# Expects in its environment:
#   PATH               with `ray` and `python` of the environment that has dist_ptq installed
#                      (the same versions on every node; launch/preflight.py checks).
#   NODE_IP            optional: the address other nodes reach this one at (pick the cluster network
#                      on multi-NIC machines). Default: Ray's choice, the interface of the default route.
#                      A loopback address (127.x) makes a one-machine cluster for tests.
#   RAY_NUM_CPUS       optional, default: all cores (`nproc`). Each NPU actor takes 1 CPU.
#   DIST_PTQ_NPUS      optional: NPUs to advertise. Default: the count of /dev/davinci[0-9]*, else
#                      `npu-smi info -l`'s Total Count, else 0. 0 advertises no NPU resource.
#                      ASCEND_RT_VISIBLE_DEVICES is not set here: Ray sets it in every actor.
#   RAY_TEMP_DIR       optional: Ray's session and log directory root (default /tmp/ray); worker
#                      nodes use the head's.
#   RAY_INCLUDE_DASHBOARD  optional, default false. RAY_DASHBOARD_PORT (8265) when true; it binds
#                      to 127.0.0.1 only unless RAY_DASHBOARD_HOST says otherwise.
#   RAY_OBJECT_STORE_MEMORY optional: object store bytes (default: Ray's, 30% of memory).
#   RAY_ADDRESS_FILE   optional: also write the head address (HOST:PORT) to this file.
#   RAY_BLOCK=1        optional: stay in the foreground until Ray stops (`ray start --block`), as a
#                      Slurm step must: Slurm ends a step's processes when its command returns.
#   Ports (defaults): RAY_PORT 6379, RAY_CLIENT_SERVER_PORT 10001, RAY_NODE_MANAGER_PORT 6380,
#     RAY_OBJECT_MANAGER_PORT 6381, RAY_RUNTIME_ENV_AGENT_PORT 6382, RAY_DASHBOARD_AGENT_GRPC_PORT 6383,
#     RAY_DASHBOARD_AGENT_LISTEN_PORT 52365, RAY_METRICS_EXPORT_PORT 6384,
#     RAY_MIN_WORKER_PORT..RAY_MAX_WORKER_PORT 10002..19999.
#   Token authentication: RAY_AUTH_MODE (default token here), RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH
#     or ~/.ray/auth_token. Without a token, one is generated into RAY_AUTH_TOKEN_PATH (if set) or
#     ~/.ray/auth_token; give that same token to every worker node and to the submitting driver.
#
# Prints `RAY_ADDRESS=HOST:PORT` (the address to give start_worker.sh and submit.sh) on stdout, as
# its last line (its first with RAY_BLOCK=1); everything else goes to stderr.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo "Usage: $(basename "$0") [--help]"
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require_command ray
require_command python

npus=$(detect_npus)
setup_auth head

mapfile -t opts < <(node_options "$npus")
opts+=(
    --head
    --port "$RAY_PORT"
    --include-dashboard="${RAY_INCLUDE_DASHBOARD:-false}"
)
# The Ray client server (ray:// addresses) needs the ray[client] extra; dist_ptq does not use it, so it
# is started only when that extra is installed.
if "$(dirname "$(command -v ray)")/python" -c "import grpc" >/dev/null 2>&1; then
    opts+=(--ray-client-server-port "$RAY_CLIENT_SERVER_PORT")
fi
if [[ "${RAY_INCLUDE_DASHBOARD:-false}" == true ]]; then
    opts+=(--dashboard-port "$RAY_DASHBOARD_PORT" --dashboard-host "${RAY_DASHBOARD_HOST:-127.0.0.1}")
fi
temp_root="${RAY_TEMP_DIR:-${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray}"
[[ -n "${RAY_TEMP_DIR:-}" ]] && opts+=(--temp-dir "$RAY_TEMP_DIR")
if [[ -n "${NODE_IP:-}" ]]; then
    opts+=(--node-ip-address "$NODE_IP")
    if is_loopback "$NODE_IP"; then
        # Ray swaps a loopback node address for the routable one unless it believes it runs a
        # one-machine cluster; this switch (named for Windows/macOS) keeps 127.0.0.1.
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    fi
fi

echo "starting the Ray head: NPU ${npus}, GCS port ${RAY_PORT}" >&2
if [[ "${RAY_BLOCK:-0}" == 1 ]]; then
    address="${NODE_IP:-$(hostname -I | awk '{print $1}')}:${RAY_PORT}"
    [[ -n "${RAY_ADDRESS_FILE:-}" ]] && echo "$address" >"$RAY_ADDRESS_FILE"
    echo "RAY_ADDRESS=$address"
    exec ray start "${opts[@]}" --block >&2
fi
ray start "${opts[@]}" >&2

address=$(cat "$temp_root/ray_current_cluster" 2>/dev/null || true)
[[ -n "$address" ]] || address="${NODE_IP:-$(hostname -I | awk '{print $1}')}:${RAY_PORT}"
[[ -n "${RAY_ADDRESS_FILE:-}" ]] && echo "$address" >"$RAY_ADDRESS_FILE"
cat >&2 <<EOF

Ray head started. On every other node (same environment, same token):
    $(dirname "$0")/start_worker.sh $address
Submit from any node:
    RAY_ADDRESS=$address $(dirname "$0")/submit.sh MODEL_DIR -c CONFIG.yaml -o OUT_DIR --workers W
EOF
echo "RAY_ADDRESS=$address"
