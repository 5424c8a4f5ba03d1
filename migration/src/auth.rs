//! Mutual authentication of two ferry processes that share a key, before any other message
//! (docs/migration-format.md, "Authentication"): HMAC-SHA256 challenge and response in both
//! directions, each side proving the key over a fresh nonce of the other.
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
/// Shortest key accepted.
pub const MIN_KEY: usize = 16;
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
    #[error("expected the destination's proof, got {0}")]
    Unexpected(&'static str),
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
        other => return Err(Error::Unexpected(other.name())),
    };
    protocol::send(
        conn,
        &Message::AuthProof(key.source_proof(&nonce_d, &nonce_s)),
    )?;
    Ok(())
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

    const K: &[u8] = b"0123456789abcdef-shared";

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
        let other = Key::new(b"another key of 16+ bytes").unwrap();
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
    fn key_sizes() {
        assert!(Key::new(b"short").is_err());
        assert!(Key::new(&[7u8; MAX_KEY + 1]).is_err());
        assert!(Key::new(b"exactly-16-bytes\n").is_ok());
    }
}
