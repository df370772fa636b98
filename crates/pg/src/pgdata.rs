//! The data directory as a backup sees it: what to leave out (the server's own
//! `basebackup.c` rules) and which files are relation data whose pages carry checksums.
//!
//! Paths are relative to the data directory (or to a tablespace's version directory,
//! e.g. `PG_15_202209061/16384/16385`).

use std::path::{Component, Path, PathBuf};

/// The control file. A data directory without it cannot be started, which makes it the
/// file a restore writes last and a restore into an existing directory removes first.
pub const CONTROL_FILE: &str = "global/pg_control";

/// What to do with one directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Include,
    Exclude,
    /// Keep the directory (the server needs it to exist), skip what is in it.
    DirectoryOnly,
}

/// Directories whose contents the server rebuilds or does not need after a restore.
const EMPTY_DIRECTORIES: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Files left out wherever they are, and files whose names start with them: the
/// relation cache's init file, rebuilt at startup, and its copies being written
/// (`pg_internal.init.<pid>`).
const EXCLUDED_ANYWHERE: &[&str] = &["pg_internal.init"];

/// Files left out at the top of the data directory. `backup_label` and
/// `tablespace_map` come from the backup stop call instead.
const EXCLUDED_AT_TOP: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "backup_label.old",
    // The manifest of the pg_basebackup this server was started from: wrong for this
    // backup (13+ leave it out).
    "backup_manifest",
    "tablespace_map",
    "tablespace_map.old",
    "recovery.signal",
    "standby.signal",
];

/// Decides for an entry of the data directory. `unlogged` answers whether the relation
/// whose main fork is at the given path has an init fork (is unlogged); it is only asked
/// about relation files.
pub fn decide(relative: &Path, is_dir: bool, unlogged: &dyn Fn(&Path) -> bool) -> Decision {
    let Some(name) = relative.file_name().and_then(|n| n.to_str()) else {
        return Decision::Include;
    };
    let depth = relative.components().count();
    if name.starts_with("pgsql_tmp") {
        return Decision::Exclude;
    }
    // Also when it is a symlink (pg_wal on another disk through `initdb --waldir`,
    // pg_stat_tmp on a RAM disk): an empty directory, as pg_basebackup stores pg_wal. A
    // restored link would point a copy restored on the same host at the source's live
    // WAL, for the copy's recovery to write into and recycle.
    if depth == 1 && EMPTY_DIRECTORIES.contains(&name) {
        return Decision::DirectoryOnly;
    }
    if is_dir {
        return Decision::Include;
    }
    if EXCLUDED_ANYWHERE
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || (depth == 1 && EXCLUDED_AT_TOP.contains(&name))
    {
        return Decision::Exclude;
    }
    if let Some(relation) = RelationFile::parse(relative) {
        if relation.temporary {
            return Decision::Exclude;
        }
        // Unlogged relations are reset from their init fork at startup: keep only it.
        if relation.fork != Fork::Init {
            let main = relative.with_file_name(relation.file_node.to_string());
            if unlogged(&main) {
                return Decision::Exclude;
            }
        }
    }
    Decision::Include
}

/// The default answer for [`decide`]'s `unlogged`: does `<main fork>_init` exist under
/// `root`?
pub fn has_init_fork(root: &Path, main_fork: &Path) -> bool {
    let Some(name) = main_fork.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    root.join(main_fork.with_file_name(format!("{name}_init")))
        .exists()
}

/// What the server needs in its data directory, or rebuilds by the rules above: an
/// operator's exclusion may not name them or anything in them.
const SERVER_ENTRIES: &[&str] = &[
    "base",
    "global",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_logical",
    "pg_multixact",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_tblspc",
    "pg_twophase",
    "pg_wal",
    "pg_xact",
    "PG_VERSION",
    "postgresql.conf",
    "postgresql.auto.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

/// Something an operator leaves out of backups (`backup --exclude`, e.g. the server log
/// directory): a path relative to the data directory, left out with everything under it;
/// written with a trailing `/`, the directory itself is kept, empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    path: PathBuf,
    contents_only: bool,
}

