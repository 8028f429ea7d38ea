#!/usr/bin/env python3
"""Renders the rolling tests' JSON report (VB_ROLL_REPORT) as Markdown: bench/roll.sh's
second half.  Usage: roll_report.py REPORT.json PROFILE"""

import datetime
import json
import statistics
import sys


def per_node(r: dict) -> str:
    # The naive roll's replacement is "done" when its new server joined, but the cluster is
    # back to full strength only once autopilot dropped the dead voter: count that.
    key = "to_healthy_voters_secs" if any("to_healthy_voters_secs" in x for x in r["replacements"]) else "replacement_secs"
    per = [x[key] for x in r["replacements"] if x.get(key) is not None]
    if not per:
        return "-"
    note = " (until all voters healthy)" if key == "to_healthy_voters_secs" else ""
    return f"{statistics.median(per):.1f} s / {max(per):.1f} s{note}"


def main() -> int:
    rep = json.load(open(sys.argv[1]))
    profile = sys.argv[2] if len(sys.argv) > 2 else "debug"
    print("# Rolling upgrades (bench/roll.sh)\n")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {profile} build, 2 cores, "
          "loopback test-bed (tests/rolling.rs), OpenBao 2.6.1 -> 2.6.2. The floors: a bare "
          "step-down's longest write gap (failover floor, measured first in each roll) and "
          "autopilot's 10 s server stabilization, which every new voter waits out.\n")
    rolls = {k: v for k, v in rep.items() if isinstance(v, dict) and v.get("replacements")}
    print("| roll | nodes | per replaced node (median / max) | whole roll | min failure tolerance (steady) "
          "| tolerance samples from a new leader not yet informed | writes failed / tried "
          "| longest write gap | failover floor | leader changes | dead voters listed (longest) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in sorted(rolls.items(), key=lambda kv: (kv[0].startswith("naive"), kv[1].get("nodes", 0))):
        def g(k, fmt="{}"):
            v = r.get(k)
            return "-" if v is None else fmt.format(v)
        dead = r.get("dead_voter_listed_secs")
        dead_s = f"{r.get('max_dead_voters_listed', '-')} ({max(dead):.0f} s)" if dead else "0"
        print(f"| {name} | {g('nodes')} | {per_node(r)} | {g('roll_secs', '{:.1f} s')} "
              f"| {g('min_failure_tolerance')} ({g('steady_failure_tolerance')}) "
              f"| {g('uninformed_leader_samples')} (longest {g('uninformed_leader_longest_secs', '{:.1f} s')}) "
              f"| {g('failed_writes')} / {g('write_attempts')} | {g('longest_gap_secs', '{:.2f} s')} "
              f"| {g('failover_floor_secs', '{:.2f} s')} | {g('leader_changes')} | {dead_s} |")
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
    print(json.dumps(rep, indent=1, sort_keys=True))
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
