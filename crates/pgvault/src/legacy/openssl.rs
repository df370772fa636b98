//! Streaming decryption of OpenSSL `enc` files: `Salted__` + 8-byte salt, then
//! AES-256-CBC with PKCS#7 padding; key and IV from `EVP_BytesToKey` (MD5 — OpenSSL
//! before 1.1.0 — or SHA-256, one iteration) or from PBKDF2-HMAC-SHA256 (`-pbkdf2 -iter N`).

use std::io::{self, Read};

use aes::cipher::{BlockDecryptMut, KeyIvInit};
use md5::Md5;
use sha2::{Digest, Sha256};

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

const MAGIC: &[u8; 8] = b"Salted__";
const BLOCK: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum OpensslError {
    #[error("not OpenSSL enc data (no \"Salted__\" header): check the source, or that the backup is encrypted")]
    NotOpenssl,
    #[error("the data ends in the middle of a cipher block: the last part is truncated")]
    Truncated,
    #[error("bad padding at the end of the data: wrong secret, or a damaged last part")]
    BadPadding,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// How the key and IV come from the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDerivation {
    /// `EVP_BytesToKey` with MD5 (`openssl enc -md md5`, OpenSSL < 1.1.0's default).
    Md5,
    /// `EVP_BytesToKey` with SHA-256 (OpenSSL ≥ 1.1.0's default without `-pbkdf2`).
    Sha256,
    /// `-pbkdf2 -iter N` (PBKDF2-HMAC-SHA256).
    Pbkdf2 { iterations: u32 },
}

impl std::fmt::Display for KeyDerivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyDerivation::Md5 => f.write_str("-md md5"),
            KeyDerivation::Sha256 => f.write_str("-md sha256"),
            KeyDerivation::Pbkdf2 { iterations } => write!(f, "-pbkdf2 -iter {iterations}"),
        }
    }
}

/// The 32-byte key and 16-byte IV for `secret` and `salt`.
pub fn derive(kind: KeyDerivation, secret: &[u8], salt: &[u8; 8]) -> ([u8; 32], [u8; 16]) {
    let mut material = [0u8; 48];
    match kind {
        KeyDerivation::Md5 => bytes_to_key::<Md5>(secret, salt, &mut material),
        KeyDerivation::Sha256 => bytes_to_key::<Sha256>(secret, salt, &mut material),
        KeyDerivation::Pbkdf2 { iterations } => {
            pbkdf2::pbkdf2_hmac::<Sha256>(secret, salt, iterations, &mut material)
        }
    }
    let mut key = [0u8; 32];
    let mut iv = [0u8; 16];
    key.copy_from_slice(&material[..32]);
    iv.copy_from_slice(&material[32..]);
    (key, iv)
}

/// `EVP_BytesToKey` with one iteration: D_i = H(D_{i-1} || secret || salt).
fn bytes_to_key<H: Digest>(secret: &[u8], salt: &[u8], out: &mut [u8]) {
    let mut previous: Vec<u8> = Vec::new();
    let mut filled = 0;
    while filled < out.len() {
        let mut hasher = H::new();
        hasher.update(&previous);
        hasher.update(secret);
        hasher.update(salt);
        previous = hasher.finalize().to_vec();
        let take = previous.len().min(out.len() - filled);
        out[filled..filled + take].copy_from_slice(&previous[..take]);
        filled += take;
    }
}

/// Reads the 16-byte header; returns the salt.
pub fn read_header(reader: &mut impl Read) -> Result<[u8; 8], OpensslError> {
    let mut header = [0u8; 16];
    reader.read_exact(&mut header).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => OpensslError::NotOpenssl,
        _ => OpensslError::Io(e),
    })?;
    if &header[..8] != MAGIC {
        return Err(OpensslError::NotOpenssl);
    }
    let mut salt = [0u8; 8];
    salt.copy_from_slice(&header[8..]);
    Ok(salt)
}