impl Exclusion {
    pub fn parse(text: &str) -> Result<Exclusion, String> {
        let contents_only = text.ends_with('/');
        let path = PathBuf::from(text.trim_end_matches('/'));
        let mut components = path.components();
        let Some(Component::Normal(first)) = components.next() else {
            return Err(format!(
                "exclusion {text:?}: give a path inside the data directory, relative to it (e.g. log/)"
            ));
        };
        if !components.all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!(
                "exclusion {text:?}: give a plain relative path, without `..` or `.`"
            ));
        }
        if let Some(entry) = first.to_str().filter(|name| SERVER_ENTRIES.contains(name)) {
            return Err(format!(
                "exclusion {text:?}: {entry} is PostgreSQL's own, and a backup without it cannot be restored"
            ));
        }
        Ok(Exclusion {
            path,
            contents_only,
        })
    }

    /// A tablespace located inside the data directory (PostgreSQL warns against it but
    /// allows it): the data directory keeps its directory, empty, as the tablespace's own
    /// backup has its files, by the rules for tablespaces.
    pub fn tablespace_inside(relative: &Path) -> Exclusion {
        Exclusion {
            path: relative.to_path_buf(),
            contents_only: true,
        }
    }

    /// For an entry of the data directory: what this exclusion decides, if it names it.
    pub fn decide(&self, relative: &Path) -> Option<Decision> {
        if relative == self.path {
            Some(match self.contents_only {
                true => Decision::DirectoryOnly,
                false => Decision::Exclude,
            })
        } else if relative.starts_with(&self.path) {
            Some(Decision::Exclude)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slash = if self.contents_only { "/" } else { "" };
        write!(f, "{}{slash}", self.path.display())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    Main,
    FreeSpace,
    VisibilityMap,
    Init,
}

/// A relation data file: `base/<db>/<filenode>[_fork][.segment]`,
/// `global/<filenode>…`, or `<tablespace version dir>/<db>/<filenode>…`; temporary
/// relations are `t<backend>_<filenode>…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelationFile {
    pub file_node: u32,
    pub fork: Fork,
    pub segment: u32,
    pub temporary: bool,
}

/// The directory of a database's files in the data directory: `base/<oid>`.
pub fn database_dir(oid: u32) -> PathBuf {
    Path::new("base").join(oid.to_string())
}

/// The directories of a database's files in a tablespace whose directory holds `entries`:
/// `<version directory>/<oid>` for each entry that is a version directory
/// (`PG_15_202209061`; a tablespace shared by clusters of several majors has one each).
pub fn database_dirs_in_tablespace<'a>(
    oid: u32,
    entries: impl IntoIterator<Item = &'a str>,
) -> Vec<PathBuf> {
    entries
        .into_iter()
        .filter(|name| name.starts_with("PG_"))
        .map(|version| Path::new(version).join(oid.to_string()))
        .collect()
}

/// The names of a relative path's components; `None` for anything but plain UTF-8 names.
pub(crate) fn path_parts(relative: &Path) -> Option<Vec<&str>> {
    relative
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect()
}

impl RelationFile {
    pub fn parse(relative: &Path) -> Option<RelationFile> {
        let parts = path_parts(relative)?;
        let in_relation_dir = match parts.as_slice() {
            ["global", _] => true,
            ["base", db, _] => is_oid(db),
            [version, db, _] => version.starts_with("PG_") && is_oid(db),
            _ => false,
        };
        if !in_relation_dir {
            return None;
        }
        let name = *parts.last()?;
        let (name, temporary) = match name.strip_prefix('t') {
            Some(rest) => (rest.split_once('_')?.1, true),
            None => (name, false),
        };
        let (name, segment) = match name.split_once('.') {
            Some((base, seg)) => (base, seg.parse().ok()?),
            None => (name, 0),
        };
        let (node, fork) = match name.split_once('_') {
            Some((node, "fsm")) => (node, Fork::FreeSpace),
            Some((node, "vm")) => (node, Fork::VisibilityMap),
            Some((node, "init")) => (node, Fork::Init),
            Some(_) => return None,
            None => (name, Fork::Main),
        };
        if !is_oid(node) {
            return None;
        }
        Some(RelationFile {
            file_node: node.parse().ok()?,
            fork,
            segment,
            temporary,
        })
    }

    /// The block number of the page at `offset` in this file.
    pub fn block_at(&self, offset: u64) -> u32 {
        (u64::from(self.segment) * crate::page::BLOCKS_PER_SEGMENT
            + offset / crate::page::PAGE_SIZE as u64) as u32
    }
}

