# The API's network load balancer: TCP passthrough (TLS ends at the nodes, whose
# certificate names tls.server_name), health-checked over HTTPS. The default sys/health
# answers 429 for a standby: with it, only the active node would count, so "standbys"
# routing asks with standbyok=true (standbys answer 200 and forward requests).

locals {
  health_path = var.load_balancer.routing == "active" ? "/v1/sys/health" : "/v1/sys/health?standbyok=true"
}

resource "aws_lb" "api" {
  name_prefix        = substr(var.name, 0, 6)
  load_balancer_type = "network"
  internal           = var.load_balancer.internal
  subnets            = local.subnet_ids
  security_groups    = [aws_security_group.lb.id]
  # One zone's nodes answer for clients in every zone: an AZ loss moves nobody.
  enable_cross_zone_load_balancing = true
  tags                             = local.tags
}

resource "aws_lb_target_group" "api" {
  name_prefix          = substr(var.name, 0, 6)
  port                 = local.api_port
  protocol             = "TCP"
  vpc_id               = local.vpc_id
  target_type          = "instance"
  deregistration_delay = 30

  health_check {
    protocol            = "HTTPS"
    port                = "traffic-port"
    path                = local.health_path
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = local.tags

  lifecycle {
    # name_prefix lets a replacement exist beside the old group while the listener moves.
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "api" {
  load_balancer_arn = aws_lb.api.arn
  port              = var.load_balancer.port
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

resource "aws_route53_record" "api" {
  count = var.route53_zone_id == null ? 0 : 1

  zone_id = var.route53_zone_id
  name    = var.tls.server_name
  type    = "A"

  alias {
    name                   = aws_lb.api.dns_name
    zone_id                = aws_lb.api.zone_id
    evaluate_target_health = true
  }
}
