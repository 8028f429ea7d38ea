# Every policy the cluster's guarantees rest on, rendered from the same values: the node
# and operator identity policies, the data-perimeter variant, the bucket policy and both key
# policies. packer/examples/*.json are these documents for the example's values.

locals {
  escrow_key_arn = aws_kms_key.escrow.arn
  seal_key_arn   = aws_kms_key.seal.arn

  # The node role: discover peers, answer its group's hooks, read TLS and PGP keys, write
  # the escrow (never a rotation's generation, never read a pending copy), write and prune
  # snapshots, encrypt for its cluster, decrypt node credentials and its own pending file.
  node_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "DiscoverPeers"
        Effect   = "Allow"
        Action   = ["ec2:DescribeInstances", "ec2:DescribeTags"]
        Resource = "*"
      },
      {
        Sid      = "AnswerOwnGroupsLifecycleHooks"
        Effect   = "Allow"
        Action   = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]
        Resource = local.group_arn
      },
      {
        Sid      = "ReadTlsMaterialAndPgpKeys"
        Effect   = "Allow"
        Action   = "s3:GetObject"
        Resource = ["${local.bucket_arn}/tls/*", "${local.bucket_arn}/pgp/*"]
      },
      {
        Sid      = "EscrowObjectsWriteAndReadBack"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:PutObject"]
        Resource = "${local.escrow_arn}/*"
      },
      {
        Sid      = "NeverWriteRotationGenerations"
        Effect   = "Deny"
        Action   = "s3:PutObject"
        Resource = "${local.escrow_arn}/generations/*"
      },
      {
        Sid      = "NeverReadPendingInitCopies"
        Effect   = "Deny"
        Action   = "s3:GetObject"
        Resource = "${local.escrow_arn}/pending-init/*"
      },
      {
        Sid      = "ListOwnPrefixesOnly"
        Effect   = "Allow"
        Action   = "s3:ListBucket"
        Resource = local.bucket_arn
        Condition = {
          StringLike = {
            "s3:prefix" = ["${local.escrow_prefix}/${var.name}/*", "${local.snapshot_prefix}/${var.name}/*"]
          }
        }
      },
      {
        Sid      = "DoctorReadsEscrowBucketControls"
        Effect   = "Allow"
        Action   = ["s3:GetBucketPolicy", "s3:GetBucketObjectLockConfiguration"]
        Resource = local.bucket_arn
      },
      {
        Sid      = "SnapshotObjectsWriteAndPrune"
        Effect   = "Allow"
        Action   = ["s3:PutObject", "s3:DeleteObject"]
        Resource = "${local.snapshots_arn}/*"
      },
      {
        Sid       = "EscrowEncryptForThisCluster"
        Effect    = "Allow"
        Action    = ["kms:Encrypt", "kms:GenerateDataKey"]
        Resource  = local.escrow_key_arn
        Condition = { StringEquals = { "kms:EncryptionContext:vault-bootstrap:cluster" = var.name } }
      },
      {
        Sid      = "EscrowDecryptNodeCredentialsOnly"
        Effect   = "Allow"
        Action   = "kms:Decrypt"
        Resource = local.escrow_key_arn
        Condition = {
          StringEquals = {
            "kms:EncryptionContext:vault-bootstrap:cluster" = var.name
            "kms:EncryptionContext:vault-bootstrap:class"   = "node-credential"
          }
        }
      },
      {
        Sid      = "EscrowDecryptOwnPendingInitFile"
        Effect   = "Allow"
        Action   = "kms:Decrypt"
        Resource = local.escrow_key_arn
        Condition = {
          StringEquals = {
            "kms:EncryptionContext:vault-bootstrap:cluster"  = var.name
            "kms:EncryptionContext:vault-bootstrap:class"    = "pending"
            "kms:EncryptionContext:vault-bootstrap:instance" = "$${ec2:SourceInstanceARN}"
          }
        }
      },
      {
        Sid      = "EscrowKeyMetadata"
        Effect   = "Allow"
        Action   = "kms:DescribeKey"
        Resource = local.escrow_key_arn
      },
      {
        Sid      = "EscrowObjectsSseKmsThroughS3"
        Effect   = "Allow"
        Action   = ["kms:GenerateDataKey", "kms:Decrypt"]
        Resource = local.escrow_key_arn
        Condition = {
          StringEquals = { "kms:ViaService" = "s3.${local.region}.amazonaws.com" }
          StringLike = {
            "kms:EncryptionContext:aws:s3:arn" = [local.bucket_arn, "${local.escrow_arn}/*", "${local.snapshots_arn}/*"]
          }
        }
      },
      {
        Sid      = "AwsKmsSeal"
        Effect   = "Allow"
        Action   = ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"]
        Resource = local.seal_key_arn
      },
    ]
  }

  # The operator role: read and finish the escrow, read snapshots (restore), decrypt every
  # escrow item of this cluster.
  operator_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ReadEscrowAndSnapshots"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:GetObjectVersion"]
        Resource = ["${local.escrow_arn}/*", "${local.snapshots_arn}/*"]
      },
      {
        Sid      = "FinishAnEscrowWriteOnce"
        Effect   = "Allow"
        Action   = "s3:PutObject"
        Resource = "${local.escrow_arn}/*"
      },
      {
        Sid      = "ListEscrowAndSnapshotsWithVersions"
        Effect   = "Allow"
        Action   = ["s3:ListBucket", "s3:ListBucketVersions"]
        Resource = local.bucket_arn
        Condition = {
          StringLike = {
            "s3:prefix" = ["${local.escrow_prefix}/${var.name}/*", "${local.snapshot_prefix}/${var.name}/*"]
          }
        }
      },
      {
        Sid       = "DecryptEveryEscrowItemOfThisCluster"
        Effect    = "Allow"
        Action    = "kms:Decrypt"
        Resource  = local.escrow_key_arn
        Condition = { StringEquals = { "kms:EncryptionContext:vault-bootstrap:cluster" = var.name } }
      },
      {
        Sid       = "FinishAnEscrowEncryptForThisCluster"
        Effect    = "Allow"
        Action    = "kms:Encrypt"
        Resource  = local.escrow_key_arn
        Condition = { StringEquals = { "kms:EncryptionContext:vault-bootstrap:cluster" = var.name } }
      },
      {
        Sid      = "EscrowKeyMetadata"
        Effect   = "Allow"
        Action   = "kms:DescribeKey"
        Resource = local.escrow_key_arn
      },
      {
        Sid      = "EscrowAndSnapshotObjectsSseKmsThroughS3"
        Effect   = "Allow"
        Action   = ["kms:Decrypt", "kms:GenerateDataKey"]
        Resource = local.escrow_key_arn
        Condition = {
          StringEquals = { "kms:ViaService" = "s3.${local.region}.amazonaws.com" }
          StringLike = {
            "kms:EncryptionContext:aws:s3:arn" = [local.bucket_arn, "${local.escrow_arn}/*", "${local.snapshots_arn}/*"]
          }
        }
      },
    ]
  }

  # Write-once escrow for every principal, administrators included; TLS only.
  bucket_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyRequestsWithoutTls"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
      {
        # The server's private key: only the nodes read it, not any principal of the
        # account that happens to hold s3:GetObject on the bucket.
        Sid       = "TlsMaterialReadByTheNodesOnly"
        Effect    = "Deny"
        Principal = "*"
        Action    = ["s3:GetObject", "s3:GetObjectVersion"]
        Resource  = "${local.bucket_arn}/tls/*"
        Condition = { ArnNotEquals = { "aws:PrincipalArn" = aws_iam_role.node.arn } }
      },
      {
        Sid       = "EscrowWriteOnceOnly"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:PutObject"
        Resource  = "${local.escrow_arn}/*"
        Condition = { Null = { "s3:if-none-match" = "true" } }
      },
      {
        Sid       = "EscrowNeverDeleted"
        Effect    = "Deny"
        Principal = "*"
        Action    = ["s3:DeleteObject", "s3:DeleteObjectVersion"]
        Resource  = "${local.escrow_arn}/*"
      },
      {
        Sid       = "EscrowSseKmsOnly"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:PutObject"
        Resource  = "${local.escrow_arn}/*"
        Condition = { StringNotEquals = { "s3:x-amz-server-side-encryption" = "aws:kms" } }
      },
      {
        Sid       = "EscrowUnderTheEscrowKeyOnly"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:PutObject"
        Resource  = "${local.escrow_arn}/*"
        Condition = { StringNotEquals = { "s3:x-amz-server-side-encryption-aws-kms-key-id" = local.escrow_key_arn } }
      },
    ]
  }

  # Key administration stays with the account; no statement lets the account's IAM grant
  # itself use of the key: only the roles named below encrypt or decrypt.
  # Not kms:Create*: it includes CreateGrant, with which an administrator would grant
  # itself Decrypt past every condition below.
  key_admin_actions = [
    "kms:CreateAlias", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*",
    "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource",
    "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion",
  ]
  account_root = "arn:${local.partition}:iam::${local.account}:root"

  seal_key_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "KeyAdministration"
        Effect    = "Allow"
        Principal = { AWS = local.account_root }
        Action    = local.key_admin_actions
        Resource  = "*"
      },
      {
        Sid       = "NodesUnsealWithIt"
        Effect    = "Allow"
        Principal = { AWS = aws_iam_role.node.arn }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"]
        Resource  = "*"
      },
    ]
  }

  escrow_key_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "KeyAdministration"
        Effect    = "Allow"
        Principal = { AWS = local.account_root }
        Action    = local.key_admin_actions
        Resource  = "*"
      },
      {
        Sid       = "NodesEncryptForTheirCluster"
        Effect    = "Allow"
        Principal = { AWS = aws_iam_role.node.arn }
        Action    = ["kms:Encrypt", "kms:GenerateDataKey"]
        Resource  = "*"
        Condition = { StringEquals = { "kms:EncryptionContext:vault-bootstrap:cluster" = var.name } }
      },
      {
        Sid       = "NodesDecryptNodeCredentials"
        Effect    = "Allow"
        Principal = { AWS = aws_iam_role.node.arn }
        Action    = "kms:Decrypt"
        Resource  = "*"
        Condition = {
          StringEquals = {
            "kms:EncryptionContext:vault-bootstrap:cluster" = var.name
            "kms:EncryptionContext:vault-bootstrap:class"   = "node-credential"
          }
        }
      },
      {
        Sid       = "NodesDecryptTheirOwnPendingFile"
        Effect    = "Allow"
        Principal = { AWS = aws_iam_role.node.arn }
        Action    = "kms:Decrypt"
        Resource  = "*"
        Condition = {
          StringEquals = {
            "kms:EncryptionContext:vault-bootstrap:cluster"  = var.name
            "kms:EncryptionContext:vault-bootstrap:class"    = "pending"
            "kms:EncryptionContext:vault-bootstrap:instance" = "$${ec2:SourceInstanceARN}"
          }
        }
      },
      {
        Sid       = "OperatorsDecryptAndFinish"
        Effect    = "Allow"
        Principal = { AWS = aws_iam_role.operator.arn }
        Action    = ["kms:Decrypt", "kms:Encrypt"]
        Resource  = "*"
        Condition = { StringEquals = { "kms:EncryptionContext:vault-bootstrap:cluster" = var.name } }
      },
      {
        Sid       = "RolesDescribeIt"
        Effect    = "Allow"
        Principal = { AWS = [aws_iam_role.node.arn, aws_iam_role.operator.arn] }
        Action    = "kms:DescribeKey"
        Resource  = "*"
      },
      {
        Sid       = "RolesUseItThroughS3ForEscrowAndSnapshots"
        Effect    = "Allow"
        Principal = { AWS = [aws_iam_role.node.arn, aws_iam_role.operator.arn] }
        Action    = ["kms:GenerateDataKey", "kms:Decrypt"]
        Resource  = "*"
        Condition = {
          StringEquals = { "kms:ViaService" = "s3.${local.region}.amazonaws.com" }
          StringLike = {
            "kms:EncryptionContext:aws:s3:arn" = [local.bucket_arn, "${local.escrow_arn}/*", "${local.snapshots_arn}/*"]
          }
        }
      },
    ]
  }
}

