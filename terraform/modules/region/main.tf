provider "helm" {
  kubernetes {
    config_path = pathexpand(var.kubeconfig)
  }
}

provider "kubernetes" {
  config_path = pathexpand(var.kubeconfig)
}

# The chart ships the CRDs in crds/, installed before the operator.
resource "helm_release" "operator" {
  name             = "cellplane"
  chart            = "${path.module}/../../../charts/cellplane-operator"
  namespace        = var.namespace
  create_namespace = true
  wait             = true

  set {
    name  = "region"
    value = var.region
  }
  set {
    name  = "replicas"
    value = var.operator_replicas
  }
  dynamic "set" {
    for_each = length(var.etcd_endpoints) > 0 ? [1] : []
    content {
      name  = "etcd.endpoints"
      value = "{${join(",", var.etcd_endpoints)}}"
    }
  }
}

resource "kubernetes_manifest" "cellset" {
  count      = var.cellset_yaml == "" ? 0 : 1
  manifest   = yamldecode(var.cellset_yaml)
  depends_on = [helm_release.operator]
}

# The edge router follows the routing table in the global etcd, so it needs its endpoints.
resource "helm_release" "router" {
  count            = var.router_enabled && length(var.etcd_endpoints) > 0 ? 1 : 0
  name             = "edge"
  chart            = "${path.module}/../../../charts/cellplane-router"
  namespace        = var.router_namespace
  create_namespace = true
  wait             = true

  set {
    name  = "table.etcd.endpoints"
    value = "{${join(",", var.etcd_endpoints)}}"
  }
  set {
    name  = "table.platform"
    value = var.platform
  }
  set {
    name  = "replicas"
    value = var.router_replicas
  }
}
