#!/usr/bin/env bash
# (g) Rolling upgrades, measured: the time to replace one node and the whole roll, for 3 and
# 5 nodes rolled from OpenBao 2.6.1 to 2.6.2 with the lifecycle hooks (launch before
# terminate, graceful leave), beside the naive roll (terminate first, no hooks, no watch),
# and the reaping of an instance lost without its hook. It runs the rolling tests
# (tests/rolling.rs, including the ones CI skips) and renders what they report
# (VB_ROLL_REPORT) as Markdown, on stdout and in bench/roll-results.md.
#
#   bash bench/roll.sh
#
#   BENCH_PROFILE   "release" builds the tests and the agent with --release (slow the first
#                   time: every dependency); default: the debug build the tests use. The roll
#                   is paced by raft and autopilot (elections, autopilot's 10 s server
#                   stabilization), not by the agent's CPU.
#   BENCH_TIMEOUT   bound on the whole run, seconds (default 2400)
#
# The floors the numbers compare with are in the report: the failover floor (a bare
# step-down's longest write gap, measured in each roll first) and autopilot's
# server_stabilization_time (10 s), which a new voter must pass before it counts.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export VB_TESTBED_VENV="${VB_TESTBED_VENV:-${HOME:-/root}/.cache/vault-bootstrap-testbed/venv}"
bash tests/testbed/install.sh >/dev/null
BOUND=${BENCH_TIMEOUT:-2400}
PROFILE_ARGS=()
[[ ${BENCH_PROFILE:-debug} == release ]] && PROFILE_ARGS=(--release)

REPORT=$(mktemp)
LOG=$(mktemp)
trap 'rm -f "$REPORT" "$LOG"' EXIT
echo "bench/roll: running the rolling tests (one at a time), log in $LOG" >&2
rc=0
VB_ROLL_REPORT=$REPORT timeout --kill-after=60 "$BOUND" \
    cargo test "${PROFILE_ARGS[@]}" --test rolling -- --include-ignored --test-threads=1 \
    >"$LOG" 2>&1 || rc=$?
if [[ $rc -ne 0 ]]; then
    tail -60 "$LOG" >&2
    echo "bench/roll: the rolling tests failed (exit $rc): no numbers" >&2
    exit 1
fi

python3 bench/roll_report.py "$REPORT" "${BENCH_PROFILE:-debug}" | tee bench/roll-results.md
