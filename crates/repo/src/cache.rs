//! A local copy of a remote repository's snapshot and index objects.
//!
//! Every command that chooses a backup reads every snapshot, and every writer reads every
//! index object: thousands of small requests against object storage, each a round trip
//! (listing 3,000 snapshots took 9.4 s from a loopback S3 server). These objects are named
//! by the hash of their sealed bytes and never rewritten, so a copy kept on local disk
//! stays right for as long as the repository lists the name. A copy is only used for a
//! name this process has just seen listed (an object deleted since, say an expired
//! backup named by its id, is not served from the copy), and a listing that no longer
//! has it removes the copy. The copies are the sealed bytes, as secret as the repository
//! itself, and are checked against their name on every read. Failing to read or write
//! the cache is never an error: it only costs the requests it would have saved.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::id::Id;

/// A temporary copy this old was left by a writer that was killed.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug)]
pub(crate) struct ObjectCache {
    /// `<root>/<repository id>`: one directory per repository, one below it per kind.
    dir: PathBuf,
    /// Per kind, the names of this process's latest complete listing.
    listed: Mutex<HashMap<String, HashSet<Id>>>,
}

impl ObjectCache {
    pub(crate) fn new(root: &Path, repo_id: &Id) -> ObjectCache {
        ObjectCache {
            dir: root.join(repo_id.to_hex()),
            listed: Mutex::default(),
        }
    }

    fn path(&self, kind: &str, id: &Id) -> PathBuf {
        self.dir.join(kind).join(id.to_hex())
    }

    /// The cached sealed bytes of `kind/id`, if it was listed, is present and still
    /// matches its name.
    pub(crate) fn get(&self, kind: &str, id: &Id) -> Option<Vec<u8>> {
        let listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        if !listed.get(kind).is_some_and(|ids| ids.contains(id)) {
            return None;
        }
        drop(listed);
        let path = self.path(kind, id);
        let bytes = std::fs::read(&path).ok()?;
        if Id::of_bytes(&bytes) == *id {
            return Some(bytes);
        }
        tracing::debug!(
            "cached {} does not match its name; removing it",
            path.display()
        );
        let _ = std::fs::remove_file(&path);
        None
    }

    /// Keeps `bytes` as `kind/id` (written under a temporary name, then renamed, so a
    /// reader never sees part of it; not synced: a torn copy fails its name check).
    pub(crate) fn put(&self, kind: &str, id: &Id, bytes: &[u8]) {
        let path = self.path(kind, id);
        let result = (|| -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            if path.exists() {
                return Ok(());
            }
            let dir = self.dir.join(kind);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            // A name of its own per write: threads and processes may copy the same object.
            static WRITES: AtomicU64 = AtomicU64::new(0);
            let tmp = dir.join(format!(
                ".{}.tmp-{}-{}",
                id.to_hex(),
                std::process::id(),
                WRITES.fetch_add(1, Ordering::Relaxed)
            ));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let published = file.write_all(bytes).and_then(|()| {
                drop(file);
                std::fs::rename(&tmp, &path)
            });
            if published.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            published
        })();
        if let Err(e) = result {
            tracing::debug!("cannot cache {}: {e}", path.display());
        }
    }

    /// Takes `listed`, a complete listing of `kind` objects, as the names copies may
    /// serve, and removes the copies of objects the repository no longer lists.
    pub(crate) fn retain(&self, kind: &str, listed: &[Id]) {
        let ids: HashSet<Id> = listed.iter().copied().collect();
        let mut names = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        names.insert(kind.to_string(), ids);
        drop(names);
        let Ok(entries) = std::fs::read_dir(self.dir.join(kind)) else {
            return;
        };
        let listed: HashSet<String> = listed.iter().map(Id::to_hex).collect();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let gone = if name.starts_with('.') {
                // A temporary name: a running writer's to rename, or a killed one's.
                (entry.metadata().and_then(|m| m.modified()).ok())
                    .and_then(|modified| modified.elapsed().ok())
                    .is_some_and(|age| age > ABANDONED_AFTER)
            } else {
                !listed.contains(name.as_ref())
            };
            if gone {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_served_while_listed_and_never_when_it_does_not_match_its_name() {
        let root = tempfile::tempdir().expect("tempdir");
        let cache = ObjectCache::new(root.path(), &Id::of_bytes(b"repo"));
        let (a, b) = (b"sealed a".to_vec(), b"sealed b".to_vec());
        let (id_a, id_b) = (Id::of_bytes(&a), Id::of_bytes(&b));
        assert_eq!(cache.get("index", &id_a), None);
        cache.put("index", &id_a, &a);
        cache.put("index", &id_b, &b);
        assert_eq!(cache.get("index", &id_a), None, "not listed yet");
        cache.retain("index", &[id_a, id_b]);
        assert_eq!(cache.get("index", &id_a), Some(a.clone()));
        cache.retain("snapshots", &[id_a]);
        assert_eq!(cache.get("snapshots", &id_a), None, "kinds are apart");

        // A damaged copy is dropped, not served.
        std::fs::write(cache.path("index", &id_b), b"sealed c").expect("write");
        assert_eq!(cache.get("index", &id_b), None);
        assert!(!cache.path("index", &id_b).exists());

        // A listing without the name removes the copy, and a killed writer's leftover.
        let leftover = cache.dir.join("index").join(".leftover.tmp-1-0");
        std::fs::write(&leftover, b"part").expect("write");
        let old = std::time::SystemTime::now() - 2 * ABANDONED_AFTER;
        (std::fs::File::options().write(true).open(&leftover))
            .and_then(|f| f.set_modified(old))
            .expect("age the leftover");
        let running = cache.dir.join("index").join(".running.tmp-1-1");
        std::fs::write(&running, b"part").expect("write");
        cache.put("index", &id_b, &b);
        cache.retain("index", &[id_b]);
        assert_eq!(cache.get("index", &id_a), None);
        assert_eq!(cache.get("index", &id_b), Some(b));
        assert!(!leftover.exists() && running.exists());
    }
}
