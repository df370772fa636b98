//! Configuration files a server reads from outside its data directory, as Debian's
//! `/etc/postgresql/<major>/<cluster>/`: a backup takes them (with what they include)
//! into its tree under `config/`, at their absolute paths; `restore --config-to DIR`
//! writes them back under `DIR` (`/`: where they were).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use pg::conn::ClusterInfo;
use repo::pack::BlobType;
use repo::restore::{apply_root_metadata, write_content, OwnerMap};
use repo::saver::BlobSaver;
use repo::snapshot::{Node, NodeKind, Tree};
use repo::{Id, Repository};
use serde::{Deserialize, Serialize};

use super::archive::fsync_dir;

/// The backup tree's entry holding the configuration files.
pub const CONFIG_ROOT: &str = "config";

/// A configuration file a backup took from outside the data directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigRecord {
    /// Absolute, as the server names it.
    pub path: String,
    /// The server setting naming this file (`config_file`, `hba_file`, `ident_file`);
    /// none for files those include.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setting: Option<String>,
    /// The path in the data directory (relative to it) that leads here through a
    /// symlink, which the restored data directory holds again: `path` is then where the
    /// link led, so that a restore to the same places makes the link whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked_from: Option<String>,
}

/// A configuration file read for a backup.
pub struct TakenFile {
    pub record: ConfigRecord,
    data: Vec<u8>,
    meta: fs::Metadata,
}

/// Files linked from the top of the data directory that are bigger than this are not
/// taken: what a server reads there (settings, certificates, keys) is small.
const LINKED_FILE_LIMIT: u64 = 16 << 20;

/// The server's configuration files that are outside `pgdata` (those inside are in the
/// backup already), and the regular files that symlinks at the top of `pgdata` lead to
/// outside it (`server.crt`, a linked `postgresql.conf`), read now. What cannot be read
/// or followed is warned about and left out: the data directory's backup matters more.
/// `pgdata` is canonical; the server may name its files through links.
pub fn take(info: &ClusterInfo, pgdata: &Path) -> Vec<TakenFile> {
    let settings = [
        ("config_file", &info.config_file),
        ("hba_file", &info.hba_file),
        ("ident_file", &info.ident_file),
    ];
    let found = pg::config::configuration_files(
        Path::new(&info.config_file),
        Path::new(&info.hba_file),
        Path::new(&info.ident_file),
        info.major(),
    );
    for problem in &found.problems {
        tracing::warn!("configuration files: {problem}; the backup goes on without it");
    }
    let files = (found.files.into_iter())
        .map(|file| (file.path, Some(file.data)))
        .chain(linked_from_top(pgdata).into_iter().map(|path| (path, None)));
    let mut taken: Vec<TakenFile> = Vec::new();
    for (named, data) in files {
        let unreadable = |e: &dyn std::fmt::Display| {
            tracing::warn!(
                "configuration files: cannot read {}: {e}; the backup goes on without it",
                named.display()
            );
        };
        let real = match fs::canonicalize(&named) {
            Ok(real) => real,
            Err(e) => {
                unreadable(&e);
                continue;
            }
        };
        if real.starts_with(pgdata) || !named.is_absolute() {
            continue;
        }
        let linked_from = (named.strip_prefix(pgdata))
            .or_else(|_| named.strip_prefix(&info.data_directory))
            .ok()
            .map(|inside| inside.display().to_string());
        let path = match linked_from {
            Some(_) => real,
            None => named.clone(),
        };
        if taken.iter().any(|t| Path::new(&t.record.path) == path) {
            continue;
        }
        let meta = match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => {
                tracing::warn!(
                    "configuration files: {} is not a regular file; the backup goes on without it",
                    named.display()
                );
                continue;
            }
            Err(e) => {
                unreadable(&e);
                continue;
            }
        };
        let data = match data.map_or_else(|| fs::read(&path), Ok) {
            Ok(data) => data,
            Err(e) => {
                unreadable(&e);
                continue;
            }
        };
        let setting = settings
            .iter()
            .find(|(_, setting)| Path::new(setting) == named)
            .map(|(name, _)| name.to_string());
        taken.push(TakenFile {
            record: ConfigRecord {
                path: path.display().to_string(),
                setting,
                linked_from,
            },
            data,
            meta,
        });
    }
    taken
}

