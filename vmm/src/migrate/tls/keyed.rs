//! TLS for a shared key (`--key-file` without `--tls-dir`): the destination shows a
//! certificate made for the connection, which the source does not check; the key's proofs,
//! bound to this TLS session, say who each side is (migration::auth).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ServerConfig};

use super::{certs, provider, tls_err, KEYED_NAME};
use crate::migrate::Error;

/// A keyed source's TLS: the destination's certificate is a throw-away one, not checked;
/// the key's proofs, bound to this session, authenticate it instead.
pub(super) fn keyed_client() -> Result<Arc<ClientConfig>, Error> {
    let p = provider();
    let config = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ProvenByKey(p)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A keyed destination's TLS, with a certificate made for this connection.
pub(super) fn keyed_server() -> Result<Arc<ServerConfig>, Error> {
    let (cert, key) = certs::throwaway(KEYED_NAME)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(tls_err)?;
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Takes any certificate: with a shared key and no CA, the key's bound proofs say who the
/// destination is. The handshake's signatures are still checked (the peer holds the key of
/// the certificate it sent), with the provider's algorithms.
#[derive(Debug)]
struct ProvenByKey(Arc<CryptoProvider>);

impl ServerCertVerifier for ProvenByKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
