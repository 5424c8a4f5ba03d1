//! The migration channel's protection (docs/migration-format.md, "Security"): TLS 1.3 with
//! rustls, in one of two ways, and plaintext only where neither is set up (local peers).
//!
//! - Certificates (`--tls-dir DIR`, QEMU's tls-creds-x509 layout: `ca-cert.pem`, and
//!   `server-cert.pem`/`server-key.pem` for the destination, `client-cert.pem`/
//!   `client-key.pem` for the source): mutual authentication, each side's certificate
//!   chained to the CA, and the destination's name (the address's host, or `--tls-name`)
//!   checked by the source.
//! - A shared key (`--key-file`): TLS with a throw-away certificate the source does not
//!   check, then migration::auth's challenge and response with the key bound to this TLS
//!   session's exporter. Only a peer that holds the key can finish it, and only inside the
//!   session it proves it in: a relay that terminates TLS on both sides has two sessions,
//!   two exporters, and proofs that fail on each.
//!
//! With both, both hold. Either way every byte after the handshake is encrypted and every
//! record authenticated (AES-GCM or ChaCha20-Poly1305): a changed, dropped, reordered or
//! injected record ends the connection before its content is used.

mod certs;
mod keyed;

pub use certs::{generate, Generate};
use keyed::{keyed_client, keyed_server};

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::auth::{self, Key};
use migration::protocol;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use super::net::{Conn, Socket};
use super::{AuthFailure, Error, Phase, TlsFiles};

/// How long a peer has to finish the TLS handshake and the key's proofs, at most.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The exporter label the shared key is bound with.
const BINDING_LABEL: &[u8] = b"EXPORTER-ferry-migration-key";
/// The name a keyed source asks for, and the throw-away certificate carries.
const KEYED_NAME: &str = "ferry-migration";

/// The source's TLS: its certificate, the CA, and the destination's name to check.
#[derive(Debug, Clone)]
pub struct SourceTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// The destination's TLS: its certificate and the CA a source's certificate must chain to.
#[derive(Debug, Clone)]
pub struct DestinationTls {
    config: Arc<ServerConfig>,
    /// The names a source's certificate must carry one of (none: any the CA signed).
    allow: Vec<String>,
}

fn tls_err(what: impl std::fmt::Display) -> Error {
    Error::Tls(what.to_string())
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::TlsFiles(TlsFiles::Refused {
        path: path.to_path_buf(),
        why: why.to_string(),
    })
}

/// TLS 1.3 only, with aws-lc-rs: AES-GCM and ChaCha20-Poly1305, AES-128-GCM first (the fastest
/// with AES instructions, the page path's cost).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = crate::files::read_capped(path, 1 << 20).map_err(|source| {
        Error::TlsFiles(TlsFiles::Io {
            path: path.to_path_buf(),
            source,
        })
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(Error::TlsFiles(TlsFiles::NoCertificate(path.to_path_buf())));
    }
    Ok(certs)
}

/// A private key file: like a shared key, refused where group or others may read it.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = super::key::read_private(path, 64 << 10).map_err(|e| Error::TlsFiles(e.into()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_err(path, e))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    Ok(roots)
}

impl SourceTls {
    /// The source's side of `dir`, to check that the destination is `name`.
    pub fn load(dir: &Path, name: &str) -> Result<SourceTls, Error> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| Error::TlsFiles(TlsFiles::NotAName(name.to_string())))?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(roots(&dir.join("ca-cert.pem"))?)
            .with_client_auth_cert(
                certificates(&dir.join("client-cert.pem"))?,
                private_key(&dir.join("client-key.pem"))?,
            )
            .map_err(|e| file_err(&dir.join("client-cert.pem"), e))?;
        Ok(SourceTls {
            config: Arc::new(config),
            name,
        })
    }
}

