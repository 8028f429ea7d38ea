#!/usr/bin/env bash
# The fleet tier's driver (issue 13): real systemd hosts booting the image, on one bridge in
# a network namespace of their own with no route out, with EC2's IMDSv2 at 169.254.169.254
# and moto as AWS on the same bridge.
#
#   fleet.sh up N                 image, namespace, moto, IMDS, N hosts booted, user-data run
#   fleet.sh down                 tear down exactly what `up` made (recorded PIDs, namespace)
#   fleet.sh kill HOST            power loss: SIGKILL of the host's whole PID namespace
#   fleet.sh start HOST           power back on: HOST boots again from its own disk
#   fleet.sh reboot HOST          `systemctl reboot` inside HOST; returns once it is running
#   fleet.sh partition HOST SECS  HOST's link down for SECS seconds, then up again
#   fleet.sh link HOST down|up    the same, by hand
#   fleet.sh exec HOST CMD...     CMD as a transient unit of HOST's systemd (stands in for
#                                 SSM Run Command); stdin/stdout/stderr and exit code pass
#   fleet.sh add HOST             one more instance in the group at a new address, booted
#                                 with user-data (a replacement, as the ASG launches one)
#   fleet.sh terminate HOST       EC2 marks HOST's instance terminated (the ASG's reaction)
#   fleet.sh ns CMD...            CMD in the fleet's network namespace (test-side probes)
#   fleet.sh aws CMD...           tests/fleet/fleet_aws.py CMD against the fleet's moto
#   fleet.sh ip HOST | id HOST | pid HOST | hosts | running HOST
#
# State lives in FLEET_RUN (default /tmp/vault-bootstrap-fleet): the namespace's name, the
# PIDs of moto, IMDS and each host's launcher, each host's address and instance id. `down`
# reads only that and stops only those PIDs (checking each is still the process it
# started), unmounts only the overlays it mounted, deletes only its own namespace.
#
# Addresses (benchmark range 198.18.0.0/15, never a real network): bridge 198.18.1.1/24 plus
# 169.254.169.254/32 (IMDS), moto 198.18.1.2:5000, hosts from 198.18.1.11. No default route
# exists in the namespace: nothing can leave it.
#
# Environment: VB_AGENT (the agent binary the image gets; required by `up`),
# VB_TESTBED_VENV, FLEET_RUN, FLEET_DEAD_THRESHOLD (autopilot's
# dead_server_last_contact_threshold in the hosts' config; default "10m" as shipped),
# FLEET_USERDATA_SED (extra sed expressions for user-data, ';'-separated).
# Needs root, systemd-nspawn (systemd-container), debootstrap, iproute2, nsenter.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RUN=${FLEET_RUN:-/tmp/vault-bootstrap-fleet}
VENV=${VB_TESTBED_VENV:-${HOME:-/root}/.cache/vault-bootstrap-testbed/venv}
PY=$VENV/bin/python
BLOCK=198.18.1
BRIDGE_IP=$BLOCK.1
MOTO_IP=$BLOCK.2
MOTO=http://$MOTO_IP:5000
IMDS_IP=169.254.169.254
REGION=us-east-1

say() { echo "fleet: $(date +%H:%M:%S.%3N) $*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}

ns() { cat "$RUN/netns"; }
in_ns() { nsenter --net="/run/netns/$(ns)" "$@"; }
hostdir() { echo "$RUN/hosts/$1"; }
host_ip() { cat "$(hostdir "$1")/ip"; }

# Is PID still the process we started (its command line contains PATTERN)?
is_ours() {
    local pid=$1 pattern=$2
    [[ -n $pid && -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern"
}

# SIGNAL the recorded PID in FILE if it is still ours; wait (bounded) until it is gone.
stop_recorded() {
    local file=$1 pattern=$2 sig=${3:-TERM} bound=${4:-10} pid i
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if is_ours "$pid" "$pattern"; then
        kill -s "$sig" "$pid" 2>/dev/null || true
        for ((i = 0; i < bound * 10; i++)); do
            is_ours "$pid" "$pattern" || break
            sleep 0.1
        done
        if is_ours "$pid" "$pattern"; then
            kill -s KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -f "$file"
}

# Poll CMD until it succeeds, at most BOUND seconds.
wait_until() {
    local bound=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < bound)) || die "timed out after ${bound}s waiting for $what"
        sleep 0.2
    done
}

# ----------------------------------------------------------------------------- hosts

# PID of HOST's systemd (PID 1 inside), seen from here; empty when the host is down.
init_pid() {
    local d pid c
    d=$(hostdir "$1")
    [[ -f $d/nspawn.pid ]] || return 0
    pid=$(cat "$d/nspawn.pid")
    is_ours "$pid" systemd-nspawn || return 0
    for c in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
        if grep -qE '^NSpid:.*[[:space:]]1$' "/proc/$c/status" 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
}

# 0 when HOST's systemd has finished booting (running or degraded).
host_running() {
    local pid state
    pid=$(init_pid "$1")
    [[ -n $pid ]] || return 1
    state=$(nsenter -t "$pid" -a systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]]
}

