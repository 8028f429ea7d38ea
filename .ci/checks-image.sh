#!/usr/bin/env bash
# Static checks of the image build: the Packer template, the systemd units and the shipped
# IAM and bucket policies. Called from .ci/run (phase "image"); runs alone too:
#   bash .ci/checks-image.sh
#
# Offline: Debian's packer (1.6.6, from apt if missing), systemd-analyze, which works
# without systemd as PID 1, and parliament (installed from PyPI once; it makes no AWS call).
# What is checked, and what is not:
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
#   parliament            (PyPI, pinned, in a venv of its own) the offline IAM linter, on every
#                         shipped policy: packer/examples/iam-policy*.json (identity policies)
#                         and escrow-bucket-policy.json (a bucket policy). It knows every
#                         action, resource ARN pattern and condition key of AWS's service
#                         reference, so a misspelled action or key, a key an action does not
#                         take, or a mistyped operator fails CI. Any finding, LOW included,
#                         fails. Not checked by it: keys under a `Null` operator (it skips
#                         them), which the key check below covers; whether a policy does
#                         what we mean (docs/security.md argues that; moto cannot: it
#                         ignores conditions, docs/evidence.md).

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

# ------------------------------------------------------------------------------ IAM policies
# A venv of its own: the test-bed venv belongs to tests/testbed/install.sh, and parliament
# pins boto3/botocore versions of its own. Kept between runs, like the test-bed's.
PARLIAMENT_VERSION=1.6.4
PARLIAMENT_VENV="${VB_PARLIAMENT_VENV:-${HOME:-/root}/.cache/vault-bootstrap-parliament/venv}"
if ! "$PARLIAMENT_VENV/bin/parliament" --version 2>/dev/null | grep -qx "parliament $PARLIAMENT_VERSION"; then
    python3 -m venv --help >/dev/null 2>&1 || {
        say "apt-get install python3-venv"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    }
    say "installing parliament==$PARLIAMENT_VERSION into $PARLIAMENT_VENV"
    rm -rf "$PARLIAMENT_VENV"
    python3 -m venv "$PARLIAMENT_VENV"
    "$PARLIAMENT_VENV/bin/pip" install -q --disable-pip-version-check "parliament==$PARLIAMENT_VERSION"
fi
POLICIES=(packer/examples/iam-policy.json packer/examples/iam-policy-operator.json
    packer/examples/escrow-bucket-policy.json packer/examples/iam-policy-data-perimeter.json
    packer/examples/kms-key-policy-seal.json packer/examples/kms-key-policy-escrow.json)
for f in packer/examples/*.json; do
    # Not policies: API inputs (launch template data, lifecycle hooks, an instance refresh).
    case $f in */launch-template.json | */lifecycle-hooks.json | */instance-refresh.json) continue ;; esac
    [[ " ${POLICIES[*]} " == *" $f "* ]] || fail "$f is not linted: add it to POLICIES in $0"
done
say "parliament $PARLIAMENT_VERSION: ${POLICIES[*]}"
# --files, not --file: --file refuses to run when stdin is not a terminal (CI's is /dev/null).
# Exit 1 and one line per finding when there is any, at any severity. No finding is accepted
# today; a false positive would be, through parliament's --config file (an entry with
# `ignore_locations` for that file and statement), with the reason beside it. (1.6.4 also
# appends the files it reads to /tmp/parliament.log: the policies are not secret.)
# A policy with a finding type accepted for it is linted alone with that type muted: its
# .ci/parliament/<name>.yaml says why (parliament's own ignore_locations matches nothing).
lint() { "$PARLIAMENT_VENV/bin/parliament" --minimum_severity INFO --include-community-auditors "$@"; }
PLAIN=()
for f in "${POLICIES[@]}"; do
    accepted=.ci/parliament/$(basename "$f" .json).yaml
    if [[ -f $accepted ]]; then
        lint --config "$accepted" --files "$f" || fail "parliament found problems in $f (above)"
    else
        PLAIN+=("$f")
    fi
done
lint --files "$(IFS=,; echo "${PLAIN[*]}")" ||
    fail "parliament found problems in the shipped policies (above)"
# parliament skips the keys of `Null` conditions, and the bucket policy's write-once rule is
# one. So: every condition key of every statement must be a global key, or one that AWS's
# service reference (parliament's copy of it) lists for each action of the statement.
"$PARLIAMENT_VENV/bin/python" - "${POLICIES[@]}" <<'PY' || fail "condition keys the actions do not take (above)"
import json, sys
from parliament import expand_action
from parliament.statement import GLOBAL_CONDITION_KEYS, get_privilege_info, is_condition_key_match

# Keys AWS puts in every request they apply to, whatever the action, that parliament's copy
# does not list as global (the data-perimeter variant uses them): newer global keys, and
# ec2:SourceInstanceARN, present in every request signed with an instance's credentials.
NEWER_GLOBAL = ["aws:ViaAWSService", "aws:Ec2InstanceSourceVpc",
                "aws:Ec2InstanceSourcePrivateIPv4", "aws:VpcSourceIp", "aws:SourceVpc",
                "ec2:SourceInstanceARN"]
GLOBAL = {k.lower() for k in list(GLOBAL_CONDITION_KEYS) + NEWER_GLOBAL}
bad = 0
for path in sys.argv[1:]:
    for st in json.load(open(path))["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        expanded = [a for pattern in actions for a in expand_action(pattern)]
        for op, keys in st.get("Condition", {}).items():
            for key in keys:
                if key.lower() in GLOBAL:
                    continue
                for a in expanded:
                    info = get_privilege_info(a["service"], a["action"])
                    documented = [k for rt in info["resource_types"] for k in rt["condition_keys"]]
                    if not any(is_condition_key_match(k, key) for k in documented):
                        bad += 1
                        print(f"{path}: {st.get('Sid')}: {op} {key}: not a condition key of "
                              f"{a['service']}:{a['action']}")
print(f"condition keys: {bad} unknown")
sys.exit(1 if bad else 0)
PY
say "ok"
