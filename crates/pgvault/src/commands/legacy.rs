//! `pgvault legacy list|restore|import`: one command instead of the runbook "list the
//! bucket, pick the newest backup, download every part, order them numerically,
//! concatenate, decrypt, gunzip, replay into psql, rename the database".
//!
//! Streaming end to end: parts are fetched in parallel ahead of the reader (bounded
//! memory), decrypted and decompressed on the fly and fed to psql; nothing is staged on
//! disk. Everything that can be checked before replaying is checked first: a missing
//! part, a truncated last part, foreign data and a wrong secret (the first decrypted
//! block must be gzip or SQL text) are refused before the target is touched.

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::Stdio;

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use flate2::read::MultiGzDecoder;
use pg::conn::{quote_ident, ConnectOptions, Connection};
use repo::archive::{archive_stream, ArchiveOptions};
use repo::lock::LockKind;
use repo::saver::BlobSaver;
use repo::snapshot::{Snapshot, Tree};
use repo::storage::{DynStorage, Location};
use serde_json::json;

use super::dump::{
    collect_stderr, tool_command, DumpMeta, DUMPALL_FILE, DUMPALL_FORMAT, DUMP_KIND,
};
use crate::cli::{LegacyCommand, LegacyDecryptArgs, LegacySourceArgs};
use crate::config::read_secret_file;
use crate::context::Context;
use crate::legacy::openssl::{self, KeyDerivation};
use crate::legacy::{discover, LegacyBackup, PartsReader};
use crate::output::{bytes, note, print_json, Table};

pub fn legacy_command(ctx: &Context, command: &LegacyCommand) -> Result<()> {
    match command {
        LegacyCommand::List(source) => list(ctx, source),
        LegacyCommand::Restore(args) => restore(ctx, args),
        LegacyCommand::Import(args) => {
            import(ctx, &args.source, &args.decrypt, args.label.as_deref())
        }
    }
}

fn source_storage(source: &LegacySourceArgs) -> Result<DynStorage> {
    let location = Location::parse(&source.source).map_err(|e| anyhow::anyhow!("--source: {e}"))?;
    let mut options = repo::BackendOptions::default();
    options.s3.endpoint = source.source_endpoint.clone();
    options.azblob.endpoint = source.source_endpoint.clone();
    Ok(repo::open_storage(&location, &options)?)
}

fn backups_of(storage: &DynStorage, source: &LegacySourceArgs) -> Result<Vec<LegacyBackup>> {
    let objects = storage
        .list(&format!("{}-", source.instance))
        .with_context(|| format!("listing {}", source.source))?;
    let found = discover(&objects, &source.instance);
    if found.is_empty() {
        bail!(
            "no backups of instance {:?} in {} (no {}-<timestamp>.json metadata files): check --source and --instance",
            source.instance,
            source.source,
            source.instance
        );
    }
    Ok(found)
}

