#!/usr/bin/env bash
# The whole fault matrix, by hand (docs/evidence.md): the default run's fast subset plus
# every case that is too slow for CI. About 8 minutes on 2 cores.
#
#   bash tests/run-full-matrix.sh
#
#   - tests/faults.rs, every tier: config, IMDS, EC2, S3, TLS, Vault, KMS cases, and a
#     sys/init slower than raft's timing;
#   - crashes and faults around init/escrow (tests/init_escrow.rs);
#   - concurrency: 3, 5 and 7 simultaneous boots (tests/boot_cluster.rs), a boot racing a
#     rejoin (tests/rejoin.rs);
#   - the secret-hygiene audit (tests/hygiene.rs);
#   - rolling upgrades (tests/rolling.rs): the 5-node roll 2.6.1 -> 2.6.2 with lifecycle
#     hooks, and the naive terminate-first roll for the side-by-side numbers (about 10
#     minutes more; VB_ROLL_REPORT=<file> collects their numbers as JSON).
#
# The 20-trial soak of simultaneous boots is separate (about 20 minutes):
#   cargo test --test boot_cluster -- --ignored soak
# So are the crash trials at the count issue 12 asks for (30 x 3 nodes, 10 x 5 nodes;
# about 25 minutes; the default run has 4 + 2 of them):
#   VB_CRASH_TRIALS=30,10 cargo test --test crash -- --nocapture

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export VB_TESTBED_VENV="${VB_TESTBED_VENV:-${HOME:-/root}/.cache/vault-bootstrap-testbed/venv}"
bash tests/testbed/install.sh >/dev/null

run() {
    echo "== cargo test $*" >&2
    cargo test "$@"
}
run --test faults -- --include-ignored --skip fault_matrix_fast --test-threads=1 --nocapture
run --test init_escrow -- --test-threads=2
run --test boot_cluster -- --include-ignored --skip soak --test-threads=1
run --test rejoin -- --test-threads=2
run --test hygiene
run --test static_stability
run --test rolling -- --include-ignored --test-threads=1 --nocapture
echo "full fault matrix: passed" >&2
