//! `setup` registers a cluster and configures archiving; `check` proves it works.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use pg::conn::{quote_literal, ArchiverStatus, ClusterInfo, ConnectOptions, Connection};
use pg::wal::WalFileName;
use serde_json::json;

use super::archive::{fetch_file, find_identity, parse_duration, register, ClusterIdentity};
use crate::cli::{CheckArgs, SetupArgs};
use crate::context::Context;
use crate::output::print_json;

pub fn connect(ctx: &Context) -> Result<(Connection, ClusterInfo)> {
    connect_to(ctx.pg_conn.as_deref())
}

/// [`connect`] to `conninfo` (`None`: the PG* variables).
pub fn connect_to(conninfo: Option<&str>) -> Result<(Connection, ClusterInfo)> {
    let options = ConnectOptions::resolve(conninfo)?;
    let mut conn = Connection::connect(&options)?;
    let info = ClusterInfo::read(&mut conn)?;
    if !(12..=18).contains(&(info.server_version_num / 10000)) {
        bail!(
            "PostgreSQL {} is not supported: pgvault works with versions 12 to 18",
            info.version_text()
        );
    }
    Ok((conn, info))
}

/// Quotes a word for the shell that runs archive_command, when it needs quoting.
fn shell_word(word: &str) -> String {
    let plain = word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:@%+,".contains(c));
    if plain && !word.is_empty() {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The `pgvault …` prefix PostgreSQL should run: this executable with the settings this
/// run used (config file, repository, passphrase file, cluster).
pub fn command_prefix(ctx: &Context) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the pgvault executable")?;
    let mut words = vec![shell_word(&exe.display().to_string())];
    let args = ctx.child_args();
    let mut iter = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(flag) = iter.next() {
        let value = iter.next().unwrap_or_default();
        if flag == "--jobs" {
            continue;
        }
        words.push(flag);
        words.push(shell_word(&value));
    }
    Ok(words.join(" "))
}

pub fn setup(ctx: &Context, args: &SetupArgs) -> Result<()> {
    let (mut conn, info) = connect(ctx)?;
    let repo = ctx.open()?;
    let identity = ClusterIdentity {
        name: ctx.cluster.clone(),
        system_identifier: info.system_identifier.to_string(),
        pg_version_num: info.server_version_num,
        wal_segment_size: info.wal_segment_size,
        registered: Utc::now(),
    };
    let newly_registered = register(&repo, &identity)?;
    let prefix = command_prefix(ctx)?;
    let archive_command = format!("{prefix} archive-push %p");
    let restore_command = format!("{prefix} archive-get %f \"%p\"");
    let mut warnings = Vec::new();
    if ctx.passphrase_file.is_none() && repo.key_id().is_some() {
        warnings.push("the repository passphrase did not come from a file: PostgreSQL's archiver will not have it. Set passphrase-file in the config or use --passphrase-file".to_string());
    }
    let mut changed = Vec::new();
    let mut restart_needed = false;
    if info.wal_level == "minimal" {
        if args.apply {
            conn.execute("ALTER SYSTEM SET wal_level = 'replica'")?;
            changed.push("wal_level = replica".to_string());
            restart_needed = true;
        } else {
            warnings.push("wal_level is minimal: archiving needs replica or logical".into());
        }
    }
    if info.archive_mode == "off" {
        if args.apply {
            conn.execute("ALTER SYSTEM SET archive_mode = 'on'")?;
            changed.push("archive_mode = on".to_string());
            restart_needed = true;
        } else {
            warnings.push("archive_mode is off: set it to on (needs a restart)".into());
        }
    }
    if args.apply && info.archive_command != archive_command {
        conn.execute(&format!(
            "ALTER SYSTEM SET archive_command = {}",
            quote_literal(&archive_command)
        ))?;
        changed.push("archive_command".to_string());
    }
    if !changed.is_empty() {
        conn.execute("SELECT pg_reload_conf()")?;
    }
    if ctx.json() {
        return print_json(&json!({
            "cluster": ctx.cluster,
            "registered": newly_registered,
            "system_identifier": identity.system_identifier,
            "pg_version": info.server_version_num,
            "wal_segment_size": info.wal_segment_size,
            "wal_level": info.wal_level,
            "archive_mode": info.archive_mode,
            "data_checksums": info.data_checksums,
            "archive_command": archive_command,
            "restore_command": restore_command,
            "applied": changed,
            "restart_needed": restart_needed,
            "warnings": warnings,
        }));
    }
    println!(
        "cluster {} {} in {}: PostgreSQL {}, system identifier {}, WAL segments of {} MiB, data checksums {}",
        ctx.cluster,
        if newly_registered { "registered" } else { "already registered" },
        repo.location(),
        info.version_text(),
        identity.system_identifier,
        info.wal_segment_size >> 20,
        if info.data_checksums { "on" } else { "off" }
    );
    println!();
    println!("archive_command = {}", quote_literal(&archive_command));
    println!("restore_command = {}", quote_literal(&restore_command));
    for warning in &warnings {
        println!("warning: {warning}");
    }
    if !changed.is_empty() {
        println!();
        println!(
            "applied with ALTER SYSTEM and reloaded: {}",
            changed.join(", ")
        );
    }
    if restart_needed {
        println!("restart PostgreSQL for wal_level/archive_mode to take effect, then run `pgvault check`");
    } else if args.apply {
        println!("run `pgvault check` to prove archiving works");
    }
    Ok(())
}

pub fn check(ctx: &Context, args: &CheckArgs) -> Result<()> {
    let timeout: Duration = parse_duration(&args.timeout, "--timeout")?;
    let (mut conn, info) = connect(ctx)?;
    let repo = ctx.open()?;
    let Some(identity) = find_identity(&repo, &ctx.cluster)? else {
        bail!(
            "cluster {:?} is not set up in repository {}: run `pgvault setup` first",
            ctx.cluster,
            repo.location()
        );
    };
    if identity.system_identifier != info.system_identifier.to_string() {
        bail!(
            "this server (system identifier {}) is not cluster {:?} of repository {} (system identifier {}): check --pg-conn and --cluster{}",
            info.system_identifier,
            ctx.cluster,
            repo.location(),
            identity.system_identifier,
            identity.upgrade_hint(info.server_version_num)
        );
    }
    if info.in_recovery {
        bail!("the server is a standby; run `pgvault check` against the primary");
    }
    // Where backups will read, when configured: the first nightly backup should not be
    // what finds it wrong.
    if let Some(pgdata) = &ctx.pgdata {
        super::backup::check_cluster_of(pgdata, &info)
            .context("backups read the data directory given by --pgdata (or PGDATA, or pgdata in the cluster's config)")?;
    }
    if info.wal_level == "minimal" {
        bail!(
            "wal_level is minimal: set it to replica and restart (or run `pgvault setup --apply`)"
        );
    }
    if info.archive_mode == "off" {
        bail!("archive_mode is off: set it to on and restart (or run `pgvault setup --apply`)");
    }
    if !info.archive_command.contains("archive-push") {
        bail!(
            "archive_command is {:?}, which does not run pgvault archive-push: run `pgvault setup --apply`",
            info.archive_command
        );
    }
    // A restore point guarantees there is WAL to switch away from.
    conn.execute("SELECT pg_create_restore_point('pgvault check')")?;
    let segment = conn
        .query_one_value("SELECT pg_walfile_name(pg_switch_wal())")?
        .context("pg_switch_wal returned nothing")?;
    let wal = WalFileName::parse(&segment)
        .with_context(|| format!("server returned an odd WAL file name {segment:?}"))?;
    let started = Instant::now();
    loop {
        if fetch_file(&repo, &ctx.cluster, &wal)?.is_some() {
            let waited = started.elapsed();
            if ctx.json() {
                return print_json(
                    &json!({"ok": true, "segment": segment, "waited_ms": waited.as_millis() as u64}),
                );
            }
            println!(
                "WAL archiving works: segment {segment} reached {} in {:.1}s",
                repo.location(),
                waited.as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let archiver = ArchiverStatus::read(&mut conn)?;
    bail!(
        "segment {segment} did not arrive within {}: {}",
        humantime::format_duration(timeout),
        archiver.explain(&segment)
    )
}
