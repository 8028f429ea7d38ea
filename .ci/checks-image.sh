#!/usr/bin/env bash
# Static checks of the image build: the Packer template and the systemd units. Called from
# .ci/run (phase "image"); runs alone too:  bash .ci/checks-image.sh
#
# Offline: Debian's packer (1.6.6, from apt if missing) and systemd-analyze, which works
# without systemd as PID 1. What is checked, and what is not:
#   packer fmt -check     the whole template, as written (1.6.6 formats modern HCL2 fine).
#   packer validate       a copy without the three things 1.6.6 predates and rejects: the
#                         `packer { required_plugins }` block (1.7+), the build instance's
#                         `metadata_options` block and the AMI's `imds_support` (newer
#                         amazon plugin). Everything else is validated by 1.6.6's bundled
#                         amazon-ebs builder: argument names and types, variables (required
#                         ones given dummies), locals and functions, the file provisioner's
#                         source. Not validated: the plugin version actually used by
#                         `packer init`, AWS-side facts (AMI filter matches, subnet, IAM),
#                         the provisioner's shell script at run time. The removed blocks are
#                         checked by grep below for the values that matter (IMDSv2 required,
#                         hop limit 1, metadata tags on, IMDSv2-only AMI).
#   systemd-analyze verify    every unit and timer in systemd/ (and the OpenBao drop-in), in a temp
#                         root holding the host's system units and a stub for every Exec*=
#                         binary. It exits 0 on warnings, so any output is a failure.
#   systemd-analyze security --offline=true    exposure of vault.service beside HashiCorp's
#                         reference unit (packer/examples/hashicorp-reference-vault.service);
#                         fails unless ours is lower. The agent's unit is scored for the record.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

say() { echo "checks-image: $*" >&2; }
fail() {
    say "FAILED: $*"
    exit 1
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ------------------------------------------------------------------------------ tools
missing=()
command -v packer >/dev/null 2>&1 || missing+=(packer)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [[ ${#missing[@]} -gt 0 ]]; then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
say "$(packer version | head -n 1); $(systemd-analyze --version | head -n 1)"

# ------------------------------------------------------------------------------ packer
TEMPLATE=packer/vault.pkr.hcl
packer fmt -check -diff packer/ || fail "packer fmt: run 'packer fmt packer/'"

# The values in the blocks the validate copy drops.
need() {
    grep -Eq "$1" "$TEMPLATE" || fail "$TEMPLATE: expected a line matching: $1"
}
need '^ *source *= *"github.com/hashicorp/amazon"'
need '^ *http_endpoint *= *"enabled"'
need '^ *http_tokens *= *"required"'
need '^ *http_put_response_hop_limit *= *1$'
need '^ *instance_metadata_tags *= *"enabled"'
need '^ *imds_support *= *"v2.0"'
need 'install --vault-archive /tmp/vault.zip --sha256 \$\{var.vault_sha256\}'
grep -Eq '^ *set -euo pipefail|"set -euo pipefail"' "$TEMPLATE" || fail "$TEMPLATE: provisioner without set -euo pipefail"

mkdir -p "$WORK/packer"
awk '
    skip > 0 {
        depth += gsub(/\{/, "{") - gsub(/\}/, "}")
        if (depth <= 0) skip = 0
        next
    }
    /^[[:space:]]*(packer|metadata_options)[[:space:]]*\{[[:space:]]*$/ { skip = 1; depth = 1; next }
    /^[[:space:]]*imds_support[[:space:]]*=/ { next }
    { print }
' "$TEMPLATE" >"$WORK/packer/vault.pkr.hcl"
removed=$(diff "$TEMPLATE" "$WORK/packer/vault.pkr.hcl" | grep -c '^<' || true)
say "packer validate on a copy without required_plugins/metadata_options/imds_support ($removed lines dropped)"
[[ $removed -gt 0 && $removed -lt 20 ]] || fail "unexpected strip result: $removed lines dropped"
printf 'stub agent\n' >"$WORK/agent"
packer validate \
    -var vault_version=0.0.0 \
    -var "vault_sha256=$(printf '0%.0s' {1..64})" \
    -var "agent_binary=$WORK/agent" \
    "$WORK/packer/vault.pkr.hcl" || fail "packer validate"

# ------------------------------------------------------------------------------ systemd
# A root with the host's units (for network-online.target, multi-user.target, ...), ours,
# and a stub for every absolute Exec*= binary they name.
SYSROOT="$WORK/root"
mkdir -p "$SYSROOT/usr/lib/systemd" "$SYSROOT/etc/systemd/system"
cp -a /usr/lib/systemd/system "$SYSROOT/usr/lib/systemd/"
cp systemd/*.service systemd/*.timer packer/examples/hashicorp-reference-vault.service "$SYSROOT/etc/systemd/system/"
stub_execs() {
    local bin
    while read -r bin; do
        mkdir -p "$SYSROOT$(dirname "$bin")"
        printf '#!/bin/sh\nexit 0\n' >"$SYSROOT$bin"
        chmod 0755 "$SYSROOT$bin"
    done < <(sed -nE 's/^Exec[A-Za-z]*=[-@:+!]*(\/[^ ]+).*/\1/p' "$@" | sort -u)
}
stub_execs systemd/*.service systemd/vault.service.d/*.conf

verify() {
    local out rc=0
    out=$(cd "$SYSROOT" && systemd-analyze verify --root="$SYSROOT" "$@" 2>&1) || rc=$?
    if [[ $rc -ne 0 || -n $out ]]; then
        printf '%s\n' "$out" >&2
        fail "systemd-analyze verify $* (exit $rc; any output fails)"
    fi
}
units=()
for f in systemd/*.service systemd/*.timer; do units+=("$(basename "$f")"); done
say "systemd-analyze verify ${units[*]}"
verify "${units[@]}"
say "systemd-analyze verify vault.service with the OpenBao drop-in"
mkdir -p "$SYSROOT/etc/systemd/system/vault.service.d"
cp systemd/vault.service.d/*.conf "$SYSROOT/etc/systemd/system/vault.service.d/"
verify vault.service
rm -r "$SYSROOT/etc/systemd/system/vault.service.d"

exposure() {
    systemd-analyze security --offline=true --root="$SYSROOT" "$1" 2>&1 |
        sed -nE 's/.*Overall exposure level for [^:]+: ([0-9.]+).*/\1/p'
}
say "systemd-analyze security --offline=true vault.service"
systemd-analyze security --offline=true --root="$SYSROOT" vault.service >&2
ours=$(exposure vault.service)
ref=$(exposure hashicorp-reference-vault.service)
agent=$(exposure vault-bootstrap.service)
[[ -n $ours && -n $ref && -n $agent ]] || fail "could not read the exposure scores"
echo >&2
say "exposure (0 = fully locked down, 10 = fully exposed):"
printf '  %-40s %s\n' \
    "vault.service (ours)" "$ours" \
    "hashicorp-reference-vault.service" "$ref" \
    "vault-bootstrap.service (ours, root)" "$agent" >&2
awk -v a="$ours" -v b="$ref" 'BEGIN { exit !(a < b) }' ||
    fail "vault.service exposure $ours is not below HashiCorp's reference unit ($ref)"
say "ok"
