variable "name" {
  description = "Name of the cluster: the Auto Scaling group, the cluster tag value, the escrow and snapshot prefixes, and the prefix of every resource's name."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,26}[a-z0-9]$", var.name)) && !startswith(var.name, "aws") && !startswith(var.name, "amazon")
    error_message = "name must be 3-28 characters of lower-case letters, digits and hyphens, starting with a letter and not with aws or amazon (IAM name prefixes and SSM document names limit it)."
  }
}

variable "bucket_name" {
  description = "Name of the resources bucket (TLS, PGP keys, escrow, snapshots); null names it <name>-vault-<account id>."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name."
  }
}

variable "vpc_id" {
  description = "An existing VPC to deploy into. Null creates a VPC of vpc_cidr with one private subnet per availability zone (no internet route: set vpc_endpoints)."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "Private subnets of vpc_id, one per availability zone (3 for a cluster of 3 or 5). Ignored when the module creates the VPC."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.subnet_ids) == 0 || length(var.subnet_ids) >= 3
    error_message = "subnet_ids must name at least 3 subnets, one per availability zone, so that losing a zone keeps quorum."
  }
}

variable "route_table_ids" {
  description = "Route tables of subnet_ids, for the S3 gateway endpoint (with vpc_endpoints and an existing VPC)."
  type        = list(string)
  default     = []
}

variable "vpc_cidr" {
  description = "CIDR of the VPC the module creates (vpc_id null)."
  type        = string
  default     = "10.80.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be an IPv4 CIDR block."
  }
}

variable "availability_zones" {
  description = "Availability zones of the subnets the module creates (vpc_id null): exactly 3."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || length(var.availability_zones) == 3
    error_message = "availability_zones must list exactly 3 zones."
  }
}

variable "cluster_size" {
  description = "Raft voters: 3 (tolerates one lost node or zone) or 5 (two)."
  type        = number
  default     = 3

  validation {
    condition     = contains([3, 5], var.cluster_size)
    error_message = "cluster_size must be 3 or 5: an even count adds no failure tolerance."
  }
}

variable "ami_id" {
  description = "The AMI the Packer build made (packer/vault.pkr.hcl): the server, the agent and the units installed by `vault-bootstrap install`."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must be an AMI id (ami-...)."
  }
}

variable "instance_type" {
  description = "Instance type of the nodes."
  type        = string
  default     = "m6i.large"
}

variable "root_volume_size" {
  description = "Root volume size in GiB (raft data lives on it)."
  type        = number
  default     = 50

  validation {
    condition     = var.root_volume_size >= 20
    error_message = "root_volume_size must be at least 20 GiB."
  }
}

variable "server_binary" {
  description = "Path of the server binary the AMI carries (vault.binary)."
  type        = string
  default     = "/usr/local/bin/vault"
}

variable "tls" {
  description = "Object keys, in the module's resources bucket, of the server certificate, its key and the cluster CA, and the name clients and the load balancer use (in the certificate's SANs)."
  type = object({
    cert_key    = optional(string, "tls/server.pem")
    key_key     = optional(string, "tls/server.key")
    ca_key      = optional(string, "tls/ca.pem")
    server_name = string
  })

  validation {
    condition     = alltrue([for k in [var.tls.cert_key, var.tls.key_key, var.tls.ca_key] : startswith(k, "tls/")])
    error_message = "The TLS objects must live under tls/: the node role reads only that prefix (and pgp/)."
  }
}

variable "operator_principals" {
  description = "IAM principals (ARNs) that may assume the operator role: they decrypt the escrow, finish an escrow, restore snapshots and rotate keys."
  type        = list(string)

  validation {
    condition     = length(var.operator_principals) > 0 && alltrue([for p in var.operator_principals : startswith(p, "arn:")])
    error_message = "operator_principals must list at least one principal ARN."
  }
}

variable "operator_ca_key" {
  description = "Object key (under tls/) of the CA that signs operators' client certificates; null leaves operator login unconfigured, and the root token is then kept (escrowed)."
  type        = string
  default     = null

  validation {
    condition     = var.operator_ca_key == null || startswith(coalesce(var.operator_ca_key, "-"), "tls/")
    error_message = "operator_ca_key must be under tls/: the node role reads only that prefix (and pgp/)."
  }
}

variable "operator_common_names" {
  description = "Certificate common names that log in as administrators (with operator_ca_key)."
  type        = list(string)
  default     = []
}

