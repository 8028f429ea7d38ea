# SSM documents for the operator commands that run on a node, so nobody needs SSH. rejoin
# and status print no secret, so Run Command (which keeps the output) carries them;
# break-glass prints a root token, so it is a Session Manager document: the token goes to
# the operator's terminal, not into Run Command's stored output (keep session logging off
# for it, or encrypted and as restricted as the escrow).

resource "aws_ssm_document" "rejoin" {
  name            = "${var.name}-vault-rejoin"
  document_type   = "Command"
  document_format = "YAML"
  content = yamlencode({
    schemaVersion = "2.2"
    description   = "vault-bootstrap rejoin: repair this node (docs/operations.md \"Rejoin\")"
    parameters = {
      DryRun = { type = "String", default = "false", allowedValues = ["true", "false"] }
    }
    mainSteps = [{
      action = "aws:runShellScript"
      name   = "rejoin"
      inputs = {
        runCommand = ["if [ '{{ DryRun }}' = true ]; then exec /usr/local/bin/vault-bootstrap rejoin --dry-run; else exec /usr/local/bin/vault-bootstrap rejoin; fi"]
      }
    }]
  })
  tags = local.tags
}

resource "aws_ssm_document" "status" {
  name            = "${var.name}-vault-status"
  document_type   = "Command"
  document_format = "YAML"
  content = yamlencode({
    schemaVersion = "2.2"
    description   = "vault-bootstrap status: this node and its cluster, as JSON (no secret)"
    mainSteps = [{
      action = "aws:runShellScript"
      name   = "status"
      inputs = { runCommand = ["exec /usr/local/bin/vault-bootstrap status"] }
    }]
  })
  tags = local.tags
}

resource "aws_ssm_document" "break_glass" {
  name            = "${var.name}-vault-break-glass"
  document_type   = "Session"
  document_format = "JSON"
  content = jsonencode({
    schemaVersion = "1.0"
    description   = "vault-bootstrap break-glass: a root token from recovery keys, on the operator's terminal"
    sessionType   = "InteractiveCommands"
    properties = {
      linux = {
        commands      = "/usr/local/bin/vault-bootstrap break-glass"
        runAsElevated = true
      }
    }
  })
  tags = local.tags
}
