//! `pgvault dump`: logical dumps. Each database is dumped by `pg_dump -Fc` without
//! pg_dump's own compression and streamed straight into the repository through the
//! content-defined chunker, so an unchanged part of tomorrow's dump is stored once. No
//! temporary file. Cluster globals (`pg_dumpall --globals-only`) and the server's
//! configuration files are stored alongside.
//!
//! A dump is a snapshot of kind `dump`, tree:
//! ```text
//! globals.sql              roles, memberships, password hashes, tablespaces
//! config/<file>            postgresql.conf, postgresql.auto.conf, pg_hba.conf, pg_ident.conf
//! databases/<name>.dump    custom-format archive, made with --create
//! ```
//! The snapshot is written last: a dump that fails or is killed half-way leaves no
//! listed dump, only unreferenced data that gc removes.

use std::collections::VecDeque;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use pg::conn::{quote_literal, ConnectOptions, Connection};
use pg::tools::Tool;
use repo::archive::{archive_stream, ArchiveOptions};
use repo::lock::LockKind;
use repo::saver::BlobSaver;
use repo::snapshot::{Node, Snapshot, Summary, Tree};
use repo::{Id, Repository};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::archive::{register, ClusterIdentity};
use super::setup::connect;
use crate::cli::{DumpAction, DumpArgs};
use crate::context::Context;
use crate::output::{bytes, note, print_json, Table};

pub const DUMP_KIND: &str = "dump";

/// One database of a dump.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseDump {
    pub name: String,
    pub owner: String,
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// pg_database_size at dump time.
    pub database_bytes: u64,
    /// Size of the custom-format archive.
    pub size_bytes: u64,
    /// New bytes this database's dump added to the repository.
    pub stored_bytes: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpMeta {
    pub cluster: String,
    pub system_identifier: String,
    pub server_version_num: u32,
    pub pg_dump_version: String,
    pub pg_dump_major: u32,
    pub databases: Vec<DatabaseDump>,
    pub globals: bool,
    pub config_files: Vec<String>,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    /// `""` for pgvault's own layout (custom-format archive per database);
    /// [`DUMPALL_FORMAT`] for an imported pg_dumpall script (`dumpall.sql`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub format: String,
    /// Where an imported dump came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// [`DumpMeta::format`] of an imported pg_dumpall script.
pub const DUMPALL_FORMAT: &str = "pg_dumpall-sql";
/// Its file in the dump's tree.
pub const DUMPALL_FILE: &str = "dumpall.sql";

/// A file name for a database name (which may contain any character but NUL).
pub fn archive_name(database: &str) -> String {
    let mut out = String::new();
    for c in database.chars() {
        match c {
            '/' | '%' | '\\' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    format!("{out}.dump")
}

pub fn dump_command(ctx: &Context, args: &DumpArgs) -> Result<()> {
    match &args.action {
        Some(DumpAction::List) => list(ctx),
        Some(DumpAction::Show { id, database }) => show(ctx, id, database.as_deref()),
        Some(DumpAction::Restore(restore)) => super::dump_restore::restore(ctx, restore),
        None => dump(ctx, args),
    }
}

/// Whether writing to a child failed only because it stopped reading (it exited; its
/// exit status tells whether that was fine).
pub fn is_broken_pipe(error: &repo::RepoError) -> bool {
    matches!(error, repo::RepoError::Io { error: io, .. } if io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The libpq environment for a client tool connected to `database`.
pub fn tool_command(tool: &Tool, options: &ConnectOptions, database: &str) -> Command {
    let mut command = Command::new(&tool.path);
    for (var, value) in options.with_dbname(database).client_environment() {
        command.env(var, value);
    }
    command.env("PGAPPNAME", "pgvault");
    command
}

/// Reads a child's stderr on a thread (so a chatty child never blocks on a full pipe).
pub fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(stderr) = stderr.as_mut() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    })
}

/// Stores what `command` writes on stdout as one stream; fails with its stderr if it
/// exits non-zero.
fn store_output(
    repo: &Repository,
    mut command: Command,
    name: &str,
    what: &str,
) -> Result<(Node, Summary)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let stderr = collect_stderr(&mut child);
    let stdout = child.stdout.take().context("no stdout")?;
    let saver = BlobSaver::new(repo);
    let stored = archive_stream(&saver, stdout, name, &ArchiveOptions::default());
    if stored.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {what}"))?;
    let errors = stderr.join().unwrap_or_default();
    if !status.success() {
        let first = errors
            .lines()
            .find(|l| l.contains("error") || l.contains("FATAL"))
            .or_else(|| errors.lines().next())
            .unwrap_or("no message");
        bail!("{what} failed ({status}): {}", first.trim());
    }
    let archived = stored.with_context(|| format!("storing the output of {what}"))?;
    let node = Tree::load(repo, &archived.tree)?
        .nodes
        .into_iter()
        .next()
        .context("stored stream has no node")?;
    Ok((node, archived.summary))
}

fn dir_node(name: &str, nodes: Vec<Node>, saver: &BlobSaver<'_>) -> Result<Node> {
    let subtree = Tree::sorted(nodes).save(saver)?;
    Ok(Node::synthetic_dir(name, subtree))
}

struct ServerDatabase {
    name: String,
    owner: String,
    encoding: String,
    collate: String,
    ctype: String,
    size: u64,
}

fn server_databases(conn: &mut Connection) -> Result<Vec<ServerDatabase>> {
    let rows = conn.query_rows(
        "SELECT datname, pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, \
         datctype, pg_database_size(oid)::text FROM pg_database \
         WHERE datallowconn AND datname <> 'template0' ORDER BY datname",
    )?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let field = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            ServerDatabase {
                name: field(0),
                owner: field(1),
                encoding: field(2),
                collate: field(3),
                ctype: field(4),
                size: field(5).parse().unwrap_or(0),
            }
        })
        .collect())
}

