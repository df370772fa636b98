//! Keys, authenticated encryption and keyed hashing.
//!
//! Every stored byte string ("sealed" object or blob) starts with a scheme byte:
//! `0` plaintext, `1` XChaCha20-Poly1305 (24-byte random nonce), `2` AES-256-GCM
//! (12-byte random nonce), followed by the nonce and the ciphertext with its 16-byte tag.
//! A repository that is encrypted refuses scheme `0`, so a tampered object cannot
//! downgrade it to plaintext.
//!
//! Nonces are random. For XChaCha20 (192-bit nonces) collisions are negligible at any
//! realistic scale. For AES-256-GCM (96-bit nonces) NIST limits one key to 2^32
//! messages; at the default chunk sizes that is petabytes, which docs/repository-format.md
//! states as the mode's limit.

use aes_gcm::aead::{Aead, KeyInit};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::id::Id;

pub const SCHEME_PLAIN: u8 = 0;
pub const SCHEME_XCHACHA20_POLY1305: u8 = 1;
pub const SCHEME_AES_256_GCM: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    None,
    Xchacha20Poly1305,
    Aes256Gcm,
}

impl Encryption {
    pub fn parse(s: &str) -> Result<Encryption, String> {
        match s {
            "none" => Ok(Encryption::None),
            "xchacha20-poly1305" | "xchacha20" | "chacha20-poly1305" => {
                Ok(Encryption::Xchacha20Poly1305)
            }
            "aes-256-gcm" | "aes" => Ok(Encryption::Aes256Gcm),
            other => Err(format!(
                "unknown encryption {other:?}: use xchacha20-poly1305 (default), aes-256-gcm or none"
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Xchacha20Poly1305 => "xchacha20-poly1305",
            Encryption::Aes256Gcm => "aes-256-gcm",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("object is empty or truncated")]
    Truncated,
    #[error("authentication failed (wrong key, or the object was modified)")]
    Authentication,
    #[error("unencrypted object in an encrypted repository")]
    Downgrade,
    #[error("unknown encryption scheme {0}")]
    UnknownScheme(u8),
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    // The OS RNG failing means the system cannot do cryptography at all; there is no
    // safe way to continue producing keys or nonces.
    #[allow(clippy::expect_used)]
    getrandom::getrandom(buf).expect("operating system random number generator failed");
}

/// The repository's secrets. Wrapped by passphrase-derived keys in `keys/` objects.
#[derive(Clone, Serialize, Deserialize)]
pub struct MasterKey {
    #[serde(with = "hex_key")]
    pub data_key: [u8; 32],
    #[serde(with = "hex_key")]
    pub id_key: [u8; 32],
}

impl MasterKey {
    pub fn generate() -> MasterKey {
        let mut key = MasterKey {
            data_key: [0; 32],
            id_key: [0; 32],
        };
        fill_random(&mut key.data_key);
        fill_random(&mut key.id_key);
        key
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.data_key.zeroize();
        self.id_key.zeroize();
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

pub(crate) mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(key))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Seals and opens objects and computes blob ids for one repository.
pub struct Crypto {
    encryption: Encryption,
    key: MasterKey,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Crypto({})", self.encryption.name())
    }
}

impl Crypto {
    pub fn new(encryption: Encryption, key: MasterKey) -> Crypto {
        Crypto { encryption, key }
    }

    pub fn encryption(&self) -> Encryption {
        self.encryption
    }

    pub(crate) fn master_key(&self) -> &MasterKey {
        &self.key
    }

    /// Keyed BLAKE3 of plaintext: storage operators cannot confirm known content.
    pub fn blob_id(&self, plaintext: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.key.id_key, plaintext).as_bytes())
    }

    /// An incremental [`Crypto::blob_id`], for content fed in pieces.
    pub fn id_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.key.id_key)
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        seal_with(self.encryption, &self.key.data_key, plaintext)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(self.encryption, &self.key.data_key, sealed)
    }

    /// Bytes a sealed object adds to its plaintext.
    pub fn overhead(&self) -> usize {
        match self.encryption {
            Encryption::None => 1,
            Encryption::Xchacha20Poly1305 => 1 + 24 + 16,
            Encryption::Aes256Gcm => 1 + 12 + 16,
        }
    }
}

