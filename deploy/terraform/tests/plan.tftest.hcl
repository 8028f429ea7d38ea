# Offline: a mocked AWS provider, no credentials, no registry. Asserts the settings the
# cluster's guarantees rest on.

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = {
      account_id = "111122223333"
    }
  }
  mock_data "aws_region" {
    defaults = {
      name = "eu-west-1"
    }
  }
  mock_data "aws_partition" {
    defaults = {
      partition = "aws"
    }
  }
  mock_data "aws_subnet" {
    defaults = {
      cidr_block = "10.0.1.0/24"
    }
  }
  mock_data "aws_ami" {
    defaults = {
      root_device_name = "/dev/xvda"
    }
  }
  mock_resource "aws_iam_role" {
    defaults = {
      arn = "arn:aws:iam::111122223333:role/mock"
    }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = {
      arn = "arn:aws:iam::111122223333:instance-profile/mock"
    }
  }
  mock_resource "aws_lb_target_group" {
    defaults = {
      arn = "arn:aws:elasticloadbalancing:eu-west-1:111122223333:targetgroup/mock/0123456789abcdef"
    }
  }
  mock_resource "aws_launch_template" {
    defaults = {
      id             = "lt-0123456789abcdef0"
      latest_version = 1
    }
  }
  mock_resource "aws_lb" {
    defaults = {
      arn = "arn:aws:elasticloadbalancing:eu-west-1:111122223333:loadbalancer/net/mock/0123456789abcdef"
    }
  }
}

# Two keys with ARNs of their own, so that any wiring of one where the other belongs shows.
override_resource {
  target = aws_kms_key.seal
  values = {
    arn    = "arn:aws:kms:eu-west-1:111122223333:key/seal"
    key_id = "seal"
  }
}

override_resource {
  target = aws_kms_key.escrow
  values = {
    arn    = "arn:aws:kms:eu-west-1:111122223333:key/escrow"
    key_id = "escrow"
  }
}

variables {
  name                = "prod-vault"
  vpc_id              = "vpc-0123456789abcdef0"
  subnet_ids          = ["subnet-a", "subnet-b", "subnet-c"]
  ami_id              = "ami-0123456789abcdef0"
  tls                 = { server_name = "vault.internal.acme.example" }
  operator_principals = ["arn:aws:iam::111122223333:role/vault-operators"]
  client_cidrs        = ["10.0.0.0/16"]
}

run "nodes_take_imdsv2_only_and_no_public_address" {
  command = plan

  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 must be required."
  }
  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].http_put_response_hop_limit == 1
    error_message = "The metadata hop limit must be 1."
  }
  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].instance_metadata_tags == "enabled"
    error_message = "The agent reads its tags from IMDS."
  }
  assert {
    condition     = aws_launch_template.nodes.network_interfaces[0].associate_public_ip_address == "false"
    error_message = "Nodes must have no public address."
  }
  assert {
    condition     = aws_launch_template.nodes.block_device_mappings[0].ebs[0].encrypted == "true"
    error_message = "The root volume (raft data) must be encrypted."
  }
}

run "hooks_are_set_at_creation_with_the_documented_defaults" {
  # apply (mocked): the user-data names the escrow key's ARN, known only then.
  command = apply

  assert {
    condition = toset([for h in aws_autoscaling_group.nodes.initial_lifecycle_hook : "${h.lifecycle_transition}/${h.default_result}/${h.heartbeat_timeout}"]) == toset([
      "autoscaling:EC2_INSTANCE_LAUNCHING/ABANDON/1800",
      "autoscaling:EC2_INSTANCE_TERMINATING/CONTINUE/1800",
    ])
    error_message = "Launch (ABANDON) and terminate (CONTINUE) hooks, 1800 s, must be set at creation."
  }
  assert {
    condition     = aws_autoscaling_lifecycle_hook.launch.default_result == "ABANDON" && aws_autoscaling_lifecycle_hook.terminate.default_result == "CONTINUE" && aws_autoscaling_lifecycle_hook.launch.name == "prod-vault-launch"
    error_message = "The hooks are also managed after creation (a change to an initial hook would replace the group)."
  }
  assert {
    condition     = aws_autoscaling_group.nodes.wait_for_capacity_timeout == "0"
    error_message = "The apply must not wait for capacity: new nodes wait in their launch hook for the TLS set uploaded after it."
  }
  assert {
    condition     = strcontains(local.user_data, "bound_cidrs = [\"10.0.1.0/24\",\"10.0.1.0/24\",\"10.0.1.0/24\"]")
    error_message = "The node credentials must be bound to the subnets' blocks."
  }
  assert {
    condition     = aws_autoscaling_group.nodes.health_check_type == "EC2"
    error_message = "The group must not terminate members on the load balancer's view."
  }
  assert {
    condition     = aws_autoscaling_group.nodes.instance_refresh[0].preferences[0].min_healthy_percentage == 100 && aws_autoscaling_group.nodes.instance_refresh[0].preferences[0].max_healthy_percentage > 100
    error_message = "An instance refresh must launch before it terminates."
  }
  assert {
    condition     = strcontains(local.user_data, "launch_hook = \"prod-vault-launch\"") && strcontains(local.user_data, "terminate_hook = \"prod-vault-terminate\"")
    error_message = "The user-data must name the hooks the group has."
  }
}

