//! SFTP backend: an SSH backup server, reached with the system's OpenSSH client (through
//! `openssh-sftp-client`), key authentication and strict host key checking.
//!
//! # Publishing protocol
//!
//! The same as the local backend's, over SFTP: write `.tmp-<random>` next to the target,
//! `fsync@openssh.com` it, then `hardlink@openssh.com` it to the final name — which fails
//! when the name exists, so an object is never replaced — and remove the temporary. A
//! dropped connection leaves at most a `.tmp-*` file, which listings skip. Servers without
//! the hardlink extension are refused: a plain SFTP rename may replace on some servers.
//! SFTP cannot fsync a directory; the server's file system journals the new name (ext4,
//! XFS: within its commit interval).
//!
//! # Access
//!
//! Works with a chrooted, `internal-sftp`-only account that sees nothing but its own
//! directory: no shell commands are run. Keys come from the `sftp-key` file (or the
//! SSH agent), host keys from the `sftp-known-hosts` file (or `~/.ssh/known_hosts`); an
//! unknown host key is refused, never trusted on first use.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use openssh::{ControlPersist, KnownHosts, SessionBuilder};
use openssh_sftp_client::error::{Error as SftpError, SftpErrorKind};
use openssh_sftp_client::{Sftp, SftpOptions};
use tokio::io::AsyncSeekExt;
use tokio::runtime::Runtime;

use super::local::{random_suffix, TEMP_PREFIX};
use super::object::{shared_runtime, DEFAULT_TIMEOUT};
use super::{check_key, ObjectMeta, PutOutcome, Storage, StorageError, StorageResult};

/// Where and how to reach the SFTP server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SftpConfig {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// Directory on the server holding the repository (as the account sees it).
    pub path: String,
    /// Private key file; `None` leaves it to the SSH agent and `~/.ssh`.
    pub key_file: Option<PathBuf>,
    /// known_hosts file; `None` uses `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
    /// Deadline of one call; `None` means 30 s. Writes get one more second per MiB.
    pub request_timeout: Option<Duration>,
}

/// An SFTP directory as a [`Storage`].
pub struct SftpStorage {
    config: SftpConfig,
    root: PathBuf,
    timeout: Duration,
    runtime: &'static Runtime,
    /// The open session, dropped after a connection failure so the next call reconnects.
    sftp: tokio::sync::Mutex<Option<Arc<Sftp>>>,
    /// Directories known to exist, to spare a round trip per object.
    made_dirs: Mutex<HashSet<PathBuf>>,
}

/// How long an ssh master with no session open waits before it exits.
const MASTER_IDLE_SECONDS: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(10) {
    Some(seconds) => seconds,
    None => panic!("zero"),
};

/// Ends the SSH connection with the storage, so that the ssh master exits now rather
/// than when it has been idle long enough.
impl Drop for SftpStorage {
    fn drop(&mut self) {
        let Some(sftp) = self.sftp.get_mut().take() else {
            return;
        };
        // Still shared (a request in flight elsewhere), or dropped on the runtime's own
        // threads where it cannot be waited for: the idle timeout ends it.
        let Ok(sftp) = Arc::try_unwrap(sftp) else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        // On a task of its own: the crate's close can panic (it unwraps its session
        // handle, which it sometimes still shares), and a panic here would fail a
        // command whose work is done. The idle timeout then ends the master.
        let closing = self.runtime.spawn(sftp.close());
        let closed = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), closing).await });
        match closed {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::debug!("closing the SFTP session to {}: {e}", self.config.host);
            }
            Ok(Err(e)) => tracing::debug!(
                "closing the SFTP session to {} failed: {e}",
                self.config.host
            ),
            Err(_elapsed) => {
                tracing::debug!("closing the SFTP session to {} timed out", self.config.host)
            }
        }
    }
}

impl std::fmt::Debug for SftpStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftpStorage")
            .field("location", &self.location())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What an operation can fail with, before it is mapped to a [`StorageError`].
enum OpError {
    Sftp(SftpError),
    /// A precondition the caller explains (e.g. a missing server extension).
    Refused(String),
}

impl From<SftpError> for OpError {
    fn from(e: SftpError) -> Self {
        OpError::Sftp(e)
    }
}

type OpResult<T> = Result<T, OpError>;

fn is_not_found(e: &SftpError) -> bool {
    matches!(e, SftpError::SftpError(SftpErrorKind::NoSuchFile, _))
}

fn is_permission_denied(e: &SftpError) -> bool {
    matches!(e, SftpError::SftpError(SftpErrorKind::PermDenied, _))
}

