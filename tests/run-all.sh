#!/usr/bin/env bash
# The project's test command, in one place: the README's "Quick start" and .ci/run both run
# exactly this. Unit tests, then the integration tests, which start real OpenBao servers
# against a local moto (see docs/internals.md "Test-bed").
#
#   bash tests/run-all.sh                 everything
#   bash tests/run-all.sh three_agents    extra arguments go to the test binaries (a name filter)
#
#   VB_TESTBED_VENV   the test-bed venv (default: $HOME/.cache/vault-bootstrap-testbed/venv);
#                     created or checked first by tests/testbed/install.sh (~2 s when present)
#   VB_TEST_LANES     test binaries run at once (default 2); 1 runs them one after another
#
# Why lanes: the integration tests wait (elections, retry_join, systemd boots) far more than
# they compute. One binary at a time kept 2 cores about 11 % busy (day2: 21 CPU-s in 91 s
# of wall time), so two binaries at once take about half the time. Three were faster still
# (436-540 s against about 700 s) but pushed the load average past 4 on 2 cores, and one
# timing-sensitive test then failed once: CI gets the margin.
# Every test binary uses its own loopback block (127.0.<n>) or its own network namespace, so
# they never share an address. Each binary still runs two test threads, as before.
#
# Every binary runs to the end (no fail-fast); its whole output goes to
# target/test-logs/<binary>.log and is printed when it fails. Exit status: non-zero if any
# binary failed.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export VB_TESTBED_VENV="${VB_TESTBED_VENV:-${HOME:-/root}/.cache/vault-bootstrap-testbed/venv}"
bash tests/testbed/install.sh >/dev/null

LANES=${VB_TEST_LANES:-2}
LOGS=target/test-logs
[[ $LANES =~ ^[1-9][0-9]*$ ]] || {
    echo "run-all: VB_TEST_LANES must be a positive integer, not '$LANES'" >&2
    exit 2
}

# Build everything first (one cargo at a time), and learn the test executables.
LIST=$(mktemp)
trap 'rm -f "$LIST"' EXIT
# Stopped from outside (CI's timeout, Ctrl-C): stop the running test binaries and what they
# started. Each runs in a session (and process group) of its own whose id is in
# $LOGS/.pid-<name> while it runs, so the group is killed whole: a test binary killed alone
# skips its Drops and would leave its servers behind. The lanes' subshells are jobs.
stop_running() {
    local f
    for f in "$LOGS"/.pid-*; do
        [[ -e $f ]] && kill -TERM -- "-$(cat "$f")" 2>/dev/null
    done
    kill $(jobs -p) 2>/dev/null
}
trap 'stop_running; exit 143' TERM INT
cargo test --all-targets --no-run --message-format=json-render-diagnostics |
    python3 -c '
import json, os, sys
seen = []
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        name = m["target"]["name"]
        if m["target"]["kind"] == ["lib"] or m["target"]["kind"] == ["bin"]:
            name = m["target"]["kind"][0] + ":" + name
        seen.append((name, m["executable"]))
# Longest first, so the long ones overlap everything else (measured on the 2-core machine).
order = ["fleet", "init_escrow", "day2", "rejoin", "faults", "crash", "deploy", "rolling",
         "static_stability", "snapshot", "hygiene", "boot_cluster", "refresh_tls"]
rank = {n: i for i, n in enumerate(order)}
seen.sort(key=lambda s: rank.get(s[0], len(order)))
for name, exe in seen:
    print(f"{name}\t{exe}")
' >"$LIST"

rm -rf "$LOGS"
mkdir -p "$LOGS"
T0=$SECONDS

