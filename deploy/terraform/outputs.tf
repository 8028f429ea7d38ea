output "api_address" {
  description = "The address clients use: https://<tls.server_name>:<port> when route53_zone_id is set, else the load balancer's DNS name (whose certificate check then needs tls.server_name as the expected name)."
  value       = var.route53_zone_id == null ? "https://${aws_lb.api.dns_name}:${var.load_balancer.port}" : "https://${var.tls.server_name}:${var.load_balancer.port}"
}

output "load_balancer_dns_name" {
  description = "The network load balancer's DNS name."
  value       = aws_lb.api.dns_name
}

output "autoscaling_group_name" {
  description = "The Auto Scaling group (also the cluster tag value the agent discovers peers by)."
  value       = aws_autoscaling_group.nodes.name
}

output "node_role_arn" {
  description = "The nodes' instance role."
  value       = aws_iam_role.node.arn
}

output "operator_role_arn" {
  description = "The operator role: escrow verify/reveal/finish, break-glass --from-escrow, snapshot restore, rotate."
  value       = aws_iam_role.operator.arn
}

output "bucket" {
  description = "The resources bucket: upload tls/ (and pgp/) here before the first apply's instances boot."
  value       = aws_s3_bucket.resources.bucket
}

output "seal_key_arn" {
  description = "The awskms seal key."
  value       = aws_kms_key.seal.arn
}

output "escrow_key_arn" {
  description = "The escrow key (recovery shares, root token, node credentials)."
  value       = aws_kms_key.escrow.arn
}

output "user_data" {
  description = "The user-data the launch template carries (no secret)."
  value       = local.user_data
}

output "next_steps" {
  description = "What the operator runs next (docs/deploy.md)."
  value       = <<-EOT
    1. Upload the TLS set: aws s3 cp server.pem s3://${aws_s3_bucket.resources.bucket}/${var.tls.cert_key} (and ${var.tls.key_key}, ${var.tls.ca_key}).
    2. Watch the group: aws autoscaling describe-auto-scaling-groups --auto-scaling-group-names ${aws_autoscaling_group.nodes.name}
    3. On a node, with the operator role (${aws_iam_role.operator.arn}): vault-bootstrap escrow verify
    4. aws ssm send-command --document-name ${aws_ssm_document.status.name} --targets Key=tag:aws:autoscaling:groupName,Values=${aws_autoscaling_group.nodes.name}
  EOT
}
