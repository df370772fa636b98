//! Repository locks: shared for writers (backup, push), exclusive for gc and expire.
//!
//! A lock is an object `locks/<random id>` describing its holder. Objects are never
//! rewritten, so the heartbeat writes a fresh lock object and deletes the previous one.
//! A lock is stale when its heartbeat is older than [`STALE_AFTER`], or when it was taken
//! on this host by a process that no longer exists.
//!
//! A lock may also name a scope (e.g. the backup of one cluster): two live locks of the
//! same scope conflict whatever their kind, so that a second backup of a cluster started
//! while one runs (an overlapping cron job) is refused instead of doubling the work.
//!
//! Acquiring: write our lock, then list; if a conflicting live lock exists, delete ours
//! and fail. Two racing acquirers may both back off, never both proceed.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::storage::DynStorage;

pub const HEARTBEAT: Duration = Duration::from_secs(60);
pub const STALE_AFTER: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Shared,
    Exclusive,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockInfo {
    pub kind: LockKind,
    pub hostname: String,
    pub pid: u32,
    pub command: String,
    /// What only one holder at a time may do; older versions ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub created: DateTime<Utc>,
    pub refreshed: DateTime<Utc>,
}

impl LockInfo {
    fn conflicts_with(&self, other: &LockInfo) -> bool {
        self.kind == LockKind::Exclusive
            || other.kind == LockKind::Exclusive
            || (self.scope.is_some() && self.scope == other.scope)
    }

    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        let age = (now - self.refreshed).to_std().unwrap_or_default();
        if age > STALE_AFTER {
            return true;
        }
        let this_host = crate::hostname() == self.hostname;
        this_host && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    pub fn describe(&self) -> String {
        format!(
            "{} lock of `{}` (pid {} on {}, since {}, last heartbeat {})",
            match self.kind {
                LockKind::Shared => "a shared",
                LockKind::Exclusive => "an exclusive",
            },
            self.command,
            self.pid,
            self.hostname,
            self.created.format("%Y-%m-%d %H:%M:%S UTC"),
            self.refreshed.format("%H:%M:%S UTC"),
        )
    }
}

/// A held lock; released when dropped.
pub struct RepoLock {
    storage: DynStorage,
    key: Arc<Mutex<String>>,
    /// Dropping it wakes the heartbeat thread at once, so releasing never waits.
    stop: Option<mpsc::Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RepoLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoLock({:?})", self.key)
    }
}

fn write_lock(storage: &DynStorage, info: &LockInfo) -> Result<String> {
    let key = format!("locks/{}", Id::random());
    let bytes = serde_json::to_vec(info).map_err(|e| RepoError::Invalid(e.to_string()))?;
    storage.put_if_absent(&key, bytes.into())?;
    Ok(key)
}

/// Every lock object with its parsed content; unreadable ones are reported as stale.
pub fn list_locks(storage: &DynStorage) -> Result<Vec<(String, Option<LockInfo>)>> {
    let mut out = Vec::new();
    for meta in storage.list("locks/")? {
        let info = match storage.get(&meta.key) {
            Ok(bytes) => serde_json::from_slice::<LockInfo>(&bytes).ok(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        out.push((meta.key, info));
    }
    Ok(out)
}

/// Removes locks that are stale (or all of them with `all`); returns what was removed.
pub fn remove_locks(storage: &DynStorage, all: bool) -> Result<Vec<String>> {
    let now = Utc::now();
    let mut removed = Vec::new();
    for (key, info) in list_locks(storage)? {
        if all || info.as_ref().is_none_or(|i| i.is_stale(now)) {
            storage.delete(&key)?;
            removed.push(key);
        }
    }
    Ok(removed)
}

impl RepoLock {
    /// `scope`: see the module's documentation.
    pub fn acquire(
        storage: DynStorage,
        kind: LockKind,
        scope: Option<&str>,
        command: &str,
    ) -> Result<RepoLock> {
        let now = Utc::now();
        let info = LockInfo {
            kind,
            hostname: crate::hostname(),
            pid: std::process::id(),
            command: command.to_string(),
            scope: scope.map(str::to_owned),
            created: now,
            refreshed: now,
        };
        let key = write_lock(&storage, &info)?;
        let conflict = (|| -> Result<Option<LockInfo>> {
            for (other_key, other) in list_locks(&storage)? {
                if other_key == key {
                    continue;
                }
                let Some(other) = other else { continue };
                if other.is_stale(Utc::now()) {
                    if kind == LockKind::Exclusive {
                        tracing::warn!("removing stale lock: {}", other.describe());
                        storage.delete(&other_key)?;
                    }
                    continue;
                }
                if info.conflicts_with(&other) {
                    return Ok(Some(other));
                }
            }
            Ok(None)
        })();
        match conflict {
            Ok(None) => {}
            Ok(Some(holder)) => {
                storage.delete(&key)?;
                return Err(
                    match holder.scope.as_ref().filter(|_| holder.scope == info.scope) {
                        Some(scope) => RepoError::Busy {
                            scope: scope.clone(),
                            holder: holder.describe(),
                        },
                        None => RepoError::Locked {
                            location: storage.location(),
                            holder: holder.describe(),
                        },
                    },
                );
            }
            Err(e) => {
                let _ = storage.delete(&key);
                return Err(e);
            }
        }
        let key = Arc::new(Mutex::new(key));
        let (stop, stopped) = mpsc::channel();
        let heartbeat = {
            let (storage, key) = (storage.clone(), key.clone());
            std::thread::spawn(move || heartbeat_loop(storage, key, stopped, info))
        };
        Ok(RepoLock {
            storage,
            key,
            stop: Some(stop),
            heartbeat: Some(heartbeat),
        })
    }
}

impl RepoLock {
    /// Fails if this lock's object is gone — removed by `unlock --all` or by an exclusive
    /// locker that judged it stale (e.g. after this process was suspended for a long
    /// time). Writers call it before committing, so that they never publish a snapshot
    /// whose new data a gc may already have deleted.
    pub fn ensure_held(&self) -> Result<()> {
        let key = self.key.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match self.storage.size(&key)? {
            Some(_) => Ok(()),
            None => Err(RepoError::Invalid(format!(
                "lost the lock on {} (another process removed {key} as stale); nothing was committed: run the command again",
                self.storage.location()
            ))),
        }
    }
}

fn heartbeat_loop(
    storage: DynStorage,
    key: Arc<Mutex<String>>,
    stopped: mpsc::Receiver<()>,
    mut info: LockInfo,
) {
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(HEARTBEAT) {
        info.refreshed = Utc::now();
        match write_lock(&storage, &info) {
            Ok(new_key) => {
                let old =
                    std::mem::replace(&mut *key.lock().unwrap_or_else(|e| e.into_inner()), new_key);
                if let Err(e) = storage.delete(&old) {
                    tracing::warn!("cannot remove old lock object {old}: {e}");
                }
            }
            Err(e) => tracing::warn!("lock heartbeat failed: {e}"),
        }
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(handle) = self.heartbeat.take() {
            let _ = handle.join();
        }
        let key = self.key.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Err(e) = self.storage.delete(&key) {
            tracing::warn!("cannot release lock {key}: {e}");
        }
    }
}
