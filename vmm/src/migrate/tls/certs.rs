//! Certificates with rcgen: `ferry tls generate DIR` (a CA, and a destination's and a
//! source's certificate signed by it, in the layout --tls-dir and QEMU's tls-creds-x509
//! read), and the throw-away certificate of a keyed destination.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::super::Error;

fn gen_err(e: rcgen::Error) -> Error {
    Error::TlsFiles(format!("making a certificate: {e}"))
}

/// A self-signed certificate for `name` and its key, made now.
pub(super) fn throwaway(
    name: &str,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).map_err(gen_err)?;
    let key = PrivatePkcs8KeyDer::from(c.key_pair.serialize_der());
    Ok((c.cert.der().clone(), key.into()))
}

fn params(cn: &str, names: &[String]) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    Ok(p)
}

/// One leaf signed by the CA, for `purpose`.
fn leaf(
    cn: &str,
    names: &[String],
    purpose: ExtendedKeyUsagePurpose,
    ca: &(rcgen::Certificate, KeyPair),
) -> Result<(String, String), Error> {
    let mut p = params(cn, names)?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = p.signed_by(&key, &ca.0, &ca.1).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a new CA (`ca-cert.pem`, `ca-key.pem`), a destination certificate for `names`
/// (`server-cert.pem`, `server-key.pem`: host names or addresses the source will connect
/// to) and a source certificate (`client-cert.pem`, `client-key.pem`) into `dir`, created
/// if missing. Keys get mode 0600; an existing file is never overwritten.
pub fn generate(dir: &Path, names: &[String]) -> Result<(), Error> {
    if names.is_empty() {
        return Err(Error::TlsFiles(
            "the destination's certificate needs at least one name".into(),
        ));
    }
    let mut ca_params = params("ferry migration CA", &[])?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err)?;
    let ca = (ca_cert, ca_key);
    let (server_cert, server_key) =
        leaf(&names[0], names, ExtendedKeyUsagePurpose::ServerAuth, &ca)?;
    let (client_cert, client_key) = leaf(
        "ferry migration source",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca,
    )?;
    let files = [
        ("ca-cert.pem", ca.0.pem(), 0o644),
        ("ca-key.pem", ca.1.serialize_pem(), 0o600),
        ("server-cert.pem", server_cert, 0o644),
        ("server-key.pem", server_key, 0o600),
        ("client-cert.pem", client_cert, 0o644),
        ("client-key.pem", client_key, 0o600),
    ];
    if let Some((f, ..)) = files.iter().find(|(f, ..)| dir.join(f).exists()) {
        return Err(Error::TlsFiles(format!(
            "{} exists already: ferry tls generate writes only new files",
            dir.join(f).display()
        )));
    }
    let io = |p: &Path, e: std::io::Error| Error::TlsFiles(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (f, text, mode) in files {
        let p = dir.join(f);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|e| io(&p, e))?;
    }
    Ok(())
}
