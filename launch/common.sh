# Sourced by start_head.sh and start_worker.sh: NPU detection, Ray token authentication and the
# fixed ports a node listens on. Not runnable on its own. See docs/cluster.md.
#
# Ray 2.60 token authentication, as implemented in ray/_private/authentication/ and the C++
# AuthenticationTokenLoader:
#   - the mode comes from RAY_AUTH_MODE (token | disabled), read by every Ray process;
#   - the token is looked up, in order, in RAY_AUTH_TOKEN (the token itself), RAY_AUTH_TOKEN_PATH
#     (a file holding it) and ~/.ray/auth_token;
#   - `ray start --head` turns token mode on by itself only when RAY_AUTH_MODE is unset and a token
#     is found; `ray start --address` and `ray.init(address="HOST:PORT")` never do: they send a
#     token only when RAY_AUTH_MODE=token. So these scripts export RAY_AUTH_MODE=token (unless the
#     operator set RAY_AUTH_MODE=disabled) and the same token must reach every node and the driver.

# shellcheck shell=bash

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

require_command() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is not on PATH; activate the environment that has dist_ptq installed"
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

# Print the number of NPUs this node should advertise as the Ray resource "NPU".
detect_npus() {
    local n
    if [[ -n "${DIST_PTQ_NPUS:-}" ]]; then
        is_uint "$DIST_PTQ_NPUS" || die "DIST_PTQ_NPUS must be a non-negative integer, got '$DIST_PTQ_NPUS'"
        n=$DIST_PTQ_NPUS
    else
        n=$(compgen -G '/dev/davinci[0-9]*' | wc -l)
        if [[ "$n" -eq 0 ]] && command -v npu-smi >/dev/null 2>&1; then
            n=$(npu-smi info -l 2>/dev/null | awk -F: '/Total Count/ {gsub(/ /, "", $2); print $2; exit}')
            is_uint "${n:-}" || n=0
        fi
    fi
    # Ray refuses more NPUs than ASCEND_RT_VISIBLE_DEVICES lists when it is already set.
    if [[ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]]; then
        local visible
        visible=$(tr ',' '\n' <<<"$ASCEND_RT_VISIBLE_DEVICES" | grep -c .)
        if [[ "$visible" -lt "$n" ]]; then
            echo "note: ASCEND_RT_VISIBLE_DEVICES lists $visible devices; advertising $visible NPUs, not $n" >&2
            n=$visible
        fi
    fi
    echo "$n"
}

# --resources value: always explicit, so {"NPU": 0} also stops Ray's own NPU auto-detection.
npu_resources() {
    printf '{"NPU": %d}' "$1"
}

is_loopback() {
    [[ "$1" == localhost || "$1" == 127.* || "$1" == ::1 ]]
}

