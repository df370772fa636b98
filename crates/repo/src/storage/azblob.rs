//! Azure Blob Storage backend, built on OpenDAL's azblob service.
//!
//! # Create-if-absent
//!
//! Objects are published with `Put Blob` (or, for large ones, a block list commit)
//! carrying `If-None-Match: *`: the service either stores the whole blob under a free
//! name or answers 409/412 (mapped to [`PutOutcome::AlreadyExists`]). Uncommitted blocks
//! of an interrupted upload are never visible as a blob.
//!
//! # Credentials
//!
//! In order: a connection string (config `azure-connection-string-file`, else
//! `AZURE_STORAGE_CONNECTION_STRING`), else account and key (`AZURE_STORAGE_ACCOUNT`,
//! `AZURE_STORAGE_KEY`) or a SAS token (`AZURE_STORAGE_SAS_TOKEN`), with the endpoint
//! from `AZURE_STORAGE_ENDPOINT` or `https://<account>.blob.core.windows.net`.

use super::object::{checked_prefix, config_error, env_nonempty, ObjectStore, Service};
use super::{ObjectMeta, PutOutcome, Storage, StorageResult};
use std::time::Duration;

const SERVICE: Service = Service {
    scheme: "azblob",
    container_word: "container",
    missing_container: &["ContainerNotFound"],
    max_conditional_put: None,
};

/// Connection settings for an Azure Blob container.
#[derive(Debug, Clone, Default)]
pub struct AzblobConfig {
    pub container: String,
    /// Blob name prefix ("" for the container root), without slashes at the ends.
    pub prefix: String,
    /// A full connection string; when set, the fields below are not used.
    pub connection_string: Option<String>,
    pub account_name: Option<String>,
    pub account_key: Option<String>,
    pub sas_token: Option<String>,
    /// e.g. `http://127.0.0.1:10000/devstoreaccount1` for Azurite.
    pub endpoint: Option<String>,
    /// Deadline of one call; `None` means 30 s. Writes get one more second per MiB.
    pub request_timeout: Option<Duration>,
}

/// The `BlobEndpoint` (or the account's default endpoint) of a connection string.
fn connection_string_endpoint(conn: &str) -> Option<String> {
    let field = |name: &str| {
        conn.split(';')
            .filter_map(|part| part.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    field("BlobEndpoint").or_else(|| {
        let account = field("AccountName")?;
        let suffix = field("EndpointSuffix").unwrap_or_else(|| "core.windows.net".into());
        let protocol = field("DefaultEndpointsProtocol").unwrap_or_else(|| "https".into());
        Some(format!("{protocol}://{account}.blob.{suffix}"))
    })
}

/// An Azure Blob container under a prefix.
#[derive(Debug)]
pub struct AzblobStorage(ObjectStore);

impl AzblobStorage {
    pub fn new(config: AzblobConfig) -> StorageResult<AzblobStorage> {
        let container = config.container.clone();
        let prefix = checked_prefix(&SERVICE, &container, &config.prefix)?;
        let config_error =
            |detail: String| config_error(SERVICE.scheme, &container, &prefix, detail);
        let connection_string = config
            .connection_string
            .clone()
            .or_else(|| env_nonempty("AZURE_STORAGE_CONNECTION_STRING"));
        let (builder, endpoint) = match connection_string {
            Some(conn) => {
                let builder = opendal::services::Azblob::from_connection_string(&conn)
                    .map_err(|e| config_error(format!("invalid Azure connection string: {e}")))?;
                let endpoint = connection_string_endpoint(&conn).unwrap_or_default();
                (builder, endpoint)
            }
            None => {
                let account = config
                    .account_name
                    .clone()
                    .or_else(|| env_nonempty("AZURE_STORAGE_ACCOUNT"))
                    .ok_or_else(|| {
                        config_error(
                            "no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING, azure-connection-string-file, or AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN"
                                .to_string(),
                        )
                    })?;
                let endpoint = config
                    .endpoint
                    .clone()
                    .or_else(|| env_nonempty("AZURE_STORAGE_ENDPOINT"))
                    .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
                let mut builder = opendal::services::Azblob::default()
                    .account_name(&account)
                    .endpoint(&endpoint);
                if let Some(key) = config
                    .account_key
                    .clone()
                    .or_else(|| env_nonempty("AZURE_STORAGE_KEY"))
                {
                    builder = builder.account_key(&key);
                }
                if let Some(sas) = config
                    .sas_token
                    .clone()
                    .or_else(|| env_nonempty("AZURE_STORAGE_SAS_TOKEN"))
                {
                    builder = builder.sas_token(&sas);
                }
                (builder, endpoint)
            }
        };
        let builder = builder.container(&container).root(&format!("/{prefix}"));
        Ok(AzblobStorage(ObjectStore::new(
            SERVICE,
            container,
            prefix,
            endpoint,
            config.request_timeout,
            builder,
        )?))
    }
}

super::delegate_storage!(AzblobStorage);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_of_a_connection_string() {
        assert_eq!(
            connection_string_endpoint(
                "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:10000/dev;"
            )
            .as_deref(),
            Some("http://127.0.0.1:10000/dev")
        );
        assert_eq!(
            connection_string_endpoint("AccountName=acct;AccountKey=a2V5").as_deref(),
            Some("https://acct.blob.core.windows.net")
        );
    }
}