/// What `postmaster.pid` says about whether a server uses a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Postmaster {
    /// No `postmaster.pid`: a server removes it when it shuts down, even immediately.
    Absent,
    /// It names a live PostgreSQL process on this host.
    Running(u32),
    /// It names no live PostgreSQL process visible here (or no pid at all): left by a
    /// crash, or written by a server in another PID namespace (a container) or on another
    /// host sharing the directory; from here the two cannot be told apart.
    Unverified(Option<u32>),
}

/// Reads `pgdata/postmaster.pid` and checks the process it names.
pub fn postmaster(pgdata: &Path) -> std::io::Result<Postmaster> {
    let text = match std::fs::read_to_string(pgdata.join("postmaster.pid")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Postmaster::Absent),
        Err(e) => return Err(e),
    };
    let pid = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok());
    Ok(match pid {
        Some(pid) if is_postgres_process(pid) => Postmaster::Running(pid),
        _ => Postmaster::Unverified(pid),
    })
}

/// A PostgreSQL server running on this host, found by its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningServer {
    pub pid: u32,
    /// The postmaster's working directory, which is its data directory.
    pub data_directory: PathBuf,
    /// Where its `pg_tblspc` entries lead, resolved.
    pub tablespaces: Vec<PathBuf>,
}

/// The servers running on this host that this user may look into (its own user's, or
/// all as root): each `postgres` process whose parent is not one, that is a postmaster.
pub fn running_servers() -> Vec<RunningServer> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    (entries.flatten())
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            if !is_postgres_process(pid) || parent_pid(pid).is_some_and(is_postgres_process) {
                return None;
            }
            let data_directory = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            let tablespaces = (std::fs::read_dir(data_directory.join("pg_tblspc")).into_iter())
                .flatten()
                .flatten()
                .filter_map(|link| std::fs::canonicalize(link.path()).ok())
                .collect();
            Some(RunningServer {
                pid,
                data_directory,
                tablespaces,
            })
        })
        .collect()
}

fn parent_pid(pid: u32) -> Option<u32> {
    // "pid (comm) state ppid …", where comm may hold spaces and parentheses.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = &stat[stat.rfind(')')? + 1..];
    fields.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is a live process of the server's executable (its name, not the process
/// title the server rewrites); a pid reused by another program after a crash is not.
fn is_postgres_process(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|name| matches!(name.trim(), "postgres" | "postmaster"))
}

