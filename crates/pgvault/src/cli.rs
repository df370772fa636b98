//! Command-line surface. `../shared/CLI.md` (mirrored in docs/cli.md) is the contract:
//! add freely, never rename or drop without a changelog entry.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use repo::restore::SyncMethod;

#[derive(Debug, Parser)]
#[command(
    name = "pgvault",
    version,
    about = "Backup and recovery for PostgreSQL",
    long_about = "Backup and recovery for PostgreSQL.\n\nSettings come from flags, then PGVAULT_* environment variables, then the config file, then defaults."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Every command takes these; the help lists them apart from the command's own options.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// TOML config file [default: /etc/pgvault/pgvault.toml if present]
    #[arg(long, global = true, env = "PGVAULT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Repository: /path, file:///path or s3://bucket/prefix
    #[arg(long, global = true, env = "PGVAULT_REPO", value_name = "URL")]
    pub repo: Option<String>,
    /// PostgreSQL cluster inside the repository
    #[arg(long, global = true, env = "PGVAULT_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// File whose first line is the repository passphrase (or set PGVAULT_PASSPHRASE)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_PASSPHRASE_FILE",
        value_name = "FILE"
    )]
    pub passphrase_file: Option<PathBuf>,
    /// Data directory of the cluster
    #[arg(long, global = true, env = "PGDATA", value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// Directory with pg_dump, pg_restore, psql of the right major version
    #[arg(long, global = true, env = "PGVAULT_PG_BIN", value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// libpq conninfo or URL of the cluster (else the PG* variables)
    #[arg(long, global = true, value_name = "CONNINFO")]
    pub pg_conn: Option<String>,
    /// Parallelism of the data pipeline [default: number of CPUs]
    #[arg(long, global = true, env = "PGVAULT_JOBS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,
    /// Human-readable text or JSON
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// More detail on stderr (repeat for debug output)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// How `restore --delta` finds the files that already match the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaMode {
    Checksum,
    Time,
}