/// The server's configuration files, read through SQL (superuser or
/// pg_read_server_files) or, failing that, from the local file system.
fn config_files(conn: &mut Connection) -> Vec<(String, Vec<u8>)> {
    let paths = conn
        .query_rows(
            "SELECT name, setting FROM pg_settings WHERE name IN \
             ('config_file', 'hba_file', 'ident_file', 'data_directory')",
        )
        .unwrap_or_default();
    let mut files = Vec::new();
    for row in paths {
        let (Some(Some(name)), Some(Some(path))) = (row.first(), row.get(1)) else {
            continue;
        };
        let path = if name == "data_directory" {
            format!("{path}/postgresql.auto.conf")
        } else {
            path.clone()
        };
        let file_name = path.rsplit('/').next().unwrap_or(&path).to_string();
        let content = conn
            .query_one_value(&format!("SELECT pg_read_file({})", quote_literal(&path)))
            .ok()
            .flatten()
            .map(String::into_bytes)
            .or_else(|| std::fs::read(&path).ok());
        match content {
            Some(data) => files.push((file_name, data)),
            None => tracing::warn!(
                "{path} is readable neither through SQL nor locally: not stored with the dump"
            ),
        }
    }
    files
}

/// pg_dump arguments for one database: global ones, then the database's own.
fn pg_dump_args(ctx: &Context, args: &DumpArgs, database: &str) -> Vec<String> {
    let section = ctx.cluster_section.dump.clone().unwrap_or_default();
    let own = section.databases.get(database).cloned().unwrap_or_default();
    let mut out = vec![
        "--format=custom".to_string(),
        "--compress=0".to_string(),
        "--create".to_string(),
    ];
    for pattern in args
        .exclude_table
        .iter()
        .chain(&section.exclude_table)
        .chain(&own.exclude_table)
    {
        out.push(format!("--exclude-table={pattern}"));
    }
    for pattern in args
        .exclude_schema
        .iter()
        .chain(&section.exclude_schema)
        .chain(&own.exclude_schema)
    {
        out.push(format!("--exclude-schema={pattern}"));
    }
    out.extend(
        args.pg_dump_opts
            .iter()
            .chain(&section.pg_dump_opt)
            .chain(&own.pg_dump_opt)
            .cloned(),
    );
    out
}

