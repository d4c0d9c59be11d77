terraform {
  # OpenTofu >= 1.6 or Terraform >= 1.5; the tests apply it with OpenTofu built from source
  # (e2e/bin/tools), the providers from a local filesystem mirror.
  required_version = ">= 1.5"
  required_providers {
    # The `kubernetes {}` block and `set {}` blocks below are the 1.x/2.x provider's syntax
    # (3.x turned them into attributes).
    helm = { source = "hashicorp/helm", version = ">= 1.3, < 3.0" }
    # kubectl_manifest applies a custom resource whose CRD the same apply installs (the
    # kubernetes provider's kubernetes_manifest needs the CRD to exist at plan time).
    kubectl = { source = "gavinbunney/kubectl", version = ">= 1.14, < 2.0" }
  }
}
