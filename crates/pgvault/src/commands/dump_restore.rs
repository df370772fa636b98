//! `pgvault dump restore`: a whole cluster (globals first, then every database), one
//! database (optionally under another name), single tables, or files for manual use.
//!
//! Archives stream from the repository into `pg_restore` (stdin); only a parallel
//! restore (`--jobs` > 1) stages one to a temporary file, because `pg_restore -j` needs
//! a seekable file — and says so. Existing databases are never replaced silently.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};
use pg::conn::{conninfo_value, quote_ident, quote_literal, ConnectOptions, Connection};
use pg::tools::Tool;
use repo::restore::write_content;
use repo::snapshot::{Node, Snapshot, Tree};
use repo::Repository;
use serde_json::json;

use super::archive::write_atomically;
use super::dump::{
    collect_stderr, database_node, find_dump, is_broken_pipe, table_of_contents, tool_command,
    DumpMeta, DUMPALL_FILE, DUMPALL_FORMAT,
};
use crate::cli::DumpRestoreArgs;
use crate::context::Context;
use crate::output::{note, print_json};

/// Streams a stored file into `command`'s stdin; returns its stderr, failing on a
/// non-zero exit with the first error line.
fn feed(repo: &Repository, node: &Node, mut command: Command, what: &str) -> Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let stderr = collect_stderr(&mut child);
    let mut stdin = child.stdin.take().context("no stdin")?;
    let written = write_content(repo, &node.content, &mut stdin);
    drop(stdin);
    let status = child.wait()?;
    let errors = stderr.join().unwrap_or_default();
    if !status.success() {
        let first = errors
            .lines()
            .find(|l| l.contains("error") || l.contains("ERROR") || l.contains("FATAL"))
            .or_else(|| errors.lines().next())
            .unwrap_or("no message");
        bail!("{what} failed: {}", first.trim());
    }
    // A child may stop reading once it has what it needs; anything else is ours.
    match written {
        Err(e) if !is_broken_pipe(&e) => {
            bail!("reading the dump from the repository for {what}: {e}")
        }
        _ => {}
    }
    Ok(errors)
}

fn config_nodes(repo: &Repository, snapshot: &Snapshot) -> Result<(Option<Node>, Vec<Node>)> {
    let top = Tree::load(repo, &snapshot.tree)?;
    let globals = top.find("globals.sql").cloned();
    let config = match top.find("config").and_then(|n| n.subtree) {
        Some(id) => Tree::load(repo, &id)?.nodes,
        None => Vec::new(),
    };
    Ok((globals, config))
}

fn write_node(repo: &Repository, node: &Node, path: &Path) -> Result<()> {
    let mut data = Vec::with_capacity(node.size as usize);
    write_content(repo, &node.content, &mut data)?;
    write_atomically(path, &data, true)
}

/// Splits `schema.table` (or `table`) into pg_restore's -n/-t.
fn table_args(table: &str) -> Vec<String> {
    match table.split_once('.') {
        Some((schema, name)) => vec![format!("--schema={schema}"), format!("--table={name}")],
        None => vec![format!("--table={table}")],
    }
}