fn dump(ctx: &Context, args: &DumpArgs) -> Result<()> {
    let start_time = Utc::now();
    let (mut conn, info) = connect(ctx)?;
    let options = ConnectOptions::resolve(ctx.pg_conn.as_deref())?;
    let pg_dump = pg::tools::find("pg_dump", info.major(), ctx.pg_bin.as_deref())?;
    let pg_dumpall_path = pg_dump.path.with_file_name("pg_dumpall");
    let pg_dumpall = pg::tools::probe(&pg_dumpall_path)?;
    tracing::info!(
        "using {} (PostgreSQL {}) for a PostgreSQL {} server",
        pg_dump.path.display(),
        pg_dump.version,
        info.version_text()
    );
    let repo = ctx.open()?;
    register(
        &repo,
        &ClusterIdentity {
            name: ctx.cluster.clone(),
            system_identifier: info.system_identifier.to_string(),
            pg_version_num: info.server_version_num,
            wal_segment_size: info.wal_segment_size,
            registered: Utc::now(),
        },
    )?;
    let on_server = server_databases(&mut conn)?;
    let chosen: Vec<&ServerDatabase> = if args.databases.is_empty() {
        on_server.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for name in &args.databases {
            let found = on_server
                .iter()
                .find(|d| &d.name == name)
                .with_context(|| {
                    format!(
                        "database {name:?} does not exist on the server (it has: {})",
                        on_server
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            chosen.push(found);
        }
        chosen
    };
    let config = config_files(&mut conn);
    drop(conn);
    let lock = ctx.lock(&repo, LockKind::Shared)?;

    let saver = BlobSaver::new(&repo);
    let mut summary = Summary::default();
    let mut top = Vec::new();
    let connect_db = options.get("dbname").unwrap_or("postgres").to_string();
    let mut globals = tool_command(&pg_dumpall, &options, &connect_db);
    globals.args(["--globals-only", &format!("--database={connect_db}")]);
    let (node, part) = store_output(&repo, globals, "globals.sql", "pg_dumpall --globals-only")?;
    add(&mut summary, &part);
    top.push(node);

    let mut config_nodes = Vec::new();
    for (name, data) in &config {
        let archived = archive_stream(&saver, &data[..], name, &ArchiveOptions::default())?;
        // Their stored bytes are counted with the saver's below.
        summary.files += 1;
        summary.bytes += archived.summary.bytes;
        config_nodes.extend(Tree::load(&repo, &archived.tree)?.nodes);
    }
    top.push(dir_node("config", config_nodes, &saver)?);

    // Databases in parallel, within --jobs.
    let queue: Mutex<VecDeque<&ServerDatabase>> = Mutex::new(chosen.iter().copied().collect());
    let results: Mutex<Vec<Result<(Node, DatabaseDump, Summary)>>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..ctx.jobs.max(1).min(chosen.len().max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(db) = next else { break };
                let started = Instant::now();
                let mut command = tool_command(&pg_dump, &options, &db.name);
                command.args(pg_dump_args(ctx, args, &db.name));
                let outcome = store_output(
                    &repo,
                    command,
                    &archive_name(&db.name),
                    &format!("pg_dump of database {:?}", db.name),
                )
                .map(|(node, part)| {
                    let dumped = DatabaseDump {
                        name: db.name.clone(),
                        owner: db.owner.clone(),
                        encoding: db.encoding.clone(),
                        collate: db.collate.clone(),
                        ctype: db.ctype.clone(),
                        database_bytes: db.size,
                        size_bytes: part.bytes,
                        stored_bytes: part.save.bytes_stored,
                        duration_ms: started.elapsed().as_millis() as u64,
                    };
                    (node, dumped, part)
                });
                let failed = outcome.is_err();
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(outcome);
                if failed {
                    // Stop handing out work: the dump as a whole has failed.
                    queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                }
            });
        }
    });
    let mut database_nodes = Vec::new();
    let mut databases = Vec::new();
    for outcome in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        let (node, dumped, part) = outcome?;
        add(&mut summary, &part);
        database_nodes.push(node);
        databases.push(dumped);
    }
    databases.sort_by(|a, b| a.name.cmp(&b.name));
    top.push(dir_node("databases", database_nodes, &saver)?);
    let tree = Tree::sorted(top).save(&saver)?;
    saver.flush()?;
    summary.save.bytes_stored += saver.stats().bytes_stored;
    summary.duration_ms = (Utc::now() - start_time).num_milliseconds().max(0) as u64;

    let meta = DumpMeta {
        cluster: ctx.cluster.clone(),
        system_identifier: info.system_identifier.to_string(),
        server_version_num: info.server_version_num,
        pg_dump_version: pg_dump.version.clone(),
        pg_dump_major: pg_dump.major,
        databases,
        globals: true,
        config_files: config.iter().map(|(n, _)| n.clone()).collect(),
        start_time,
        stop_time: Utc::now(),
        format: String::new(),
        source: None,
    };
    let snapshot = Snapshot {
        label: args.label.clone(),
        tags: ctx.cluster_tags(),
        meta: serde_json::to_value(&meta).context("encode dump metadata")?,
        ..Snapshot::new(DUMP_KIND, start_time, meta.stop_time, tree, summary)
    };
    lock.ensure_held()?;
    let id = snapshot.save(&repo)?;
    drop(lock);
    let copies = super::copy::replicate(ctx, &repo);
    if ctx.json() {
        return print_json(&json!({
            "id": id,
            "cluster": ctx.cluster,
            "copies": copies,
            "databases": meta.databases.iter().map(|d| &d.name).collect::<Vec<_>>(),
            "size_bytes": summary.bytes,
            "stored_bytes": summary.save.bytes_stored,
            "duration_ms": summary.duration_ms,
            "pg_dump": {"path": pg_dump.path, "version": pg_dump.version},
            "per_database": meta.databases,
            "config_files": meta.config_files,
        }));
    }
    println!("{id}");
    note!(ctx,
        "dump {} of cluster {}: {} databases + globals with {} ({}), {} in archives, {} new stored, {:.1}s",
        id.short(),
        ctx.cluster,
        meta.databases.len(),
        pg_dump.path.display(),
        pg_dump.version,
        bytes(summary.bytes),
        bytes(summary.save.bytes_stored),
        summary.duration_ms as f64 / 1000.0
    );
    Ok(())
}

