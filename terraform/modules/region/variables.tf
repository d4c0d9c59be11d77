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

variable "platform" {
  description = "Platform name (spec.platform of the CellSets); the router follows /cellplane/<platform>/routing."
  type        = string
  default     = "shop"
  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.platform))
    error_message = "platform must be a DNS label, e.g. shop."
  }
}

variable "router_enabled" {
  description = "Install the edge router in this region (needs etcd_endpoints: it follows the routing table there)."
  type        = bool
  default     = true
}

variable "router_namespace" {
  description = "Namespace of the edge router."
  type        = string
  default     = "edge"
}

variable "router_replicas" {
  description = "Router replicas (spread over zones)."
  type        = number
  default     = 2
}
