//! `terraform/modules/region` applied by real OpenTofu against a real region: `tofu init`
//! installs the providers from the local filesystem mirror that `e2e/bin/tools --tofu` built from
//! their Go modules (nothing is downloaded), a bad variable is refused naming the fix, apply
//! creates the CRDs, the operator, the router and a CellSet, a second plan is empty, and
//! destroy removes them.

use cellplane_e2e::{build_tools, repo_root, tools_bin, Region};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Runs `tofu ARGS` in `dir` with the mirror-only CLI config; returns (exit code, output).
fn tofu(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(tools_bin().join("tofu"))
        .args(args.iter().take(1))
        .arg("-no-color")
        .args(args.iter().skip(1))
        .current_dir(dir)
        .env("TF_CLI_CONFIG_FILE", dir.join("cli.tfrc"))
        .env("TF_IN_AUTOMATION", "1")
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .expect("tofu runs (e2e/bin/tools builds it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A module source must be a relative path (`./` or `../`): from `from` to `to`, both absolute.
fn relative(from: &Path, to: &Path) -> String {
    let ups = from
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let down: PathBuf = to
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    format!("{}{}", "../".repeat(ups), down.display())
}

#[test]
fn the_region_module_is_applied_by_opentofu() -> anyhow::Result<()> {
    // OpenTofu and its providers are built on first use (`make test` starts that build
    // in the background when its tests start).
    build_tools("--tofu")?;
    let region = Region::up("tofu")?;
    let dir = region.dir.join("tofu-root");
    std::fs::create_dir_all(&dir)?;
    let mirror = tools_bin().join("tofu-mirror");
    std::fs::write(
        dir.join("cli.tfrc"),
        format!(
            "# Providers only from the mirror: an init that would download fails.\n\
             provider_installation {{\n  filesystem_mirror {{\n    path = \"{}\"\n  }}\n}}\n",
            mirror.display()
        ),
    )?;
    let module = relative(
        &std::fs::canonicalize(&dir)?,
        &repo_root().join("terraform/modules/region"),
    );
    let cellset = repo_root().join("examples/cellset-two-regions.yaml");
    std::fs::write(
        dir.join("main.tf"),
        format!(
            r#"variable "region" {{
  type    = string
  default = "tofu"
}}

module "region" {{
  source            = "{module}"
  region            = var.region
  kubeconfig        = "{kubeconfig}"
  etcd_endpoints    = ["http://127.0.0.1:2379"]
  operator_replicas = 1
  router_replicas   = 1
  cellset_yaml      = file("{cellset}")
}}
"#,
            kubeconfig = region.kubeconfig().display(),
            cellset = cellset.display(),
        ),
    )?;

    let terraform_dir = repo_root().join("terraform");
    let (code, out) = tofu(
        &dir,
        &[
            "fmt",
            "-check",
            "-recursive",
            &terraform_dir.display().to_string(),
        ],
    );
    assert_eq!(code, 0, "tofu fmt -recursive terraform/ changes: {out}");
    let (code, out) = tofu(&dir, &["init", "-input=false"]);
    assert_eq!(code, 0, "{out}");
    for provider in ["hashicorp/helm", "gavinbunney/kubectl"] {
        assert!(out.contains(provider), "init names {provider}: {out}");
    }
    let (code, out) = tofu(&dir, &["validate"]);
    assert_eq!(code, 0, "{out}");
    println!("{out}");

    // The example root module for three regions is valid too (copied, so its .terraform
    // stays out of the repository).
    let example = region.dir.join("tofu-example");
    std::fs::create_dir_all(&example)?;
    let main =
        std::fs::read_to_string(repo_root().join("terraform/examples/three-regions/main.tf"))?;
    let module_dir = relative(
        &std::fs::canonicalize(&example)?,
        &repo_root().join("terraform/modules/region"),
    );
    std::fs::write(
        example.join("main.tf"),
        main.replace("../../modules/region", &module_dir),
    )?;
    std::fs::copy(dir.join("cli.tfrc"), example.join("cli.tfrc"))?;
    for args in [&["init", "-input=false"][..], &["validate"]] {
        let (code, out) = tofu(&example, args);
        assert_eq!(code, 0, "the three-region example: tofu {args:?}: {out}");
    }

    // A bad variable is refused at plan, naming the fix; nothing is created.
    let (code, out) = tofu(&dir, &["plan", "-input=false", "-var", "region=Bad_Region"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("region must be a DNS label, e.g. us-east"),
        "{out}"
    );
    assert!(region
        .kubectl(&["get", "crd", "cells.cellplane.io"])
        .is_err());

    // -detailed-exitcode: 2 = changes to make, 0 = nothing to do.
    let (code, out) = tofu(
        &dir,
        &[
            "plan",
            "-input=false",
            "-detailed-exitcode",
            "-out=first.plan",
        ],
    );
    assert_eq!(code, 2, "{out}");
    let (code, out) = tofu(
        &dir,
        &["apply", "-input=false", "-auto-approve", "first.plan"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Apply complete! Resources: 3 added"), "{out}");

    for crd in ["cells.cellplane.io", "cellsets.cellplane.io"] {
        region.kubectl(&["get", "crd", crd])?;
    }
    let ready = |ns: &str, name: &str| {
        region.kubectl(&[
            "-n",
            ns,
            "get",
            "deployment",
            name,
            "-o",
            "jsonpath={.status.readyReplicas}",
        ])
    };
    assert_eq!(ready("cellplane", "cellplane-cellplane-operator")?, "1");
    assert_eq!(ready("edge", "edge-cellplane-router")?, "1");
    let platform = region.kubectl(&[
        "-n",
        "default",
        "get",
        "cellset",
        "shop",
        "-o",
        "jsonpath={.spec.platform}",
    ])?;
    assert_eq!(platform, "shop");

    let (code, out) = tofu(&dir, &["plan", "-input=false", "-detailed-exitcode"]);
    assert_eq!(code, 0, "a second plan must be empty: {out}");

    let (code, out) = tofu(&dir, &["destroy", "-input=false", "-auto-approve"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Resources: 3 destroyed"), "{out}");
    assert!(region
        .kubectl(&["-n", "default", "get", "cellset", "shop"])
        .is_err());
    assert!(region
        .kubectl(&[
            "-n",
            "cellplane",
            "get",
            "deployment",
            "cellplane-cellplane-operator"
        ])
        .is_err());
    Ok(())
}
