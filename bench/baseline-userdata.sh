#!/usr/bin/env bash
# The baseline the agent's boot path is measured against (bench/run.sh, table 1b): the same
# steps as EC2 user-data scripts commonly do them today, with curl, the AWS CLI and openssl.
#
#   1. IMDSv2: a token PUT, then GETs of instance id, region, AZ, private IP and the
#      cluster tag (instance metadata tags on).
#   2. Peers: `aws ec2 describe-instances` filtered on the ASG tag (pending/running).
#   3. TLS: `aws s3 cp` of the certificate, key and CA; openssl checks that the key matches
#      the certificate, that the chain verifies against the CA, that the certificate is
#      not expired and covers this node's IP.
#   4. vault.hcl from a heredoc, one retry_join per peer.
#
# It is deliberately written the way such scripts are, not the way they should be: no
# retries, no timeouts, no atomic writes, a missing tag or a slow IMDS simply ends it (with
# set -e) halfway, and a second run overwrites whatever the first one wrote. The bench only
# measures it; it never starts a server (`systemctl enable --now vault` would follow).
#
# The values a Terraform templatefile() would fill in come from the environment here, so the
# bench can point the script at the test-bed (AWS_ENDPOINT_URL, IMDS_ENDPOINT) and at a
# scratch directory; the defaults are what it would use on EC2.

set -euo pipefail

IMDS=${IMDS_ENDPOINT:-http://169.254.169.254}
BUCKET=${VAULT_TLS_BUCKET:-vault-resources}
TAG_KEY=${VAULT_TAG_KEY:-aws:autoscaling:groupName}
CONFIG_FILE=${VAULT_CONFIG_FILE:-/etc/vault.d/vault.hcl}
TLS_DIR=${VAULT_TLS_DIR:-/opt/vault/tls}
DATA_DIR=${VAULT_DATA_DIR:-/opt/vault/data}
AUDIT_FILE=${VAULT_AUDIT_FILE:-/var/log/vault/audit.log}
KMS_KEY_ID=${VAULT_KMS_KEY_ID:-alias/vault-unseal}
# Only set on the test-bed (the seal's KMS is moto there).
KMS_ENDPOINT=${VAULT_KMS_ENDPOINT:-}
VAULT_USER=${VAULT_USER:-vault}

# --- 1. instance metadata (IMDSv2) ----------------------------------------------------------
TOKEN=$(curl -fsS -X PUT "$IMDS/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
md() { curl -fsS -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/meta-data/$1"; }
INSTANCE_ID=$(md instance-id)
REGION=$(md placement/region)
AZ=$(md placement/availability-zone)
LOCAL_IP=$(md local-ipv4)
CLUSTER=$(md "tags/instance/$TAG_KEY")

# --- 2. peers ---------------------------------------------------------------------------------
PEER_IPS=$(aws ec2 describe-instances --region "$REGION" \
    --filters "Name=tag:$TAG_KEY,Values=$CLUSTER" "Name=instance-state-name,Values=pending,running" \
    --query 'Reservations[].Instances[].PrivateIpAddress' --output text)

# --- 3. TLS material --------------------------------------------------------------------------
mkdir -p "$TLS_DIR" "$DATA_DIR" "$(dirname "$CONFIG_FILE")" "$(dirname "$AUDIT_FILE")"
for f in server.pem server.key ca.pem; do
    aws s3 cp --region "$REGION" --only-show-errors "s3://$BUCKET/tls/$f" "$TLS_DIR/$f"
done
chmod 600 "$TLS_DIR/server.key"

# The key belongs to the certificate: both public keys hash the same.
cert_pub=$(openssl x509 -in "$TLS_DIR/server.pem" -noout -pubkey | openssl sha256)
key_pub=$(openssl pkey -in "$TLS_DIR/server.key" -pubout | openssl sha256)
if [[ $cert_pub != "$key_pub" ]]; then
    echo "user-data: server.key does not match server.pem" >&2
    exit 1
fi
# The chain verifies against the CA (this also checks both validity periods).
openssl verify -CAfile "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" >/dev/null
# Not expired now (the agent also warns ahead of expiry; user-data rarely does).
openssl x509 -in "$TLS_DIR/server.pem" -noout -checkend 0 >/dev/null
# Covers this node's IP (`-checkip` prints "does match" / "does NOT match", exit 0 either way).
if ! openssl x509 -in "$TLS_DIR/server.pem" -noout -checkip "$LOCAL_IP" | grep -q ' does match'; then
    echo "user-data: server.pem does not cover $LOCAL_IP" >&2
    exit 1
fi

# --- 4. vault.hcl -----------------------------------------------------------------------------
JOINS=""
for ip in $PEER_IPS; do
    [[ $ip == "$LOCAL_IP" ]] && continue
    JOINS+="
  retry_join {
    leader_api_addr       = \"https://$ip:8200\"
    leader_ca_cert_file   = \"$TLS_DIR/ca.pem\"
  }
"
done
SEAL_ENDPOINT_LINE=""
if [[ -n $KMS_ENDPOINT ]]; then
    SEAL_ENDPOINT_LINE="  endpoint   = \"$KMS_ENDPOINT\""
fi

cat >"$CONFIG_FILE" <<EOF
# Written by user-data for $INSTANCE_ID ($AZ)
ui            = true
disable_mlock = true
api_addr      = "https://$LOCAL_IP:8200"
cluster_addr  = "https://$LOCAL_IP:8201"

storage "raft" {
  path                   = "$DATA_DIR"
  node_id                = "$INSTANCE_ID"
  performance_multiplier = 1
$JOINS}

listener "tcp" {
  address         = "$LOCAL_IP:8200"
  cluster_address = "$LOCAL_IP:8201"
  tls_cert_file   = "$TLS_DIR/server.pem"
  tls_key_file    = "$TLS_DIR/server.key"
  tls_min_version = "tls12"
}

seal "awskms" {
  region     = "$REGION"
  kms_key_id = "$KMS_KEY_ID"
$SEAL_ENDPOINT_LINE
}

audit "file" "file" {
  options {
    file_path = "$AUDIT_FILE"
  }
}

telemetry {
  prometheus_retention_time = "24h"
  disable_hostname          = true
}
EOF
chown -R "$VAULT_USER:$VAULT_USER" "$TLS_DIR" "$DATA_DIR"
chmod 640 "$CONFIG_FILE"