run "the_escrow_key_is_not_the_seal_key" {
  command = apply

  assert {
    condition     = aws_kms_alias.seal.target_key_id == "seal" && aws_kms_alias.escrow.target_key_id == "escrow"
    error_message = "Each alias must name its own key."
  }
  assert {
    condition     = strcontains(local.user_data, "kms_key_id = \"alias/prod-vault-seal\"") && strcontains(local.user_data, "escrow_kms_key_id = \"arn:aws:kms:eu-west-1:111122223333:key/escrow\"")
    error_message = "The agent must seal with the seal key and escrow under the escrow key, by ARN (the bucket policy compares ARNs)."
  }
  assert {
    condition = alltrue([
      for st in jsondecode(aws_iam_role_policy.node.policy).Statement :
      st.Resource == (st.Sid == "AwsKmsSeal" ? "arn:aws:kms:eu-west-1:111122223333:key/seal" : "arn:aws:kms:eu-west-1:111122223333:key/escrow")
      if startswith(st.Sid, "Escrow") && can(regex("kms:", jsonencode(st.Action))) || st.Sid == "AwsKmsSeal"
    ])
    error_message = "The node may use the seal key unconditioned, and the escrow key only by the escrow statements."
  }
  assert {
    condition     = one([for st in jsondecode(aws_s3_bucket_policy.resources.policy).Statement : st if st.Sid == "EscrowUnderTheEscrowKeyOnly"]).Condition.StringNotEquals["s3:x-amz-server-side-encryption-aws-kms-key-id"] == "arn:aws:kms:eu-west-1:111122223333:key/escrow"
    error_message = "The bucket policy must admit escrow writes under the escrow key only."
  }
  assert {
    condition     = !strcontains(aws_kms_key.seal.policy, "vault-bootstrap:class") && strcontains(aws_kms_key.escrow.policy, "node-credential")
    error_message = "Only the escrow key's policy grants Decrypt by class."
  }
}

run "security_groups_open_exactly_the_api_and_raft_ports" {
  command = plan

  assert {
    condition     = aws_vpc_security_group_ingress_rule.raft_between_nodes.from_port == 8200 && aws_vpc_security_group_ingress_rule.raft_between_nodes.to_port == 8201
    error_message = "Nodes reach each other on 8200-8201."
  }
  assert {
    condition     = alltrue([for r in aws_vpc_security_group_ingress_rule.api_from_clients : r.from_port == 8200 && r.to_port == 8200])
    error_message = "Clients reach the API on 8200 only."
  }
  assert {
    condition     = aws_vpc_security_group_ingress_rule.api_from_lb.from_port == 8200 && aws_vpc_security_group_ingress_rule.api_from_lb.to_port == 8200
    error_message = "The load balancer reaches the API on 8200 only."
  }
  assert {
    condition     = aws_vpc_security_group_egress_rule.https.from_port == 443 && aws_vpc_security_group_egress_rule.https.to_port == 443
    error_message = "Nodes reach AWS APIs on 443 only."
  }
}

run "the_health_check_counts_standbys_by_default" {
  command = plan

  assert {
    condition     = aws_lb_target_group.api.health_check[0].path == "/v1/sys/health?standbyok=true" && aws_lb_target_group.api.health_check[0].matcher == "200" && aws_lb_target_group.api.health_check[0].protocol == "HTTPS"
    error_message = "Standbys answer 429 to the default sys/health: the check must ask with standbyok=true over HTTPS and match 200."
  }
  assert {
    condition     = aws_lb_target_group.api.protocol == "TCP" && aws_lb.api.load_balancer_type == "network"
    error_message = "TLS ends at the nodes: TCP passthrough."
  }
}

run "active_only_routing_asks_the_plain_health_path" {
  command = plan

  variables {
    load_balancer = { routing = "active" }
  }

  assert {
    condition     = aws_lb_target_group.api.health_check[0].path == "/v1/sys/health"
    error_message = "Active-only routing counts the active node alone."
  }
}

