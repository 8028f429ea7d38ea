# Vault (or OpenBao) AMI with the vault-bootstrap agent: one Packer build replaces the manual
# install steps. See docs/operations.md "Building the AMI".
#
#   packer init packer/
#   packer build \
#     -var vault_version=1.19.0 \
#     -var vault_sha256=<linux_amd64 zip digest from the release's SHA256SUMS> \
#     -var agent_binary=target/release/vault-bootstrap \
#     packer/
#
# Supported base images: the agent binary is built on Debian 12 and needs glibc >= 2.34, so
# Amazon Linux 2023 (the default below), Ubuntu 22.04 or later, or Debian 12 or later
# (x86_64). Amazon Linux 2 (glibc 2.26) cannot run it. For Ubuntu set ssh_username = "ubuntu",
# for Debian "admin", and point source_ami_name/source_ami_owner at those images.
#
# Nothing secret is baked in: config.toml, TLS material and keys arrive on each instance
# (user-data, S3, KMS). The image only holds verified binaries, directories and units.

packer {
  required_version = ">= 1.9.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3"
    }
  }
}

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region the AMI is built in (copy it elsewhere with ami_regions if needed)."
}

variable "source_ami_name" {
  type        = string
  default     = "al2023-ami-2023.*-x86_64"
  description = "Name filter of the base AMI; the most recent match is used."
}

variable "source_ami_owner" {
  type        = string
  default     = "amazon"
  description = "Owner (account id or alias) of the base AMI: never a marketplace wildcard."
}

variable "ssh_username" {
  type        = string
  default     = "ec2-user"
  description = "Login user of the base AMI (ec2-user on Amazon Linux, ubuntu, admin on Debian)."
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Build instance type; 2 GiB of memory is plenty (the install streams the binary)."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty: the default VPC's."
}

variable "vault_version" {
  type        = string
  description = "Vault release to install, e.g. 1.19.0."
}

variable "vault_sha256" {
  type        = string
  description = "SHA-256 of the release zip, copied by a person from the release's SHA256SUMS (and its signature checked). No default: an unpinned download is never installed."
}

variable "vault_arch" {
  type        = string
  default     = "amd64"
  description = "Release architecture in the download URL; must match the base AMI and the agent binary."
}

variable "vault_download_url" {
  type        = string
  default     = ""
  description = "Release zip URL; empty: releases.hashicorp.com for vault_version and vault_arch. An internal mirror works the same way: the pinned SHA-256 is what is trusted."
}

variable "agent_binary" {
  type        = string
  default     = "target/release/vault-bootstrap"
  description = "Path of the built vault-bootstrap agent on the machine running Packer."
}

variable "ami_name_prefix" {
  type    = string
  default = "vault"
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Extra tags for the AMI, its snapshots and the build instance."
}

locals {
  vault_url = var.vault_download_url != "" ? var.vault_download_url : "https://releases.hashicorp.com/vault/${var.vault_version}/vault_${var.vault_version}_linux_${var.vault_arch}.zip"
  timestamp = formatdate("YYYYMMDD-hhmmss", timestamp())
  tags = merge({
    Name         = "${var.ami_name_prefix}-${var.vault_version}"
    VaultVersion = var.vault_version
    VaultSha256  = var.vault_sha256
    BaseAMI      = "{{ .SourceAMI }}"
    BuiltBy      = "packer"
  }, var.tags)
}

source "amazon-ebs" "vault" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id != "" ? var.subnet_id : null
  ssh_username  = var.ssh_username

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = [var.source_ami_owner]
    most_recent = true
  }

  ami_name        = "${var.ami_name_prefix}-${var.vault_version}-${local.timestamp}"
  ami_description = "Vault ${var.vault_version} with vault-bootstrap (config from user-data)"
  # Instances launched from this AMI default to IMDSv2 only, whatever the launch template says.
  imds_support  = "v2.0"
  encrypt_boot  = true
  ena_support   = true
  sriov_support = true

  # The build instance itself: IMDSv2 only, one hop (no container on it may reach IMDS).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  tags          = local.tags
  snapshot_tags = local.tags
  run_tags      = merge(local.tags, { Name = "packer-build-${var.ami_name_prefix}" })
}

build {
  sources = ["source.amazon-ebs.vault"]

  provisioner "file" {
    source      = var.agent_binary
    destination = "/tmp/vault-bootstrap"
  }

  provisioner "shell" {
    inline_shebang = "/bin/bash -e"
    inline = [
      "set -euo pipefail",
      "chmod 0755 /tmp/vault-bootstrap",
      "/tmp/vault-bootstrap --version",
      # Downloaded here, trusted only after install checks it against the pinned digest.
      "curl --fail --silent --show-error --location --proto '=https' --tlsv1.2 --retry 3 -o /tmp/vault.zip '${local.vault_url}'",
      "sudo /tmp/vault-bootstrap install --vault-archive /tmp/vault.zip --sha256 ${var.vault_sha256}",
      # Idempotent: a second run must report that nothing changed.
      "sudo /tmp/vault-bootstrap install --vault-archive /tmp/vault.zip --sha256 ${var.vault_sha256} | grep 'nothing changed'",
      "rm -f /tmp/vault.zip /tmp/vault-bootstrap",
      "/usr/local/bin/vault version",
    ]
  }
}
