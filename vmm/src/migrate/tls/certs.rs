//! Certificates with rcgen: `ferry tls generate DIR` (a CA, and a destination's and a
//! source's certificate signed by it, in the layout --tls-dir and QEMU's tls-creds-x509
//! read; each valid for a number of days; the CA's key written apart from DIR, since DIR
//! goes to both hosts and whoever holds that key can make certificates), and the
//! throw-away certificate of a keyed destination.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::super::{Error, TlsFiles};

fn gen_err(e: rcgen::Error) -> Error {
    Error::TlsFiles(TlsFiles::Generate(e))
}

/// A self-signed certificate for `name` and its key, made now.
pub(super) fn throwaway(
    name: &str,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).map_err(gen_err)?;
    let key = PrivatePkcs8KeyDer::from(c.key_pair.serialize_der());
    Ok((c.cert.der().clone(), key.into()))
}

/// What `ferry tls generate` makes.
#[derive(Debug, Clone)]
pub struct Generate {
    /// Host names or addresses the source will connect to: the destination certificate's.
    pub names: Vec<String>,
    /// The source certificate's name (what a destination's `--tls-allow` names).
    pub source_name: String,
    /// Days each certificate is valid from now (and from an hour ago, for clocks that lag).
    pub days: u32,
    /// Where the CA's private key goes: not in the directory both hosts use.
    pub ca_key: PathBuf,
}

impl Generate {
    /// Certificates for a destination named `names` with `dir`'s defaults: a source named
    /// `ferry-source`, valid a year, the CA key at [`Generate::default_ca_key`].
    pub fn new(dir: &Path, names: Vec<String>) -> Generate {
        Generate {
            names,
            source_name: "ferry-source".into(),
            days: 365,
            ca_key: Generate::default_ca_key(dir),
        }
    }

    /// The default place of the CA key for `dir`: beside it, `DIR.ca-key.pem`.
    pub fn default_ca_key(dir: &Path) -> PathBuf {
        let mut name = dir.as_os_str().to_owned();
        name.push(".ca-key.pem");
        PathBuf::from(name)
    }
}

fn params(cn: &str, names: &[String], days: u32) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
    Ok(p)
}

/// One leaf signed by the CA, for `purpose`.
fn leaf(
    cn: &str,
    names: &[String],
    purpose: ExtendedKeyUsagePurpose,
    ca: &(rcgen::Certificate, KeyPair),
    days: u32,
) -> Result<(String, String), Error> {
    let mut p = params(cn, names, days)?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = p.signed_by(&key, &ca.0, &ca.1).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a new CA (`ca-cert.pem` in `dir`, its key at `g.ca_key`), a destination
/// certificate for `g.names` (`server-cert.pem`, `server-key.pem`: host names or addresses
/// the source will connect to) and a source certificate for `g.source_name`
/// (`client-cert.pem`, `client-key.pem`) into `dir`, created if missing, each valid for
/// `g.days`. Keys get mode 0600; an existing file is never overwritten.
pub fn generate(dir: &Path, g: &Generate) -> Result<(), Error> {
    let names = &g.names;
    if names.is_empty() {
        return Err(Error::TlsFiles(TlsFiles::NoNames));
    }
    if g.days == 0 {
        return Err(Error::TlsFiles(TlsFiles::NoDays));
    }
    if g.ca_key.starts_with(dir) {
        return Err(Error::TlsFiles(TlsFiles::CaKeyInside {
            key: g.ca_key.clone(),
            dir: dir.to_path_buf(),
        }));
    }
    let mut ca_params = params("ferry migration CA", &[], g.days)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err)?;
    let ca = (ca_cert, ca_key);
    let (server_cert, server_key) = leaf(
        &names[0],
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca,
        g.days,
    )?;
    let (client_cert, client_key) = leaf(
        &g.source_name,
        std::slice::from_ref(&g.source_name),
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca,
        g.days,
    )?;
    let files = [
        (dir.join("ca-cert.pem"), ca.0.pem(), 0o644),
        (g.ca_key.clone(), ca.1.serialize_pem(), 0o600),
        (dir.join("server-cert.pem"), server_cert, 0o644),
        (dir.join("server-key.pem"), server_key, 0o600),
        (dir.join("client-cert.pem"), client_cert, 0o644),
        (dir.join("client-key.pem"), client_key, 0o600),
    ];
    if let Some((f, ..)) = files.iter().find(|(f, ..)| f.exists()) {
        return Err(Error::TlsFiles(TlsFiles::Exists(f.to_path_buf())));
    }
    let io = |p: &Path, source: std::io::Error| {
        Error::TlsFiles(TlsFiles::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (p, text, mode) in files {
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