# Writes HOST's launcher: a shell in a cgroup of its own (see TESTBED-NOTES) that starts
# systemd-nspawn in the fleet's namespace and starts it again when the host reboots (nspawn
# exits 133 then, as systemd-nspawn@.service's RestartForceExitStatus= expects).
start_host() {
    local h=$1 d root
    d=$(hostdir "$h")
    root=$d/root
    cat >"$d/launcher.sh" <<EOF
#!/bin/bash
# launcher of fleet host $h ($RUN)
for hier in systemd unified; do
    mkdir -p /sys/fs/cgroup/\$hier/$(ns)-$h 2>/dev/null &&
        echo \$\$ >/sys/fs/cgroup/\$hier/$(ns)-$h/cgroup.procs 2>/dev/null || true
done
while :; do
    nsenter --net=/run/netns/$(ns) systemd-nspawn --quiet -D "$root" -M "$h" --boot \\
        --register=no --keep-unit --console=read-only --capability=CAP_IPC_LOCK \\
        --network-bridge=br0 --resolv-conf=off --timezone=off >>"$d/console.log" 2>&1 &
    echo \$! >"$d/nspawn.pid"
    rc=0
    wait \$! || rc=\$?
    echo "\$(date +%T.%3N) systemd-nspawn exited \$rc" >>"$d/launcher.log"
    [[ \$rc -eq 133 ]] || break
done
EOF
    chmod 0755 "$d/launcher.sh"
    setsid "$d/launcher.sh" </dev/null >>"$d/launcher.log" 2>&1 &
    echo $! >"$d/launcher.pid"
}

# A host's own disk (an overlay over the run's image, like a volume made from the AMI's
# snapshot) and what EC2 gives an instance besides the image: its address (DHCP there; a
# static networkd file here) and its name.
make_host() {
    local h=$1 ip=$2 iid=$3 d
    d=$(hostdir "$h")
    mkdir -p "$d/upper" "$d/work" "$d/root"
    # redirect_dir=on: a directory of the image can be renamed, as on any disk. Without it
    # overlayfs answers EXDEV, and the agent's "move the raft data aside" after an
    # interrupted init (rename of /opt/vault/data, made by install) failed on every boot.
    mount -t overlay "overlay-$(ns)-$h" \
        -o "lowerdir=$RUN/image,upperdir=$d/upper,workdir=$d/work,redirect_dir=on" "$d/root"
    echo "$d/root" >"$d/mounted"
    echo "$ip" >"$d/ip"
    echo "$iid" >"$d/instance_id"
    mkdir -p "$d/root/etc/systemd/network"
    # Sorts before systemd's 80-container-host0.network, which would give host0 only a
    # link-local address (packets to IMDS then leave with a source IMDS cannot answer).
    # IgnoreCarrierLoss: a partition takes the bridge side of the link down; an ENI never
    # loses its address for that, so neither does the host.
    cat >"$d/root/etc/systemd/network/10-host0.network" <<EOF
[Match]
Name=host0

[Network]
Address=$ip/24
Gateway=$BRIDGE_IP
LinkLocalAddressing=no
IPv6AcceptRA=no
IgnoreCarrierLoss=yes
EOF
    echo "ip-${ip//./-}" >"$d/root/etc/hostname"
}

