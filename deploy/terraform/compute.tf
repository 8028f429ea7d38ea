# The nodes: a launch template (IMDSv2 only, no public address, encrypted root volume, the
# rendered user-data) and the Auto Scaling group with its lifecycle hooks set at creation,
# so that the very first instances already wait for the launch hook.

locals {
  # Where nodes can be: the subnets' blocks (a subnet in a secondary VPC CIDR included).
  node_cidrs = var.vpc_id == null ? aws_subnet.private[*].cidr_block : [for s in data.aws_subnet.given : s.cidr_block]

  user_data = templatefile("${path.module}/templates/user-data.sh.tftpl", {
    name               = var.name
    cluster_size       = var.cluster_size
    bucket             = local.bucket_name
    cert_key           = var.tls.cert_key
    key_key            = var.tls.key_key
    ca_key             = var.tls.ca_key
    server_name        = var.tls.server_name
    seal_key           = aws_kms_alias.seal.name
    escrow_key         = aws_kms_key.escrow.arn
    server_binary      = var.server_binary
    recovery_shares    = length(var.recovery_pgp_keys) > 0 ? length(var.recovery_pgp_keys) : var.recovery_shares
    recovery_threshold = var.recovery_threshold
    escrow_prefix      = local.escrow_prefix
    snapshot_prefix    = local.snapshot_prefix
    snapshot_keep      = var.snapshot.keep
    pgp_keys           = [for k in var.recovery_pgp_keys : "s3://${local.bucket_name}/${k}"]
    node_cidrs         = local.node_cidrs
    launch_hook        = local.launch_hook
    terminate_hook     = local.terminate_hook
    operator_ca_key    = var.operator_ca_key == null ? "" : var.operator_ca_key
    common_names       = var.operator_common_names
  })
}

# The AMI's own root device: Amazon Linux names it /dev/xvda, Ubuntu /dev/sda1; a mapping
# under another name would add a second disk and leave raft data on the image's small root.
data "aws_ami" "nodes" {
  filter {
    name   = "image-id"
    values = [var.ami_id]
  }
}

data "aws_subnet" "given" {
  for_each = var.vpc_id == null ? toset([]) : toset(var.subnet_ids)
  id       = each.value
}

resource "aws_launch_template" "nodes" {
  name_prefix   = "${var.name}-"
  description   = "vault-bootstrap ${var.name}"
  image_id      = var.ami_id
  instance_type = var.instance_type
  user_data     = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  # IMDSv2 only, one hop (no container on the node reaches the role), tags readable: the
  # agent reads its cluster tag from IMDS.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  block_device_mappings {
    device_name = data.aws_ami.nodes.root_device_name

    ebs {
      volume_size           = var.root_volume_size
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  network_interfaces {
    device_index                = 0
    associate_public_ip_address = false
    security_groups             = [aws_security_group.nodes.id]
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "nodes" {
  name                = var.name
  min_size            = var.cluster_size
  max_size            = var.cluster_size + 1
  desired_capacity    = var.cluster_size
  vpc_zone_identifier = local.subnet_ids
  target_group_arns   = [aws_lb_target_group.api.arn]

  # EC2 health only: the load balancer's view (a sealed or standby node) must never make
  # the group terminate a member; the launch hook decides when a node counts.
  health_check_type         = "EC2"
  health_check_grace_period = 300
  # New instances wait in their launch hook until they are healthy voters, which needs
  # the TLS set uploaded after this apply: never wait for capacity here, or a first apply
  # times out, taints the group and the next apply replaces every node.
  wait_for_capacity_timeout = "0"

  launch_template {
    id      = aws_launch_template.nodes.id
    version = aws_launch_template.nodes.latest_version
  }

  # Set at creation: hooks added later miss the first instances.
  initial_lifecycle_hook {
    name                 = local.launch_hook
    lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
    heartbeat_timeout    = var.lifecycle_hook_timeout_secs
    default_result       = "ABANDON"
  }

  initial_lifecycle_hook {
    name                 = local.terminate_hook
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = var.lifecycle_hook_timeout_secs
    default_result       = "CONTINUE"
  }

  # A new launch template rolls the group one node at a time, launching before
  # terminating (MaxHealthyPercentage above 100), so it never has fewer voters.
  instance_refresh {
    strategy = "Rolling"

    preferences {
      min_healthy_percentage = 100
      max_healthy_percentage = var.cluster_size == 3 ? 134 : 120
      instance_warmup        = 30
      skip_matching          = true
      auto_rollback          = true
      checkpoint_percentages = var.cluster_size == 3 ? [33, 66, 100] : [20, 40, 60, 80, 100]
      checkpoint_delay       = 120
      # A protected or standby instance stops the refresh rather than being skipped.
      scale_in_protected_instances = "Wait"
      standby_instances            = "Wait"
    }
  }

  lifecycle {
    # A change to an initial_lifecycle_hook would replace the group (every node at once);
    # aws_autoscaling_lifecycle_hook below keeps the hooks up to date instead.
    ignore_changes = [initial_lifecycle_hook]

    precondition {
      condition     = var.recovery_threshold <= (length(var.recovery_pgp_keys) > 0 ? length(var.recovery_pgp_keys) : var.recovery_shares)
      error_message = "recovery_threshold is above the number of recovery shares."
    }
    precondition {
      condition     = var.operator_ca_key == null || length(var.operator_common_names) > 0
      error_message = "operator_ca_key needs operator_common_names: without a list, no certificate logs in (the agent refuses such a config)."
    }
    precondition {
      condition     = length(var.operator_common_names) == 0 || var.operator_ca_key != null
      error_message = "operator_common_names without operator_ca_key configures nothing."
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}

# The same hooks, managed after creation: PutLifecycleHook updates a hook in place, so a
# new timeout reaches the group without replacing it.
resource "aws_autoscaling_lifecycle_hook" "launch" {
  name                   = local.launch_hook
  autoscaling_group_name = aws_autoscaling_group.nodes.name
  lifecycle_transition   = "autoscaling:EC2_INSTANCE_LAUNCHING"
  heartbeat_timeout      = var.lifecycle_hook_timeout_secs
  default_result         = "ABANDON"
}

resource "aws_autoscaling_lifecycle_hook" "terminate" {
  name                   = local.terminate_hook
  autoscaling_group_name = aws_autoscaling_group.nodes.name
  lifecycle_transition   = "autoscaling:EC2_INSTANCE_TERMINATING"
  heartbeat_timeout      = var.lifecycle_hook_timeout_secs
  default_result         = "CONTINUE"
}