pub(crate) fn seal_with(encryption: Encryption, key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    // Encrypting into memory cannot fail for these AEADs except on absurd lengths
    // (> 64 GiB for GCM), which our blob and object sizes never reach.
    #[allow(clippy::expect_used)]
    match encryption {
        Encryption::None => {
            let mut out = Vec::with_capacity(plaintext.len() + 1);
            out.push(SCHEME_PLAIN);
            out.extend_from_slice(plaintext);
            out
        }
        Encryption::Xchacha20Poly1305 => {
            let mut nonce = [0u8; 24];
            fill_random(&mut nonce);
            let cipher = chacha20poly1305::XChaCha20Poly1305::new(key.into());
            let ct = cipher
                .encrypt(&nonce.into(), plaintext)
                .expect("xchacha20-poly1305 encryption");
            let mut out = Vec::with_capacity(1 + 24 + ct.len());
            out.push(SCHEME_XCHACHA20_POLY1305);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&ct);
            out
        }
        Encryption::Aes256Gcm => {
            let mut nonce = [0u8; 12];
            fill_random(&mut nonce);
            let cipher = aes_gcm::Aes256Gcm::new(key.into());
            let ct = cipher
                .encrypt(&nonce.into(), plaintext)
                .expect("aes-256-gcm encryption");
            let mut out = Vec::with_capacity(1 + 12 + ct.len());
            out.push(SCHEME_AES_256_GCM);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&ct);
            out
        }
    }
}

pub(crate) fn open_with(
    encryption: Encryption,
    key: &[u8; 32],
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let (&scheme, rest) = sealed.split_first().ok_or(CryptoError::Truncated)?;
    match scheme {
        SCHEME_PLAIN => {
            if encryption != Encryption::None {
                return Err(CryptoError::Downgrade);
            }
            Ok(rest.to_vec())
        }
        SCHEME_XCHACHA20_POLY1305 => {
            if rest.len() < 24 + 16 {
                return Err(CryptoError::Truncated);
            }
            let (nonce, ct) = rest.split_at(24);
            let cipher = chacha20poly1305::XChaCha20Poly1305::new(key.into());
            cipher
                .decrypt(chacha20poly1305::XNonce::from_slice(nonce), ct)
                .map_err(|_| CryptoError::Authentication)
        }
        SCHEME_AES_256_GCM => {
            if rest.len() < 12 + 16 {
                return Err(CryptoError::Truncated);
            }
            let (nonce, ct) = rest.split_at(12);
            let cipher = aes_gcm::Aes256Gcm::new(key.into());
            cipher
                .decrypt(aes_gcm::Nonce::from_slice(nonce), ct)
                .map_err(|_| CryptoError::Authentication)
        }
        other => Err(CryptoError::UnknownScheme(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        for enc in [
            Encryption::None,
            Encryption::Xchacha20Poly1305,
            Encryption::Aes256Gcm,
        ] {
            let crypto = Crypto::new(enc, MasterKey::generate());
            let sealed = crypto.seal(b"some plaintext");
            assert_eq!(sealed.len(), 14 + crypto.overhead());
            assert_eq!(crypto.open(&sealed).as_deref(), Ok(&b"some plaintext"[..]));
            if enc != Encryption::None {
                let mut bad = sealed.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert_eq!(crypto.open(&bad), Err(CryptoError::Authentication));
                let other = Crypto::new(enc, MasterKey::generate());
                assert_eq!(other.open(&sealed), Err(CryptoError::Authentication));
                let plain = seal_with(Encryption::None, &[0; 32], b"x");
                assert_eq!(crypto.open(&plain), Err(CryptoError::Downgrade));
            }
        }
    }

    #[test]
    fn blob_ids_are_keyed() {
        let a = Crypto::new(Encryption::None, MasterKey::generate());
        let b = Crypto::new(Encryption::None, MasterKey::generate());
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), Id::of_bytes(b"x"));
    }
}
