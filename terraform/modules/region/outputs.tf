output "operator_release" {
  description = "Name and namespace of the operator's Helm release."
  value       = "${helm_release.operator.namespace}/${helm_release.operator.name}"
}

output "router_release" {
  description = "Name and namespace of the router's Helm release (empty when not installed)."
  value       = length(helm_release.router) > 0 ? "${helm_release.router[0].namespace}/${helm_release.router[0].name}" : ""
}