/// Whether a decrypted first block looks like what these backups hold: gzip, or text.
/// (When the data is a single block, its end is PKCS#7 padding.)
fn plausible(block: &[u8]) -> bool {
    let pad = usize::from(block[BLOCK - 1]);
    let content = if (1..=BLOCK).contains(&pad)
        && block[BLOCK - pad..].iter().all(|b| usize::from(*b) == pad)
    {
        &block[..BLOCK - pad]
    } else {
        block
    };
    content.starts_with(&[0x1f, 0x8b, 0x08])
        || content
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
}

/// Which derivation turns `first_block` into plausible plaintext, trying MD5, SHA-256
/// and PBKDF2 with OpenSSL's default 10 000 iterations (or `iterations`).
pub fn detect(
    secret: &[u8],
    salt: &[u8; 8],
    first_block: &[u8; 16],
    iterations: Option<u32>,
) -> Option<KeyDerivation> {
    let candidates = [
        KeyDerivation::Md5,
        KeyDerivation::Sha256,
        KeyDerivation::Pbkdf2 {
            iterations: iterations.unwrap_or(10_000),
        },
    ];
    candidates.into_iter().find(|kind| {
        let (key, iv) = derive(*kind, secret, salt);
        let mut block = aes::Block::clone_from_slice(first_block);
        Aes256CbcDec::new(&key.into(), &iv.into()).decrypt_block_mut(&mut block);
        plausible(&block)
    })
}

/// Decrypts the ciphertext after the header as it is read; checks the padding at the end.
pub struct Decryptor<R> {
    inner: R,
    cipher: Aes256CbcDec,
    /// Ciphertext read but not yet a whole block.
    pending: Vec<u8>,
    /// The last decrypted block, held back until we know whether it is the last.
    held: Option<[u8; BLOCK]>,
    ready: Vec<u8>,
    ready_at: usize,
    done: bool,
}

