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
  validation {
    condition     = fileexists(pathexpand(var.kubeconfig))
    error_message = "kubeconfig: no file at that path; give the path of this region's kubeconfig, e.g. ~/.kube/us-east."
  }
}

variable "namespace" {
  description = "Namespace of the operator."
  type        = string
  default     = "cellplane"
  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.namespace)) && length(var.namespace) <= 63
    error_message = "namespace must be a DNS label (at most 63 lowercase letters, digits and '-'), e.g. cellplane."
  }
}

variable "etcd_endpoints" {
  description = "Endpoints of the platform's global etcd (cell registration); empty disables registration."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for e in var.etcd_endpoints : can(regex("^https?://[^/]+$", e))])
    error_message = "etcd_endpoints: each must be a URL with scheme and host:port and no path, e.g. https://etcd-0.global.example:2379."
  }
}

variable "operator_replicas" {
  description = "Operator replicas (leader-elected)."
  type        = number
  default     = 2
  validation {
    condition     = var.operator_replicas >= 1 && var.operator_replicas == floor(var.operator_replicas)
    error_message = "operator_replicas must be a whole number of at least 1 (2 keeps a standby for leader election)."
  }
}

variable "cellset_yaml" {
  description = "Optional CellSet manifest to apply in this region (the operator stamps only this region's cells)."
  type        = string
  default     = ""
  validation {
    condition     = var.cellset_yaml == "" || try(yamldecode(var.cellset_yaml).kind == "CellSet" && yamldecode(var.cellset_yaml).apiVersion == "cellplane.io/v1alpha1", false)
    error_message = "cellset_yaml must be one CellSet manifest (apiVersion: cellplane.io/v1alpha1, kind: CellSet), e.g. file(\"examples/cellset-two-regions.yaml\"), or empty for none."
  }
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
  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.router_namespace)) && length(var.router_namespace) <= 63
    error_message = "router_namespace must be a DNS label, e.g. edge."
  }
}

variable "router_replicas" {
  description = "Router replicas (spread over zones)."
  type        = number
  default     = 2
  validation {
    condition     = var.router_replicas >= 1 && var.router_replicas == floor(var.router_replicas)
    error_message = "router_replicas must be a whole number of at least 1 (2 or more spread over zones)."
  }
}