# packer/examples/user-data.sh with this fleet's values, as a user would adapt it: bucket,
# server name, the `bao` binary, no PGP keys, the cluster size, the VPC's CIDR, endpoints;
# no lifecycle hooks: the fleet's moto has no CompleteLifecycleAction (the loopback tier
# emulates it, tests/testbed/lifecycle.py), and these hosts are not launched by a group.
userdata() {
    local n=$1 bucket
    bucket=$(jq_env bucket)
    local sed_extra=${FLEET_USERDATA_SED:-}
    sed -e "s|acme-vault-resources|$bucket|g" \
        -e "s|vault.internal.acme.example|$(jq_env server_name)|" \
        -e '/^recovery_pgp_keys = \[/,/^\]/d' \
        -e 's|^binary = "/usr/local/bin/vault"|binary = "/usr/local/bin/bao"|' \
        -e "s|^min_peers = 3|min_peers = $n|" \
        -e "s|^expected_size = 3|expected_size = $n|" \
        -e "s|^dead_server_last_contact_threshold = \"10m\"|dead_server_last_contact_threshold = \"${FLEET_DEAD_THRESHOLD:-10m}\"|" \
        -e "s|^AWS_ENDPOINT_URL=\"\"|AWS_ENDPOINT_URL=\"$MOTO\"|" \
        -e "s|^# endpoint = \"https://vpce-.*|endpoint = \"$MOTO\"|" \
        -e 's|^bound_cidrs = \["10.0.0.0/16"\]|bound_cidrs = ["198.18.0.0/16"]|' \
        -e '/^launch_hook = /d' -e '/^terminate_hook = /d' \
        ${sed_extra:+-e "$sed_extra"} \
        "$REPO/packer/examples/user-data.sh"
}

jq_env() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$RUN/aws/env.json" "$1"; }

# Boots HOST and runs user-data in it, as cloud-init would late in the first boot.
boot_host() {
    local h=$1 n=$2 t0
    t0=$(date +%s%N)
    start_host "$h"
    wait_until 60 "$h to boot" host_running "$h"
    # From starting nspawn to systemd reporting running (or degraded), in seconds.
    echo "$((($(date +%s%N) - t0) / 1000000))" | sed -E 's/^([0-9]*)([0-9]{3})$/\1.\2/; s/^\./0./' \
        >"$(hostdir "$h")/boot_secs"
    userdata "$n" >"$(hostdir "$h")/user-data.sh"
    cmd_exec "$h" /bin/bash -s <"$(hostdir "$h")/user-data.sh" >"$(hostdir "$h")/user-data.log" 2>&1 ||
        die "user-data failed on $h: $(tail -5 "$(hostdir "$h")/user-data.log")"
}

# ----------------------------------------------------------------------------- commands

cmd_up() {
    local n=${1:?usage: fleet.sh up N} t0=$SECONDS i
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, nspawn)"
    command -v systemd-nspawn >/dev/null || die "systemd-nspawn is missing: apt-get install systemd-container"
    [[ ! -e $RUN/netns ]] || die "$RUN already holds a fleet: fleet.sh down first"
    # The run lives in memory: the image (~460 MB, its binaries fsynced by install) and the
    # hosts' disks. On this machine's disk (ext4 with online discard) deleting one run's
    # files took ~20 s; unmounting a tmpfs takes nothing.
    mkdir -p "$RUN"
    if ! mountpoint -q "$RUN"; then
        mount -t tmpfs -o size=4g,mode=0700 "fleet-run" "$RUN"
        touch "$RUN/.fleet-tmpfs"
    fi
    mkdir -p "$RUN/hosts" "$RUN/imds-control"
    touch "$RUN/.fleet-run"

    VB_AGENT=${VB_AGENT:?set VB_AGENT to the vault-bootstrap binary} \
        bash "$HERE/image.sh" image "$RUN/image" >/dev/null

    local name
    name="vbfleet-$$-$RANDOM"
    ip netns add "$name"
    echo "$name" >"$RUN/netns"
    in_ns ip link set lo up
    in_ns ip link add br0 type bridge
    in_ns ip addr add "$BRIDGE_IP/24" dev br0
    in_ns ip addr add "$MOTO_IP/24" dev br0
    in_ns ip addr add "$IMDS_IP/32" dev br0
    in_ns ip link set br0 up
    # Nothing leaves: no interface but the hosts' links, and the default route is
    # `unreachable` (a packet for any other address fails at once, never goes anywhere).
    in_ns ip route add unreachable default
    in_ns ip route show default | grep -q '^unreachable default' || die "$name has a usable default route"
    say "namespace $name: br0 $BRIDGE_IP/24, moto $MOTO_IP, IMDS $IMDS_IP"

    # moto as moto_server runs it, with S3's conditional writes made atomic (see the file).
    setsid nsenter --net="/run/netns/$name" "$PY" "$HERE/moto_server.py" "$MOTO_IP" 5000 \
        </dev/null >"$RUN/moto.log" 2>&1 &
    echo $! >"$RUN/moto.pid"
    wait_until 30 "moto at $MOTO" in_ns "$PY" -c "import urllib.request; urllib.request.urlopen('$MOTO/moto-api/', timeout=1)"

    in_ns "$PY" "$HERE/fleet_aws.py" --moto "$MOTO" --region "$REGION" --dir "$RUN/aws" \
        up --block "$BLOCK" --nodes "$n" >"$RUN/aws.log" 2>&1 || {
        cat "$RUN/aws.log" >&2
        die "seeding moto failed"
    }

    local warm=()
    for ((i = 1; i <= n; i++)); do warm+=(--warm "$BLOCK.$((10 + i))"); done
    setsid nsenter --net="/run/netns/$name" "$PY" "$REPO/tests/testbed/imds.py" --moto "$MOTO" \
        --region "$REGION" --by-source "$IMDS_IP" --port 80 --control-dir "$RUN/imds-control" \
        "${warm[@]}" </dev/null >"$RUN/imds.out" 2>"$RUN/imds.log" &
    echo $! >"$RUN/imds.pid"
    wait_until 30 "IMDS to listen" grep -q READY "$RUN/imds.out"
    say "moto seeded, IMDS up after $((SECONDS - t0)) s"

    local ids
    mapfile -t ids < <("$PY" -c 'import json,sys; [print(i["id"]) for i in json.load(open(sys.argv[1]))["instances"]]' "$RUN/aws/env.json")
    echo "$n" >"$RUN/size"
    for ((i = 1; i <= n; i++)); do
        make_host "h$i" "$BLOCK.$((10 + i))" "${ids[$((i - 1))]}"
    done
    # Every host boots and runs its user-data at the same moment, as an ASG launches them.
    local pids=()
    for ((i = 1; i <= n; i++)); do
        boot_host "h$i" "$n" &
        pids+=($!)
    done
    local rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    [[ $rc -eq 0 ]] || die "a host did not come up"
    say "up: $n hosts booted, user-data run, in $((SECONDS - t0)) s"
    local h
    for ((i = 1; i <= n; i++)); do
        h=h$i
        echo "$h $(host_ip "$h") $(cat "$(hostdir "$h")/instance_id") boot=$(cat "$(hostdir "$h")/boot_secs")s"
    done
}