impl SftpStorage {
    pub fn new(config: SftpConfig) -> StorageResult<SftpStorage> {
        let location = location_of(&config);
        let permanent = |detail: String| StorageError::Permanent {
            location: location.clone(),
            key: String::new(),
            detail,
        };
        if config.host.is_empty() {
            return Err(permanent(
                "missing host (sftp://user@host[:port]/path)".into(),
            ));
        }
        if !config.path.starts_with('/') {
            return Err(permanent(format!(
                "the path {:?} must be absolute (sftp://user@host/path)",
                config.path
            )));
        }
        for (what, file) in [
            ("sftp-key", &config.key_file),
            ("sftp-known-hosts", &config.known_hosts),
        ] {
            if let Some(file) = file {
                if !file.is_file() {
                    return Err(permanent(format!(
                        "{what} file {} does not exist",
                        file.display()
                    )));
                }
            }
        }
        let runtime = shared_runtime().map_err(permanent)?;
        Ok(SftpStorage {
            root: PathBuf::from(&config.path),
            timeout: config.request_timeout.unwrap_or(DEFAULT_TIMEOUT),
            config,
            runtime,
            sftp: tokio::sync::Mutex::new(None),
            made_dirs: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, key: &str) -> StorageResult<PathBuf> {
        check_key(&self.location(), key)?;
        Ok(self.root.join(key))
    }

    async fn connection(&self) -> Result<Arc<Sftp>, StorageError> {
        let mut slot = self.sftp.lock().await;
        if let Some(sftp) = slot.as_ref() {
            return Ok(sftp.clone());
        }
        let mut builder = SessionBuilder::default();
        builder
            .known_hosts_check(KnownHosts::Strict)
            .control_directory(std::env::temp_dir())
            .connect_timeout(Duration::from_secs(15))
            .server_alive_interval(Duration::from_secs(15))
            // The ssh master outlives this process if it is killed or never closes the
            // session (the crate's default keeps it forever): with one process per
            // archived segment they would pile up. Idle, it ends by itself.
            .control_persist(ControlPersist::IdleFor(MASTER_IDLE_SECONDS));
        if let Some(user) = &self.config.user {
            builder.user(user.clone());
        }
        if let Some(port) = self.config.port {
            builder.port(port);
        }
        if let Some(key) = &self.config.key_file {
            builder.keyfile(key);
        }
        if let Some(known_hosts) = &self.config.known_hosts {
            builder.user_known_hosts_file(known_hosts);
        }
        let session = builder
            .connect(&self.config.host)
            .await
            .map_err(|e| self.connect_error(error_chain(&e)))?;
        let sftp = Sftp::from_session(session, SftpOptions::default())
            .await
            .map_err(|e| self.connect_error(error_chain(&e)))?;
        let sftp = Arc::new(sftp);
        *slot = Some(sftp.clone());
        Ok(sftp)
    }

    fn connect_error(&self, text: String) -> StorageError {
        let location = self.location();
        let key = String::new();
        let host = &self.config.host;
        let text = text.trim().replace('\n', " ");
        if text.contains("Host key verification failed")
            || text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        {
            let port = self.config.port.unwrap_or(22);
            return StorageError::Permanent {
                location,
                key,
                detail: format!(
                    "the host key of {host} is unknown or changed: check it and add it to the known_hosts file (sftp-known-hosts), e.g. `ssh-keyscan -p {port} {host} >> FILE` ({text})"
                ),
            };
        }
        if text.contains("Permission denied") {
            return StorageError::PermissionDenied {
                location,
                key,
                detail: format!("{host} refused the key (check sftp-key and the account's authorized_keys): {text}"),
            };
        }
        if text.contains("Could not resolve hostname") {
            return StorageError::Permanent {
                location,
                key,
                detail: format!("cannot resolve host {host}: {text}"),
            };
        }
        StorageError::Transient {
            location,
            key,
            detail: format!("cannot connect to {host}: {text}"),
        }
    }

    fn map_err(&self, what: &str, key: &str, err: OpError) -> StorageError {
        let location = self.location();
        let key = key.to_string();
        match err {
            OpError::Refused(detail) => StorageError::Permanent {
                location,
                key,
                detail,
            },
            OpError::Sftp(e) if is_not_found(&e) => StorageError::NotFound { location, key },
            OpError::Sftp(e) if is_permission_denied(&e) => StorageError::PermissionDenied {
                location,
                key,
                detail: format!("{what}: {e}"),
            },
            // The server answered: retrying the same request will not help (a full disk
            // is reported as a generic failure by SFTP v3).
            OpError::Sftp(e @ SftpError::SftpError(..)) => StorageError::Permanent {
                location,
                key,
                detail: format!("{what}: {e}"),
            },
            // Connection-level trouble: reconnect on the next call.
            OpError::Sftp(e) => StorageError::Transient {
                location,
                key,
                detail: format!("{what}: {e}"),
            },
        }
    }

    /// Runs `op` on the shared runtime within `deadline`; drops the session after a
    /// connection-level failure.
    fn run<'f, T: Send + 'f>(
        &self,
        what: &str,
        key: &str,
        deadline: Duration,
        op: impl FnOnce(Arc<Sftp>) -> BoxFuture<'f, OpResult<T>> + Send,
    ) -> StorageResult<T> {
        let work = async {
            let sftp = self.connection().await?;
            let outcome = tokio::time::timeout(deadline, op(sftp)).await;
            let failed_connection = match &outcome {
                Ok(Err(OpError::Sftp(e))) => !matches!(e, SftpError::SftpError(..)),
                Err(_) => true,
                _ => false,
            };
            if failed_connection {
                *self.sftp.lock().await = None;
            }
            match outcome {
                Ok(result) => result.map_err(|e| self.map_err(what, key, e)),
                Err(_elapsed) => Err(StorageError::no_answer(
                    self.location(),
                    key,
                    what,
                    &self.config.host,
                    deadline,
                )),
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // `block_on` panics inside an async context: block a helper thread instead.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| self.runtime.block_on(work))
                    .join()
                    .unwrap_or_else(|_| {
                        Err(StorageError::Permanent {
                            location: self.location(),
                            key: key.to_string(),
                            detail: format!("{what}: I/O thread panicked"),
                        })
                    })
            })
        } else {
            self.runtime.block_on(work)
        }
    }

    /// Creates `dir` and its missing parents under the root.
    async fn make_dirs(&self, sftp: &Sftp, dir: &Path) -> OpResult<()> {
        let known = |d: &Path| {
            self.made_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(d)
        };
        if known(dir) {
            return Ok(());
        }
        let mut fs = sftp.fs();
        let mut current = PathBuf::new();
        for part in dir.components() {
            current.push(part);
            if current.as_os_str() == "/" || known(&current) {
                continue;
            }
            if let Err(e) = fs.create_dir(&current).await {
                // Exists already (SFTP v3 says only "failure"), or a real error.
                match fs.metadata(&current).await {
                    Ok(meta) if meta.file_type().is_some_and(|t| t.is_dir()) => {}
                    _ => return Err(e.into()),
                }
            }
            self.made_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(current.clone());
        }
        Ok(())
    }

    async fn publish(&self, sftp: &Sftp, path: &Path, data: &[u8]) -> OpResult<PutOutcome> {
        if !sftp.support_hardlink() {
            return Err(OpError::Refused(
                "the server lacks the hardlink@openssh.com extension, needed to create objects without replacing them (use OpenSSH's sftp-server or internal-sftp)".into(),
            ));
        }
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.make_dirs(sftp, &dir).await?;
        let temporary = dir.join(format!("{TEMP_PREFIX}{}", random_suffix()));
        let mut file = sftp
            .options()
            .write(true)
            .create_new(true)
            .open(&temporary)
            .await?;
        let written = async {
            file.write_all(data).await?;
            if sftp.support_fsync() {
                file.sync_all().await?;
            }
            file.close().await
        }
        .await;
        let mut fs = sftp.fs();
        if let Err(e) = written {
            let _ = fs.remove_file(&temporary).await;
            return Err(e.into());
        }
        let linked = fs.hard_link(&temporary, path).await;
        let _ = fs.remove_file(&temporary).await;
        match linked {
            Ok(()) => Ok(PutOutcome::Created),
            Err(e) => match fs.metadata(path).await {
                Ok(_) => Ok(PutOutcome::AlreadyExists),
                Err(_) => Err(e.into()),
            },
        }
    }
}

/// An error and its sources, e.g. the SSH client's own message behind "failed to connect".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn location_of(config: &SftpConfig) -> String {
    let user = config
        .user
        .as_deref()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let port = config.port.map(|p| format!(":{p}")).unwrap_or_default();
    format!("sftp://{user}{}{port}{}", config.host, config.path)
}