impl DestinationTls {
    /// The destination's side of `dir`.
    pub fn load(dir: &Path) -> Result<DestinationTls, Error> {
        let ca = dir.join("ca-cert.pem");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&ca)?),
            provider(),
        )
        .build()
        .map_err(|e| file_err(&ca, e))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certificates(&dir.join("server-cert.pem"))?,
                private_key(&dir.join("server-key.pem"))?,
            )
            .map_err(|e| file_err(&dir.join("server-cert.pem"), e))?;
        config.send_tls13_tickets = 0;
        Ok(DestinationTls {
            config: Arc::new(config),
            allow: Vec::new(),
        })
    }

    /// Takes only a source whose certificate names one of `names` (`--tls-allow`).
    pub fn allow(mut self, names: Vec<String>) -> Result<DestinationTls, Error> {
        for n in &names {
            ServerName::try_from(n.as_str())
                .map_err(|_| Error::TlsFiles(TlsFiles::NotAnAllowedName(n.clone())))?;
        }
        self.allow = names;
        Ok(self)
    }

    /// Whether the source's certificate (the CA has signed it) names one of the allowed.
    fn allows(&self, conn: &ServerConnection) -> Result<(), Error> {
        if self.allow.is_empty() {
            return Ok(());
        }
        let named = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
            .is_some_and(|cert| {
                self.allow.iter().any(|n| {
                    ServerName::try_from(n.as_str())
                        .is_ok_and(|sn| cert.verify_is_valid_for_subject_name(&sn).is_ok())
                })
            });
        if named {
            return Ok(());
        }
        Err(Error::Auth(AuthFailure::NotAllowed(self.allow.clone())))
    }
}

/// The host part of a TCP address (what a source checks the destination's certificate
/// against by default); for a Unix socket, "localhost".
pub fn default_name(addr: &super::Address) -> String {
    match addr {
        super::Address::Tcp(hp) => {
            let host = hp.rsplit_once(':').map_or(hp.as_str(), |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        }
        super::Address::Unix(_) => "localhost".into(),
    }
}

/// A socket whose reads and writes end by `deadline`, however the peer trickles.
struct Deadline<'s> {
    sock: &'s mut dyn Socket,
    deadline: Instant,
}

