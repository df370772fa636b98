//! One retry helper with exponential backoff, used by every backend and caller.

use super::{ObjectMeta, PutOutcome, Storage, StorageResult};
use bytes::Bytes;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// Runs `op` until it succeeds, fails permanently, or the attempts are spent.
pub fn retry<T>(
    policy: RetryPolicy,
    what: &str,
    mut op: impl FnMut() -> StorageResult<T>,
) -> StorageResult<T> {
    let mut delay = policy.first_delay;
    let mut attempt = 1;
    loop {
        match op() {
            Err(err) if err.is_retryable() && attempt < policy.attempts => {
                tracing::warn!("{what}: {err}; retrying in {delay:?} (attempt {attempt})");
                std::thread::sleep(delay);
                delay = (delay * 2).min(policy.max_delay);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A decorator that retries transient failures of the wrapped backend.
#[derive(Debug)]
pub struct RetryingStorage<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S: Storage> RetryingStorage<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        RetryingStorage { inner, policy }
    }
}

impl<S: Storage> Storage for RetryingStorage<S> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put_if_absent(&self, key: &str, data: Bytes) -> StorageResult<PutOutcome> {
        retry(self.policy, key, || {
            self.inner.put_if_absent(key, data.clone())
        })
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        retry(self.policy, key, || self.inner.get(key))
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        retry(self.policy, key, || self.inner.get_range(key, offset, len))
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        retry(self.policy, prefix, || self.inner.list(prefix))
    }
    fn size(&self, key: &str) -> StorageResult<Option<u64>> {
        retry(self.policy, key, || self.inner.size(key))
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        retry(self.policy, key, || self.inner.delete(key))
    }
    fn read_ahead(&self, key: &str, offset: u64, len: u64) {
        self.inner.read_ahead(key, offset, len)
    }
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageError;
    use std::cell::Cell;

    fn transient() -> StorageError {
        StorageError::Transient {
            location: "x".into(),
            key: "k".into(),
            detail: "timeout".into(),
        }
    }

    #[test]
    fn retries_transient_then_succeeds() {
        let calls = Cell::new(0);
        let policy = RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let out = retry(policy, "k", || {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(transient())
            } else {
                Ok(7)
            }
        });
        assert_eq!(out.ok(), Some(7));
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let calls = Cell::new(0);
        let out: StorageResult<()> = retry(RetryPolicy::default(), "k", || {
            calls.set(calls.get() + 1);
            Err(StorageError::NotFound {
                location: "x".into(),
                key: "k".into(),
            })
        });
        assert!(out.is_err());
        assert_eq!(calls.get(), 1);
    }
}
