# Three regions of one platform: each region's cluster gets the CRDs, the operator, an
# edge router and the same CellSet (each operator stamps only its own region's cells).
# The global etcd (three members, one per region) is assumed to run already.
#
#   tofu init && tofu apply -var-file=regions.tfvars
#
# with regions.tfvars naming each region's kubeconfig, e.g.
#   kubeconfigs = { us-east = "~/.kube/us-east", eu-west = "~/.kube/eu-west", ap-south = "~/.kube/ap-south" }

variable "kubeconfigs" {
  description = "Kubeconfig path of each region's cluster, by region name (us-east, eu-west, ap-south)."
  type        = map(string)
  validation {
    condition     = alltrue([for r in ["us-east", "eu-west", "ap-south"] : contains(keys(var.kubeconfigs), r)])
    error_message = "kubeconfigs needs an entry for each of us-east, eu-west and ap-south."
  }
}

variable "etcd_endpoints" {
  description = "The global etcd's client URLs (one member per region)."
  type        = list(string)
  default = [
    "https://etcd.us-east.example:2379",
    "https://etcd.eu-west.example:2379",
    "https://etcd.ap-south.example:2379",
  ]
}

locals {
  cellset = <<-YAML
    apiVersion: cellplane.io/v1alpha1
    kind: CellSet
    metadata: {name: shop, namespace: default}
    spec:
      platform: shop
      regions:
      - {name: us-east, cells: 2}
      - {name: eu-west, cells: 2}
      - {name: ap-south, cells: 2}
      template:
        app: {image: "ghcr.io/cellplane/shop:0.1.0", replicas: 2}
        redis: {inCluster: {storage: 1Gi}}
        mysql: {inCluster: {storage: 10Gi}}
        kafka: {inCluster: {storage: 10Gi}}
  YAML
}

# A module with its own provider blocks cannot take count or for_each: one block per region.
module "us_east" {
  source         = "../../modules/region"
  region         = "us-east"
  kubeconfig     = var.kubeconfigs["us-east"]
  etcd_endpoints = var.etcd_endpoints
  cellset_yaml   = local.cellset
}

module "eu_west" {
  source         = "../../modules/region"
  region         = "eu-west"
  kubeconfig     = var.kubeconfigs["eu-west"]
  etcd_endpoints = var.etcd_endpoints
  cellset_yaml   = local.cellset
}

module "ap_south" {
  source         = "../../modules/region"
  region         = "ap-south"
  kubeconfig     = var.kubeconfigs["ap-south"]
  etcd_endpoints = var.etcd_endpoints
  cellset_yaml   = local.cellset
}

output "releases" {
  value = {
    us-east  = [module.us_east.operator_release, module.us_east.router_release]
    eu-west  = [module.eu_west.operator_release, module.eu_west.router_release]
    ap-south = [module.ap_south.operator_release, module.ap_south.router_release]
  }
}
