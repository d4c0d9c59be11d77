provider "helm" {
  kubernetes {
    config_path = pathexpand(var.kubeconfig)
  }
}

provider "kubectl" {
  config_path      = pathexpand(var.kubeconfig)
  load_config_file = true
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

# After the operator (and its CRDs); destroyed before it, and the destroy waits until the
# CellSet is gone, so the operator is still there to finish its cells' finalizers.
resource "kubectl_manifest" "cellset" {
  count      = var.cellset_yaml == "" ? 0 : 1
  yaml_body  = var.cellset_yaml
  wait       = true
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
  # A destroy removes the generated admin token too (the chart keeps it on a plain helm
  # uninstall; helm provider 1.x also fails a destroy that left a kept resource behind).
  set {
    name  = "admin.keepTokenOnUninstall"
    value = "false"
  }
}
