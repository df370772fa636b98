//! What the object-store backends (S3-compatible, Azure Blob) share: an OpenDAL operator
//! driven from synchronous callers, per-call deadlines, create-if-absent through the
//! service's conditional write, and error mapping to [`StorageError`].
//!
//! # Runtime
//!
//! The [`Storage`] trait is synchronous and is called from many threads at once. Every
//! object store shares one process-wide multi-thread tokio runtime (2 workers), driven
//! with `Runtime::block_on` from the calling thread; several threads may block on it at
//! the same time. One shared runtime (rather than one per storage) matters because
//! OpenDAL's HTTP client and its connection pool are process-global: connections created
//! on a runtime that was later dropped would fail on the next request. Calls made from
//! inside an async context are moved to a short-lived helper thread instead of panicking.
//!
//! # Retries and timeouts
//!
//! No retries here: wrap the storage in [`super::RetryingStorage`], which retries
//! [`StorageError::Transient`] failures. Each call has a deadline (`request_timeout`, 30 s
//! by default, plus one second per MiB sent for writes), so an unreachable endpoint fails
//! instead of hanging.

use super::{check_key, ObjectMeta, PutOutcome, Storage, StorageError, StorageResult};
use bytes::Bytes;
use opendal::{Buffer, ErrorKind, Operator};
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::runtime::Runtime;

/// Default deadline of one storage call (writes get more time per byte sent).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Writes get one extra second per this many bytes on top of the base deadline.
const WRITE_BYTES_PER_SECOND: usize = 1024 * 1024;

/// What differs between the object-store services.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Service {
    /// URL scheme, e.g. `s3`.
    pub scheme: &'static str,
    /// "bucket" or "container", for messages.
    pub container_word: &'static str,
    /// Error codes the service answers when the bucket/container does not exist.
    pub missing_container: &'static [&'static str],
    /// Largest payload one conditional write may carry; larger ones are refused rather
    /// than written without the condition.
    pub max_conditional_put: Option<usize>,
}

/// An OpenDAL operator rooted at `container/prefix`, as a [`Storage`].
pub struct ObjectStore {
    service: Service,
    container: String,
    prefix: String,
    /// Endpoint as used in messages.
    endpoint: String,
    timeout: Duration,
    op: Operator,
    runtime: &'static Runtime,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("scheme", &self.service.scheme)
            .field("container", &self.container)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

pub(crate) fn shared_runtime() -> Result<&'static Runtime, String> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("pgvault-io")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the object-store I/O runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A permanent configuration error for `scheme://container/prefix`.
pub(crate) fn config_error(
    scheme: &str,
    container: &str,
    prefix: &str,
    detail: String,
) -> StorageError {
    StorageError::Permanent {
        location: format!("{scheme}://{container}/{prefix}"),
        key: String::new(),
        detail,
    }
}

/// Checks a container name and prefix, returning the prefix without slashes at the ends.
pub(crate) fn checked_prefix(
    service: &Service,
    container: &str,
    prefix: &str,
) -> StorageResult<String> {
    let trimmed = prefix.trim_matches('/').to_string();
    if container.is_empty() {
        return Err(config_error(
            service.scheme,
            container,
            &trimmed,
            format!("missing {} name", service.container_word),
        ));
    }
    if !trimmed.is_empty() && check_key("", &trimmed).is_err() {
        return Err(config_error(
            service.scheme,
            container,
            &trimmed,
            format!("invalid prefix {prefix:?}"),
        ));
    }
    Ok(trimmed)
}

impl ObjectStore {
    /// An operator from a configured OpenDAL `builder` (rooted at `container/prefix`).
    pub(crate) fn new(
        service: Service,
        container: String,
        prefix: String,
        endpoint: String,
        timeout: Option<Duration>,
        builder: impl opendal::Builder,
    ) -> StorageResult<ObjectStore> {
        let error = |detail: String| config_error(service.scheme, &container, &prefix, detail);
        let op = Operator::new(builder)
            .map_err(|e| {
                error(format!(
                    "invalid {} configuration for {endpoint}: {e}",
                    service.scheme
                ))
            })?
            .finish();
        let runtime = shared_runtime().map_err(error)?;
        Ok(ObjectStore {
            service,
            container,
            prefix,
            endpoint,
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            op,
            runtime,
        })
    }