impl<R: Read> Decryptor<R> {
    pub fn new(inner: R, key: &[u8; 32], iv: &[u8; 16]) -> Decryptor<R> {
        Decryptor {
            inner,
            cipher: Aes256CbcDec::new(key.into(), iv.into()),
            pending: Vec::new(),
            held: None,
            ready: Vec::new(),
            ready_at: 0,
            done: false,
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.inner.read(&mut buf)?;
        self.ready.clear();
        self.ready_at = 0;
        if n == 0 {
            self.done = true;
            if !self.pending.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    OpensslError::Truncated,
                ));
            }
            let Some(last) = self.held.take() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    OpensslError::Truncated,
                ));
            };
            let pad = usize::from(last[BLOCK - 1]);
            if pad == 0 || pad > BLOCK || last[BLOCK - pad..].iter().any(|b| usize::from(*b) != pad)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    OpensslError::BadPadding,
                ));
            }
            self.ready.extend_from_slice(&last[..BLOCK - pad]);
            return Ok(());
        }
        self.pending.extend_from_slice(&buf[..n]);
        let whole = self.pending.len() / BLOCK * BLOCK;
        for chunk in self.pending[..whole].chunks_exact(BLOCK) {
            if let Some(previous) = self.held.take() {
                self.ready.extend_from_slice(&previous);
            }
            let mut block = aes::Block::clone_from_slice(chunk);
            self.cipher.decrypt_block_mut(&mut block);
            let mut plain = [0u8; BLOCK];
            plain.copy_from_slice(&block);
            self.held = Some(plain);
        }
        self.pending.drain(..whole);
        Ok(())
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.ready_at == self.ready.len() {
            if self.done {
                return Ok(0);
            }
            self.fill()?;
        }
        let n = out.len().min(self.ready.len() - self.ready_at);
        out[..n].copy_from_slice(&self.ready[self.ready_at..self.ready_at + n]);
        self.ready_at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::BlockEncryptMut;

    type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;

    /// What `openssl enc -aes-256-cbc -salt` writes, for the round trip.
    fn encrypt(kind: KeyDerivation, secret: &[u8], salt: [u8; 8], plain: &[u8]) -> Vec<u8> {
        let (key, iv) = derive(kind, secret, &salt);
        let mut data = plain.to_vec();
        let pad = BLOCK - data.len() % BLOCK;
        data.extend(std::iter::repeat_n(pad as u8, pad));
        let mut cipher = Aes256CbcEnc::new(&key.into(), &iv.into());
        for chunk in data.chunks_exact_mut(BLOCK) {
            cipher.encrypt_block_mut(aes::Block::from_mut_slice(chunk));
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&salt);
        out.extend_from_slice(&data);
        out
    }

    fn decrypt(data: &[u8], secret: &[u8]) -> Result<(KeyDerivation, Vec<u8>), String> {
        let mut reader = data;
        let salt = read_header(&mut reader).map_err(|e| e.to_string())?;
        let first: [u8; 16] = reader
            .get(..16)
            .and_then(|b| b.try_into().ok())
            .ok_or("short")?;
        let kind = detect(secret, &salt, &first, None).ok_or("wrong secret")?;
        let (key, iv) = derive(kind, secret, &salt);
        let mut out = Vec::new();
        Decryptor::new(reader, &key, &iv)
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        Ok((kind, out))
    }

    #[test]
    fn keys_match_the_openssl_cli() {
        // openssl enc -aes-256-cbc {-md md5 | -md sha256 | -pbkdf2 -iter 1000}
        //   -pass pass:secret -S 0102030405060708 -P
        let salt = [1, 2, 3, 4, 5, 6, 7, 8];
        for (kind, key, iv) in [
            (
                KeyDerivation::Md5,
                "c9e5a1bd216dbe1317e230cef48f38ee7f0e17ad64022144bccec4a1aa2879ab",
                "e24b32bbbc4ef02ecbcb6576523ad893",
            ),
            (
                KeyDerivation::Sha256,
                "03b375940cb96c16f84faa87f5ef39cc0bc7066ccd3e14456d9d74e438e35832",
                "904aebc6e588fdb49fd15806bb4fee6f",
            ),
            (
                KeyDerivation::Pbkdf2 { iterations: 1000 },
                "d9bf4f8b9d6a9ca73fb33112ebed290a4c6df9017a23add035fea1a1d83b5db8",
                "7d886027e8e4c75b0f8660dcf9c281e3",
            ),
        ] {
            let (k, i) = derive(kind, b"secret", &salt);
            assert_eq!(
                (hex::encode(k), hex::encode(i)),
                (key.to_string(), iv.to_string()),
                "{kind}"
            );
        }
    }

    #[test]
    fn round_trips_for_every_derivation_and_size() {
        let plain: Vec<u8> = (0..100_000u32)
            .map(|i| b"SELECT 1;\n"[(i % 10) as usize])
            .collect();
        for kind in [
            KeyDerivation::Md5,
            KeyDerivation::Sha256,
            KeyDerivation::Pbkdf2 { iterations: 10_000 },
        ] {
            for len in [0, 1, 15, 16, 17, 65_536, 100_000] {
                let data = encrypt(kind, b"pw", [9; 8], &plain[..len]);
                let (found, out) = decrypt(&data, b"pw").expect("decrypt");
                assert_eq!(found, kind);
                assert_eq!(out, &plain[..len], "{kind} {len}");
            }
        }
    }

    #[test]
    fn wrong_secret_truncation_and_foreign_data_are_named() {
        let data = encrypt(
            KeyDerivation::Md5,
            b"pw",
            [3; 8],
            b"CREATE ROLE x;\n-- more text here\n",
        );
        assert_eq!(decrypt(&data, b"other"), Err("wrong secret".into()));
        let err = decrypt(&data[..data.len() - 5], b"pw").expect_err("truncated");
        assert!(err.contains("truncated"), "{err}");
        let err = decrypt(b"\x1f\x8b\x08 plain gzip, not encrypted", b"pw").expect_err("foreign");
        assert!(err.contains("Salted__"), "{err}");
        let mut bad_tail = data.clone();
        let n = bad_tail.len();
        bad_tail[n - 1] ^= 0x55;
        let err = decrypt(&bad_tail, b"pw").expect_err("bad padding");
        assert!(err.contains("padding"), "{err}");
    }
}
