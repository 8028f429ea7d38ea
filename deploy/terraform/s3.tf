# The resources bucket: TLS material and PGP keys (operators upload them), the escrow
# (write-once for every principal, by the bucket policy; optionally Object Lock), and the
# snapshots. Versioned, private, encrypted at rest; the agent writes escrow and snapshot
# objects SSE-KMS under the escrow key itself.

resource "aws_s3_bucket" "resources" {
  bucket              = local.bucket_name
  object_lock_enabled = var.object_lock_days > 0
  # Never destroyed with the stack while it holds a cluster's keys.
  force_destroy = false
  tags          = local.tags
}

resource "aws_s3_bucket_versioning" "resources" {
  bucket = aws_s3_bucket.resources.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_public_access_block" "resources" {
  bucket                  = aws_s3_bucket.resources.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "resources" {
  bucket = aws_s3_bucket.resources.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "resources" {
  bucket = aws_s3_bucket.resources.id

  rule {
    # TLS and PGP objects at rest; escrow and snapshot objects name the escrow key
    # themselves (the bucket policy refuses escrow writes that do not).
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_policy" "resources" {
  bucket = aws_s3_bucket.resources.id
  policy = jsonencode(local.bucket_policy)

  depends_on = [aws_s3_bucket_public_access_block.resources]
}

resource "aws_s3_bucket_object_lock_configuration" "resources" {
  count = var.object_lock_days > 0 ? 1 : 0

  bucket = aws_s3_bucket.resources.id

  rule {
    default_retention {
      mode = "COMPLIANCE"
      days = var.object_lock_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.resources]
}

resource "aws_s3_bucket_lifecycle_configuration" "resources" {
  bucket = aws_s3_bucket.resources.id

  # Pruned snapshots (the agent deletes beyond snapshot.keep) and replaced TLS objects stay
  # recoverable for a while as noncurrent versions, then go. The escrow has no rule: its
  # objects are never deleted.
  rule {
    id     = "snapshots-noncurrent"
    status = "Enabled"

    filter {
      prefix = "${local.snapshot_prefix}/${var.name}/"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.snapshot.noncurrent_version_days
    }
  }

  rule {
    id     = "tls-noncurrent"
    status = "Enabled"

    filter {
      prefix = "tls/"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.snapshot.noncurrent_version_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.resources]
}