pub fn restore(ctx: &Context, args: &DumpRestoreArgs) -> Result<()> {
    let repo = ctx.open()?;
    let _lock = ctx.read_lock(&repo)?;
    let (id, snapshot, meta) = find_dump(&repo, &ctx.cluster, &args.dump)?;
    if meta.format == DUMPALL_FORMAT {
        return restore_dumpall(ctx, &repo, &id, &snapshot, args);
    }
    let databases: Vec<String> = if args.globals {
        Vec::new()
    } else if args.databases.is_empty() {
        meta.databases.iter().map(|d| d.name.clone()).collect()
    } else {
        args.databases.clone()
    };
    for db in &databases {
        database_node(&repo, &snapshot, &meta, db)?;
    }
    if (args.as_name.is_some() || !args.tables.is_empty()) && args.databases.len() != 1 {
        bail!("--as and --table need exactly one --database");
    }
    if !args.tables.is_empty() {
        let toc = table_of_contents(
            &repo,
            &snapshot,
            &meta,
            &databases[0],
            ctx.pg_bin.as_deref(),
        )?;
        let tables: Vec<String> = toc
            .iter()
            .filter(|e| e.kind == "TABLE")
            .map(|e| format!("{}.{}", e.schema, e.name))
            .collect();
        for wanted in &args.tables {
            let found = tables
                .iter()
                .any(|t| t == wanted || t.split_once('.').is_some_and(|(_, n)| n == wanted));
            if !found {
                bail!(
                    "table {wanted:?} is not in the dump of database {:?} (tables: {})",
                    databases[0],
                    tables.join(", ")
                );
            }
        }
    }
    let with_globals = args.globals || (args.databases.is_empty() && !args.data_only);

    if let Some(dir) = &args.to_dir {
        return to_dir(ctx, &repo, &snapshot, &meta, &databases, with_globals, dir);
    }
    let pg_restore_major = meta.pg_dump_major;
    if let Some(path) = &args.to_file {
        let pg_restore = pg::tools::find("pg_restore", pg_restore_major, ctx.pg_bin.as_deref())?;
        return to_file(
            ctx,
            &repo,
            &snapshot,
            &meta,
            &databases,
            with_globals,
            args,
            &pg_restore,
            path,
        );
    }

    let target = args.target_conn.as_deref().or(ctx.pg_conn.as_deref());
    let options = ConnectOptions::resolve(target)?;
    let mut conn = Connection::connect(&options)
        .with_context(|| format!("cannot reach the target server {options}"))?;
    let version: u32 = conn
        .query_one_value("SHOW server_version_num")?
        .and_then(|v| v.parse().ok())
        .context("target server version")?;
    let pg_restore = pg::tools::find(
        "pg_restore",
        (version / 10000).max(pg_restore_major),
        ctx.pg_bin.as_deref(),
    )?;
    let psql = pg::tools::probe(&pg_restore.path.with_file_name("psql"))?;
    let connect_db = options.get("dbname").unwrap_or("postgres").to_string();
    let existing: Vec<String> = conn
        .query_rows("SELECT datname FROM pg_database")?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();

    // Check every database before touching any.
    let mut plan = Vec::new();
    for db in &databases {
        let target_name = args.as_name.clone().unwrap_or_else(|| db.clone());
        let exists = existing.contains(&target_name);
        // Every server has these: like pg_dumpall, restore their contents in place
        // during a whole-cluster restore.
        let system = exists
            && args.databases.is_empty()
            && ["postgres", "template1"].contains(&target_name.as_str());
        let whole = args.tables.is_empty() && !args.data_only && !system;
        if whole && exists && args.if_exists == "fail" {
            bail!(
                "database {target_name:?} exists on the target: pass --if-exists drop to replace it, or --as NEWNAME to restore beside it"
            );
        }
        if args.data_only && !exists {
            bail!("database {target_name:?} does not exist on the target: a --data-only restore needs it");
        }
        plan.push((db.clone(), target_name, exists, whole, system));
    }

    let mut expected_errors = Vec::new();
    if with_globals {
        let (globals, _) = config_nodes(&repo, &snapshot)?;
        let globals = globals.context("dump has no globals")?;
        let mut command = tool_command(&psql, &options, &connect_db);
        command.args(["-X", "-q", "-v", "ON_ERROR_STOP=0", "-f", "-"]);
        command.stdout(Stdio::null());
        let errors = feed(&repo, &globals, command, "psql (globals)")?;
        for line in errors.lines().filter(|l| l.contains("ERROR:")) {
            // Roles that already exist (at least the bootstrap superuser) are expected;
            // their attributes are set by the ALTER ROLE that follows each CREATE ROLE.
            if line.contains("already exists") {
                expected_errors.push(line.trim().to_string());
            } else {
                bail!("restoring roles and tablespaces failed: {}", line.trim());
            }
        }
    }

    let mut restored = Vec::new();
    for (db, target_name, exists, whole, system) in plan {
        let info = meta
            .databases
            .iter()
            .find(|d| d.name == db)
            .context("database metadata")?;
        let node = database_node(&repo, &snapshot, &meta, &db)?;
        let mut restore_args = vec!["--exit-on-error".to_string()];
        if args.schema_only {
            restore_args.push("--schema-only".into());
        }
        if args.data_only {
            restore_args.push("--data-only".into());
        }
        for table in &args.tables {
            restore_args.extend(table_args(table));
        }
        if whole && exists {
            let force = if version >= 130000 {
                " WITH (FORCE)"
            } else {
                ""
            };
            conn.execute(&format!(
                "DROP DATABASE {}{force}",
                quote_ident(&target_name)
            ))
            .with_context(|| format!("dropping database {target_name:?} for --if-exists drop"))?;
        }
        let into = if whole && args.as_name.is_none() {
            // The archive's own CREATE DATABASE keeps owner, encoding, locale, ACLs and
            // per-database settings.
            restore_args.push("--create".into());
            connect_db.clone()
        } else {
            if !exists || whole {
                create_database(&mut conn, &target_name, info)?;
            }
            if (!args.tables.is_empty() || system) && args.if_exists == "drop" && !args.data_only {
                restore_args.extend(["--clean".into(), "--if-exists".into()]);
            }
            target_name.clone()
        };
        restore_args.push(format!("--dbname=dbname={}", conninfo_value(&into)));
        let what = format!("pg_restore of database {db:?} into {target_name:?}");
        if ctx.jobs > 1 && args.tables.is_empty() && node.size > 0 {
            let staged = tempfile::Builder::new()
                .prefix("pgvault-dump-")
                .tempfile()
                .context("cannot create a temporary file for a parallel restore")?;
            note!(
                ctx,
                "staging the archive of {db:?} ({}) in {} for pg_restore --jobs {}",
                crate::output::bytes(node.size),
                staged.path().display(),
                ctx.jobs
            );
            {
                let mut file = staged.as_file();
                write_content(&repo, &node.content, &mut file)?;
                file.flush()?;
            }
            let mut command = tool_command(&pg_restore, &options, &into);
            command
                .args(&restore_args)
                .arg(format!("--jobs={}", ctx.jobs))
                .arg(staged.path());
            let out = command
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("cannot start {what}"))?;
            if !out.status.success() {
                let errors = String::from_utf8_lossy(&out.stderr);
                bail!(
                    "{what} failed: {}",
                    errors
                        .lines()
                        .find(|l| l.contains("error"))
                        .unwrap_or(errors.trim())
                );
            }
        } else {
            let mut command = tool_command(&pg_restore, &options, &into);
            command.args(&restore_args);
            feed(&repo, &node, command, &what)?;
        }
        restored.push(json!({"database": db, "as": target_name}));
    }
    if ctx.json() {
        return print_json(&json!({
            "dump": id,
            "globals": with_globals,
            "databases": restored,
            "expected_errors": expected_errors,
            "pg_restore": pg_restore.path,
        }));
    }
    note!(
        ctx,
        "restored dump {}{} and {} database(s) with {} ({}){}",
        id.short(),
        if with_globals { ": globals" } else { "" },
        restored.len(),
        pg_restore.path.display(),
        pg_restore.version,
        if expected_errors.is_empty() {
            String::new()
        } else {
            format!("; expected and ignored: {}", expected_errors.join("; "))
        }
    );
    Ok(())
}

