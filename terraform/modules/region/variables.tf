variable "region" {
  description = "Region of this cluster (a DNS label such as us-east)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.region))
    error_message = "region must be a DNS label, e.g. us-east."
  }
}

variable "kubeconfig" {
  description = "Path of the kubeconfig of this region's cluster."
  type        = string
}

variable "namespace" {
  description = "Namespace of the operator."
  type        = string
  default     = "cellplane"
}

variable "etcd_endpoints" {
  description = "Endpoints of the platform's global etcd (cell registration); empty disables registration."
  type        = list(string)
  default     = []
}

variable "operator_replicas" {
  description = "Operator replicas (leader-elected)."
  type        = number
  default     = 2
}

variable "cellset_yaml" {
  description = "Optional CellSet manifest to apply in this region (the operator stamps only this region's cells)."
  type        = string
  default     = ""
}
