//! Test certificates made with the real openssl: a CA and certificates it issues, for the
//! TLS and mutual-TLS tests.

use anyhow::{ensure, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Makes `<name>.crt` and `<name>.key` in `dir`, issued by the CA `<ca>.crt`/`<ca>.key`
/// (made first if missing) with the v3 extensions `ext` (e.g.
/// `subjectAltName=IP:127.0.0.1`). Returns the certificate and key paths.
pub fn issue(dir: &Path, ca: &str, name: &str, ext: &str) -> Result<(PathBuf, PathBuf)> {
    if !dir.join(format!("{ca}.crt")).exists() {
        let subject = format!("/CN={ca}");
        let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
        openssl(
            dir,
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &subject,
                "-keyout", &key, "-out", &crt,
            ],
        )?;
    }
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), ext)?;
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key,
            "-out", &csr,
        ],
    )?;
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &extfile,
            "-out",
            &crt,
        ],
    )?;
    Ok((dir.join(crt), dir.join(key)))
}

/// Extensions of a server certificate for the loopback address.
pub const LOCAL_SERVER: &str =
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
/// Extensions of a client certificate.
pub const CLIENT: &str = "extendedKeyUsage=clientAuth\n";
