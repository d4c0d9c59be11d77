output "operator_release" {
  description = "Name and namespace of the operator's Helm release."
  value       = "${helm_release.operator.namespace}/${helm_release.operator.name}"
}
