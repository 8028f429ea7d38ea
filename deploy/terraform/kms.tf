# Two keys: the seal key (auto-unseal; every node uses it without condition) and the escrow
# key (recovery shares, root token, node credentials), whose Decrypt the key policy grants
# by encryption-context class. They are never the same key: the seal grant's unconditioned
# Decrypt would open the escrow.

resource "aws_kms_key" "seal" {
  description             = "vault-bootstrap ${var.name}: awskms seal"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = jsonencode(local.seal_key_policy)
  tags                    = local.tags
}

resource "aws_kms_alias" "seal" {
  name          = "alias/${var.name}-seal"
  target_key_id = aws_kms_key.seal.key_id
}

resource "aws_kms_key" "escrow" {
  description             = "vault-bootstrap ${var.name}: recovery-key escrow"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = jsonencode(local.escrow_key_policy)
  tags                    = local.tags
}

resource "aws_kms_alias" "escrow" {
  name          = "alias/${var.name}-escrow"
  target_key_id = aws_kms_key.escrow.key_id
}