/// Parses `user@host[:port]/path` (what follows `sftp://`).
pub fn parse_sftp_url(rest: &str) -> Result<SftpConfig, String> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((user, host)) => (Some(user.to_string()), host),
        None => (None, authority),
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => (
            host,
            Some(
                port.parse::<u16>()
                    .map_err(|_| format!("invalid port {port:?}"))?,
            ),
        ),
        None => (host_port, None),
    };
    if host.is_empty() {
        return Err("missing host (sftp://user@host[:port]/path)".into());
    }
    Ok(SftpConfig {
        user,
        host: host.to_string(),
        port,
        path: match path.trim_end_matches('/') {
            "" => "/".to_string(),
            trimmed => trimmed.to_string(),
        },
        ..SftpConfig::default()
    })
}

impl Storage for SftpStorage {
    fn location(&self) -> String {
        location_of(&self.config)
    }

    fn put_if_absent(&self, key: &str, data: Bytes) -> StorageResult<PutOutcome> {
        let path = self.path(key)?;
        let data: &[u8] = &data;
        let deadline = self.timeout + Duration::from_secs((data.len() / (1024 * 1024)) as u64);
        self.run("put", key, deadline, |sftp| {
            Box::pin(async move { self.publish(&sftp, &path, data).await })
        })
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        let path = self.path(key)?;
        self.run("get", key, self.timeout, |sftp| {
            Box::pin(async move {
                let bytes = sftp.fs().read(&path).await?;
                Ok(bytes.to_vec())
            })
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        let path = self.path(key)?;
        let location = self.location();
        let wanted = usize::try_from(len).map_err(|_| StorageError::Permanent {
            location: location.clone(),
            key: key.to_string(),
            detail: format!("range of {len} bytes is too large"),
        })?;
        let read = self.run("get range", key, self.timeout, |sftp| {
            Box::pin(async move {
                let mut file = sftp.open(&path).await?;
                let size = file.metadata().await?.len().unwrap_or(0);
                if offset.saturating_add(len) > size {
                    return Ok(Err(size));
                }
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(SftpError::from)?;
                let bytes = file.read_all(wanted, bytes::BytesMut::new()).await?;
                Ok(Ok(bytes.to_vec()))
            })
        })?;
        read.map_err(|size| StorageError::Permanent {
            location,
            key: key.to_string(),
            detail: format!(
                "range {offset}+{len} beyond object size {size}: the object is truncated or not what was expected"
            ),
        })
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_part)?
        };
        let root = self.root.clone();
        let deadline = self.timeout * 10;
        self.run("list", prefix, deadline, |sftp| {
            Box::pin(async move {
                let mut out = Vec::new();
                let mut stack = vec![start];
                while let Some(dir) = stack.pop() {
                    let mut fs = sftp.fs();
                    let handle = match fs.open_dir(&dir).await {
                        Ok(handle) => handle,
                        Err(e) if is_not_found(&e) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    let mut entries = std::pin::pin!(handle.read_dir());
                    while let Some(entry) = entries.next().await {
                        let entry = entry?;
                        let name = entry.filename().to_string_lossy().into_owned();
                        if name == "." || name == ".." || name.starts_with(TEMP_PREFIX) {
                            continue;
                        }
                        let path = dir.join(&name);
                        let meta = entry.metadata();
                        if meta.file_type().is_some_and(|t| t.is_dir()) {
                            stack.push(path);
                            continue;
                        }
                        let Ok(relative) = path.strip_prefix(&root) else {
                            continue;
                        };
                        let key = relative.to_string_lossy().into_owned();
                        if !key.starts_with(prefix) {
                            continue;
                        }
                        out.push(ObjectMeta {
                            key,
                            size: meta.len().unwrap_or(0),
                            modified: meta
                                .modified()
                                .map(|t| chrono::DateTime::<chrono::Utc>::from(t.as_system_time())),
                        });
                    }
                }
                Ok(out)
            })
        })
    }

    fn size(&self, key: &str) -> StorageResult<Option<u64>> {
        let path = self.path(key)?;
        self.run("stat", key, self.timeout, |sftp| {
            Box::pin(async move {
                match sftp.fs().metadata(&path).await {
                    Ok(meta) => Ok(Some(meta.len().unwrap_or(0))),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            })
        })
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        let path = self.path(key)?;
        self.run("delete", key, self.timeout, |sftp| {
            Box::pin(async move {
                match sftp.fs().remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sftp_urls() {
        let c = parse_sftp_url("backup@host.example:2222/srv/pg").expect("parse");
        assert_eq!(
            (c.user.as_deref(), c.host.as_str(), c.port, c.path.as_str()),
            (Some("backup"), "host.example", Some(2222), "/srv/pg")
        );
        let c = parse_sftp_url("host/").expect("parse");
        assert_eq!((c.user, c.port, c.path.as_str()), (None, None, "/"));
        assert!(parse_sftp_url("u@:22/x").is_err());
        assert!(parse_sftp_url("u@h:port/x").is_err());
    }
}