fn add(total: &mut Summary, part: &Summary) {
    total.files += part.files;
    total.bytes += part.bytes;
    total.save.bytes_stored += part.save.bytes_stored;
    total.save.bytes_new += part.save.bytes_new;
    total.save.blobs_new += part.save.blobs_new;
    total.save.blobs_reused += part.save.blobs_reused;
    total.save.bytes_reused += part.save.bytes_reused;
}

/// All dumps of `cluster`, oldest first.
pub fn list_dumps(repo: &Repository, cluster: &str) -> Result<Vec<(Id, Snapshot, DumpMeta)>> {
    let mut out = Vec::new();
    for (id, snapshot) in Snapshot::load_all(repo)? {
        if snapshot.kind != DUMP_KIND {
            continue;
        }
        let meta: DumpMeta = serde_json::from_value(snapshot.meta.clone())
            .with_context(|| format!("dump {id} has malformed metadata"))?;
        if meta.cluster == cluster {
            out.push((id, snapshot, meta));
        }
    }
    Ok(out)
}

/// Resolves "latest" or an id prefix among the dumps of the cluster.
pub fn find_dump(repo: &Repository, cluster: &str, spec: &str) -> Result<(Id, Snapshot, DumpMeta)> {
    let mut dumps = list_dumps(repo, cluster)?;
    if spec == "latest" {
        return dumps.pop().with_context(|| {
            format!(
                "no dumps of cluster {cluster:?} in {}: run `pgvault dump` first",
                repo.location()
            )
        });
    }
    let wanted = spec.to_lowercase();
    let mut matches: Vec<_> = dumps
        .into_iter()
        .filter(|(id, _, _)| id.to_hex().starts_with(&wanted))
        .collect();
    match matches.len() {
        0 => bail!(
            "no dump {spec:?} of cluster {cluster:?} in {}: see `pgvault dump list`",
            repo.location()
        ),
        1 => Ok(matches.remove(0)),
        _ => bail!("dump id prefix {spec:?} is ambiguous: give more characters"),
    }
}