locals {
  perimeter_resources = [local.seal_key_arn, local.escrow_key_arn, "${local.escrow_arn}/*", "${local.snapshots_arn}/*"]
  perimeter_actions   = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"]

  # The data-perimeter variant: the node's credentials use the keys and the escrow and
  # snapshot objects only from the instance itself, through its VPC's endpoints. Three
  # denies, each on its own condition, for the same actions and resources.
  perimeter_conditions = [
    {
      sid = "SealEscrowAndSnapshotsOnlyThroughVpcEndpoints"
      condition = {
        Null         = { "aws:SourceVpc" = "true", "ec2:SourceInstanceARN" = "false" }
        BoolIfExists = { "aws:ViaAWSService" = "false" }
      }
    },
    {
      sid = "SealEscrowAndSnapshotsOnlyFromTheInstanceVpc"
      condition = {
        StringNotEquals = { "aws:Ec2InstanceSourceVpc" = "$${aws:SourceVpc}" }
        Null            = { "ec2:SourceInstanceARN" = "false" }
        BoolIfExists    = { "aws:ViaAWSService" = "false" }
      }
    },
    {
      sid = "SealEscrowAndSnapshotsOnlyFromTheInstanceAddress"
      condition = {
        StringNotEquals = { "aws:Ec2InstanceSourcePrivateIPv4" = "$${aws:VpcSourceIp}" }
        Null            = { "ec2:SourceInstanceARN" = "false" }
        BoolIfExists    = { "aws:ViaAWSService" = "false" }
      }
    },
  ]
  perimeter_policy = {
    Version = "2012-10-17"
    Statement = [for c in local.perimeter_conditions : {
      Sid       = c.sid
      Effect    = "Deny"
      Action    = local.perimeter_actions
      Resource  = local.perimeter_resources
      Condition = c.condition
    }]
  }
}
