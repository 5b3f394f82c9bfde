#!/usr/bin/env bash
# Stop the Ray processes of this node and check that none is left.
#
# Usage: stop.sh [--force] [--grace SECONDS] [--temp-dir DIR]
#   --force        SIGKILL at once instead of SIGTERM first.
#   --grace S      seconds to wait after SIGTERM before SIGKILL (default 10).
#   --temp-dir DIR stop only the Ray cluster whose head was started with RAY_TEMP_DIR=DIR (its
#                  processes, those of worker nodes joined on this machine, and their children),
#                  leaving other Ray sessions of this user alone. Without it: `ray stop`, which
#                  stops every Ray process of this user on the machine.
#
# Expects in its environment: PATH with `ray` (without --temp-dir). Exits 1, listing them, if Ray
# processes are left.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

force=0 grace=10 temp_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -f|--force) force=1 ;;
        --grace) grace=${2:?--grace needs seconds}; shift ;;
        --temp-dir) temp_dir=${2:?--temp-dir needs a directory}; shift ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

# Ray's processes: its binaries, its Python daemons, and workers (renamed ray::...).
RAY_PATTERN='/ray/core/src/ray/(raylet/raylet|gcs/gcs_server)|ray/(dashboard/(dashboard|agent)|_private/log_monitor|autoscaler/_private/monitor|_private/runtime_env/agent/main)\.py|-m ray\.util\.client\.server|^ray::'

# "pid ppid args" of this user's live (non-zombie) processes, except this script and its children
# (their command lines carry the directory and patterns searched for).
processes() {
    ps -ww -u "$(id -u)" -o pid=,ppid=,stat=,args= | SELF=$$ awk '
        $3 !~ /^Z/ { pid = $1; ppid[pid] = $2; s = $0; sub(/^ *[0-9]+ +[0-9]+ +[^ ]+ /, "", s); args[pid] = s }
        END {
            mine[ENVIRON["SELF"]] = 1
            do {
                grew = 0
                for (p in ppid) if (!(p in mine) && (ppid[p] in mine)) { mine[p] = 1; grew = 1 }
            } while (grew)
            for (p in args) if (!(p in mine)) print p, ppid[p], args[p]
        }'
}

# pids of the session under $temp_dir: processes naming the directory, those naming one of its GCS
# addresses (the Ray client server names only that), and all their descendants.
session_pids() {
    local recorded=""
    [[ -f "$temp_dir/ray_current_cluster" ]] && recorded=$(<"$temp_dir/ray_current_cluster")
    processes | DIR="$temp_dir/" RECORDED="$recorded" awk '
        { pid = $1; ppid[pid] = $2; $1 = $2 = ""; args[pid] = $0 " " }
        END {
            if (ENVIRON["RECORDED"] != "") gcs["=" ENVIRON["RECORDED"] " "] = 1
            for (p in args)
                if (index(args[p], ENVIRON["DIR"])) {
                    keep[p] = 1
                    n = split(args[p], words, " ")
                    for (i = 1; i <= n; i++)
                        if (words[i] ~ /^--gcs[-_]address=/) { sub(/^[^=]*/, "", words[i]); gcs[words[i] " "] = 1 }
                }
            for (p in args)
                for (g in gcs)
                    if (index(args[p], g)) keep[p] = 1
            do {
                grew = 0
                for (p in args) if (!(p in keep) && (ppid[p] in keep)) { keep[p] = 1; grew = 1 }
            } while (grew)
            for (p in keep) print p
        }'
}

ray_pids() {
    processes | PATTERN="$RAY_PATTERN" awk '{ pid = $1; $1 = $2 = ""; sub(/^ +/, ""); if ($0 ~ ENVIRON["PATTERN"]) print pid }'
}

left() {
    if [[ -n "$temp_dir" ]]; then session_pids; else ray_pids; fi
}

signal_all() {
    local sig=$1 pids
    pids=$(left | tr '\n' ' ')
    [[ -n "${pids// }" ]] || return 0
    # shellcheck disable=SC2086
    kill "-$sig" $pids 2>/dev/null || true
}

wait_gone() {
    local deadline=$((SECONDS + $1))
    while [[ -n "$(left)" && $SECONDS -lt $deadline ]]; do sleep 0.5; done
}

if [[ -n "$temp_dir" ]]; then
    temp_dir=${temp_dir%/}
    if [[ ! -e "$temp_dir/session_latest" && ! -e "$temp_dir/ray_current_cluster" ]]; then
        echo "$(basename "$0"): error: $temp_dir holds no Ray session (no session_latest)" >&2
        exit 2
    fi
    if [[ $force -eq 1 ]]; then
        signal_all KILL
    else
        signal_all TERM
        wait_gone "$grace"
        signal_all KILL
    fi
    wait_gone 10
else
    command -v ray >/dev/null 2>&1 || { echo "$(basename "$0"): error: 'ray' is not on PATH" >&2; exit 2; }
    if [[ $force -eq 1 ]]; then ray stop --force; else ray stop --grace-period "$grace"; fi
    wait_gone 10
fi

remaining=$(left)
if [[ -n "$remaining" ]]; then
    echo "$(basename "$0"): Ray processes are still running:" >&2
    # shellcheck disable=SC2086
    ps -ww -o pid=,args= -p $(echo $remaining | tr ' ' ',') >&2 || true
    exit 1
fi
echo "no Ray process left${temp_dir:+ for $temp_dir}"