    /// Runs `fut` to completion on the shared runtime within `deadline`.
    fn run<T, F>(&self, what: &str, key: &str, deadline: Duration, fut: F) -> StorageResult<T>
    where
        F: Future<Output = opendal::Result<T>> + Send,
        T: Send,
    {
        let timed = async move { tokio::time::timeout(deadline, fut).await };
        let outcome = if tokio::runtime::Handle::try_current().is_ok() {
            // `block_on` panics inside an async context: block a helper thread instead.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| self.runtime.block_on(timed))
                    .join()
                    .map_err(|_| self.permanent(key, format!("{what}: I/O thread panicked")))
            })?
        } else {
            self.runtime.block_on(timed)
        };
        match outcome {
            Ok(result) => result.map_err(|e| self.map_err(what, key, e)),
            Err(_elapsed) => Err(StorageError::no_answer(
                self.location(),
                key,
                what,
                &self.endpoint,
                deadline,
            )),
        }
    }

    fn permanent(&self, key: &str, detail: String) -> StorageError {
        StorageError::Permanent {
            location: self.location(),
            key: key.to_string(),
            detail,
        }
    }

    fn map_err(&self, what: &str, key: &str, err: opendal::Error) -> StorageError {
        let location = self.location();
        let key = key.to_string();
        let text = err.to_string();
        let word = self.service.container_word;
        // A create answered "not found" can only mean the bucket is missing, whatever
        // words the service (or an emulator) uses for it.
        let missing_container = self
            .service
            .missing_container
            .iter()
            .any(|code| text.contains(code))
            || (what == "put" && err.kind() == ErrorKind::NotFound);
        match err.kind() {
            _ if missing_container => StorageError::Permanent {
                location,
                key,
                detail: format!(
                    "{word} {} does not exist at {}: create it first ({what} failed: {text})",
                    self.container, self.endpoint
                ),
            },
            ErrorKind::NotFound => StorageError::NotFound { location, key },
            ErrorKind::PermissionDenied => StorageError::PermissionDenied {
                location,
                key,
                detail: format!("{what} at {}: {text}", self.endpoint),
            },
            // Another conditional write on the same key is in flight (HTTP 409 on S3):
            // retrying then settles to Created or AlreadyExists.
            _ if err.is_temporary()
                || err.kind() == ErrorKind::RateLimited
                || text.contains("ConditionalRequestConflict") =>
            {
                StorageError::Transient {
                    location,
                    key,
                    detail: format!("{what} at {}: {text}", self.endpoint),
                }
            }
            _ => StorageError::Permanent {
                location,
                key,
                detail: format!(
                    "{what} on {word} {} at {}: {text}",
                    self.container, self.endpoint
                ),
            },
        }
    }

    fn check(&self, key: &str) -> StorageResult<()> {
        check_key(&self.location(), key)
    }
}

impl Storage for ObjectStore {
    fn location(&self) -> String {
        format!(
            "{}://{}/{}",
            self.service.scheme, self.container, self.prefix
        )
    }

    fn put_if_absent(&self, key: &str, data: Bytes) -> StorageResult<PutOutcome> {
        self.check(key)?;
        if let Some(max) = self.service.max_conditional_put {
            if data.len() > max {
                return Err(self.permanent(
                    key,
                    format!(
                        "object of {} bytes exceeds the {max} bytes one conditional upload \
                         allows; refusing an upload that could overwrite",
                        data.len()
                    ),
                ));
            }
        }
        let deadline =
            self.timeout + Duration::from_secs((data.len() / WRITE_BYTES_PER_SECOND) as u64);
        let body = Buffer::from(data);
        let fut = async {
            match self.op.write_with(key, body).if_not_exists(true).await {
                Ok(_) => Ok(PutOutcome::Created),
                Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Ok(PutOutcome::AlreadyExists),
                Err(e) => Err(e),
            }
        };
        self.run("put", key, deadline, fut)
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.check(key)?;
        let fut = async { self.op.read(key).await.map(|b| b.to_vec()) };
        self.run("get", key, self.timeout, fut)
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.check(key)?;
        let Some(end) = offset.checked_add(len) else {
            return Err(self.permanent(key, format!("range {offset}+{len} overflows")));
        };
        let beyond_end = |size: u64| {
            self.permanent(
                key,
                format!("range {offset}+{len} beyond object size {size}: the object is truncated or not what was expected"),
            )
        };
        if len == 0 {
            // An empty HTTP range cannot be expressed; only check that the object is there.
            return match self.size(key)? {
                Some(size) if offset <= size => Ok(Vec::new()),
                Some(size) => Err(beyond_end(size)),
                None => Err(StorageError::NotFound {
                    location: self.location(),
                    key: key.to_string(),
                }),
            };
        }
        let fut = async {
            self.op
                .read_with(key)
                .range(offset..end)
                .await
                .map(|b| b.to_vec())
        };
        match self.run("get range", key, self.timeout, fut) {
            Ok(bytes) if bytes.len() as u64 == len => Ok(bytes),
            Ok(bytes) => Err(beyond_end(offset + bytes.len() as u64)),
            Err(err @ (StorageError::NotFound { .. } | StorageError::Transient { .. })) => Err(err),
            Err(err) => match self.size(key) {
                // Services answer 416 (or a short body) for ranges past the end: say so.
                Ok(Some(size)) if end > size => Err(beyond_end(size)),
                _ => Err(err),
            },
        }
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        let fut = async {
            let entries = self.op.list_with(prefix).recursive(true).await?;
            Ok(entries
                .into_iter()
                .filter(|e| e.metadata().is_file() && !e.path().ends_with('/'))
                .filter(|e| e.path().starts_with(prefix))
                .map(|e| ObjectMeta {
                    size: e.metadata().content_length(),
                    modified: e.metadata().last_modified(),
                    key: e.path().to_string(),
                })
                .collect())
        };
        self.run("list", prefix, self.timeout, fut)
    }

    fn size(&self, key: &str) -> StorageResult<Option<u64>> {
        self.check(key)?;
        let fut = async {
            match self.op.stat(key).await {
                Ok(meta) => Ok(Some(meta.content_length())),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        self.run("stat", key, self.timeout, fut)
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        self.check(key)?;
        let fut = async {
            match self.op.delete(key).await {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        self.run("delete", key, self.timeout, fut)
    }
}
