#!/usr/bin/env bash
# Run a quantization on the running Ray cluster: preflight first, then `dist-ptq quantize`.
#
# Usage: submit.sh MODEL_DIR -c CONFIG.yaml -o OUT_DIR [other `dist-ptq quantize` options]
#   Every argument goes to `dist-ptq quantize` unchanged, with `--address $RAY_ADDRESS` added (an
#   --address among the arguments takes its place). MODEL_DIR must come first; give absolute paths
#   on a file system that every node mounts at the same place (stage workers read MODEL_DIR and
#   write OUT_DIR.partial on their own nodes).
#
# Expects in its environment:
#   PATH               with `python` and `dist-ptq` of the cluster's environment.
#   RAY_ADDRESS        the head, HOST:PORT as start_head.sh printed it; default `auto` (the cluster
#                      this machine last started or joined). A loopback head (127.0.0.1:PORT) is
#                      reached through a host name of 127.0.0.1, as in start_worker.sh.
#   Token authentication: RAY_AUTH_MODE (default token here: Ray sends the token to an explicit
#     HOST:PORT only in that mode) and the head's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
#     ~/.ray/auth_token.
#   DIST_PTQ_EXPECT_NODES  optional: preflight waits for this many nodes (default 1) ...
#   DIST_PTQ_NODES_WAIT    ... for at most this many seconds (default 120).
#   DIST_PTQ_SKIP_PREFLIGHT=1  optional: skip the preflight check.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    ""|-*) usage >&2; echo "$(basename "$0"): error: the first argument must be MODEL_DIR" >&2; exit 2 ;;
esac
model_dir=$1
shift

address="${RAY_ADDRESS:-auto}" out_dir="" args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --address) address=${2:?--address needs a value}; shift ;;
        --address=*) address=${1#--address=} ;;
        -o|--out) out_dir=${2:?$1 needs a directory}; args+=("$1" "$2"); shift ;;
        --out=*) out_dir=${1#--out=}; args+=("$1") ;;
        *) args+=("$1") ;;
    esac
    shift
done

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require_command python
require_command dist-ptq
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
[[ "$address" == auto ]] || address=$(reachable_head_address "$address")

if [[ "${DIST_PTQ_SKIP_PREFLIGHT:-0}" != 1 ]]; then
    preflight=(python "$(dirname "$0")/preflight.py" --address "$address" --model-dir "$model_dir"
               --expect-nodes "${DIST_PTQ_EXPECT_NODES:-1}" --wait "${DIST_PTQ_NODES_WAIT:-120}")
    [[ -n "$out_dir" ]] && preflight+=(--out-dir "$out_dir")
    "${preflight[@]}" || { echo "$(basename "$0"): preflight failed; nothing was submitted" >&2; exit 1; }
fi

exec dist-ptq quantize "$model_dir" "${args[@]}" --address "$address"