fn list(ctx: &Context, source: &LegacySourceArgs) -> Result<()> {
    let storage = source_storage(source)?;
    let found = backups_of(&storage, source)?;
    if ctx.json() {
        let all: Vec<_> = found
            .iter()
            .map(|b| {
                json!({"id": b.id, "time": b.time, "parts": b.parts.len(), "size_bytes": b.size(),
                       "contiguous": b.contiguous(), "missing_parts": b.missing})
            })
            .collect();
        return print_json(&json!({"instance": source.instance, "backups": all}));
    }
    let mut table = Table::new(&["backup", "time (UTC)", "parts", "size", "parts complete"]);
    for b in &found {
        table.row(vec![
            b.id.clone(),
            b.time
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "?".into()),
            b.parts.len().to_string(),
            bytes(b.size()),
            if b.contiguous() {
                "yes".into()
            } else if b.parts.is_empty() {
                "NO DATA".into()
            } else {
                format!(
                    "NO: missing {}",
                    b.missing
                        .iter()
                        .map(|i| format!("-{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        ]);
    }
    table.print();
    Ok(())
}

/// The decrypted, decompressed SQL of the chosen backup, checked as far as possible
/// before anything is read for real.
struct SqlStream {
    backup: LegacyBackup,
    derivation: KeyDerivation,
    gzip: bool,
    reader: Box<dyn BufRead + Send>,
}

fn open_sql(
    ctx: &Context,
    source: &LegacySourceArgs,
    args: &LegacyDecryptArgs,
) -> Result<SqlStream> {
    let secret = read_secret_file(&args.secret_file, "legacy secret")?;
    let storage = source_storage(source)?;
    let found = backups_of(&storage, source)?;
    let backup = if args.backup == "latest" {
        found.last().cloned()
    } else {
        found.iter().find(|b| b.id == args.backup).cloned()
    }
    .with_context(|| {
        format!(
            "no backup {:?} of instance {:?} (backups: {})",
            args.backup,
            source.instance,
            found
                .iter()
                .map(|b| b.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    if backup.parts.is_empty() {
        bail!(
            "backup {} has a metadata file but no data objects: nothing to restore",
            backup.id
        );
    }
    if !backup.missing.is_empty() {
        bail!(
            "backup {} is missing part(s) {}: nothing was restored; find the parts or choose another --backup",
            backup.id,
            backup
                .missing
                .iter()
                .map(|i| format!("{}-{i}", backup.id))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let total = backup.size();
    if total < 32 || (total - 16) % 16 != 0 {
        let last = backup.parts.last().map(|p| p.key.as_str()).unwrap_or("");
        bail!(
            "backup {} is {total} bytes, not a whole number of cipher blocks: the last part {last} is truncated (or the data is not openssl enc output); nothing was restored",
            backup.id
        );
    }
    let mut parts = PartsReader::new(storage, &backup.parts, ctx.jobs.max(1) * 2);
    let salt = openssl::read_header(&mut parts).with_context(|| format!("backup {}", backup.id))?;
    let mut first = [0u8; 16];
    parts
        .read_exact(&mut first)
        .context("reading the first cipher block")?;
    let derivation = match (args.digest.as_str(), args.pbkdf2) {
        (_, true) => KeyDerivation::Pbkdf2 { iterations: args.iter.unwrap_or(10_000) },
        ("md5", _) => KeyDerivation::Md5,
        ("sha256", _) => KeyDerivation::Sha256,
        _ => openssl::detect(secret.as_bytes(), &salt, &first, args.iter).with_context(|| {
            format!(
                "backup {}: the secret does not decrypt it with -md md5, -md sha256 or -pbkdf2: wrong secret? (or pass --pbkdf2 --iter N for other iteration counts)",
                backup.id
            )
        })?,
    };
    let (key, iv) = openssl::derive(derivation, secret.as_bytes(), &salt);
    let cipher = io::Cursor::new(first.to_vec()).chain(parts);
    let mut plain =
        BufReader::with_capacity(256 * 1024, openssl::Decryptor::new(cipher, &key, &iv));
    let head = plain.fill_buf().map_err(|e| wrong_secret(&backup, e))?;
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    if !gzip
        && head
            .iter()
            .take(64)
            .any(|b| !(b.is_ascii_graphic() || b.is_ascii_whitespace()))
    {
        bail!(
            "backup {} decrypts to neither gzip nor SQL text: wrong secret or key derivation (try --digest md5|sha256 or --pbkdf2)?",
            backup.id
        );
    }
    let reader: Box<dyn BufRead + Send> = if gzip {
        Box::new(BufReader::with_capacity(
            256 * 1024,
            MultiGzDecoder::new(plain),
        ))
    } else {
        Box::new(plain)
    };
    tracing::info!(
        "backup {}: {} parts, {}, openssl {derivation}, {}",
        backup.id,
        backup.parts.len(),
        bytes(total),
        if gzip { "gzip" } else { "plain SQL" }
    );
    Ok(SqlStream {
        backup,
        derivation,
        gzip,
        reader,
    })
}

fn wrong_secret(backup: &LegacyBackup, e: io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "backup {}: {e} (wrong secret, or a damaged part?)",
        backup.id
    )
}

/// What replaying a script did.
#[derive(Debug, Default)]
pub struct Replay {
    /// Statements left out because they fail on any server that already has the
    /// object (the bootstrap superuser's CREATE ROLE), as the runbook expects.
    pub skipped: Vec<String>,
    pub bytes: u64,
}

/// Replays a pg_dumpall script into the server with psql, stopping at the first SQL
/// error (ON_ERROR_STOP). `CREATE ROLE r;` for roles that already exist on the target
/// is left out: the `ALTER ROLE r WITH …` that follows still sets its attributes.
pub fn replay(
    ctx: &Context,
    options: &ConnectOptions,
    mut script: impl BufRead,
    what: &str,
) -> Result<Replay> {
    let mut conn = Connection::connect(options)
        .with_context(|| format!("cannot reach the target server {options}"))?;
    let version: u32 = conn
        .query_one_value("SHOW server_version_num")?
        .and_then(|v| v.parse().ok())
        .context("target server version")?;
    let existing: BTreeSet<String> = conn
        .query_rows("SELECT rolname FROM pg_roles")?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    drop(conn);
    let psql = pg::tools::find("psql", version / 10000, ctx.pg_bin.as_deref())?;
    let connect_db = options.get("dbname").unwrap_or("postgres").to_string();
    let mut command = tool_command(&psql, options, &connect_db);
    command
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", psql.path.display()))?;
    let stderr = collect_stderr(&mut child);
    let mut stdin = child.stdin.take().context("no stdin")?;
    let mut report = Replay::default();
    let mut line = Vec::new();
    let mut in_copy = false;
    let fed: io::Result<()> = (|| loop {
        line.clear();
        if script.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        report.bytes += line.len() as u64;
        if in_copy {
            in_copy = line != b"\\.\n";
        } else if line.starts_with(b"COPY ") && line.ends_with(b"FROM stdin;\n") {
            in_copy = true;
        } else if let Some(role) = existing_role_created(&line, &existing) {
            report
                .skipped
                .push(format!("CREATE ROLE {role} (exists on the target)"));
            continue;
        }
        stdin.write_all(&line)?;
    })();
    drop(stdin);
    let status = child.wait()?;
    let errors = stderr.join().unwrap_or_default();
    if !status.success() {
        let first = errors
            .lines()
            .find(|l| l.contains("ERROR") || l.contains("FATAL"))
            .or_else(|| errors.lines().next())
            .unwrap_or("no message");
        bail!("{what} stopped at the first SQL error: {}", first.trim());
    }
    match fed {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            bail!("psql ended early while replaying {what}: {}", errors.trim())
        }
        Err(e) => bail!("reading {what}: {e} (wrong secret, or a damaged part?)"),
        Ok(()) => {}
    }
    Ok(report)
}

/// The role name when `line` is exactly `CREATE ROLE name;` for an existing role.
fn existing_role_created(line: &[u8], existing: &BTreeSet<String>) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let name = text.strip_prefix("CREATE ROLE ")?.strip_suffix(';')?;
    let unquoted = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None if !name.contains(' ') => name.to_string(),
        None => return None,
    };
    existing.contains(&unquoted).then_some(unquoted)
}

fn restore(ctx: &Context, args: &crate::cli::LegacyRestoreArgs) -> Result<()> {
    let rename = match &args.rename {
        Some(spec) => Some(
            spec.split_once('=')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("--rename {spec:?}: write OLD=NEW"))?,
        ),
        None => None,
    };
    if args.to_file.is_none() && args.target_conn.is_none() && ctx.pg_conn.is_none() {
        bail!("say where to: --target-conn CONNINFO (replay into a server) or --to-file PATH");
    }
    // Refusals that need the target come before reading anything.
    let target = match &args.to_file {
        Some(_) => None,
        None => {
            let options =
                ConnectOptions::resolve(args.target_conn.as_deref().or(ctx.pg_conn.as_deref()))?;
            let mut conn = Connection::connect(&options)
                .with_context(|| format!("cannot reach the target server {options}"))?;
            if let Some((old, new)) = &rename {
                let exists = |conn: &mut Connection, name: &str| -> Result<bool> {
                    Ok(conn
                        .query_one_value(&format!(
                            "SELECT 1 FROM pg_database WHERE datname = {}",
                            pg::conn::quote_literal(name)
                        ))?
                        .is_some())
                };
                if exists(&mut conn, old)? {
                    bail!("database {old:?} already exists on the target, and the backup creates it: restore into a server without it");
                }
                if exists(&mut conn, new)? && !args.replace {
                    bail!("database {new:?} exists on the target: pass --replace to drop it after a successful restore, or choose another --rename");
                }
            }
            Some(options)
        }
    };
    let started = std::time::Instant::now();
    let stream = open_sql(ctx, &args.source, &args.decrypt)?;
    let backup_id = stream.backup.id.clone();
    if let Some(path) = &args.to_file {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let mut out = tempfile::Builder::new()
            .prefix(".pgvault-legacy-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        let mut reader = stream.reader;
        let written = io::copy(&mut reader, out.as_file_mut())
            .map_err(|e| wrong_secret(&stream.backup, e))?;
        out.as_file().sync_all()?;
        out.persist(path)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot write {}", path.display()))?;
        if ctx.json() {
            return print_json(&json!({"backup": backup_id, "written": path, "bytes": written}));
        }
        note!(
            ctx,
            "wrote {} ({}) from backup {backup_id}",
            path.display(),
            bytes(written)
        );
        return Ok(());
    }
    let options = target.context("target")?;
    let report = replay(ctx, &options, stream.reader, &format!("backup {backup_id}"))?;
    if let Some((old, new)) = &rename {
        let mut conn = Connection::connect(&options)?;
        let version: u32 = conn
            .query_one_value("SHOW server_version_num")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if args.replace {
            let force = if version >= 130000 {
                " WITH (FORCE)"
            } else {
                ""
            };
            conn.execute(&format!(
                "DROP DATABASE IF EXISTS {}{force}",
                quote_ident(new)
            ))?;
        }
        conn.execute(&format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(old),
            quote_ident(new)
        ))
        .with_context(|| format!("renaming database {old:?} to {new:?}"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if ctx.json() {
        return print_json(&json!({
            "backup": backup_id,
            "parts": stream.backup.parts.len(),
            "encrypted_bytes": stream.backup.size(),
            "sql_bytes": report.bytes,
            "key_derivation": stream.derivation.to_string(),
            "gzip": stream.gzip,
            "expected_and_skipped": report.skipped,
            "renamed": rename.as_ref().map(|(a, b)| json!({"from": a, "to": b})),
            "duration_ms": (seconds * 1000.0) as u64,
        }));
    }
    note!(ctx,
        "restored backup {backup_id} ({} parts, {} encrypted, {} of SQL, openssl {}) in {seconds:.1}s",
        stream.backup.parts.len(),
        bytes(stream.backup.size()),
        bytes(report.bytes),
        stream.derivation
    );
    for skipped in &report.skipped {
        note!(ctx, "  expected on a fresh server and left out: {skipped}");
    }
    if let Some((old, new)) = &rename {
        note!(ctx, "  renamed database {old:?} to {new:?}");
    }
    Ok(())
}

/// Passes data through while noting what a pg_dumpall script says about itself.
struct Sniffer<R> {
    inner: R,
    partial: Vec<u8>,
    databases: Vec<String>,
    dumped_from: Option<String>,
    dumped_by: Option<String>,
}

impl<R: Read> Sniffer<R> {
    fn look(&mut self, line: &[u8]) {
        let Ok(text) = std::str::from_utf8(line) else {
            return;
        };
        let text = text.trim_end();
        if let Some(rest) = text.strip_prefix("CREATE DATABASE ") {
            let name = match rest.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or("").to_string(),
                None => rest.split([' ', ';']).next().unwrap_or("").to_string(),
            };
            if !name.is_empty() && !self.databases.contains(&name) {
                self.databases.push(name);
            }
        } else if let Some(v) = text.strip_prefix("-- Dumped from database version ") {
            self.dumped_from.get_or_insert(v.trim().to_string());
        } else if let Some(v) = text.strip_prefix("-- Dumped by pg_dump") {
            let v = v
                .trim_start_matches("all")
                .trim()
                .trim_start_matches("version")
                .trim();
            self.dumped_by.get_or_insert(v.to_string());
        }
    }
}

impl<R: Read> Read for Sniffer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        for &b in &out[..n] {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.look(&line);
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
        Ok(n)
    }
}

fn import(
    ctx: &Context,
    source: &LegacySourceArgs,
    decrypt: &LegacyDecryptArgs,
    label: Option<&str>,
) -> Result<()> {
    let start_time = Utc::now();
    let repo = ctx.open()?;
    let stream = open_sql(ctx, source, decrypt)?;
    let lock = ctx.lock(&repo, LockKind::Shared)?;
    let mut sniffer = Sniffer {
        inner: stream.reader,
        partial: Vec::new(),
        databases: Vec::new(),
        dumped_from: None,
        dumped_by: None,
    };
    let saver = BlobSaver::new(&repo);
    let archived = archive_stream(
        &saver,
        &mut sniffer,
        DUMPALL_FILE,
        &ArchiveOptions::default(),
    )
    .map_err(|e| anyhow::anyhow!("{e} (wrong secret, or a damaged part?)"))?;
    let node = Tree::load(&repo, &archived.tree)?
        .nodes
        .into_iter()
        .next()
        .context("stored stream has no node")?;
    let tree = Tree::sorted(vec![node]).save(&saver)?;
    saver.flush()?;
    let version_num = |text: &Option<String>| -> u32 {
        text.as_deref()
            .and_then(|v| {
                let mut it = v.split(|c: char| !c.is_ascii_digit());
                let major: u32 = it.next()?.parse().ok()?;
                let minor: u32 = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
                Some(major * 10000 + minor)
            })
            .unwrap_or(0)
    };
    let meta = DumpMeta {
        cluster: ctx.cluster.clone(),
        system_identifier: String::new(),
        server_version_num: version_num(&sniffer.dumped_from),
        pg_dump_version: sniffer.dumped_by.clone().unwrap_or_default(),
        pg_dump_major: version_num(&sniffer.dumped_by) / 10000,
        databases: sniffer
            .databases
            .iter()
            .map(|name| super::dump::DatabaseDump {
                name: name.clone(),
                owner: String::new(),
                encoding: String::new(),
                collate: String::new(),
                ctype: String::new(),
                database_bytes: 0,
                size_bytes: 0,
                stored_bytes: 0,
                duration_ms: 0,
            })
            .collect(),
        globals: true,
        config_files: Vec::new(),
        start_time: stream.backup.time.unwrap_or(start_time),
        stop_time: stream.backup.time.unwrap_or(start_time),
        format: DUMPALL_FORMAT.into(),
        source: Some(format!("{} {}", source.source, stream.backup.id)),
    };
    let mut summary = archived.summary;
    summary.save = saver.stats();
    summary.duration_ms = (Utc::now() - start_time).num_milliseconds().max(0) as u64;
    let snapshot = Snapshot {
        label: label
            .map(str::to_string)
            .or_else(|| Some(format!("legacy {}", stream.backup.id))),
        tags: ctx.cluster_tags(),
        meta: serde_json::to_value(&meta).context("encode dump metadata")?,
        ..Snapshot::new(DUMP_KIND, meta.start_time, meta.stop_time, tree, summary)
    };
    lock.ensure_held()?;
    let id = snapshot.save(&repo)?;
    if ctx.json() {
        return print_json(&json!({
            "id": id, "backup": stream.backup.id, "databases": sniffer.databases,
            "size_bytes": summary.bytes, "stored_bytes": summary.save.bytes_stored,
        }));
    }
    println!("{id}");
    note!(
        ctx,
        "imported backup {} as dump {} of cluster {}: {} of SQL, {} stored; databases: {}",
        stream.backup.id,
        id.short(),
        ctx.cluster,
        bytes(summary.bytes),
        bytes(summary.save.bytes_stored),
        sniffer.databases.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_creates_of_existing_roles_are_left_out() {
        let existing: BTreeSet<String> = ["postgres".to_string(), "Odd \"one\"".to_string()].into();
        assert_eq!(
            existing_role_created(b"CREATE ROLE postgres;\n", &existing),
            Some("postgres".into())
        );
        assert_eq!(
            existing_role_created(b"CREATE ROLE \"Odd \"\"one\"\"\";\n", &existing),
            Some("Odd \"one\"".into())
        );
        assert_eq!(
            existing_role_created(b"CREATE ROLE alice;\n", &existing),
            None
        );
        assert_eq!(
            existing_role_created(b"ALTER ROLE postgres WITH SUPERUSER;\n", &existing),
            None
        );
    }
}