impl std::str::FromStr for DeltaMode {
    type Err = String;
    /// A one-line error (clap's list of possible values takes a line of its own).
    fn from_str(text: &str) -> Result<DeltaMode, String> {
        match text {
            "checksum" => Ok(DeltaMode::Checksum),
            "time" => Ok(DeltaMode::Time),
            _ => Err(format!(
                "use --delta (hash every file) or --delta=time (trust size and mtime), not {text:?}"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository (encrypted unless --encryption none)
    Init(InitArgs),
    /// Manage the passphrases that unlock the repository
    #[command(subcommand)]
    Key(KeyCommand),
    /// Store, list, show, restore and forget snapshots of directories or streams
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Authenticate every object the snapshots need
    Verify(VerifyArgs),
    /// Remove unreferenced data and repack half-empty packs
    Gc(GcArgs),
    /// Remove stale locks left by crashed processes
    Unlock(UnlockArgs),
    /// Recreate the index from the pack headers
    RebuildIndex,
    /// Register the cluster in the repository and print (or --apply) archive settings
    Setup(SetupArgs),
    /// Prove that WAL archiving works: switch a segment and wait for it in the repository
    Check(CheckArgs),
    /// Archive one WAL file: archive_command = 'pgvault … archive-push %p'
    ArchivePush(ArchivePushArgs),
    /// Fetch one WAL file: restore_command = 'pgvault … archive-get %f "%p"' (exit 1 if absent)
    ArchiveGet(ArchiveGetArgs),
    /// Take a physical backup of the cluster (every backup complete, only changes stored)
    Backup(BackupArgs),
    /// Restore a physical backup into --pgdata, optionally to a point in time
    Restore(RestoreArgs),
    /// Logical dumps: every database (or --database) with roles and config; list, show, restore
    Dump(DumpArgs),
    /// Recover openssl-encrypted, gzip'd, split pg_dumpall backups of older backup managers
    #[command(subcommand)]
    Legacy(LegacyCommand),
    /// Clusters, backups, WAL archive, recoverable window, repository totals
    Info,
    /// Apply retention: remove backups no rule keeps, then WAL no retained backup needs, then gc
    Expire(ExpireArgs),
    /// Run the configured schedules of every cluster; serve /metrics and a dashboard
    Daemon(DaemonArgs),
    /// Work across repositories: copy a cluster's backups, dumps and WAL
    #[command(subcommand)]
    Repo(RepoCommand),
    /// A cluster as a whole: remove one that is retired (e.g. the old one after pg_upgrade)
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Streaming standbys seeded from the repository
    #[command(subcommand)]
    Standby(StandbyCommand),
    /// Replication state of a primary and its standbys, or of a standby
    #[command(subcommand)]
    Replication(ReplicationCommand),
    #[command(hide = true)]
    ArchivePushWorker {
        /// The cluster's pg_wal directory
        pg_wal: PathBuf,
    },
    #[command(hide = true)]
    ArchiveGetWorker,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub action: Option<BackupAction>,
    /// Show what the backup would read and roughly store; write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Label stored with the backup (and in backup_label)
    #[arg(long)]
    pub label: Option<String>,
    /// Start with an immediate checkpoint instead of a spread one
    #[arg(long)]
    pub fast: bool,
    /// Read every file, even those unchanged since the previous backup
    #[arg(long)]
    pub checksum_all: bool,
    /// How long to wait for the backup's last WAL segment to reach the repository
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub wal_timeout: String,
    /// Require --pg-conn to be a standby (a standby is detected and used anyway)
    #[arg(long)]
    pub from_standby: bool,
    /// With a standby: the primary, asked to switch WAL so the backup's last segment is
    /// archived at once instead of when it fills up
    #[arg(long, value_name = "CONNINFO")]
    pub primary_conn: Option<String>,
    /// Leave this path of the data directory out (repeatable; relative to it; with a
    /// trailing / keep the directory, empty), e.g. log/; added to backup-exclude in the
    /// cluster's config
    #[arg(long, value_name = "PATH")]
    pub exclude: Vec<String>,
    /// Read the data directory no faster than this many bytes per second, e.g. 200MiB
    /// (at least 1MiB), sparing the disk for the server's queries [default:
    /// backup-max-rate in the cluster's config, else unlimited]
    #[arg(long, value_name = "SIZE")]
    pub max_rate: Option<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DumpArgs {
    #[command(subcommand)]
    pub action: Option<DumpAction>,
    /// Database to dump (repeatable) [default: every database but template0]
    #[arg(long = "database", value_name = "DB")]
    pub databases: Vec<String>,
    /// pg_dump --exclude-table for every database (repeatable)
    #[arg(long, value_name = "PATTERN")]
    pub exclude_table: Vec<String>,
    /// pg_dump --exclude-schema for every database (repeatable)
    #[arg(long, value_name = "PATTERN")]
    pub exclude_schema: Vec<String>,
    /// Extra pg_dump argument (repeatable), e.g. --pg-dump-opt=--no-comments
    #[arg(long = "pg-dump-opt", value_name = "OPT", allow_hyphen_values = true)]
    pub pg_dump_opts: Vec<String>,
    /// Label stored with the dump
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DumpAction {
    /// Dumps of the cluster, oldest first
    List,
    /// One dump: databases, sizes, pg_dump version; with --database its table of contents
    Show {
        /// Dump id (or unique prefix) or "latest"
        id: String,
        /// Show this database's table of contents
        #[arg(long)]
        database: Option<String>,
    },
    /// Restore a dump into a server, or write it to files
    Restore(DumpRestoreArgs),
}

#[derive(Debug, Args)]
pub struct DumpRestoreArgs {
    /// Dump id (or unique prefix) or "latest"
    #[arg(long = "dump", default_value = "latest", value_name = "ID")]
    pub dump: String,
    /// Only this database (repeatable) [default: globals, then every database]
    #[arg(long = "database", value_name = "DB")]
    pub databases: Vec<String>,
    /// Restore the one --database under this name, beside the original
    #[arg(long = "as", value_name = "NEWNAME")]
    pub as_name: Option<String>,
    /// Only this table (repeatable; needs one --database)
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    #[arg(long, conflicts_with = "data_only")]
    pub schema_only: bool,
    #[arg(long)]
    pub data_only: bool,
    /// Only the roles and tablespaces (pg_dumpall --globals-only)
    #[arg(long, conflicts_with_all = ["databases", "tables", "as_name"])]
    pub globals: bool,
    /// Server to restore into [default: --pg-conn]
    #[arg(long, value_name = "CONNINFO")]
    pub target_conn: Option<String>,
    /// Write plain SQL to this file instead of restoring
    #[arg(long, value_name = "PATH", conflicts_with_all = ["target_conn", "to_dir"])]
    pub to_file: Option<PathBuf>,
    /// Write globals.sql, config files and one custom-format archive per database here
    #[arg(long, value_name = "DIR", conflicts_with = "target_conn")]
    pub to_dir: Option<PathBuf>,
    /// When a target database exists: fail (default) or drop it first
    #[arg(long, default_value = "fail", value_parser = ["fail", "drop"])]
    pub if_exists: String,
}

#[derive(Debug, Subcommand)]
pub enum LegacyCommand {
    /// Backups of an instance: time, parts, size, whether the parts are complete
    List(LegacySourceArgs),
    /// Replay a backup into a server (--target-conn) or write its SQL (--to-file)
    Restore(LegacyRestoreArgs),
    /// Store a backup in the repository as a dump (retention, verify, dump restore)
    Import(LegacyImportArgs),
}

#[derive(Debug, Args)]
pub struct LegacySourceArgs {
    /// Where the backups are: s3://bucket/prefix (AWS_* variables) or a local directory
    #[arg(long, value_name = "URL")]
    pub source: String,
    /// Backup-manager instance id: objects are named <id>-<timestamp>…
    #[arg(long, value_name = "ID")]
    pub instance: String,
    /// S3 endpoint of the source, e.g. http://127.0.0.1:9000 [default: AWS_ENDPOINT_URL]
    #[arg(long, value_name = "URL")]
    pub source_endpoint: Option<String>,
}

#[derive(Debug, Args)]
pub struct LegacyDecryptArgs {
    /// Backup id (metadata file name without .json) or "latest"
    #[arg(long, default_value = "latest", value_name = "ID")]
    pub backup: String,
    /// File whose first line is the openssl secret (-pass pass:SECRET)
    #[arg(long, value_name = "FILE")]
    pub secret_file: PathBuf,
    /// openssl -md of the backups: auto (try md5, sha256, pbkdf2), md5 or sha256
    #[arg(long, default_value = "auto", value_parser = ["auto", "md5", "sha256"])]
    pub digest: String,
    /// The backups were made with openssl -pbkdf2
    #[arg(long)]
    pub pbkdf2: bool,
    /// openssl -iter of -pbkdf2 backups [default: 10000]
    #[arg(long, value_name = "N")]
    pub iter: Option<u32>,
}

#[derive(Debug, Args)]
pub struct LegacyRestoreArgs {
    #[command(flatten)]
    pub source: LegacySourceArgs,
    #[command(flatten)]
    pub decrypt: LegacyDecryptArgs,
    /// Server to replay into [default: --pg-conn]
    #[arg(long, value_name = "CONNINFO", conflicts_with = "to_file")]
    pub target_conn: Option<String>,
    /// Rename a restored database afterwards
    #[arg(long, value_name = "OLD=NEW", conflicts_with = "to_file")]
    pub rename: Option<String>,
    /// With --rename: drop an existing NEW after a successful restore
    #[arg(long, requires = "rename")]
    pub replace: bool,
    /// Write the decrypted SQL here instead
    #[arg(long, value_name = "PATH")]
    pub to_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LegacyImportArgs {
    #[command(flatten)]
    pub source: LegacySourceArgs,
    #[command(flatten)]
    pub decrypt: LegacyDecryptArgs,
    /// Label of the new dump [default: "legacy <backup id>"]
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BackupAction {
    /// Everything about one backup: WAL range, sizes, tablespaces, databases, the
    /// corrupted pages it found (file and block), its backup_label
    Show {
        /// Backup id (or unique prefix) or "latest"
        id: String,
    },
    /// Keep this backup whatever the retention policy says
    Pin {
        /// Backup id (or unique prefix) or "latest"
        id: String,
    },
    /// Let retention decide about this backup again
    Unpin { id: String },
}

#[derive(Debug, Args)]
pub struct ExpireArgs {
    /// List what would be removed and why; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the N newest backups
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the N newest days that have one
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the N newest ISO weeks that have one
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the N newest months that have one
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_monthly: Option<u32>,
    /// Keep what is needed to restore to any instant in this period, e.g. 14d
    #[arg(long, value_name = "DURATION")]
    pub recovery_window: Option<String>,
    /// Time zone of the calendar buckets, e.g. Europe/Berlin [default: UTC]
    #[arg(long, value_name = "ZONE")]
    pub time_zone: Option<String>,
    /// Do not run gc afterwards (space is freed by the next gc)
    #[arg(long)]
    pub no_gc: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Backup id (or unique prefix) or "latest"; default: the newest that ends before the target
    #[arg(long)]
    pub backup: Option<String>,
    /// Recover to this time, e.g. "2026-11-25 01:30:00+00"
    #[arg(long, group = "recovery_target")]
    pub target_time: Option<String>,
    /// Recover to this WAL position, e.g. 0/3000060
    #[arg(long, group = "recovery_target")]
    pub target_lsn: Option<String>,
    /// Recover to this transaction id
    #[arg(long, group = "recovery_target")]
    pub target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, group = "recovery_target")]
    pub target_name: Option<String>,
    /// "immediate": stop as soon as the backup is consistent
    #[arg(long, group = "recovery_target", value_parser = ["immediate"])]
    pub target: Option<String>,
    /// Stop just before the target instead of just after it
    #[arg(long)]
    pub target_exclusive: bool,
    /// latest, current or a timeline number
    #[arg(long)]
    pub target_timeline: Option<String>,
    /// What the server does at the target: promote, pause (PostgreSQL's default) or shutdown
    #[arg(long, default_value = "pause")]
    pub target_action: String,
    /// Start as a standby (standby.signal)
    #[arg(long)]
    pub standby: bool,
    /// primary_conninfo for --standby
    #[arg(long, requires = "standby", value_name = "CONNINFO")]
    pub primary_conn: Option<String>,
    /// primary_slot_name for --standby (the slot must exist on the primary)
    #[arg(long, requires = "standby", value_name = "NAME")]
    pub primary_slot: Option<String>,
    /// Restore a tablespace elsewhere: OID_OR_NAME=DIR (repeatable)
    #[arg(long, value_name = "OID_OR_NAME=DIR")]
    pub tablespace_map: Vec<String>,
    /// Restore every tablespace --tablespace-map does not name into DIR/<its name>
    /// (absolute)
    #[arg(long, value_name = "DIR")]
    pub tablespace_map_all: Option<PathBuf>,
    /// Restore only this database's data, besides template0, template1 and postgres
    /// (repeatable); the others come back as empty files that recovery replays into and
    /// that cannot be used: drop them once the server is up
    #[arg(long, value_name = "NAME", conflicts_with = "standby")]
    pub db_include: Vec<String>,
    /// Restore this database as empty files, to be dropped once the server is up
    /// (repeatable; template0, template1 and postgres are always restored)
    #[arg(long, value_name = "NAME", conflicts_with = "standby")]
    pub db_exclude: Vec<String>,
    /// Put pg_wal on another disk: pg_wal becomes a symlink to DIR (absolute; created if
    /// missing; must be empty, or is emptied with --delta/--force)
    #[arg(long, value_name = "DIR")]
    pub waldir: Option<PathBuf>,
    /// Write the configuration files the backup took from outside the data directory
    /// (as Debian's /etc/postgresql/...) under DIR at their original paths; "/" puts them
    /// back where they were
    #[arg(long, value_name = "DIR")]
    pub config_to: Option<PathBuf>,
    /// A server setting written with the recovery settings, e.g.
    /// recovery_min_apply_delay=1h or restore_command=... (repeatable; replaces pgvault's
    /// own of that name; not the recovery targets, which have options of their own)
    #[arg(long, value_name = "NAME=VALUE")]
    pub recovery_option: Vec<String>,
    /// "off" keeps the restored server from archiving into the repository (a test or
    /// reporting copy); "preserve" keeps the source's archive settings
    #[arg(long, default_value = "preserve", value_parser = ["preserve", "off"])]
    pub archive_mode: String,
    /// Restore over an existing (stopped) data directory, rewriting only what differs:
    /// "--delta" hashes every file to find it; "--delta=time" takes files with the
    /// backup's size and mtime as unchanged without reading them, as the next backup would
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "checksum",
          value_parser = str::parse::<DeltaMode>, value_name = "checksum|time")]
    pub delta: Option<DeltaMode>,
    /// Remove what is in --pgdata (a stopped cluster) before restoring
    #[arg(long, conflicts_with = "delta")]
    pub force: bool,
    /// How long `expire` keeps the restored backup, and the WAL from its start, for the
    /// restored server's recovery to fetch, e.g. 3d; 0 holds nothing
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub hold: String,
    /// How restored files are made durable: "fsync" each file and directory, or one
    /// "syncfs" of each filesystem restored into (much faster for many small files; it also
    /// writes out other dirty data on that filesystem, and Linux before 5.8 does not
    /// report its write errors)
    #[arg(long, default_value = "fsync", value_parser = str::parse::<SyncMethod>)]
    pub sync_method: SyncMethod,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Remove every backup, dump, WAL file, pin, hold and job record of cluster NAME and
    /// its registration, then gc
    Remove(ClusterRemoveArgs),
}

#[derive(Debug, Args)]
pub struct ClusterRemoveArgs {
    /// The cluster to remove (named here, not taken from --cluster)
    pub name: String,
    /// Show what would be removed; remove nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Remove even a cluster that archived or backed up within the last 24 hours, or has
    /// pinned or held backups
    #[arg(long)]
    pub force: bool,
    /// Do not run gc afterwards
    #[arg(long)]
    pub no_gc: bool,
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Copy what the target lacks of a cluster (registration, WAL, backups, dumps, pins)
    Copy(RepoCopyArgs),
}

#[derive(Debug, Args)]
pub struct RepoCopyArgs {
    /// Source: a [repos.NAME] of the config, or a repository URL
    #[arg(long, value_name = "NAME|URL")]
    pub from: String,
    /// Target: a [repos.NAME] of the config, or a repository URL (initialized already)
    #[arg(long, value_name = "NAME|URL")]
    pub to: String,
    /// Every cluster of the source instead of --cluster
    #[arg(long)]
    pub all_clusters: bool,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Address for /metrics and the dashboard [default: [daemon] listen, else 127.0.0.1:9187]
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum StandbyCommand {
    /// Restore a backup into --pgdata as a standby streaming from --primary-conn
    Create(StandbyCreateArgs),
}

#[derive(Debug, Args)]
pub struct StandbyCreateArgs {
    /// The primary: the new standby's primary_conninfo (user needs the REPLICATION attribute)
    #[arg(long, value_name = "CONNINFO")]
    pub primary_conn: String,
    /// Replication slot to stream through, created on the primary if missing
    #[arg(long, value_name = "NAME")]
    pub slot: Option<String>,
    /// Backup id (or unique prefix) or "latest"
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Restore a tablespace elsewhere: OID_OR_NAME=DIR (repeatable)
    #[arg(long, value_name = "OID_OR_NAME=DIR")]
    pub tablespace_map: Vec<String>,
    /// Restore every tablespace --tablespace-map does not name into DIR/<its name>
    /// (absolute)
    #[arg(long, value_name = "DIR")]
    pub tablespace_map_all: Option<PathBuf>,
    /// Put pg_wal on another disk: pg_wal becomes a symlink to DIR (absolute; created if
    /// missing; must be empty, or is emptied with --delta/--force)
    #[arg(long, value_name = "DIR")]
    pub waldir: Option<PathBuf>,
    /// Write the configuration files the backup took from outside the data directory
    /// under DIR at their original paths ("/": where they were)
    #[arg(long, value_name = "DIR")]
    pub config_to: Option<PathBuf>,
    /// Remove what is in --pgdata (a stopped cluster) before restoring
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReplicationCommand {
    /// Role, sent/write/flush/replay positions, lag and slots of the server at --pg-conn
    Status(ReplicationStatusArgs),
}

#[derive(Debug, Args)]
pub struct ReplicationStatusArgs {
    /// Fail (exit 1) when a standby or slot is further behind: a size (16MiB) or a time (30s)
    #[arg(long, value_name = "SIZE|DURATION")]
    pub max_lag: Option<String>,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Set archive_mode, archive_command (ALTER SYSTEM) and reload
    #[arg(long)]
    pub apply: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// How long to wait for the switched segment to arrive
    #[arg(long, default_value = "60s")]
    pub timeout: String,
}

#[derive(Debug, Args)]
pub struct ArchivePushArgs {
    /// The WAL file (%p)
    pub path: PathBuf,
    /// Answer from the background worker that pushes ready segments in parallel
    #[arg(long = "async")]
    pub r#async: bool,
    /// Push synchronously even if archive-async is set in the config
    #[arg(long, conflicts_with = "async")]
    pub no_async: bool,
}

#[derive(Debug, Args)]
pub struct ArchiveGetArgs {
    /// File name PostgreSQL asks for (%f)
    pub wal_name: String,
    /// Where to write it (%p)
    pub destination: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// xchacha20-poly1305 (default), aes-256-gcm or none
    #[arg(long, default_value = "xchacha20-poly1305")]
    pub encryption: String,
    /// zstd[:LEVEL] (default zstd:3), lz4, gzip[:LEVEL] or none
    #[arg(long)]
    pub compression: Option<String>,
    /// Target pack size in MiB (4-256)
    #[arg(long, value_name = "MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(4..=256))]
    pub pack_size: u32,
    /// Chunk size in KiB for files (a multiple of the 8 KiB page; see docs/benchmarks.md)
    #[arg(long, value_name = "KIB")]
    pub fixed_chunk_size: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a passphrase (from --new-passphrase-file, a terminal prompt, or one stdin line)
    Add(NewPassphraseArgs),
    /// Replace the passphrase used to open the repository
    Passwd(NewPassphraseArgs),
    /// List the keys
    List,
    /// Remove a key (not the last one, not the one in use)
    Remove {
        /// Key id or a unique prefix of it
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct NewPassphraseArgs {
    #[arg(long, value_name = "FILE")]
    pub new_passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Store a directory tree (--path) or standard input (--stdin)
    Create(SnapshotCreateArgs),
    /// List snapshots, oldest first
    List,
    /// Show one snapshot's metadata and files
    Show {
        /// Snapshot id, unique prefix, or "latest"
        id: String,
    },
    /// Restore a snapshot into an empty directory or to standard output
    Restore(SnapshotRestoreArgs),
    /// Delete snapshots (their data goes at the next gc)
    Forget {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["path", "stdin"])))]
pub struct SnapshotCreateArgs {
    /// Directory to store
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// Store standard input as one file
    #[arg(long, requires = "name")]
    pub stdin: bool,
    /// File name for --stdin data
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub label: Option<String>,
    /// KEY=VALUE, repeatable
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Read every file even if it looks unchanged since the previous snapshot
    #[arg(long)]
    pub read_all: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["target", "stdout"])))]
pub struct SnapshotRestoreArgs {
    /// Snapshot id, unique prefix, or "latest"
    #[arg(default_value = "latest")]
    pub id: String,
    /// Empty or new directory to restore into
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// Write a single-file snapshot (e.g. from --stdin) to standard output
    #[arg(long)]
    pub stdout: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only these snapshots (id, prefix or "latest"; repeatable) [default: all]
    #[arg(long = "snapshot", visible_alias = "backup", value_name = "ID")]
    pub snapshots: Vec<String>,
    /// Read this share of the packs, e.g. 10% [default: 100%]
    #[arg(long, value_name = "PERCENT")]
    pub read_data_subset: Option<String>,
    /// Check structure and index coverage without reading pack contents
    #[arg(long, conflicts_with = "read_data_subset")]
    pub no_read_data: bool,
    /// Re-read objects that an earlier verify already proved (default: skip them)
    #[arg(long)]
    pub full: bool,
    /// Also re-check the page checksums of every relation file of the backups
    #[arg(long)]
    pub pages: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Print what would be removed and repacked, change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// Remove every lock, including those of live processes
    #[arg(long)]
    pub all: bool,
}
