#!/bin/bash
# EC2 user-data for instances launched from the vault-bootstrap AMI: put it (base64) in the
# launch template's UserData. cloud-init runs it once per instance, as root, late in the
# first boot. It writes /etc/vault-bootstrap/config.toml, the only per-cluster input: the
# AMI bakes no configuration and no secret. Nothing below is secret either: TLS material
# comes from S3 and keys stay in KMS; the instance role grants access to both.
#
# Check a config before you ship it: `vault-bootstrap --config FILE render` on an instance.
# Every key and its default: tests/fixtures/config/example.toml in the repository.
set -euo pipefail
umask 077

# Only for VPC endpoints without private DNS: the one URL every AWS call of the agent, its
# timers and the server's awskms seal goes to (EC2, S3 and KMS through one endpoint, e.g. a
# proxy). Leave it empty with private DNS on the endpoints, or with a NAT gateway.
AWS_ENDPOINT_URL=""

install -d -m 0750 -o root -g root /etc/vault-bootstrap
# Written beside the target and renamed: the agent never reads half a file.
cat >/etc/vault-bootstrap/config.toml.new <<'CONFIG'
# prod-vault: 3 voters across 3 AZs in one Auto Scaling group.

[cluster]
# Peers: running/pending instances with this instance's value of the ASG tag.
tag_key = "aws:autoscaling:groupName"
# Wait for all three nodes before joining: a first node alone must not form a cluster early.
min_peers = 3
discovery_timeout_secs = 600

[tls]
bucket = "acme-vault-resources"
cert_key = "tls/server.pem"
key_key = "tls/server.key"
ca_key = "tls/ca.pem"
# The name clients and the load balancer use; must be in the certificate's SANs.
server_name = "vault.internal.acme.example"

[seal]
kms_key_id = "alias/vault-unseal"
# A KMS VPC endpoint keeps the seal working without a NAT gateway (optional).
# endpoint = "https://vpce-0123456789abcdef0-abcdefgh.kms.eu-west-1.vpce.amazonaws.com"

[vault]
binary = "/usr/local/bin/vault"
launcher = "systemd"
unit = "vault.service"
user = "vault"
bind_address = "0.0.0.0"
api_port = 8200
cluster_port = 8201
performance_multiplier = 1
health_timeout_secs = 180
prometheus_retention = "24h"
ui = true

[agent]
state_dir = "/var/lib/vault-bootstrap"
imds_timeout_secs = 120
warm_pool_timeout_secs = 0
aws_timeout_secs = 120

[init]
enabled = true
recovery_shares = 5
recovery_threshold = 3
escrow_bucket = "acme-vault-resources"
escrow_prefix = "vault-bootstrap"
# A key of its own, whose Decrypt only the instances and the key holders get.
escrow_kms_key_id = "alias/vault-escrow"
# One public key per share: each holder can decrypt only their own share.
recovery_pgp_keys = [
  "s3://acme-vault-resources/pgp/alice.asc",
  "s3://acme-vault-resources/pgp/bob.asc",
  "s3://acme-vault-resources/pgp/carol.asc",
  "s3://acme-vault-resources/pgp/dave.asc",
  "s3://acme-vault-resources/pgp/erin.asc",
]
revoke_root_token = true
audit_file_path = "/var/log/vault/audit.log"
expected_size = 3
cleanup_dead_servers = false
dead_server_last_contact_threshold = "10m"
join_timeout_secs = 600

[snapshot]
# The VPC's CIDR: the snapshot AppRole logs in, and its tokens work, only from these
# addresses. The default (the instances' own IPs when the cluster is initialised) would
# leave out every instance that replaces one later.
bound_cidrs = ["10.0.0.0/16"]

[lifecycle]
# The group's lifecycle hooks (packer/examples/lifecycle-hooks.json): a new instance goes
# InService only once it is a healthy raft voter; a terminating one leaves raft first, so
# an instance refresh never costs quorum (docs/operations.md "Rolling upgrades"). The
# lifecycle AppRole is bound to snapshot.bound_cidrs above.
launch_hook = "vault-launch"
terminate_hook = "vault-terminate"

[access]
# Operators log in with client certificates this CA signed (cert auth, README "Operator
# access"). Only with a login path is the root token revoked after init; without one it
# stays valid (escrowed) and every boot says so.
operator_ca_key = "tls/operator-ca.pem"
# Only these certificate common names log in as administrators.
operator_common_names = ["alice", "bob"]
CONFIG
chmod 0640 /etc/vault-bootstrap/config.toml.new
mv -f /etc/vault-bootstrap/config.toml.new /etc/vault-bootstrap/config.toml

if [[ -n $AWS_ENDPOINT_URL ]]; then
    # A drop-in per unit that calls AWS: the agent, its two timers' services, the watch
    # unit, the server.
    for unit in vault-bootstrap vault-bootstrap-refresh-tls vault-bootstrap-snapshot vault-bootstrap-watch vault; do
        install -d -m 0755 "/etc/systemd/system/$unit.service.d"
        printf '[Service]\nEnvironment=AWS_ENDPOINT_URL=%s\n' "$AWS_ENDPOINT_URL" \
            >"/etc/systemd/system/$unit.service.d/aws-endpoint.conf"
        chmod 0644 "/etc/systemd/system/$unit.service.d/aws-endpoint.conf"
    done
    systemctl daemon-reload
fi

# vault-bootstrap.service is enabled in the AMI, so every later boot starts it on its own.
# On this first boot, though, it was due before cloud-init ran this script (user-data runs
# in cloud-final, late in boot) and skipped itself: its ConditionFileNotEmpty= on
# config.toml was not met. Start it now. --no-block: the boot may take minutes (peers,
# init) and cloud-init must not wait for it; if the unit is already running, this is a
# no-op. Follow it with `journalctl -fu vault-bootstrap`. The watch unit skipped itself for
# the same reason; it is ordered after the agent, so it starts once the boot is done.
systemctl start --no-block vault-bootstrap.service vault-bootstrap-watch.service
