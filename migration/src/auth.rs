//! Mutual authentication of two ferry processes that share a key, before any other message
//! (docs/migration-format.md, "Authentication"): HMAC-SHA256 challenge and response in both
//! directions, each side proving the key over a fresh nonce of the other. It runs inside the
//! TLS session that carries the migration, with the key bound to that session
//! ([`Key::bound_to`] its exporter): proofs made in one session prove nothing in another, so
//! a relay that terminates TLS on each side cannot pass them through.
//!
//! ```text
//! source                                        destination
//! AUT1 {nonce_s}                            ->
//!                                           <-  AUT2 {nonce_d, HMAC(K, "ferry destination" | nonce_s | nonce_d)}
//! checks the destination's proof
//! AUT3 {HMAC(K, "ferry source" | nonce_d | nonce_s)}  ->  checks the source's proof
//! ```
//! A recorded handshake replayed to a destination fails: the destination's nonce is new
//! each time, so the recorded AUT3 proves nothing about it. The two proofs carry different
//! labels, so one side's proof cannot be reflected as the other's. Comparisons are in
//! constant time (`hmac`'s verify).

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::protocol::{self, Message};

/// Bytes of each nonce and each proof.
pub const NONCE_SIZE: usize = 32;
pub const PROOF_SIZE: usize = 32;
/// Shortest key accepted: 256 bits, what `ferry key generate` writes (a shorter one, a
/// passphrase say, would fall to an offline guess from any proof a client collects).
pub const MIN_KEY: usize = 32;
/// Longest key file accepted.
pub const MAX_KEY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key of {0} bytes: a key has {MIN_KEY} to {MAX_KEY} bytes")]
    KeySize(usize),
    #[error("the peer could not prove the shared key")]
    BadProof,
    #[error("authenticating: {0}")]
    Protocol(#[from] protocol::Error),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("expected the {0}, got {1}")]
    Unexpected(&'static str, &'static str),
}

/// The source's half of the handshake over `conn`, with `nonce_s` fresh from a random
/// source: challenge, check the destination's proof, prove. (The destination's half is the
/// receiver's first states, crate::receiver.)
pub fn source_handshake(
    conn: &mut (impl Read + Write),
    key: &Key,
    nonce_s: [u8; NONCE_SIZE],
) -> Result<(), Error> {
    protocol::send(conn, &Message::AuthChallenge(nonce_s))?;
    let nonce_d = match protocol::recv(conn)? {
        Message::AuthResponse(nd, proof) => {
            key.check_destination(&nonce_s, &nd, &proof)?;
            nd
        }
        Message::Refuse(r) => return Err(Error::Refused(r)),
        other => return Err(Error::Unexpected("destination's proof", other.name())),
    };
    protocol::send(
        conn,
        &Message::AuthProof(key.source_proof(&nonce_d, &nonce_s)),
    )?;
    Ok(())
}

/// The destination's half over `conn`, with `nonce_d` fresh from a random source: answer
/// the challenge with this side's proof, check the source's.
pub fn destination_handshake(
    conn: &mut (impl Read + Write),
    key: &Key,
    nonce_d: [u8; NONCE_SIZE],
) -> Result<(), Error> {
    let nonce_s = match protocol::recv(conn)? {
        Message::AuthChallenge(ns) => ns,
        other => return Err(Error::Unexpected("source's challenge", other.name())),
    };
    let proof = key.destination_proof(&nonce_s, &nonce_d);
    protocol::send(conn, &Message::AuthResponse(nonce_d, proof))?;
    match protocol::recv(conn)? {
        Message::AuthProof(p) => key.check_source(&nonce_d, &nonce_s, &p),
        other => Err(Error::Unexpected("source's proof", other.name())),
    }
}