/// The symlinks at the top of `pgdata` that lead to a regular file (`pg_wal` and the
/// tablespaces are directories, and are backed up as such).
fn linked_from_top(pgdata: &Path) -> Vec<PathBuf> {
    let entries = match fs::read_dir(pgdata) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!("configuration files: cannot list {}: {e}", pgdata.display());
            return Vec::new();
        }
    };
    let mut links = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_symlink()) {
            continue;
        }
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() > LINKED_FILE_LIMIT => tracing::warn!(
                "configuration files: {} leads to a file of {} bytes, too big to be configuration; it is not taken (the backup keeps the link)",
                path.display(),
                meta.len()
            ),
            Ok(meta) if meta.is_file() => links.push(path),
            // A dangling link or one to a directory: the backup keeps the link.
            _ => {}
        }
    }
    links.sort();
    links
}

/// Stores `files` and returns the tree entry [`CONFIG_ROOT`] holding them, directories
/// as on this host (mode, owner) down to each file.
pub fn store(saver: &BlobSaver<'_>, files: &[TakenFile]) -> Result<Node> {
    let mut root = DirEntries::default();
    for file in files {
        let path = Path::new(&file.record.path);
        let names: Vec<String> = (path.components())
            .filter_map(|c| match c {
                Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let Some((name, dirs)) = names.split_last() else {
            continue;
        };
        let mut dir = &mut root;
        for part in dirs {
            dir = dir.dirs.entry(part.clone()).or_default();
        }
        let node = Node {
            name: name.clone(),
            kind: NodeKind::File,
            mode: file.meta.mode(),
            uid: file.meta.uid(),
            gid: file.meta.gid(),
            mtime_ns: file.meta.mtime() * 1_000_000_000 + file.meta.mtime_nsec(),
            size: file.data.len() as u64,
            content: vec![saver.save(BlobType::Data, &file.data)?],
            subtree: None,
            target: None,
        };
        dir.files.push(node);
    }
    let subtree = root.save(saver, Path::new("/"))?;
    Ok(Node::synthetic_dir(CONFIG_ROOT, subtree))
}

#[derive(Default)]
struct DirEntries {
    dirs: BTreeMap<String, DirEntries>,
    files: Vec<Node>,
}

impl DirEntries {
    fn save(self, saver: &BlobSaver<'_>, path: &Path) -> Result<Id> {
        let mut nodes = self.files;
        for (name, entries) in self.dirs {
            let dir = path.join(&name);
            let meta =
                fs::metadata(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
            nodes.push(Node {
                name,
                kind: NodeKind::Dir,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                size: 0,
                content: Vec::new(),
                subtree: Some(entries.save(saver, &dir)?),
                target: None,
            });
        }
        Ok(Tree::sorted(nodes).save(saver)?)
    }
}

/// One stored configuration file and where a restore puts it.
pub struct Placement {
    target: PathBuf,
    node: Node,
    data: Vec<u8>,
    /// The directories above it, outermost first, with their nodes: created where missing.
    dirs: Vec<(PathBuf, Node)>,
    /// Already there with this content.
    unchanged: bool,
}

impl Placement {
    pub fn target(&self) -> &Path {
        &self.target
    }
}

/// Where each configuration file of the backup tree `top` goes under `dir`, checked
/// before the restore writes anything: a file there with other content is refused
/// unless `replace`.
pub fn plan(repo: &Repository, top: &Tree, dir: &Path, replace: bool) -> Result<Vec<Placement>> {
    if !dir.is_absolute() {
        bail!(
            "--config-to {}: give an absolute directory (`/` puts the files back where they were)",
            dir.display()
        );
    }
    let root = top
        .find(CONFIG_ROOT)
        .and_then(|node| node.subtree)
        .context("--config-to: this backup took no configuration files from outside its data directory (they were inside it and are restored with it); drop --config-to")?;
    let mut placements = Vec::new();
    let mut stack = vec![(root, dir.to_path_buf(), Vec::new())];
    while let Some((tree, path, dirs)) = stack.pop() {
        for node in Tree::load(repo, &tree)?.nodes {
            let target = path.join(&node.name);
            match (node.kind, node.subtree) {
                (NodeKind::Dir, Some(subtree)) => {
                    let mut dirs: Vec<(PathBuf, Node)> = dirs.clone();
                    dirs.push((target.clone(), node));
                    stack.push((subtree, target, dirs));
                }
                (NodeKind::File, _) => {
                    let mut data = Vec::with_capacity(node.size as usize);
                    write_content(repo, &node.content, &mut data)?;
                    let unchanged = match fs::symlink_metadata(&target) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                        Err(e) => bail!("--config-to: cannot read {}: {e}", target.display()),
                        Ok(meta) if !meta.is_file() => bail!(
                            "--config-to: {} is there and is not a regular file: move it away",
                            target.display()
                        ),
                        Ok(_) => {
                            let same = fs::read(&target).with_context(|| {
                                format!("--config-to: cannot read {}", target.display())
                            })? == data;
                            if !same && !replace {
                                bail!(
                                    "--config-to: {} is there with other content than the backup's: move it away, or add --force (or --delta) to replace it",
                                    target.display()
                                );
                            }
                            same
                        }
                    };
                    if !unchanged {
                        check_writable(&target)?;
                    }
                    placements.push(Placement {
                        target,
                        node,
                        data,
                        dirs: dirs.clone(),
                        unchanged,
                    });
                }
                _ => {}
            }
        }
    }
    placements.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(placements)
}

/// Refuses, before anything is written, a target whose directory (or the nearest one of
/// its ancestors that exists, to be created in) this user cannot write.
fn check_writable(target: &Path) -> Result<()> {
    let dir = (target.ancestors().skip(1))
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).map_err(|e| {
        anyhow::anyhow!(
            "--config-to: cannot write into {}: {}: restore as a user that can, or give another --config-to",
            dir.display(),
            e.desc()
        )
    })
}

/// Writes the planned files that are not there already under `dir` (created if
/// missing): missing directories below it created with their recorded mode and owner,
/// each file through a temporary one renamed into place, all of it synced.
pub fn write(dir: &Path, placements: &[Placement], owners: OwnerMap) -> Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)
            .with_context(|| format!("--config-to: cannot create {}", dir.display()))?;
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
    }
    for placement in placements.iter().filter(|p| !p.unchanged) {
        for (dir, node) in &placement.dirs {
            if dir.exists() {
                continue;
            }
            fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            apply_root_metadata(dir, &owners.apply(node.clone()))?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        }
        let target = &placement.target;
        let parent = target.parent().unwrap_or(Path::new("/"));
        let tmp = tempfile::Builder::new()
            .prefix(".pgvault-tmp-")
            .tempfile_in(parent)
            .with_context(|| format!("cannot create a file in {}", parent.display()))?;
        fs::write(tmp.path(), &placement.data)
            .with_context(|| format!("cannot write {}", target.display()))?;
        apply_root_metadata(tmp.path(), &owners.apply(placement.node.clone()))?;
        tmp.persist(target)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot rename into {}", target.display()))?;
        fsync_dir(parent)?;
    }
    Ok(())
}