fn list(ctx: &Context) -> Result<()> {
    let repo = ctx.open()?;
    let dumps = list_dumps(&repo, &ctx.cluster)?;
    if ctx.json() {
        let all: Vec<_> = dumps
            .iter()
            .map(|(id, s, m)| {
                json!({"id": id, "time": m.start_time, "label": s.label,
                       "databases": m.databases.iter().map(|d| &d.name).collect::<Vec<_>>(),
                       "size_bytes": s.summary.bytes, "stored_bytes": s.summary.save.bytes_stored,
                       "duration_ms": s.summary.duration_ms, "pg_dump_version": m.pg_dump_version})
            })
            .collect();
        return print_json(&json!({"dumps": all}));
    }
    let mut table = Table::new(&[
        "id",
        "time (UTC)",
        "databases",
        "size",
        "new stored",
        "took",
        "pg_dump",
    ]);
    for (id, s, m) in &dumps {
        table.row(vec![
            id.short(),
            m.start_time.format("%Y-%m-%d %H:%M:%S").to_string(),
            m.databases
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            bytes(s.summary.bytes),
            bytes(s.summary.save.bytes_stored),
            format!("{:.1}s", s.summary.duration_ms as f64 / 1000.0),
            m.pg_dump_version.clone(),
        ]);
    }
    table.print();
    Ok(())
}

/// A table-of-contents entry of a custom-format archive (`pg_restore -l`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TocEntry {
    pub kind: String,
    pub schema: String,
    pub name: String,
    pub owner: String,
}

/// Parses `pg_restore -l` lines like `215; 1259 16390 TABLE public accounts alice`.
pub fn parse_toc(listing: &str) -> Vec<TocEntry> {
    const KINDS: &[&str] = &[
        "TABLE DATA",
        "SEQUENCE SET",
        "MATERIALIZED VIEW DATA",
        "MATERIALIZED VIEW",
        "TABLE",
        "SEQUENCE OWNED BY",
        "SEQUENCE",
        "VIEW",
        "FUNCTION",
        "PROCEDURE",
        "TRIGGER",
        "INDEX",
        "CONSTRAINT",
        "FK CONSTRAINT",
        "EXTENSION",
        "SCHEMA",
        "TYPE",
        "DOMAIN",
        "COMMENT",
        "ACL",
        "BLOB",
        "LARGE OBJECT",
        "DATABASE",
        "DEFAULT",
        "AGGREGATE",
        "RULE",
        "POLICY",
    ];
    let mut out = Vec::new();
    for line in listing.lines() {
        if line.starts_with(';') || line.trim().is_empty() {
            continue;
        }
        // "<dumpId>; <tableoid> <oid> <rest>"
        let Some((_, rest)) = line.split_once(';') else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(_), Some(_)) = (words.next(), words.next()) else {
            continue;
        };
        let rest: String = words.collect::<Vec<_>>().join(" ");
        let Some(kind) = KINDS
            .iter()
            .find(|k| rest.starts_with(*k) && rest[k.len()..].starts_with(' '))
        else {
            continue;
        };
        let tail: Vec<&str> = rest[kind.len()..].split_whitespace().collect();
        let (schema, name, owner) = match tail.len() {
            0 => continue,
            1 => ("-".to_string(), tail[0].to_string(), String::new()),
            2 => ("-".to_string(), tail[0].to_string(), tail[1].to_string()),
            n => (
                tail[0].to_string(),
                tail[1..n - 1].join(" "),
                tail[n - 1].to_string(),
            ),
        };
        out.push(TocEntry {
            kind: kind.to_string(),
            schema,
            name,
            owner,
        });
    }
    out
}

/// The table of contents of one database's archive.
pub fn table_of_contents(
    repo: &Repository,
    snapshot: &Snapshot,
    meta: &DumpMeta,
    database: &str,
    pg_bin: Option<&std::path::Path>,
) -> Result<Vec<TocEntry>> {
    let node = database_node(repo, snapshot, meta, database)?;
    let pg_restore = pg::tools::find("pg_restore", meta.pg_dump_major, pg_bin)?;
    let mut child = Command::new(&pg_restore.path)
        .arg("--list")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", pg_restore.path.display()))?;
    let stderr = collect_stderr(&mut child);
    let mut stdin = child.stdin.take().context("no stdin")?;
    let content = node.content.clone();
    let writer = std::thread::scope(|scope| {
        let handle = scope.spawn(move || repo::restore::write_content(repo, &content, &mut stdin));
        let mut listing = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            let _ = stdout.read_to_string(&mut listing);
        }
        (handle.join(), listing)
    });
    let status = child.wait()?;
    let (written, listing) = writer;
    if !status.success() {
        bail!(
            "pg_restore --list of database {database:?} failed: {}",
            stderr.join().unwrap_or_default().trim()
        );
    }
    match written {
        Ok(Err(e)) if !is_broken_pipe(&e) => return Err(e.into()),
        Ok(_) => {}
        Err(_) => bail!("writing the archive to pg_restore panicked"),
    }
    Ok(parse_toc(&listing))
}

