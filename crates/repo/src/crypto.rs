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

    /// [`Crypto::blob_id`] of a plaintext that arrives in pieces.
    pub fn blob_hasher(&self) -> blake3::Hasher {
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

/// [`Crypto::blob_id`] of a `len`-byte input hashed as pieces of `piece_len` bytes (a
/// power of two, at least BLAKE3's 1 KiB chunk) on any threads in any order: each piece
/// is a subtree of BLAKE3's own tree, merged as BLAKE3 merges them, so the id is the
/// same as hashing the whole input at once.
pub struct PieceHasher<'a> {
    crypto: &'a Crypto,
    len: u64,
    piece_len: u64,
    pieces: std::sync::Mutex<Vec<Option<[u8; 32]>>>,
}

impl<'a> PieceHasher<'a> {
    pub fn new(crypto: &'a Crypto, len: u64, piece_len: u64) -> PieceHasher<'a> {
        assert!(piece_len.is_power_of_two() && piece_len >= blake3::CHUNK_LEN as u64);
        let count = usize::try_from(len.div_ceil(piece_len).max(1)).unwrap_or(usize::MAX);
        PieceHasher {
            crypto,
            len,
            piece_len,
            pieces: std::sync::Mutex::new(vec![None; count]),
        }
    }

    /// Hashes the piece starting at `offset` (a multiple of the piece length).
    pub fn add(&self, offset: u64, piece: &[u8]) {
        let hash = if self.len <= self.piece_len {
            self.crypto.blob_id(piece).0
        } else {
            use blake3::hazmat::HasherExt;
            blake3::Hasher::new_keyed(&self.crypto.key.id_key)
                .set_input_offset(offset)
                .update(piece)
                .finalize_non_root()
        };
        let index = usize::try_from(offset / self.piece_len).unwrap_or(usize::MAX);
        let mut pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = pieces.get_mut(index) {
            *slot = Some(hash);
        }
    }

    /// The id; `None` when a piece was never added.
    pub fn finish(self) -> Option<Id> {
        let pieces = self.pieces.into_inner().unwrap_or_else(|e| e.into_inner());
        let pieces: Vec<[u8; 32]> = pieces.into_iter().collect::<Option<_>>()?;
        if self.len <= self.piece_len {
            return pieces.first().map(|hash| Id(*hash));
        }
        let mode = blake3::hazmat::Mode::KeyedHash(&self.crypto.key.id_key);
        let left_len = blake3::hazmat::left_subtree_len(self.len);
        let (left, right) = pieces.split_at((left_len / self.piece_len) as usize);
        let left = subtree(left, self.piece_len, left_len, mode);
        let right = subtree(right, self.piece_len, self.len - left_len, mode);
        Some(Id(*blake3::hazmat::merge_subtrees_root(
            &left, &right, mode,
        )
        .as_bytes()))
    }
}

/// The chaining value of `len` bytes hashed as `pieces`, split where BLAKE3 splits.
fn subtree(pieces: &[[u8; 32]], piece_len: u64, len: u64, mode: blake3::hazmat::Mode) -> [u8; 32] {
    if pieces.len() <= 1 {
        return pieces.first().copied().unwrap_or_default();
    }
    // Above one piece the left subtree is a power of two at least one piece long.
    let left_len = blake3::hazmat::left_subtree_len(len);
    let (left, right) = pieces.split_at((left_len / piece_len) as usize);
    blake3::hazmat::merge_subtrees_non_root(
        &subtree(left, piece_len, left_len, mode),
        &subtree(right, piece_len, len - left_len, mode),
        mode,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_hashes_equal_the_whole_input_hash() {
        let crypto = Crypto::new(Encryption::None, MasterKey::generate());
        let piece = 4096u64;
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
        for len in [
            0, 1, 1024, 1025, 4095, 4096, 4097, 8192, 12288, 12289, 16385, 28672, 40_000,
        ] {
            let input = &data[..len];
            let hasher = PieceHasher::new(&crypto, len as u64, piece);
            // Out of order, as threads deliver them.
            let offsets: Vec<usize> = (0..len.max(1)).step_by(piece as usize).collect();
            for &offset in offsets.iter().rev() {
                hasher.add(
                    offset as u64,
                    &input[offset..len.min(offset + piece as usize)],
                );
            }
            assert_eq!(hasher.finish(), Some(crypto.blob_id(input)), "len {len}");
        }
        let missing = PieceHasher::new(&crypto, 9000, piece);
        missing.add(0, &data[..4096]);
        assert_eq!(missing.finish(), None);
    }

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