variable "recovery_pgp_keys" {
  description = "Object keys (under pgp/) of one public key per recovery share; empty escrows the shares KMS-encrypted only (then the operator role reads them: docs/security.md)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for k in var.recovery_pgp_keys : startswith(k, "pgp/")])
    error_message = "recovery_pgp_keys must be object keys under pgp/."
  }
}

variable "recovery_shares" {
  description = "Recovery key shares (equals the number of recovery_pgp_keys when those are set)."
  type        = number
  default     = 5

  validation {
    condition     = var.recovery_shares >= 1 && var.recovery_shares <= 10
    error_message = "recovery_shares must be 1-10."
  }
}

variable "recovery_threshold" {
  description = "Shares needed to generate a root token."
  type        = number
  default     = 3

  validation {
    condition     = var.recovery_threshold >= 1 && var.recovery_threshold <= 10
    error_message = "recovery_threshold must be 1-10 (and at most the number of shares: checked at plan)."
  }
}

variable "client_cidrs" {
  description = "CIDR blocks of the clients that reach the API (port 8200) through the load balancer and directly."
  type        = list(string)

  validation {
    condition     = alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))]) && !contains(var.client_cidrs, "0.0.0.0/0")
    error_message = "client_cidrs must be CIDR blocks, and not 0.0.0.0/0."
  }
}

variable "load_balancer" {
  description = "The network load balancer (TCP passthrough: TLS ends at the nodes). routing: \"standbys\" sends clients to every unsealed member (standbys forward to the active node), \"active\" only to the active node."
  type = object({
    internal = optional(bool, true)
    port     = optional(number, 8200)
    routing  = optional(string, "standbys")
  })
  default = {}

  validation {
    condition     = contains(["standbys", "active"], var.load_balancer.routing)
    error_message = "load_balancer.routing must be \"standbys\" or \"active\"."
  }
}

variable "route53_zone_id" {
  description = "A Route 53 zone in which to publish tls.server_name as an alias of the load balancer; null publishes nothing."
  type        = string
  default     = null
}

variable "vpc_endpoints" {
  description = "Create VPC endpoints (interface: EC2, KMS, Auto Scaling, SSM, SSM messages, EC2 messages, STS; gateway: S3) so nodes need no NAT."
  type        = bool
  default     = false
}

variable "data_perimeter" {
  description = "Attach the data-perimeter variant of the node policy: the seal key, the escrow key and the escrow and snapshot objects only through the VPC's endpoints, from the instance itself (needs vpc_endpoints)."
  type        = bool
  default     = false
}

variable "object_lock_days" {
  description = "S3 Object Lock (COMPLIANCE) default retention in days on the resources bucket; 0 leaves Object Lock off (the write-once bucket policy still applies). Only at bucket creation."
  type        = number
  default     = 0

  validation {
    condition     = var.object_lock_days >= 0
    error_message = "object_lock_days must be 0 or more."
  }
}

variable "snapshot" {
  description = "Raft snapshots: how many the agent keeps, and after how many days S3 expires noncurrent versions of snapshot and TLS objects."
  type = object({
    keep                    = optional(number, 48)
    noncurrent_version_days = optional(number, 30)
  })
  default = {}

  validation {
    condition     = var.snapshot.keep >= 1 && var.snapshot.noncurrent_version_days >= 1
    error_message = "snapshot.keep and snapshot.noncurrent_version_days must be at least 1."
  }
}

variable "lifecycle_hook_timeout_secs" {
  description = "Heartbeat timeout of the launch and terminate hooks: the agent heartbeats while it waits, so this bounds a silent agent."
  type        = number
  default     = 1800

  validation {
    condition     = var.lifecycle_hook_timeout_secs >= 30 && var.lifecycle_hook_timeout_secs <= 7200
    error_message = "lifecycle_hook_timeout_secs must be 30-7200 (Auto Scaling's range)."
  }
}

variable "attach_ssm_policy" {
  description = "Attach AWS's AmazonSSMManagedInstanceCore to the node role, so operators reach nodes through SSM. Set false where an organisation attaches its own SSM policy."
  type        = bool
  default     = true
}

variable "operator_require_mfa" {
  description = "The operator role's trust policy requires MFA (aws:MultiFactorAuthPresent). Set false for principals that cannot carry it (IAM Identity Center permission sets, role chains), and require MFA where those sign in."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
