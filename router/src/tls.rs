//! TLS termination (rustls, ring): the listener's certificate and ALPN (h2, http/1.1).

use crate::config::TlsConfig;
use crate::Error;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

fn bad(field: &str, problem: String) -> Error {
    Error::Config {
        field: field.into(),
        problem,
    }
}

/// Loads the PEM files named in `tls.certFile` / `tls.keyFile`; errors name the field.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, Error> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| bad("tls.certFile", format!("{}: {e}", cfg.cert_file.display())))?;
    if certs.is_empty() {
        return Err(bad(
            "tls.certFile",
            format!("{}: no CERTIFICATE block", cfg.cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| bad("tls.keyFile", format!("{}: {e}", cfg.key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("tls.keyFile", format!("does not match tls.certFile: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
