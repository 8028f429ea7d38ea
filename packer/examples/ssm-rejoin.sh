#!/bin/bash
# Runs `vault-bootstrap rejoin` on one instance through SSM Run Command, without SSH.
# Without VAULT_TOKEN, rejoin moves raft data aside only when the node serves another
# cluster id, and refuses (exit 75) when it cannot tell; a removed node needs the raft view:
# run rejoin with VAULT_TOKEN in an interactive session (`aws ssm start-session`), never in
# this command's parameters, which SSM keeps in its command history.
#
# Usage: ssm-rejoin.sh INSTANCE_ID [REGION]
# Needs: the SSM agent on the instance (Amazon Linux 2023 has it), the
# AmazonSSMManagedInstanceCore managed policy on the instance role, and
# ssm:SendCommand / ssm:GetCommandInvocation for the caller.
set -euo pipefail
instance=${1:?usage: ssm-rejoin.sh INSTANCE_ID [REGION]}
region=${2:-${AWS_REGION:-eu-west-1}}

command_id=$(aws ssm send-command \
    --region "$region" \
    --instance-ids "$instance" \
    --document-name AWS-RunShellScript \
    --comment "vault-bootstrap rejoin" \
    --parameters 'commands=["/usr/local/bin/vault-bootstrap rejoin"],executionTimeout=["1800"]' \
    --query Command.CommandId --output text)
echo "sent: $command_id"
aws ssm wait command-executed --region "$region" --command-id "$command_id" --instance-id "$instance" || true
aws ssm get-command-invocation --region "$region" --command-id "$command_id" --instance-id "$instance" \
    --query '{status: Status, exit: ResponseCode, stdout: StandardOutputContent, stderr: StandardErrorContent}'