/// A shared key, checked for size.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// A key from a key file's bytes (a trailing newline is not part of it).
    pub fn new(bytes: &[u8]) -> Result<Key, Error> {
        let b = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        if !(MIN_KEY..=MAX_KEY).contains(&b.len()) {
            return Err(Error::KeySize(b.len()));
        }
        Ok(Key(b.to_vec()))
    }

    /// This key bound to one channel: HMAC(K, "ferry channel binding" | `binding`), where
    /// `binding` is the channel's TLS exporter value (RFC 8446 section 7.5, as tls-exporter
    /// channel bindings of RFC 9266 use it): both ends of one TLS session compute the same,
    /// the two sessions of a relay in the middle do not.
    pub fn bound_to(&self, binding: &[u8]) -> Key {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key size");
        m.update(b"ferry channel binding");
        m.update(binding);
        Key(m.finalize().into_bytes().to_vec())
    }

    fn mac(&self, label: &[u8], a: &[u8; NONCE_SIZE], b: &[u8; NONCE_SIZE]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key size");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }

    /// The destination's proof over the source's nonce and its own.
    pub fn destination_proof(
        &self,
        nonce_s: &[u8; NONCE_SIZE],
        nonce_d: &[u8; NONCE_SIZE],
    ) -> [u8; PROOF_SIZE] {
        self.mac(b"ferry destination", nonce_s, nonce_d)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The source's proof over the destination's nonce and its own.
    pub fn source_proof(
        &self,
        nonce_d: &[u8; NONCE_SIZE],
        nonce_s: &[u8; NONCE_SIZE],
    ) -> [u8; PROOF_SIZE] {
        self.mac(b"ferry source", nonce_d, nonce_s)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks the destination's proof (in constant time).
    pub fn check_destination(
        &self,
        nonce_s: &[u8; NONCE_SIZE],
        nonce_d: &[u8; NONCE_SIZE],
        proof: &[u8; PROOF_SIZE],
    ) -> Result<(), Error> {
        self.mac(b"ferry destination", nonce_s, nonce_d)
            .verify_slice(proof)
            .map_err(|_| Error::BadProof)
    }

    /// Checks the source's proof (in constant time).
    pub fn check_source(
        &self,
        nonce_d: &[u8; NONCE_SIZE],
        nonce_s: &[u8; NONCE_SIZE],
        proof: &[u8; PROOF_SIZE],
    ) -> Result<(), Error> {
        self.mac(b"ferry source", nonce_d, nonce_s)
            .verify_slice(proof)
            .map_err(|_| Error::BadProof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &[u8] = b"0123456789abcdef-shared-key-bytes";

    #[test]
    fn both_sides_prove_the_key() {
        let k = Key::new(K).unwrap();
        let (ns, nd) = ([1u8; 32], [2u8; 32]);
        let pd = k.destination_proof(&ns, &nd);
        k.check_destination(&ns, &nd, &pd).unwrap();
        let ps = k.source_proof(&nd, &ns);
        k.check_source(&nd, &ns, &ps).unwrap();
    }

    #[test]
    fn a_wrong_key_a_replay_and_a_reflection_fail() {
        let k = Key::new(K).unwrap();
        let other = Key::new(b"another key of thirty-two bytes!!").unwrap();
        let (ns, nd) = ([1u8; 32], [2u8; 32]);
        let ps = other.source_proof(&nd, &ns);
        assert!(k.check_source(&nd, &ns, &ps).is_err(), "wrong key");
        // A proof recorded for an earlier destination nonce.
        let old = k.source_proof(&[9u8; 32], &ns);
        assert!(k.check_source(&nd, &ns, &old).is_err(), "replay");
        // The destination's own proof sent back as the source's.
        let pd = k.destination_proof(&ns, &nd);
        assert!(k.check_source(&nd, &ns, &pd).is_err(), "reflection");
    }

    #[test]
    fn a_key_bound_to_another_channel_proves_nothing() {
        let k = Key::new(K).unwrap();
        let (ns, nd) = ([1u8; 32], [2u8; 32]);
        let here = k.bound_to(b"exporter of session A");
        let there = k.bound_to(b"exporter of session B");
        let pd = there.destination_proof(&ns, &nd);
        assert!(here.check_destination(&ns, &nd, &pd).is_err());
        let again = k.bound_to(b"exporter of session A");
        here.check_destination(&ns, &nd, &again.destination_proof(&ns, &nd))
            .unwrap();
    }

    #[test]
    fn the_two_halves_agree_over_a_socket() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let k = Key::new(K).unwrap();
        let kd = k.clone();
        let d = std::thread::spawn(move || destination_handshake(&mut b, &kd, [7; 32]));
        source_handshake(&mut a, &k, [3; 32]).unwrap();
        d.join().unwrap().unwrap();
        // A source with another key is told nothing it can use, and stops.
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let d = std::thread::spawn(move || destination_handshake(&mut b, &k, [7; 32]));
        let other = Key::new(b"another key of thirty-two bytes!!").unwrap();
        assert!(matches!(
            source_handshake(&mut a, &other, [3; 32]),
            Err(Error::BadProof)
        ));
        drop(a);
        assert!(d.join().unwrap().is_err());
    }

    #[test]
    fn key_sizes() {
        assert!(Key::new(b"short").is_err());
        assert!(Key::new(&[7u8; MAX_KEY + 1]).is_err());
        assert!(Key::new(b"exactly-16-bytes\n").is_err());
        assert!(Key::new(b"exactly-thirty-two-bytes-of-key!\n").is_ok());
        assert!(Key::new(&[7u8; 31]).is_err());
    }
}