/// The stored archive of `database` in a dump.
pub fn database_node(
    repo: &Repository,
    snapshot: &Snapshot,
    meta: &DumpMeta,
    database: &str,
) -> Result<Node> {
    if !meta.databases.iter().any(|d| d.name == database) {
        bail!(
            "database {database:?} is not in this dump (it has: {})",
            meta.databases
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let top = Tree::load(repo, &snapshot.tree)?;
    let databases = top
        .find("databases")
        .and_then(|n| n.subtree)
        .context("dump has no databases tree")?;
    Tree::load(repo, &databases)?
        .find(&archive_name(database))
        .cloned()
        .with_context(|| format!("dump has no archive for database {database:?}"))
}

fn show(ctx: &Context, spec: &str, database: Option<&str>) -> Result<()> {
    let repo = ctx.open()?;
    let (id, snapshot, meta) = find_dump(&repo, &ctx.cluster, spec)?;
    let toc = match database {
        Some(db) => Some(table_of_contents(
            &repo,
            &snapshot,
            &meta,
            db,
            ctx.pg_bin.as_deref(),
        )?),
        None => None,
    };
    if ctx.json() {
        return print_json(&json!({
            "id": id, "label": snapshot.label, "meta": meta,
            "size_bytes": snapshot.summary.bytes, "stored_bytes": snapshot.summary.save.bytes_stored,
            "toc": toc,
        }));
    }
    println!(
        "dump {} of cluster {} at {} by pg_dump {} (server {}.{}), {} config files: {}",
        id.short(),
        meta.cluster,
        meta.start_time.format("%Y-%m-%d %H:%M:%S UTC"),
        meta.pg_dump_version,
        meta.server_version_num / 10000,
        meta.server_version_num % 10000,
        meta.config_files.len(),
        meta.config_files.join(", ")
    );
    let mut table = Table::new(&[
        "database",
        "owner",
        "encoding",
        "db size",
        "archive",
        "new stored",
        "took",
    ]);
    for d in &meta.databases {
        table.row(vec![
            d.name.clone(),
            d.owner.clone(),
            d.encoding.clone(),
            bytes(d.database_bytes),
            bytes(d.size_bytes),
            bytes(d.stored_bytes),
            format!("{:.1}s", d.duration_ms as f64 / 1000.0),
        ]);
    }
    table.print();
    if let Some(toc) = toc {
        let mut table = Table::new(&["kind", "schema", "name", "owner"]);
        for e in toc
            .iter()
            .filter(|e| e.kind != "TABLE DATA" && e.kind != "ACL")
        {
            table.row(vec![
                e.kind.clone(),
                e.schema.clone(),
                e.name.clone(),
                e.owner.clone(),
            ]);
        }
        println!();
        table.print();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_contents_lines() {
        let listing = ";\n; Archive created at 2026-11-25\n;\n\
            215; 1259 16390 TABLE public accounts alice\n\
            3350; 0 16390 TABLE DATA public accounts alice\n\
            5; 3079 16385 EXTENSION - hstore \n\
            216; 1259 16400 VIEW app big spenders bob\n";
        let toc = parse_toc(listing);
        assert_eq!(toc.len(), 4, "{toc:?}");
        assert_eq!(
            toc[0],
            TocEntry {
                kind: "TABLE".into(),
                schema: "public".into(),
                name: "accounts".into(),
                owner: "alice".into()
            }
        );
        assert_eq!(toc[1].kind, "TABLE DATA");
        assert_eq!(toc[2].kind, "EXTENSION");
        assert_eq!(toc[3].name, "big spenders");
    }

    #[test]
    fn archive_names_are_file_names() {
        assert_eq!(archive_name("app"), "app.dump");
        assert_eq!(archive_name("a/b%c"), "a%2Fb%25c.dump");
    }
}