/// An imported pg_dumpall script is restored whole, into a server or a file.
fn restore_dumpall(
    ctx: &Context,
    repo: &Repository,
    id: &repo::Id,
    snapshot: &Snapshot,
    args: &DumpRestoreArgs,
) -> Result<()> {
    if !args.databases.is_empty()
        || args.as_name.is_some()
        || !args.tables.is_empty()
        || args.globals
        || args.schema_only
        || args.data_only
        || args.to_dir.is_some()
    {
        bail!(
            "dump {} is an imported pg_dumpall script: restore it whole (--target-conn) or write it with --to-file and edit it",
            id.short()
        );
    }
    let node = Tree::load(repo, &snapshot.tree)?
        .find(DUMPALL_FILE)
        .cloned()
        .context("imported dump has no script")?;
    if let Some(path) = &args.to_file {
        write_node(repo, &node, path)?;
        note!(
            ctx,
            "wrote {} ({})",
            path.display(),
            crate::output::bytes(node.size)
        );
        return Ok(());
    }
    let options = ConnectOptions::resolve(args.target_conn.as_deref().or(ctx.pg_conn.as_deref()))?;
    // Stream the script from the repository through a pipe into the replay.
    let (reader, mut writer) = std::io::pipe().context("pipe")?;
    let report = std::thread::scope(|scope| {
        let feeder = scope.spawn(move || write_content(repo, &node.content, &mut writer));
        let report = super::legacy::replay(
            ctx,
            &options,
            std::io::BufReader::new(reader),
            &format!("dump {}", id.short()),
        );
        let fed = feeder.join();
        (report, fed)
    });
    let replayed = report.0?;
    match report.1 {
        Ok(Err(e)) if !is_broken_pipe(&e) => return Err(e.into()),
        Err(_) => bail!("reading the dump panicked"),
        _ => {}
    }
    if ctx.json() {
        return print_json(
            &json!({"dump": id, "sql_bytes": replayed.bytes, "expected_and_skipped": replayed.skipped}),
        );
    }
    note!(
        ctx,
        "replayed dump {} ({} of SQL){}",
        id.short(),
        crate::output::bytes(replayed.bytes),
        if replayed.skipped.is_empty() {
            String::new()
        } else {
            format!("; left out as expected: {}", replayed.skipped.join("; "))
        }
    );
    Ok(())
}