run "the_bucket_is_versioned_private_and_encrypted" {
  command = plan

  assert {
    condition     = aws_s3_bucket_versioning.resources.versioning_configuration[0].status == "Enabled"
    error_message = "Versioning must be on."
  }
  assert {
    condition     = aws_s3_bucket_public_access_block.resources.block_public_acls && aws_s3_bucket_public_access_block.resources.block_public_policy && aws_s3_bucket_public_access_block.resources.ignore_public_acls && aws_s3_bucket_public_access_block.resources.restrict_public_buckets
    error_message = "Public access must be blocked."
  }
  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.resources.rule).apply_server_side_encryption_by_default[0].sse_algorithm == "AES256"
    error_message = "The bucket must encrypt at rest."
  }
}

run "bad_input_is_refused" {
  command = plan

  variables {
    cluster_size = 4
  }

  expect_failures = [var.cluster_size]
}

run "a_threshold_above_the_shares_is_refused" {
  command = plan

  variables {
    recovery_shares    = 3
    recovery_threshold = 4
  }

  expect_failures = [aws_autoscaling_group.nodes]
}

run "the_data_perimeter_without_endpoints_is_refused" {
  command = plan

  variables {
    data_perimeter = true
  }

  expect_failures = [aws_iam_role_policy.node_perimeter]
}

run "a_module_made_vpc_needs_three_zones" {
  command = plan

  variables {
    vpc_id     = null
    subnet_ids = []
  }

  expect_failures = [aws_vpc.this]
}

run "operators_need_mfa_by_default" {
  command = plan

  assert {
    condition     = jsondecode(aws_iam_role.operator.assume_role_policy).Statement[0].Condition.Bool["aws:MultiFactorAuthPresent"] == "true"
    error_message = "The operator role must require MFA unless told otherwise."
  }
}

# packer/examples/*.json are the module's policies for the example's values: one source of
# truth, kept equal here (a change on either side alone fails).
run "the_example_policy_files_are_what_the_module_renders" {
  command = apply
  # A state of its own: the keys must be made with the example's ARNs.
  state_key = "examples"

  variables {
    bucket_name     = "acme-vault-resources"
    data_perimeter  = true
    vpc_endpoints   = true
    route_table_ids = ["rtb-a"]
  }

  override_resource {
    target = aws_kms_key.seal
    values = {
      arn    = "arn:aws:kms:eu-west-1:111122223333:key/66666666-7777-8888-9999-000000000000"
      key_id = "66666666-7777-8888-9999-000000000000"
    }
  }
  override_resource {
    target = aws_kms_key.escrow
    values = {
      arn    = "arn:aws:kms:eu-west-1:111122223333:key/11111111-2222-3333-4444-555555555555"
      key_id = "11111111-2222-3333-4444-555555555555"
    }
  }

  override_resource {
    target = aws_iam_role.node
    values = { arn = "arn:aws:iam::111122223333:role/prod-vault-node" }
  }
  override_resource {
    target = aws_iam_role.operator
    values = { arn = "arn:aws:iam::111122223333:role/prod-vault-operator" }
  }

  assert {
    condition     = jsondecode(aws_kms_key.seal.policy) == jsondecode(file("../../packer/examples/kms-key-policy-seal.json"))
    error_message = "packer/examples/kms-key-policy-seal.json differs from the seal key's policy the module renders."
  }
  assert {
    condition     = jsondecode(aws_kms_key.escrow.policy) == jsondecode(file("../../packer/examples/kms-key-policy-escrow.json"))
    error_message = "packer/examples/kms-key-policy-escrow.json differs from the escrow key's policy the module renders."
  }
  assert {
    condition     = jsondecode(aws_iam_role_policy.node.policy) == jsondecode(file("../../packer/examples/iam-policy.json"))
    error_message = "packer/examples/iam-policy.json differs from the node policy the module renders."
  }
  assert {
    condition     = jsondecode(aws_iam_role_policy.operator.policy) == jsondecode(file("../../packer/examples/iam-policy-operator.json"))
    error_message = "packer/examples/iam-policy-operator.json differs from the operator policy the module renders."
  }
  assert {
    condition     = jsondecode(aws_s3_bucket_policy.resources.policy) == jsondecode(file("../../packer/examples/escrow-bucket-policy.json"))
    error_message = "packer/examples/escrow-bucket-policy.json differs from the bucket policy the module renders."
  }
  assert {
    condition     = jsondecode(aws_iam_role_policy.node_perimeter[0].policy) == jsondecode(file("../../packer/examples/iam-policy-data-perimeter.json"))
    error_message = "packer/examples/iam-policy-data-perimeter.json differs from the data-perimeter policy the module renders."
  }
}