# The policy tier: the shipped IAM and bucket policies evaluated with their conditions by a
# pinned IAM simulator (tests/policy/, node's test runner). moto ignores conditions, so this
# is the only place they are evaluated. Needs node and npm; missing, it fails: never skipped.
run_policy() {
    local log="$LOGS/policy.log" t0=$SECONDS rc=0
    # A subshell: it changes directory, and may exit.
    (
        command -v node >/dev/null && command -v npm >/dev/null ||
            { echo "node and npm are needed (apt-get install nodejs npm)"; exit 1; }
        # npm ci installs exactly package-lock.json's versions; skipped when the pinned
        # simulator is already there.
        if ! node -e '
            const want = require("./tests/policy/package.json").dependencies["@cloud-copilot/iam-simulate"];
            const have = require("./tests/policy/node_modules/@cloud-copilot/iam-simulate/package.json").version;
            process.exit(want === have ? 0 : 1);' 2>/dev/null; then
            npm ci --prefix tests/policy --no-audit --no-fund
        fi
        cd tests/policy && node --test
    ) >"$log" 2>&1 || rc=$?
    local summary
    summary=$(grep -E '^# (pass|fail) ' "$log" | tr '\n' ' ' || true)
    if [[ $rc -eq 0 ]]; then
        printf 'run-all: ok     %-18s %4ss  %s\n' policy "$((SECONDS - t0))" "$summary"
    else
        printf 'run-all: FAILED %-18s %4ss  exit %s; its output:\n' policy "$((SECONDS - t0))" "$rc"
        sed 's/^/    | /' "$log"
        touch "$LOGS/.failed-policy"
    fi
}
# The Terraform tier: the deploy module (deploy/terraform/) offline: fmt -check, validate
# (module and example), and `terraform test` with a mocked AWS provider. The provider comes
# from a filesystem mirror (VB_TF_MIRROR, default /opt/tf-plugins), never a registry. Without
# terraform or the mirror it says SKIPPED (a failure under CI), never passed.
run_terraform() {
    local log="$LOGS/terraform.log" t0=$SECONDS rc=0
    local mirror=${VB_TF_MIRROR:-/opt/tf-plugins}
    if ! command -v terraform >/dev/null || [[ ! -d $mirror/registry.terraform.io/hashicorp/aws ]]; then
        printf 'run-all: SKIPPED %-17s %4ss  SKIPPED: terraform on PATH and the hashicorp/aws provider mirror in %s are needed\n' terraform 0 "$mirror"
        touch "$LOGS/.skipped-terraform"
        return
    fi
    (
        set -e
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        cat >"$work/terraformrc" <<EOF_RC
provider_installation {
  filesystem_mirror {
    path    = "$mirror"
    include = ["registry.terraform.io/hashicorp/*"]
  }
  direct {
    exclude = ["registry.terraform.io/*/*"]
  }
}
EOF_RC
        export TF_CLI_CONFIG_FILE=$work/terraformrc CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1
        export TF_DATA_DIR=$work/module TF_PLUGIN_CACHE_DIR=
        cd deploy/terraform
        terraform version
        terraform fmt -check -recursive -diff .
        terraform init -backend=false -input=false -no-color >/dev/null
        terraform validate -no-color
        terraform test -no-color
        cd examples/complete
        TF_DATA_DIR=$work/example terraform init -backend=false -input=false -no-color >/dev/null
        TF_DATA_DIR=$work/example terraform validate -no-color
    ) >"$log" 2>&1 || rc=$?
    local summary
    summary=$(grep -E '^(Success|Failure)!' "$log" | tr '\n' ' ' || true)
    if [[ $rc -eq 0 ]]; then
        printf 'run-all: ok     %-18s %4ss  %s\n' terraform "$((SECONDS - t0))" "$summary"
    else
        printf 'run-all: FAILED %-18s %4ss  exit %s; its output:\n' terraform "$((SECONDS - t0))" "$rc"
        sed 's/^/    | /' "$log"
        touch "$LOGS/.failed-terraform"
    fi
}
# Name filters are for the Rust test binaries; a filtered run leaves the policy and
# Terraform tiers out.
if [[ $# -eq 0 ]]; then
    run_policy
    run_terraform
fi

# Runs one binary, output to its log; prints a result line when it ends.
run_one() {
    local name=$1 exe=$2 log="$LOGS/${1//:/-}.log" t0=$SECONDS rc=0
    local pidfile="$LOGS/.pid-${1//:/-}"
    # setsid execs the binary (a background job here is no group leader): $! is its PID,
    # and its session's and process group's id.
    setsid "$exe" --test-threads=2 "${@:3}" >"$log" 2>&1 &
    echo "$!" >"$pidfile"
    wait "$!" || rc=$?
    # Ended: its PID may be reused from now on, so it is no longer a target.
    rm -f "$pidfile"
    local summary skipped
    summary=$(grep -E '^test result:' "$log" | tail -1 || true)
    # A test that could not run on this machine says "SKIPPED: why" and returns: the
    # runner counts it passed, so the summary must not. Under CI a skip is a failure.
    skipped=$(grep -E 'SKIPPED:' "$log" | head -3 | tr '\n' ' ' || true)
    if [[ $rc -eq 0 && -n $skipped ]]; then
        printf 'run-all: SKIPPED %-17s %4ss  %s\n' "$name" "$((SECONDS - t0))" "$skipped"
        touch "$LOGS/.skipped-${name//:/-}"
    elif [[ $rc -eq 0 ]]; then
        printf 'run-all: ok     %-18s %4ss  %s\n' "$name" "$((SECONDS - t0))" "$summary"
    else
        printf 'run-all: FAILED %-18s %4ss  exit %s; its output:\n' "$name" "$((SECONDS - t0))" "$rc"
        sed 's/^/    | /' "$log"
        printf 'run-all: FAILED %-18s (output above, kept in %s)\n' "$name" "$log"
        touch "$LOGS/.failed-${name//:/-}"
    fi
}

declare -a PIDS=()
while IFS=$'\t' read -r name exe; do
    # Bounded parallelism: wait for a lane to free up.
    while [[ $(jobs -rp | wc -l) -ge $LANES ]]; do
        wait -n || true
    done
    run_one "$name" "$exe" "$@" &
    PIDS+=($!)
done <"$LIST"
for p in "${PIDS[@]}"; do wait "$p" || true; done

failed=$(find "$LOGS" -name '.failed-*' | sed 's|.*/.failed-||' | sort | tr '\n' ' ')
skipped=$(find "$LOGS" -name '.skipped-*' | sed 's|.*/.skipped-||' | sort | tr '\n' ' ')
echo "run-all: $(wc -l <"$LIST") test binaries, $LANES at a time, in $((SECONDS - T0)) s"
if [[ -n $failed ]]; then
    echo "run-all: FAILED: $failed" >&2
    [[ -z $skipped ]] || echo "run-all: SKIPPED (not run here, not passed): $skipped" >&2
    exit 1
fi
if [[ -n $skipped ]]; then
    echo "run-all: SKIPPED (not run here, not passed): $skipped" >&2
    if [[ ${CI:-} == true ]]; then
        echo "run-all: FAILED: under CI every tier must run" >&2
        exit 1
    fi
    echo "run-all: passed, except what was SKIPPED above"
    exit 0
fi
echo "run-all: all passed"