cmd_kill() {
    local h=${1:?usage: fleet.sh kill HOST} d pid
    d=$(hostdir "$h")
    [[ -d $d ]] || die "no host $h"
    # The launcher first, so it cannot start the host again.
    stop_recorded "$d/launcher.pid" launcher.sh KILL 5
    pid=$(init_pid "$h")
    # Killing the PID namespace's init kills every process in it at once: a power loss.
    [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
    stop_recorded "$d/nspawn.pid" systemd-nspawn TERM 10
    say "$h killed"
}

cmd_start() {
    local h=${1:?usage: fleet.sh start HOST} t0=$SECONDS
    [[ -d $(hostdir "$h") ]] || die "no host $h"
    [[ -z $(init_pid "$h") ]] || die "$h is running"
    start_host "$h"
    wait_until 60 "$h to boot" host_running "$h"
    say "$h booted in $((SECONDS - t0)) s"
}

cmd_reboot() {
    local h=${1:?usage: fleet.sh reboot HOST} old t0=$SECONDS
    old=$(init_pid "$h")
    [[ -n $old ]] || die "$h is not running"
    nsenter -t "$old" -a systemctl reboot --no-block >/dev/null 2>&1 || true
    # A new systemd in the same place, then booted.
    wait_until 60 "$h to go down" bash -c "[[ ! -d /proc/$old ]]"
    wait_until 60 "$h to boot again" host_running "$h"
    say "$h rebooted in $((SECONDS - t0)) s"
}

cmd_link() {
    local h=${1:?usage: fleet.sh link HOST down|up} state=${2:?usage: fleet.sh link HOST down|up}
    [[ $state == up || $state == down ]] || die "link HOST down|up"
    in_ns ip link set "vb-$h" "$state"
}

cmd_partition() {
    local h=${1:?usage: fleet.sh partition HOST SECS} secs=${2:?usage: fleet.sh partition HOST SECS}
    cmd_link "$h" down
    say "$h cut off for $secs s"
    sleep "$secs"
    cmd_link "$h" up
    say "$h connected again"
}

cmd_exec() {
    local h=${1:?usage: fleet.sh exec HOST CMD...} pid
    shift
    pid=$(init_pid "$h")
    [[ -n $pid ]] || die "$h is not running"
    # As a transient service of the host's systemd, the way an SSM agent's command runs:
    # a clean environment, the host's cgroups, its journal. The one variable is what an
    # operator's command needs in a VPC whose endpoints have no private DNS, as the units
    # get it from their drop-ins.
    exec nsenter -t "$pid" -a systemd-run --quiet --wait --pipe --collect \
        --service-type=exec --setenv=AWS_ENDPOINT_URL="$MOTO" -- "$@"
}

cmd_add() {
    local h=${1:?usage: fleet.sh add HOST} ip iid next n
    [[ ! -d $(hostdir "$h") ]] || die "host $h exists"
    # A fresh address: moto never frees a terminated instance's.
    next=$(cat "$RUN/next_ip" 2>/dev/null || echo $(($(cat "$RUN/size") + 11)))
    ip=$BLOCK.$next
    echo $((next + 1)) >"$RUN/next_ip"
    iid=$(in_ns "$PY" "$HERE/fleet_aws.py" --dir "$RUN/aws" add-instance --ip "$ip")
    n=$(cat "$RUN/size")
    make_host "$h" "$ip" "$iid"
    boot_host "$h" "$n"
    echo "$h $ip $iid boot=$(cat "$(hostdir "$h")/boot_secs")s"
}

cmd_terminate() {
    local h=${1:?usage: fleet.sh terminate HOST}
    in_ns "$PY" "$HERE/fleet_aws.py" --dir "$RUN/aws" terminate --id "$(cat "$(hostdir "$h")/instance_id")"
}

cmd_down() {
    [[ -d $RUN ]] || return 0
    local d h pid
    for d in "$RUN"/hosts/*/; do
        [[ -d $d ]] || continue
        h=$(basename "$d")
        stop_recorded "$d/launcher.pid" launcher.sh KILL 5
        if [[ -f $d/nspawn.pid ]]; then
            pid=$(init_pid "$h")
            [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
            stop_recorded "$d/nspawn.pid" systemd-nspawn TERM 10
        fi
        if [[ -f $d/mounted ]]; then
            umount "$(cat "$d/mounted")" 2>/dev/null || umount -l "$(cat "$d/mounted")" || true
            rm -f "$d/mounted"
        fi
    done
    stop_recorded "$RUN/imds.pid" imds.py TERM 5
    stop_recorded "$RUN/moto.pid" moto_server TERM 5
    if [[ -f $RUN/netns ]]; then
        local name cg
        name=$(ns)
        # The launchers' cgroups (and what nspawn made below them), deepest first.
        for hier in systemd unified; do
            for cg in /sys/fs/cgroup/$hier/"$name"-*; do
                [[ -d $cg ]] || continue
                find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
            done
        done
        ip netns del "$name" 2>/dev/null || true
        rm -f "$RUN/netns"
    fi
    # Only a directory `up` made, and only when no host's disk is still mounted in it.
    if [[ -z ${FLEET_KEEP:-} && -f $RUN/.fleet-run ]] && ! grep -qF " $RUN/" /proc/mounts; then
        if [[ -f $RUN/.fleet-tmpfs ]] && mountpoint -q "$RUN"; then
            umount "$RUN"
            rmdir "$RUN" 2>/dev/null || true
        else
            rm -rf "$RUN"
        fi
    elif [[ -n ${FLEET_KEEP:-} && -f $RUN/.fleet-tmpfs ]]; then
        say "kept $RUN (a tmpfs: umount $RUN when done)"
    fi
    say "down"
}

cmd=${1:-}
shift || true
case $cmd in
up) cmd_up "$@" ;;
down) cmd_down ;;
kill) cmd_kill "$@" ;;
start) cmd_start "$@" ;;
reboot) cmd_reboot "$@" ;;
partition) cmd_partition "$@" ;;
link) cmd_link "$@" ;;
exec) cmd_exec "$@" ;;
add) cmd_add "$@" ;;
terminate) cmd_terminate "$@" ;;
ns) in_ns "$@" ;;
aws) in_ns "$PY" "$HERE/fleet_aws.py" --dir "$RUN/aws" "$@" ;;
ip) host_ip "${1:?usage: fleet.sh ip HOST}" ;;
id) cat "$(hostdir "${1:?usage: fleet.sh id HOST}")/instance_id" ;;
pid) init_pid "${1:?usage: fleet.sh pid HOST}" ;;
hosts) ls "$RUN/hosts" ;;
running) host_running "${1:?usage: fleet.sh running HOST}" ;;
*)
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
