# Two roles: the node role (the instance profile: exactly what the agent and the server's
# seal do) and the operator role (decrypting the escrow, finishing it, restoring, rotating).

resource "aws_iam_role" "node" {
  name_prefix = "${var.name}-node-"
  description = "vault-bootstrap ${var.name}: Raft nodes"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = local.tags
}

resource "aws_iam_role_policy" "node" {
  name   = "vault-bootstrap"
  role   = aws_iam_role.node.id
  policy = jsonencode(local.node_policy)
}

resource "aws_iam_role_policy" "node_perimeter" {
  count = var.data_perimeter ? 1 : 0

  name   = "vault-bootstrap-data-perimeter"
  role   = aws_iam_role.node.id
  policy = jsonencode(local.perimeter_policy)

  lifecycle {
    precondition {
      condition     = var.vpc_endpoints
      error_message = "data_perimeter needs vpc_endpoints: it denies the keys and the escrow except through the VPC's endpoints, so without them no node unseals."
    }
  }
}

# Operators reach nodes without SSH: SSM Run Command and Session Manager.
resource "aws_iam_role_policy_attachment" "node_ssm" {
  count = var.attach_ssm_policy ? 1 : 0

  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "node" {
  name_prefix = "${var.name}-node-"
  role        = aws_iam_role.node.name
  tags        = local.tags
}

resource "aws_iam_role" "operator" {
  name_prefix = "${var.name}-op-"
  description = "vault-bootstrap ${var.name}: operators (escrow, restore, rotation)"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [merge({
      Effect    = "Allow"
      Principal = { AWS = var.operator_principals }
      Action    = "sts:AssumeRole"
      }, var.operator_require_mfa ? {
      Condition = { Bool = { "aws:MultiFactorAuthPresent" = "true" } }
    } : {})]
  })
  max_session_duration = 3600
  tags                 = local.tags
}

resource "aws_iam_role_policy" "operator" {
  name   = "vault-bootstrap-operator"
  role   = aws_iam_role.operator.id
  policy = jsonencode(local.operator_policy)
}
