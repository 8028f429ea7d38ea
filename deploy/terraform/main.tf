# vault-bootstrap on AWS: everything one Raft cluster of Vault or OpenBao needs, with the
# guarantees the agent relies on set where they live (IAM, KMS key policies, the bucket
# policy, the group's hooks). The nodes themselves come from the AMI the Packer build made;
# this module gives them their network, keys, bucket, roles, group and load balancer.

data "aws_caller_identity" "this" {}
data "aws_region" "this" {}
data "aws_partition" "this" {}

locals {
  account   = data.aws_caller_identity.this.account_id
  region    = data.aws_region.this.name
  partition = data.aws_partition.this.partition

  # The agent's layout in the resources bucket (docs/internals.md "Init and escrow").
  escrow_prefix   = "vault-bootstrap"
  snapshot_prefix = "vault-bootstrap-snapshots"
  bucket_name     = var.bucket_name == null ? "${var.name}-vault-${local.account}" : var.bucket_name
  bucket_arn      = "arn:${local.partition}:s3:::${local.bucket_name}"
  escrow_arn      = "${local.bucket_arn}/${local.escrow_prefix}/${var.name}"
  snapshots_arn   = "${local.bucket_arn}/${local.snapshot_prefix}/${var.name}"
  group_arn       = "arn:${local.partition}:autoscaling:${local.region}:${local.account}:autoScalingGroup:*:autoScalingGroupName/${var.name}"

  launch_hook    = "${var.name}-launch"
  terminate_hook = "${var.name}-terminate"

  tags = merge({ "vault-bootstrap:cluster" = var.name }, var.tags)
}
