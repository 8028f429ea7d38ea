# A whole cluster in an existing VPC: three private subnets in three zones, no NAT (VPC
# endpoints), operators from one role, PGP-wrapped shares for five key holders, published
# as vault.internal.acme.example in a private zone.

terraform {
  required_version = ">= 1.7.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.60.0, < 6.0.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "vpc_id" {
  description = "The VPC to deploy into."
  type        = string
}

variable "subnet_ids" {
  description = "Three private subnets, one per zone."
  type        = list(string)
}

variable "route_table_ids" {
  description = "Their route tables (for the S3 gateway endpoint)."
  type        = list(string)
}

variable "ami_id" {
  description = "The AMI the Packer build made."
  type        = string
}

variable "zone_id" {
  description = "A private Route 53 zone for vault.internal.acme.example."
  type        = string
  default     = null
}

module "vault" {
  source = "../.."

  name            = "prod-vault"
  vpc_id          = var.vpc_id
  subnet_ids      = var.subnet_ids
  route_table_ids = var.route_table_ids
  ami_id          = var.ami_id
  cluster_size    = 3

  tls = {
    server_name = "vault.internal.acme.example"
  }
  operator_principals   = ["arn:aws:iam::111122223333:role/vault-operators"]
  operator_ca_key       = "tls/operator-ca.pem"
  operator_common_names = ["alice", "bob"]
  recovery_pgp_keys     = ["pgp/alice.asc", "pgp/bob.asc", "pgp/carol.asc", "pgp/dave.asc", "pgp/erin.asc"]

  client_cidrs    = ["10.0.0.0/16"]
  route53_zone_id = var.zone_id
  vpc_endpoints   = true
  data_perimeter  = true

  tags = {
    Owner = "platform"
  }
}

output "api_address" {
  description = "Where clients connect."
  value       = module.vault.api_address
}

output "next_steps" {
  description = "What to run next."
  value       = module.vault.next_steps
}
