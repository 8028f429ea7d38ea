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

python3 - "$REPORT" "${BENCH_PROFILE:-debug}" <<'PY' | tee bench/roll-results.md
import json, statistics, sys, datetime
rep = json.load(open(sys.argv[1]))
profile = sys.argv[2]
print("# Rolling upgrades (bench/roll.sh)\n")
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {profile} build, 2 cores, "
      "loopback test-bed (tests/rolling.rs), OpenBao 2.6.1 -> 2.6.2.\n")
rolls = {k: v for k, v in rep.items() if isinstance(v, dict) and v.get("replacements")}
print("| roll | nodes | per replaced node (median / max) | whole roll | min failure tolerance (steady) "
      "| writes failed / tried | longest write gap | failover floor | leader changes |")
print("|---|---|---|---|---|---|---|---|---|")
for name, r in sorted(rolls.items(), key=lambda kv: (kv[1].get("nodes", 0), kv[0])):
    per = [x.get("replacement_secs") for x in r["replacements"] if x.get("replacement_secs") is not None]
    per_s = f"{statistics.median(per):.1f} s / {max(per):.1f} s" if per else "-"
    def g(k, fmt="{}"):
        v = r.get(k)
        return "-" if v is None else fmt.format(v)
    print(f"| {name} | {g('nodes')} | {per_s} | {g('roll_secs', '{:.1f} s')} "
          f"| {g('min_failure_tolerance')} ({g('steady_failure_tolerance')}) "
          f"| {g('failed_writes')} / {g('write_attempts')} | {g('longest_gap_secs', '{:.2f} s')} "
          f"| {g('failover_floor_secs', '{:.2f} s')} | {g('leader_changes')} |")
print()
for name, r in sorted(rep.items()):
    if name in rolls:
        continue
    print(f"## {name}\n")
    for k, v in r.items():
        if not isinstance(v, (dict, list)):
            print(f"- {k}: {v}")
    print()
print("Full reports (JSON):\n")
print("```json")
print(json.dumps(rep, indent=1, sort_keys=True)[:20000])
print("```")
PY