/// What in the restored main configuration file still names the backed-up server's
/// places where this restore put things elsewhere: (setting, its value, where this
/// restore put it).
pub fn stale_places(
    placements: &[Placement],
    records: &[ConfigRecord],
    config_to: &Path,
    pgdata: &Path,
) -> Vec<(String, String, PathBuf)> {
    let restored = |setting: &str| -> Option<PathBuf> {
        let record = records
            .iter()
            .find(|r| r.setting.as_deref() == Some(setting))?;
        under(config_to, &record.path)
    };
    let Some(main) = restored("config_file") else {
        return Vec::new();
    };
    let Some(placement) = placements.iter().find(|p| p.target == main) else {
        return Vec::new();
    };
    let Ok(settings) = pg::config::parse_settings(&String::from_utf8_lossy(&placement.data)) else {
        return Vec::new();
    };
    // The server takes the last of repeated settings.
    let last: BTreeMap<String, String> = (settings.into_iter())
        .map(|setting| (setting.name, setting.value))
        .collect();
    let mut stale = Vec::new();
    for (name, value) in last {
        let now = match name.as_str() {
            "data_directory" => Some(pgdata.to_path_buf()),
            "hba_file" => restored("hba_file"),
            "ident_file" => restored("ident_file"),
            _ => None,
        };
        if let Some(now) = now.filter(|now| !same_place(Path::new(&value), now)) {
            stale.push((name, value, now));
        }
    }
    stale
}

/// The paths in the restored data directory `pgdata` that led, through a symlink, to a
/// file the backup took, and no longer lead to the copy of it this restore wrote under
/// `config_to` (or, without it, lead to no file on this host): each with where the
/// backup's copy is.
pub fn unlinked(
    records: &[ConfigRecord],
    pgdata: &Path,
    config_to: Option<&Path>,
) -> Vec<(PathBuf, PathBuf)> {
    let mut unlinked = Vec::new();
    for record in records {
        let Some(linked_from) = &record.linked_from else {
            continue;
        };
        let link = pgdata.join(linked_from);
        let broken = match config_to {
            Some(dir) => {
                let Some(copy) = under(dir, &record.path) else {
                    continue;
                };
                (!same_place(&link, &copy)).then_some((link, copy))
            }
            None => fs::metadata(&link)
                .is_err()
                .then(|| (link, PathBuf::from(&record.path))),
        };
        unlinked.extend(broken);
    }
    unlinked
}

/// Where `--config-to config_to` puts the file the backup took at the absolute `path`.
fn under(config_to: &Path, path: &str) -> Option<PathBuf> {
    Some(config_to.join(Path::new(path).strip_prefix("/").ok()?))
}

fn same_place(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
