# The network: the VPC (given, or made with one private subnet per zone), the security
# groups, and optional VPC endpoints so that nodes reach AWS without a NAT gateway.

resource "aws_vpc" "this" {
  count = var.vpc_id == null ? 1 : 0

  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = var.name })

  lifecycle {
    precondition {
      condition     = length(var.availability_zones) == 3
      error_message = "A VPC made by the module (vpc_id null) needs availability_zones: exactly 3."
    }
  }
}

resource "aws_subnet" "private" {
  count = var.vpc_id == null ? 3 : 0

  vpc_id                  = aws_vpc.this[0].id
  availability_zone       = var.availability_zones[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 4, count.index)
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "${var.name}-private-${count.index}" })
}

resource "aws_route_table" "private" {
  count = var.vpc_id == null ? 1 : 0

  vpc_id = aws_vpc.this[0].id
  tags   = merge(local.tags, { Name = "${var.name}-private" })
}

resource "aws_route_table_association" "private" {
  count = var.vpc_id == null ? 3 : 0

  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[0].id
}

locals {
  vpc_id          = var.vpc_id == null ? aws_vpc.this[0].id : var.vpc_id
  subnet_ids      = var.vpc_id == null ? aws_subnet.private[*].id : var.subnet_ids
  route_table_ids = var.vpc_id == null ? aws_route_table.private[*].id : var.route_table_ids

  # Interface endpoints for what the agent, the server's seal and SSM call; S3 is a gateway.
  interface_endpoints = var.vpc_endpoints ? toset(["ec2", "kms", "autoscaling", "ssm", "ssmmessages", "ec2messages", "sts"]) : toset([])

  api_port     = 8200
  cluster_port = 8201
}

resource "aws_security_group" "nodes" {
  name_prefix = "${var.name}-nodes-"
  description = "vault-bootstrap ${var.name}: Raft nodes"
  vpc_id      = local.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-nodes" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "lb" {
  name_prefix = "${var.name}-lb-"
  description = "vault-bootstrap ${var.name}: the API load balancer"
  vpc_id      = local.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-lb" })

  lifecycle {
    create_before_destroy = true
  }
}

# The API from clients, directly and through the load balancer (its health checks too).
resource "aws_vpc_security_group_ingress_rule" "api_from_clients" {
  for_each = toset(var.client_cidrs)

  security_group_id = aws_security_group.nodes.id
  description       = "API from clients"
  ip_protocol       = "tcp"
  from_port         = local.api_port
  to_port           = local.api_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "api_from_lb" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "API from the load balancer (traffic and health checks)"
  ip_protocol                  = "tcp"
  from_port                    = local.api_port
  to_port                      = local.api_port
  referenced_security_group_id = aws_security_group.lb.id
}

# API and Raft between nodes: retry_join, request forwarding, replication.
resource "aws_vpc_security_group_ingress_rule" "raft_between_nodes" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "API and cluster port between nodes"
  ip_protocol                  = "tcp"
  from_port                    = local.api_port
  to_port                      = local.cluster_port
  referenced_security_group_id = aws_security_group.nodes.id
}

resource "aws_vpc_security_group_egress_rule" "raft_between_nodes" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "API and cluster port between nodes"
  ip_protocol                  = "tcp"
  from_port                    = local.api_port
  to_port                      = local.cluster_port
  referenced_security_group_id = aws_security_group.nodes.id
}

# AWS APIs (EC2, S3, KMS, Auto Scaling, SSM, STS), through endpoints or a NAT.
resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.nodes.id
  description       = "HTTPS to AWS APIs"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "lb_from_clients" {
  for_each = toset(var.client_cidrs)

  security_group_id = aws_security_group.lb.id
  description       = "API from clients"
  ip_protocol       = "tcp"
  from_port         = var.load_balancer.port
  to_port           = var.load_balancer.port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "lb_to_nodes" {
  security_group_id            = aws_security_group.lb.id
  description                  = "API on the nodes"
  ip_protocol                  = "tcp"
  from_port                    = local.api_port
  to_port                      = local.api_port
  referenced_security_group_id = aws_security_group.nodes.id
}

resource "aws_security_group" "endpoints" {
  count = var.vpc_endpoints ? 1 : 0

  name_prefix = "${var.name}-endpoints-"
  description = "vault-bootstrap ${var.name}: VPC endpoints"
  vpc_id      = local.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-endpoints" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_nodes" {
  count = var.vpc_endpoints ? 1 : 0

  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "HTTPS from the nodes"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.nodes.id
}

resource "aws_vpc_endpoint" "interface" {
  for_each = local.interface_endpoints

  vpc_id              = local.vpc_id
  service_name        = "com.amazonaws.${local.region}.${each.value}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = local.subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
  tags                = merge(local.tags, { Name = "${var.name}-${each.value}" })
}

resource "aws_vpc_endpoint" "s3" {
  count = var.vpc_endpoints ? 1 : 0

  vpc_id            = local.vpc_id
  service_name      = "com.amazonaws.${local.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = local.route_table_ids
  tags              = merge(local.tags, { Name = "${var.name}-s3" })

  lifecycle {
    precondition {
      condition     = length(local.route_table_ids) > 0
      error_message = "vpc_endpoints with an existing VPC needs route_table_ids: an S3 gateway endpoint without routes carries nothing."
    }
  }
}