# A head address other nodes and drivers can use. Ray 2.60 replaces a loopback host given as
# `--address 127.0.0.1:P` (or localhost) by this machine's routable address before it connects, and a
# head started on loopback listens on 127.0.0.1 only; a host name that resolves to 127.0.0.1 is
# left alone. So a loopback head is addressed by such a name (this machine's, or another one that
# /etc/hosts maps to 127.0.0.1). Other addresses pass unchanged.
reachable_head_address() {
    local addr=$1 host port name
    host=${addr%:*}
    port=${addr##*:}
    [[ "$host" == 127.0.0.1 || "$host" == localhost ]] || { echo "$addr"; return 0; }
    for name in "$(hostname)" $(awk '$1 == "127.0.0.1" { for (i = 2; i <= NF; i++) print $i }' /etc/hosts 2>/dev/null); do
        [[ "$name" == localhost || -z "$name" ]] && continue
        if [[ "$(getent ahostsv4 "$name" 2>/dev/null | awk 'NR == 1 { print $1 }')" == 127.0.0.1 ]]; then
            echo "$name:$port"
            return 0
        fi
    done
    die "Ray rewrites the loopback head address $addr to this machine's routable address, where a loopback head does not listen; add a name for 127.0.0.1 to /etc/hosts and use NAME:$port"
}

# Where the token comes from (Ray's order), or nothing.
token_source() {
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        echo "RAY_AUTH_TOKEN"
    elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        [[ -s "$RAY_AUTH_TOKEN_PATH" ]] && echo "$RAY_AUTH_TOKEN_PATH"
    elif [[ -s "$HOME/.ray/auth_token" ]]; then
        echo "$HOME/.ray/auth_token"
    fi
    return 0
}

# role: head (creates a token where none exists) or worker (requires one).
setup_auth() {
    local role=$1 src file
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    case "$RAY_AUTH_MODE" in
        disabled)
            echo "warning: RAY_AUTH_MODE=disabled: anyone who reaches the Ray ports can run code on this node" >&2
            return 0 ;;
        token) ;;
        *) die "RAY_AUTH_MODE must be 'token' or 'disabled', got '$RAY_AUTH_MODE'" ;;
    esac
    src=$(token_source)
    if [[ -z "$src" ]]; then
        if [[ "$role" != head ]]; then
            die "token authentication is on but no token was found: copy the head's token to ~/.ray/auth_token, or set RAY_AUTH_TOKEN_PATH to a file holding it, or RAY_AUTH_TOKEN to the token (or RAY_AUTH_MODE=disabled on every node)"
        fi
        file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
        mkdir -p "$(dirname "$file")"
        # the same generator as Ray's (`ray get-auth-token --generate`): 256 random bits, hex
        (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$file")
        echo "generated a Ray auth token in $file" >&2
        src=$file
    fi
    echo "Ray token authentication: on, token from $src" >&2
}

# Ports as operators open them. Ray's defaults where it has fixed ones; fixed values where Ray would
# otherwise pick a random port, so that a firewall can be written once.
RAY_PORT="${RAY_PORT:-6379}"                                       # GCS (head only)
RAY_CLIENT_SERVER_PORT="${RAY_CLIENT_SERVER_PORT:-10001}"          # Ray client server (head only, when ray[client] is installed)
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"                   # dashboard, when enabled (head only)
RAY_NODE_MANAGER_PORT="${RAY_NODE_MANAGER_PORT:-6380}"             # raylet
RAY_OBJECT_MANAGER_PORT="${RAY_OBJECT_MANAGER_PORT:-6381}"         # object transfers between nodes
RAY_RUNTIME_ENV_AGENT_PORT="${RAY_RUNTIME_ENV_AGENT_PORT:-6382}"
RAY_DASHBOARD_AGENT_GRPC_PORT="${RAY_DASHBOARD_AGENT_GRPC_PORT:-6383}"
RAY_DASHBOARD_AGENT_LISTEN_PORT="${RAY_DASHBOARD_AGENT_LISTEN_PORT:-52365}"
RAY_METRICS_EXPORT_PORT="${RAY_METRICS_EXPORT_PORT:-6384}"
RAY_MIN_WORKER_PORT="${RAY_MIN_WORKER_PORT:-10002}"                # one port per worker process
RAY_MAX_WORKER_PORT="${RAY_MAX_WORKER_PORT:-19999}"

# `ray start` options common to head and worker nodes.
node_options() {
    local npus=$1
    local opts=(
        --num-cpus "${RAY_NUM_CPUS:-$(nproc)}"
        --resources "$(npu_resources "$npus")"
        --node-manager-port "$RAY_NODE_MANAGER_PORT"
        --object-manager-port "$RAY_OBJECT_MANAGER_PORT"
        --runtime-env-agent-port "$RAY_RUNTIME_ENV_AGENT_PORT"
        --dashboard-agent-grpc-port "$RAY_DASHBOARD_AGENT_GRPC_PORT"
        --dashboard-agent-listen-port "$RAY_DASHBOARD_AGENT_LISTEN_PORT"
        --metrics-export-port "$RAY_METRICS_EXPORT_PORT"
        --min-worker-port "$RAY_MIN_WORKER_PORT"
        --max-worker-port "$RAY_MAX_WORKER_PORT"
        --disable-usage-stats
    )
    [[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ]] && opts+=(--object-store-memory "$RAY_OBJECT_STORE_MEMORY")
    printf '%s\n' "${opts[@]}"
}
