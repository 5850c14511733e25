//! TLS client configuration shared by the origin and merchant clients.
//!
//! Certificates are verified by default against the Mozilla roots shipped in `webpki-roots`
//! (no dependency on the host's CA store, so containers behave like hosts). A `ca_file`
//! replaces those roots with the PEM bundle given: the explicit opt-in for a private CA.
//! There is deliberately no switch that disables verification.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

/// A rustls client configuration trusting the public roots, or only `ca_file` if given.
///
/// # Errors
/// The CA file cannot be read, holds no certificate, or a certificate is invalid.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read CA file {}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.with_context(|| format!("invalid PEM in {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("invalid certificate in {}", path.display()))?;
                n += 1;
            }
            anyhow::ensure!(n > 0, "no certificate found in {}", path.display());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTP+HTTPS connector (HTTP/1.1 and, where ALPN offers it, HTTP/2) with a connect
/// timeout and `TCP_NODELAY`.
///
/// # Errors
/// As [`client_config`].
pub fn https_connector(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> anyhow::Result<HttpsConnector<HttpConnector>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(ca_file)?)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http))
}
