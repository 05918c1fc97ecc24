//! TLS of the remote reward's client: rustls (its `ring` provider) trusting
//! the bundled Mozilla roots (`webpki-roots`), the system's roots
//! (`rustls-native-certs`, where they load) and, optionally, a PEM file of the
//! user's own CAs.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::error::{Error, Result};

/// The client configuration: the roots above, TLS 1.2 and 1.3.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // the system's store may be absent or partly unreadable: the bundled roots remain
    let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let bad = |msg: String| Error::config(path, "ca_file", msg);
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect())
            .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(bad("holds no CERTIFICATE block".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| bad(format!("a certificate is not usable as a root: {e}")))?;
        }
    }
    // ring (deprecated in rustls for lacking post-quantum key exchange) is the
    // provider ureq builds; aws-lc-rs would add a second C crypto library
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Input(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