fn is_oid(text: &str) -> bool {
    !text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_process_parent_is_read_from_proc() {
        assert_eq!(
            parent_pid(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        assert!(!is_postgres_process(std::process::id()));
    }

    #[test]
    fn exclusions_name_what_the_operator_leaves_out() {
        let log = Exclusion::parse("log/").expect("log/");
        assert_eq!(log.to_string(), "log/");
        assert_eq!(log.decide(Path::new("log")), Some(Decision::DirectoryOnly));
        assert_eq!(
            log.decide(Path::new("log/postgresql-Mon.log")),
            Some(Decision::Exclude)
        );
        assert_eq!(log.decide(Path::new("logs")), None);
        assert_eq!(log.decide(Path::new("base/1/log")), None);
        let junk = Exclusion::parse("scratch/old dumps").expect("junk");
        assert_eq!(
            junk.decide(Path::new("scratch/old dumps")),
            Some(Decision::Exclude)
        );
        assert_eq!(junk.decide(Path::new("scratch")), None);
        for (bad, says) in [
            ("", "give a path inside the data directory"),
            ("/var/log", "give a path inside the data directory"),
            ("../elsewhere", "give a path inside the data directory"),
            ("log/../base", "without `..`"),
            ("base", "base is PostgreSQL's own"),
            ("global/pg_control", "global is PostgreSQL's own"),
            ("pg_wal/", "pg_wal is PostgreSQL's own"),
            ("postgresql.conf", "postgresql.conf is PostgreSQL's own"),
        ] {
            let err = Exclusion::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    fn decide_for(path: &str, is_dir: bool) -> Decision {
        decide(Path::new(path), is_dir, &|main: &Path| {
            main == Path::new("base/5/16400")
        })
    }

    #[test]
    fn postmaster_pid_is_read_and_its_process_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(postmaster(dir.path()).expect("read"), Postmaster::Absent);
        let pid_file = dir.path().join("postmaster.pid");
        // Above the kernel's largest pid: never a live process.
        std::fs::write(&pid_file, "99999999\n/data\n").expect("write");
        assert_eq!(
            postmaster(dir.path()).expect("read"),
            Postmaster::Unverified(Some(99_999_999))
        );
        // A live process that is not PostgreSQL (this test).
        std::fs::write(&pid_file, format!("{}\n/data\n", std::process::id())).expect("write");
        assert_eq!(
            postmaster(dir.path()).expect("read"),
            Postmaster::Unverified(Some(std::process::id()))
        );
        std::fs::write(&pid_file, "garbage").expect("write");
        assert_eq!(
            postmaster(dir.path()).expect("read"),
            Postmaster::Unverified(None)
        );
    }

    #[test]
    fn the_servers_exclusions_apply() {
        assert_eq!(decide_for("pg_wal", true), Decision::DirectoryOnly);
        assert_eq!(decide_for("pg_replslot", true), Decision::DirectoryOnly);
        assert_eq!(decide_for("base", true), Decision::Include);
        assert_eq!(decide_for("base/pgsql_tmp", true), Decision::Exclude);
        assert_eq!(
            decide_for("base/5/pgsql_tmp123.0", false),
            Decision::Exclude
        );
        assert_eq!(decide_for("postmaster.pid", false), Decision::Exclude);
        assert_eq!(decide_for("backup_label", false), Decision::Exclude);
        assert_eq!(
            decide_for("global/pg_internal.init", false),
            Decision::Exclude
        );
        assert_eq!(
            decide_for("base/5/pg_internal.init.4242", false),
            Decision::Exclude
        );
        assert_eq!(decide_for("backup_manifest", false), Decision::Exclude);
        assert_eq!(decide_for("PG_VERSION", false), Decision::Include);
        assert_eq!(decide_for("postgresql.auto.conf", false), Decision::Include);
        assert_eq!(decide_for("base/5/t3_16384", false), Decision::Exclude);
        // Unlogged relation 16400: every fork but the init fork goes.
        assert_eq!(decide_for("base/5/16400", false), Decision::Exclude);
        assert_eq!(decide_for("base/5/16400.1", false), Decision::Exclude);
        assert_eq!(decide_for("base/5/16400_fsm", false), Decision::Exclude);
        assert_eq!(decide_for("base/5/16400_init", false), Decision::Include);
        assert_eq!(decide_for("base/5/16401", false), Decision::Include);
        // A nested pg_wal is not the server's.
        assert_eq!(decide_for("base/pg_wal", true), Decision::Include);
        // Symlinked elsewhere: still an empty directory, never the link.
        assert_eq!(decide_for("pg_wal", false), Decision::DirectoryOnly);
        assert_eq!(decide_for("pg_stat_tmp", false), Decision::DirectoryOnly);
        assert_eq!(decide_for("base/pg_wal", false), Decision::Include);
    }

    #[test]
    fn a_databases_files_are_in_base_and_in_each_tablespace_version_directory() {
        assert_eq!(database_dir(16_390), Path::new("base/16390"));
        let entries = ["PG_15_202209061", "PG_16_202307071", "lost+found"];
        assert_eq!(
            database_dirs_in_tablespace(16_390, entries),
            [
                Path::new("PG_15_202209061/16390"),
                Path::new("PG_16_202307071/16390")
            ]
        );
    }

    #[test]
    fn relation_files_parse() {
        let rel = RelationFile::parse(Path::new("base/16384/16385.2")).expect("relation");
        assert_eq!(rel.file_node, 16385);
        assert_eq!(rel.segment, 2);
        assert_eq!(rel.fork, Fork::Main);
        assert_eq!(rel.block_at(8192 * 3), 2 * 131_072 + 3);
        let fsm = RelationFile::parse(Path::new("global/1262_fsm")).expect("fsm");
        assert_eq!(fsm.fork, Fork::FreeSpace);
        let ts =
            RelationFile::parse(Path::new("PG_15_202209061/16384/16390_vm")).expect("tablespace");
        assert_eq!(ts.fork, Fork::VisibilityMap);
        assert!(
            RelationFile::parse(Path::new("base/16384/t4_16390"))
                .expect("temp")
                .temporary
        );
        for other in [
            "base/16384/PG_VERSION",
            "global/pg_control",
            "global/pg_filenode.map",
            "pg_xact/0000",
            "base/16384/16385_xyz",
            "base/abc/16385",
        ] {
            assert!(
                RelationFile::parse(&PathBuf::from(other)).is_none(),
                "{other}"
            );
        }
    }
}
