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

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export VB_TESTBED_VENV="${VB_TESTBED_VENV:-${HOME:-/root}/.cache/vault-bootstrap-testbed/venv}"
bash tests/testbed/install.sh >/dev/null

# --no-fail-fast: one run reports every failing test target, not just the first.
# Two test threads: each cluster test runs 3+ servers, moto and an IMDS; more threads than
# the 2 cores of the CI machine make their bounded waits flaky, not the run faster.
exec cargo test --all-targets --no-fail-fast -- --test-threads=2 "$@"
