//! Key files: the master key wrapped by a passphrase-derived key.
//!
//! ```text
//! keys/<id>  JSON { version, created, hostname, username, kdf: {argon2id params, salt},
//!                  wrapped: hex(seal_xchacha20(kek, json(MasterKey))) }
//! ```
//! Several key files may wrap the same master key (one per passphrase). Changing or
//! adding a passphrase writes a key file; no data is re-encrypted.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{fill_random, open_with, seal_with, Encryption, MasterKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// Argon2id with 64 MiB and 3 passes: about a quarter second per unlock attempt.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Kdf {
    pub algorithm: String,
    #[serde(flatten)]
    pub params: KdfParams,
    pub salt: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub created: DateTime<Utc>,
    pub hostname: String,
    pub username: String,
    pub kdf: Kdf,
    pub wrapped: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file is malformed: {0}")]
    Malformed(String),
    #[error("unsupported key derivation {0:?}")]
    UnsupportedKdf(String),
    #[error("passphrase does not open this key")]
    WrongPassphrase,
}

fn derive(
    passphrase: &str,
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let argon_params = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(32),
    )
    .map_err(|e| KeyError::Malformed(e.to_string()))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut kek = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, kek.as_mut())
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    Ok(kek)
}

impl KeyFile {
    pub fn wrap(
        master: &MasterKey,
        passphrase: &str,
        params: KdfParams,
    ) -> Result<KeyFile, KeyError> {
        let mut salt = [0u8; 16];
        fill_random(&mut salt);
        let kek = derive(passphrase, &salt, params)?;
        let plain = Zeroizing::new(
            serde_json::to_vec(master).map_err(|e| KeyError::Malformed(e.to_string()))?,
        );
        let wrapped = seal_with(Encryption::Xchacha20Poly1305, &kek, &plain);
        Ok(KeyFile {
            version: 1,
            created: Utc::now(),
            hostname: crate::hostname(),
            username: std::env::var("USER").unwrap_or_default(),
            kdf: Kdf {
                algorithm: "argon2id".into(),
                params,
                salt: hex::encode(salt),
            },
            wrapped: hex::encode(wrapped),
        })
    }

    pub fn unwrap_key(&self, passphrase: &str) -> Result<MasterKey, KeyError> {
        if self.kdf.algorithm != "argon2id" {
            return Err(KeyError::UnsupportedKdf(self.kdf.algorithm.clone()));
        }
        let salt = hex::decode(&self.kdf.salt).map_err(|e| KeyError::Malformed(e.to_string()))?;
        let wrapped = hex::decode(&self.wrapped).map_err(|e| KeyError::Malformed(e.to_string()))?;
        let kek = derive(passphrase, &salt, self.kdf.params)?;
        let plain = Zeroizing::new(
            open_with(Encryption::Xchacha20Poly1305, &kek, &wrapped)
                .map_err(|_| KeyError::WrongPassphrase)?,
        );
        serde_json::from_slice(&plain).map_err(|e| KeyError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn wraps_and_unwraps() {
        let master = MasterKey::generate();
        let file = KeyFile::wrap(&master, "correct horse", FAST).expect("wrap");
        let back = file.unwrap_key("correct horse").expect("unwrap");
        assert_eq!(back.data_key, master.data_key);
        assert_eq!(back.id_key, master.id_key);
        assert!(matches!(
            file.unwrap_key("wrong"),
            Err(KeyError::WrongPassphrase)
        ));
        let json = serde_json::to_string(&file).expect("json");
        assert!(!json.contains(&hex::encode(master.data_key)));
    }
}