fn create_database(
    conn: &mut Connection,
    name: &str,
    info: &super::dump::DatabaseDump,
) -> Result<()> {
    let owner_exists = conn
        .query_one_value(&format!(
            "SELECT 1 FROM pg_roles WHERE rolname = {}",
            quote_literal(&info.owner)
        ))?
        .is_some();
    let mut sql = format!(
        "CREATE DATABASE {} WITH TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        quote_ident(name),
        quote_literal(&info.encoding),
        quote_literal(&info.collate),
        quote_literal(&info.ctype)
    );
    if owner_exists {
        sql.push_str(&format!(" OWNER {}", quote_ident(&info.owner)));
    }
    conn.execute(&sql)
        .with_context(|| format!("creating database {name:?}"))?;
    Ok(())
}

fn to_dir(
    ctx: &Context,
    repo: &Repository,
    snapshot: &Snapshot,
    meta: &DumpMeta,
    databases: &[String],
    with_globals: bool,
    dir: &Path,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let (globals, config) = config_nodes(repo, snapshot)?;
    if with_globals {
        if let Some(node) = globals {
            let path = dir.join("globals.sql");
            write_node(repo, &node, &path)?;
            written.push(path);
        }
        if !config.is_empty() {
            fs::create_dir_all(dir.join("config"))?;
        }
        for node in &config {
            let path = dir.join("config").join(&node.name);
            write_node(repo, node, &path)?;
            written.push(path);
        }
    }
    for db in databases {
        let node = database_node(repo, snapshot, meta, db)?;
        let path = dir.join(&node.name);
        write_node(repo, &node, &path)?;
        written.push(path);
    }
    if ctx.json() {
        return print_json(&json!({"written": written}));
    }
    for path in written {
        println!("{}", path.display());
    }
    note!(
        ctx,
        "restore an archive with: pg_restore --create --dbname=postgres DIR/NAME.dump"
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn to_file(
    ctx: &Context,
    repo: &Repository,
    snapshot: &Snapshot,
    meta: &DumpMeta,
    databases: &[String],
    with_globals: bool,
    args: &DumpRestoreArgs,
    pg_restore: &Tool,
    path: &Path,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut out = tempfile::Builder::new()
        .prefix(".pgvault-sql-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    if with_globals {
        let (globals, _) = config_nodes(repo, snapshot)?;
        if let Some(node) = globals {
            write_content(repo, &node.content, out.as_file_mut())?;
            out.as_file_mut().flush()?;
        }
    }
    for db in databases {
        let node = database_node(repo, snapshot, meta, db)?;
        let mut command = Command::new(&pg_restore.path);
        command.args(["--file=-"]);
        if args.as_name.is_none() && args.tables.is_empty() {
            command.arg("--create");
        }
        if args.schema_only {
            command.arg("--schema-only");
        }
        if args.data_only {
            command.arg("--data-only");
        }
        for table in &args.tables {
            command.args(table_args(table));
        }
        let append = fs::OpenOptions::new()
            .append(true)
            .open(out.path())
            .with_context(|| format!("cannot append to {}", out.path().display()))?;
        command.stdout(append);
        feed(
            repo,
            &node,
            command,
            &format!("pg_restore --file of database {db:?}"),
        )?;
    }
    out.as_file().sync_all()?;
    out.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if ctx.json() {
        return print_json(
            &json!({"written": path, "databases": databases, "globals": with_globals}),
        );
    }
    note!(
        ctx,
        "wrote {} ({}{} database(s)) as plain SQL",
        path.display(),
        if with_globals { "globals and " } else { "" },
        databases.len()
    );
    Ok(())
}