impl Deadline<'_> {
    fn arm(&mut self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        self.sock.set_timeout(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.sock.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// A socket read in large pieces: rustls asks for at most 4 KiB per read, which over a
/// fast connection would be a system call per 4 KiB of pages; this reads up to
/// [`READ_AHEAD`] at once and hands it out. Writes go straight through.
struct ReadAhead {
    sock: Box<dyn Socket>,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

/// Bytes read from the socket at once, at most.
const READ_AHEAD: usize = 256 << 10;

impl ReadAhead {
    fn new(sock: Box<dyn Socket>) -> ReadAhead {
        ReadAhead {
            sock,
            buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.end {
            if out.len() >= self.buf.len() {
                return self.sock.read(out);
            }
            self.end = self.sock.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for ReadAhead {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.sock.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// A TLS connection over its socket, like rustls' StreamOwned, but a vectored write (the
/// page path writes a frame's pages as one) goes out as full records in one system call
/// rather than a record and a system call per slice.
struct TlsStream<C> {
    tls: C,
    sock: ReadAhead,
}

impl<C> TlsStream<C> {
    fn new(tls: C, sock: Box<dyn Socket>) -> TlsStream<C> {
        TlsStream {
            tls,
            sock: ReadAhead::new(sock),
        }
    }
}

impl<C, D> Read for TlsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        rustls::Stream::new(&mut self.tls, &mut self.sock).read(buf)
    }
}

impl<C, D> Write for TlsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        rustls::Stream::new(&mut self.tls, &mut self.sock).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        // rustls seals the slices as full records straight from where they lie (no copy
        // gathers them first), up to its buffer limit; then the records go out.
        rustls::Stream::new(&mut self.tls, &mut self.sock).flush()?;
        let n = self.tls.writer().write_vectored(bufs)?;
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        rustls::Stream::new(&mut self.tls, &mut self.sock).flush()
    }
}

/// The handshake's I/O failed: the peer went, stalled, or TLS refused it (rustls' error
/// inside).
fn handshake_io(e: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    Error::Tls(match e.kind() {
        WouldBlock | TimedOut => "the handshake took too long: the peer stalled".into(),
        UnexpectedEof | ConnectionReset | BrokenPipe => {
            "the peer closed the connection during the handshake".into()
        }
        _ => e.to_string(),
    })
}

/// Runs the TLS handshake on `io`; where it fails, the alert saying why still goes to the
/// peer (a plaintext peer then reads a TLS record, and names that).
fn handshake_on<D>(
    tls: &mut rustls::ConnectionCommon<D>,
    io: &mut Deadline<'_>,
) -> Result<(), Error>
where
    D: rustls::SideData,
{
    while tls.is_handshaking() {
        if let Err(e) = tls.complete_io(io) {
            while tls.wants_write() {
                if tls.write_tls(io).is_err() {
                    break;
                }
            }
            return Err(handshake_io(e));
        }
    }
    Ok(())
}

/// Draws from the TLS library's random source once, so that whatever it does on first use
/// (aws-lc looks for a VM generation ID device, and sets itself up: milliseconds) happens
/// on the calling thread, before a source connects, and not on a handshake's thread, whose
/// filter allows no file. Later calls cost a draw of 16 bytes.
pub fn warm_up() {
    let mut b = [0u8; 16];
    let _ = provider().secure_random.fill(&mut b);
}

/// This session's binding of the shared key.
fn bound(key: &Key, conn: &rustls::ConnectionCommon<impl rustls::SideData>) -> Result<Key, Error> {
    let exporter = conn
        .export_keying_material([0u8; 32], BINDING_LABEL, None)
        .map_err(tls_err)?;
    Ok(key.bound_to(&exporter))
}

/// The source's side: protects `sock` as `key` and `tls` say (as it is, with neither), the
/// handshake and proofs done by `handshake` from now, then reads and writes give up after
/// `timeout` again.
pub(super) fn to_destination(
    mut sock: Box<dyn Socket>,
    key: Option<&Key>,
    tls: Option<&SourceTls>,
    handshake: Duration,
    timeout: Duration,
) -> Result<Box<dyn Conn>, Error> {
    let (config, name) = match (tls, key) {
        (Some(t), _) => (t.config.clone(), t.name.clone()),
        (None, Some(_)) => (
            keyed_client()?,
            ServerName::try_from(KEYED_NAME).map_err(tls_err)?,
        ),
        (None, None) => return Ok(Box::new(sock)),
    };
    let mut tls = ClientConnection::new(config, name).map_err(tls_err)?;
    {
        let mut io = Deadline {
            sock: &mut *sock,
            deadline: Instant::now() + handshake,
        };
        handshake_on(&mut tls, &mut io)?;
        if let Some(key) = key {
            let key = bound(key, &tls)?;
            let mut stream = rustls::Stream::new(&mut tls, &mut io);
            super::authenticate_to(&mut stream, &key)?;
        }
    }
    sock.set_timeout(timeout).map_err(handshake_io)?;
    Ok(Box::new(TlsStream::new(tls, sock)))
}

/// The destination's side of [`to_destination`]: a peer that does not finish it (no TLS,
/// a certificate the CA did not sign, the wrong key, too slow) is an error here.
pub(super) fn from_source(
    mut sock: Box<dyn Socket>,
    key: Option<&Key>,
    tls: Option<&DestinationTls>,
    handshake: Duration,
    timeout: Duration,
) -> Result<Box<dyn Conn>, Error> {
    let tls_choice = tls;
    let config = match (tls, key) {
        (Some(t), _) => t.config.clone(),
        (None, Some(_)) => keyed_server()?,
        (None, None) => return Ok(Box::new(sock)),
    };
    let mut tls = ServerConnection::new(config).map_err(tls_err)?;
    {
        let mut io = Deadline {
            sock: &mut *sock,
            deadline: Instant::now() + handshake,
        };
        if let Err(e) = handshake_on(&mut tls, &mut io) {
            if matches!(&e, Error::Tls(why) if why.contains("InvalidContentType")) {
                // A peer that does not speak TLS: tell it in its own terms, a Refuse frame.
                let why = "this destination speaks TLS only (--key-file or --tls-dir): give the source the same";
                let _ = protocol::send(&mut io, &protocol::Message::Refuse(why.into()));
            }
            return Err(e);
        }
        if let Some(t) = tls_choice {
            t.allows(&tls)?;
        }
        if let Some(key) = key {
            let key = bound(key, &tls)?;
            let mut stream = rustls::Stream::new(&mut tls, &mut io);
            let nonce = super::nonce()?;
            auth::destination_handshake(&mut stream, &key, nonce).map_err(|e| match e {
                auth::Error::Protocol(source) => Error::Protocol {
                    phase: Phase::Handshake,
                    what: "authenticating the source",
                    source,
                },
                auth::Error::BadProof => Error::Auth(AuthFailure::SourceProof),
                other => Error::Auth(AuthFailure::Handshake(other)),
            })?;
        }
    }
    sock.set_timeout(timeout).map_err(handshake_io)?;
    Ok(Box::new(TlsStream::new(tls, sock)))
}
