//! Listener TLS (`[server] tls_cert_file` and `tls_key_file`): every listener speaks HTTPS
//! with rustls, HTTP/2 or HTTP/1.1 by ALPN.
//!
//! The crypto provider is ring, as for the Redis client's TLS, named explicitly rather than
//! taken from the process default. The certificate is looked up on every handshake
//! ([`Certs`] is the resolver), so a SIGHUP that loads new files serves them to the next
//! connection; files that fail to load leave the running certificate in place.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why the certificate or key cannot be used, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    /// `server.tls_cert_file` or `server.tls_key_file`.
    pub key: &'static str,
    /// What is wrong, with the file's path.
    pub message: String,
}

impl TlsError {
    fn new(key: &'static str, message: String) -> Self {
        TlsError { key, message }
    }
}

const CERT_KEY: &str = "server.tls_cert_file";
const KEY_KEY: &str = "server.tls_key_file";

/// Reads and checks the PEM certificate chain at `cert` and its private key at `key`: both
/// readable, at least one certificate, a key ring can sign with, and that matches the
/// first certificate.
///
/// # Errors
/// A [`TlsError`] naming the file's key.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |k: &'static str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| TlsError::new(k, format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read(CERT_KEY, cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::new(CERT_KEY, format!("{}: not PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        let message = format!("{}: no PEM certificate in it", cert.display());
        return Err(TlsError::new(CERT_KEY, message));
    }
    let key_pem = read(KEY_KEY, key)?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsError::new(
            KEY_KEY,
            format!("{}: no PEM private key: {e}", key.display()),
        )
    })?;
    let signer = ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::new(KEY_KEY, format!("{}: {e}", key.display())))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        let message = format!(
            "{} is not the key of {}: {e}",
            key.display(),
            cert.display()
        );
        TlsError::new(KEY_KEY, message)
    })?;
    Ok(certified)
}

/// The certificate the listeners serve, replaceable while they run.
pub struct Certs {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certs").finish_non_exhaustive()
    }
}

impl Certs {
    /// Loads the certificate and key.
    ///
    /// # Errors
    /// As [`certified_key`].
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Certs {
            current: RwLock::new(Arc::new(certified_key(cert, key)?)),
        })
    }

    /// Loads the files again and serves them from the next handshake on; on an error the
    /// running certificate stays.
    ///
    /// # Errors
    /// As [`certified_key`].
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let fresh = Arc::new(certified_key(cert, key)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The acceptor of every listener: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, this
    /// certificate (as it is at each handshake).
    ///
    /// # Errors
    /// The provider supports none of the protocol versions (never, with ring).
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, rustls::Error> {
        let resolver = Arc::clone(self) as Arc<dyn ResolvesServerCert>;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::TestCerts;

    #[test]
    fn bad_files_are_named_by_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let certs = TestCerts::generate(dir.path());
        certified_key(&certs.server_cert, &certs.server_key).expect("a good pair");
        let missing = dir.path().join("nope.pem");
        let e = certified_key(&missing, &certs.server_key).unwrap_err();
        assert_eq!(e.key, CERT_KEY, "{e}");
        assert!(e.message.contains("cannot read"), "{e}");
        // A key file given as the certificate: no certificate in it.
        let e = certified_key(&certs.server_key, &certs.server_key).unwrap_err();
        assert_eq!(e.key, CERT_KEY, "{e}");
        // A certificate given as the key.
        let e = certified_key(&certs.server_cert, &certs.server_cert).unwrap_err();
        assert_eq!(e.key, KEY_KEY, "{e}");
        // Another certificate's key.
        let e = certified_key(&certs.server_cert, &certs.client_key).unwrap_err();
        assert_eq!(e.key, KEY_KEY, "{e}");
        assert!(e.message.contains("is not the key of"), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_running_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let certs = TestCerts::generate(dir.path());
        let served = Certs::load(&certs.server_cert, &certs.server_key).unwrap();
        let before = served.current.read().unwrap().cert.clone();
        let missing = dir.path().join("gone.pem");
        assert!(served.reload(&missing, &certs.server_key).is_err());
        assert_eq!(served.current.read().unwrap().cert, before);
        served
            .reload(&certs.client_cert, &certs.client_key)
            .expect("another good pair");
        assert_ne!(served.current.read().unwrap().cert, before);
    }
}
