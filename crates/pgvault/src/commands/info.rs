//! `pgvault info`: per cluster, its backups, WAL archive (ranges, gaps, last push, lag
//! behind the server when reachable), the recoverable window and repository totals.
//! Everything comes from LIST calls plus one read per snapshot and history file.

use anyhow::{Context as _, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use pg::wal::{Lsn, WalFileName};
use repo::Repository;
use serde_json::{json, Value};

use super::backup::backup_named;
use super::catalog::{cluster_names, BackupState, ClusterState};
use crate::context::Context;
use crate::output::{bytes, print_json, Table};

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn backup_json(b: &BackupState) -> Value {
    let summary = &b.snapshot.summary;
    json!({
        "id": b.id,
        "label": b.snapshot.label,
        "start_time": rfc3339(b.meta.start_time),
        "stop_time": rfc3339(b.meta.stop_time),
        "start_lsn": b.meta.start_lsn,
        "stop_lsn": b.meta.stop_lsn,
        "timeline": b.meta.timeline,
        "duration_ms": summary.duration_ms,
        "size_bytes": summary.bytes,
        "stored_bytes": summary.save.bytes_stored,
        "dedup_ratio": summary.bytes as f64 / summary.save.bytes_stored.max(1) as f64,
        "corrupted_pages": b.meta.corrupted_pages.len(),
        "pinned": b.pinned,
        "held_until": b.held_until.map(rfc3339),
        "wal_complete": b.reach.restorable(),
        "wal_missing": b.reach.missing,
        "reaches": b.reach.last_segment.as_ref().map(|n| n.to_string()),
        // What `restore --db-include` can name; null for backups that did not record it.
        "databases": b.meta.databases.as_ref().map(|all| {
            all.iter().map(|d| d.name.as_str()).collect::<Vec<_>>()
        }),
        // Whom a restore run as root gives the files to; null for older backups.
        "owner": b.meta.owner,
        "excluded": b.meta.excluded,
    })
}

/// How far the archive is behind the server, when `--pg-conn` (or the cluster's
/// `pg-conn` in the config) names one.
fn server_lag(ctx: &Context, state: &ClusterState) -> Option<Value> {
    let conninfo = ctx.pg_conn_of(&state.identity.name)?;
    let (mut conn, info) = match super::setup::connect_to(Some(&conninfo)) {
        Ok(c) => c,
        Err(e) => return Some(json!({"error": format!("{e:#}")})),
    };
    if info.system_identifier.to_string() != state.identity.system_identifier {
        return Some(json!({"error": "--pg-conn is another cluster (system identifier differs)"}));
    }
    let current = conn
        .query_one_value("SELECT pg_current_wal_lsn()::text")
        .ok()
        .and_then(|v| v)
        .and_then(|t| Lsn::parse(&t).ok())?;
    let segment_size = state.identity.wal_segment_size;
    let archived_end = state
        .wal
        .segments
        .iter()
        .filter_map(|(tli, s)| s.keys().next_back().map(|segno| (*tli, *segno)))
        .max()
        .map(|(_, segno)| (segno + 1) * segment_size)
        .unwrap_or(0);
    let last_push = state.wal.last_archived().map(|(t, _)| t);
    Some(json!({
        "server_lsn": current.to_string(),
        "current_segment": WalFileName::holding_end_of(current, info.timeline, segment_size).to_string(),
        "lag_bytes": current.0.saturating_sub(archived_end),
        "seconds_since_last_push": last_push.map(|t| (Utc::now() - t).num_seconds()),
    }))
}

fn dumps_json(repo: &Repository, cluster: &str) -> Result<Vec<Value>> {
    Ok(super::dump::list_dumps(repo, cluster)?
        .iter()
        .map(|(id, s, m)| {
            json!({
                "id": id,
                "time": rfc3339(m.start_time),
                "label": s.label,
                "databases": m.databases.iter().map(|d| &d.name).collect::<Vec<_>>(),
                "size_bytes": s.summary.bytes,
                "stored_bytes": s.summary.save.bytes_stored,
                "duration_ms": s.summary.duration_ms,
                "pg_dump_version": m.pg_dump_version,
            })
        })
        .collect())
}

fn cluster_json(ctx: &Context, state: &ClusterState, dumps: Vec<Value>, jobs: Vec<Value>) -> Value {
    let window = state.window();
    let last_push = state.wal.last_archived();
    json!({
        "name": state.identity.name,
        "system_identifier": state.identity.system_identifier,
        "pg_version": state.identity.pg_version_num,
        "wal_segment_size": state.identity.wal_segment_size,
        "backups": state.backups.iter().map(backup_json).collect::<Vec<_>>(),
        "dumps": dumps,
        "wal": {
            "first": state.wal.ranges().first().map(|r| r.1.clone()),
            "last": state.wal.ranges().last().map(|r| r.2.clone()),
            "timelines": state.wal.ranges().iter().map(|(tli, first, last)| json!({
                "timeline": tli, "first": first, "last": last,
                "segments": state.wal.segments.get(tli).map_or(0, |s| s.len()),
            })).collect::<Vec<_>>(),
            "gaps": state.wal.gaps(),
            "latest_timeline": state.wal.latest_timeline(1),
            "off_latest": state.wal.off_latest(),
            "files": state.wal.files.len(),
            "stored_bytes": state.wal.files.iter().map(|f| f.size).sum::<u64>(),
            "last_push": last_push.as_ref().map(|(t, _)| rfc3339(*t)),
            "last_pushed_file": last_push.map(|(_, n)| n.to_string()),
            "unreadable_histories": state.wal.unreadable_histories.iter()
                .map(|(tli, e)| json!({"timeline": tli, "error": e})).collect::<Vec<_>>(),
            "server": server_lag(ctx, state),
        },
        "recoverable": window.map(|w| json!({"from": rfc3339(w.from), "to": rfc3339(w.to)})),
        "jobs": jobs,
    })
}

fn totals(repo: &Repository, logical: u64) -> Result<Value> {
    let stored: u64 = repo.storage().list("")?.iter().map(|m| m.size).sum();
    Ok(json!({
        "logical_bytes": logical,
        "stored_bytes": stored,
        "ratio": logical as f64 / stored.max(1) as f64,
    }))
}

/// The daemon's recent jobs of a cluster, newest first.
fn jobs_json(repo: &Repository, cluster: &str) -> Result<Vec<Value>> {
    Ok(
        crate::jobs::recent(repo, cluster, super::daemon::HISTORY_SHOWN)?
            .into_iter()
            .map(|r| {
                json!({
                    "kind": r.kind,
                    "trigger": r.trigger,
                    "started": rfc3339(r.started),
                    "finished": rfc3339(r.finished),
                    "duration_ms": (r.finished - r.started).num_milliseconds(),
                    "outcome": r.outcome,
                    "stored_bytes": r.stored_bytes,
                    "result_id": r.result_id,
                    "error": r.error,
                    "hostname": r.hostname,
                })
            })
            .collect(),
    )
}

/// `pgvault backup show ID`: one backup in full.
pub fn show_backup(ctx: &Context, spec: &str) -> Result<()> {
    let repo = ctx.open()?;
    let state = ClusterState::load(&repo, &ctx.cluster)?.with_context(|| {
        format!(
            "no cluster {:?} in {}: see `pgvault info`",
            ctx.cluster,
            repo.location()
        )
    })?;
    let ids: Vec<_> = state.backups.iter().map(|b| b.id).collect();
    let b = &state.backups[backup_named(&ids, spec, &ctx.cluster)?];
    let meta = &b.meta;
    let summary = &b.snapshot.summary;
    let mut view = backup_json(b);
    let details = json!({
        "cluster": meta.cluster,
        "pg_version": meta.pg_version,
        "system_identifier": meta.system_identifier,
        "from_standby": meta.from_standby,
        "data_checksums": meta.data_checksums,
        "start_wal": meta.start_wal,
        "stop_wal": meta.stop_wal,
        "files": summary.files,
        "bytes_read": summary.bytes.saturating_sub(summary.bytes_unchanged),
        "wal_summary_blocks": meta.wal_summary_blocks,
        "tablespaces": meta.tablespaces,
        "config_files": meta.config_files,
        // As `backup` reports them (`info` counts them).
        "corrupted_pages": meta.corrupted_pages,
        "backup_label": meta.backup_label,
    });
    if let (Some(view), Some(details)) = (view.as_object_mut(), details.as_object()) {
        view.extend(details.clone());
    }
    if ctx.json() {
        return print_json(&view);
    }
    let time = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string();
    let mut lines = vec![
        ("backup", b.id.to_hex()),
        ("label", b.snapshot.label.clone().unwrap_or_default()),
        (
            "cluster",
            format!(
                "{} (PostgreSQL {}.{}, system identifier {})",
                meta.cluster,
                meta.pg_version / 10000,
                meta.pg_version % 10000,
                meta.system_identifier
            ),
        ),
        (
            "taken from",
            if meta.from_standby {
                "a standby"
            } else {
                "the primary"
            }
            .to_string(),
        ),
        (
            "start",
            format!("{} at {}", time(meta.start_time), meta.start_lsn),
        ),
        (
            "stop",
            format!("{} at {}", time(meta.stop_time), meta.stop_lsn),
        ),
        (
            "WAL",
            format!(
                "{} … {} (timeline {})",
                meta.start_wal, meta.stop_wal, meta.timeline
            ),
        ),
        (
            "WAL in repository",
            match b.reach.restorable() {
                true => "complete".to_string(),
                false => format!("MISSING {}", b.reach.missing.join(", ")),
            },
        ),
        (
            "size",
            format!(
                "{} in {} files; {} read, {} new stored ({:.1}s)",
                bytes(summary.bytes),
                summary.files,
                bytes(summary.bytes.saturating_sub(summary.bytes_unchanged)),
                bytes(summary.save.bytes_stored),
                summary.duration_ms as f64 / 1000.0
            ),
        ),
        ("pinned", if b.pinned { "yes" } else { "no" }.to_string()),
        (
            "held",
            match b.held_until {
                Some(until) => format!(
                    "until {} for a restored server's recovery (`backup unpin` ends it)",
                    until.format("%Y-%m-%d %H:%M:%S UTC")
                ),
                None => "no".to_string(),
            },
        ),
        (
            "data checksums",
            match meta.data_checksums {
                false => "off".to_string(),
                true => format!("on; {} corrupted page(s)", meta.corrupted_pages.len()),
            },
        ),
    ];
    if let Some(databases) = &meta.databases {
        let names: Vec<&str> = databases.iter().map(|d| d.name.as_str()).collect();
        lines.push(("databases", names.join(", ")));
    }
    for t in &meta.tablespaces {
        lines.push((
            "tablespace",
            format!("{} (oid {}) at {}", t.name, t.oid, t.location),
        ));
    }
    if !meta.excluded.is_empty() {
        lines.push(("left out", meta.excluded.join(", ")));
    }
    for file in &meta.config_files {
        let about: Vec<String> = (file.setting.iter().cloned())
            .chain(
                file.linked_from
                    .iter()
                    .map(|link| format!("linked from {link}")),
            )
            .collect();
        let line = match about.is_empty() {
            true => file.path.clone(),
            false => format!("{} ({})", file.path, about.join(", ")),
        };
        lines.push(("configuration", line));
    }
    if let Some(owner) = &meta.owner {
        let name = |name: &Option<String>, id: u32| name.clone().unwrap_or_else(|| id.to_string());
        lines.push((
            "owner",
            format!(
                "{}:{} (uid {}, gid {})",
                name(&owner.user, owner.uid),
                name(&owner.group, owner.gid),
                owner.uid,
                owner.gid
            ),
        ));
    }
    for (key, value) in lines {
        println!("{key:<18} {value}");
    }
    if !meta.corrupted_pages.is_empty() {
        let mut table = Table::new(&["corrupted page: file", "block"]);
        for page in &meta.corrupted_pages {
            table.row(vec![page.file.clone(), page.block.to_string()]);
        }
        table.print();
    }
    println!("backup_label:\n{}", meta.backup_label.trim_end());
    Ok(())
}

pub fn info(ctx: &Context) -> Result<()> {
    let repo = ctx.open()?;
    let (view, states) = collect_with_states(ctx, &repo)?;
    if ctx.json() {
        return print_json(&view);
    }
    println!("repository {}", repo.location());
    let clusters = view["clusters"].as_array().cloned().unwrap_or_default();
    if clusters.is_empty() {
        println!("no clusters: run `pgvault setup` to register one");
    }
    for (state, view) in states.iter().zip(&clusters) {
        print_cluster(state, view);
    }
    let totals = &view["totals"];
    println!(
        "\ntotal: {} logical in {} stored ({:.1}x)",
        bytes(totals["logical_bytes"].as_u64().unwrap_or(0)),
        bytes(totals["stored_bytes"].as_u64().unwrap_or(0)),
        totals["ratio"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

/// What `info --output json` prints: every cluster, with totals.
pub fn collect(ctx: &Context, repo: &Repository) -> Result<Value> {
    Ok(collect_with_states(ctx, repo)?.0)
}

fn collect_with_states(ctx: &Context, repo: &Repository) -> Result<(Value, Vec<ClusterState>)> {
    let mut clusters = Vec::new();
    let mut states = Vec::new();
    let mut logical = 0u64;
    for name in cluster_names(repo)? {
        if let Some(state) = ClusterState::load(repo, &name)? {
            let dumps = dumps_json(repo, &name)?;
            logical += dumps
                .iter()
                .map(|d| d["size_bytes"].as_u64().unwrap_or(0))
                .sum::<u64>();
            logical += state
                .backups
                .iter()
                .map(|b| b.snapshot.summary.bytes)
                .sum::<u64>();
            logical += state
                .wal
                .segments
                .values()
                .map(|s| s.len() as u64)
                .sum::<u64>()
                * state.identity.wal_segment_size;
            let jobs = jobs_json(repo, &name)?;
            clusters.push(cluster_json(ctx, &state, dumps, jobs));
            states.push(state);
        }
    }
    let view = json!({
        "repository": repo.location(),
        "clusters": clusters,
        "totals": totals(repo, logical)?,
    });
    Ok((view, states))
}

fn print_cluster(state: &ClusterState, view: &Value) {
    let id = &state.identity;
    println!(
        "\ncluster {}: PostgreSQL {}.{}, system identifier {}",
        id.name,
        id.pg_version_num / 10000,
        id.pg_version_num % 10000,
        id.system_identifier
    );
    match state.window() {
        Some(w) => println!(
            "recoverable: {} … {} (end: archive time of the last continuous WAL segment)",
            w.from.format("%Y-%m-%d %H:%M:%S UTC"),
            w.to.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        None => println!("recoverable: nothing yet (no backup with complete WAL)"),
    }
    if state.backups.is_empty() {
        println!("backups: none");
    } else {
        let mut table = Table::new(&[
            "id",
            "label",
            "stop time (UTC)",
            "stop lsn",
            "tli",
            "size",
            "new stored",
            "dedup",
            "took",
            "bad pages",
            "wal",
        ]);
        for b in &state.backups {
            let s = &b.snapshot.summary;
            table.row(vec![
                format!(
                    "{}{}{}",
                    b.id.short(),
                    if b.pinned { " (pinned)" } else { "" },
                    if b.held_until.is_some() {
                        " (held)"
                    } else {
                        ""
                    }
                ),
                b.snapshot.label.clone().unwrap_or_default(),
                b.meta.stop_time.format("%Y-%m-%d %H:%M:%S").to_string(),
                b.meta.stop_lsn.clone(),
                b.meta.timeline.to_string(),
                bytes(s.bytes),
                bytes(s.save.bytes_stored),
                format!("{:.1}x", s.bytes as f64 / s.save.bytes_stored.max(1) as f64),
                format!("{:.1}s", s.duration_ms as f64 / 1000.0),
                b.meta.corrupted_pages.len().to_string(),
                if b.reach.restorable() {
                    "complete".to_string()
                } else {
                    format!("MISSING {}", b.reach.missing.join(", "))
                },
            ]);
        }
        table.print();
        if let Some(b) = state
            .backups
            .iter()
            .rev()
            .find(|b| !b.meta.corrupted_pages.is_empty())
        {
            println!(
                "bad pages: `pgvault backup show {}` lists them (file, block)",
                b.id.short()
            );
        }
    }
    let dumps = view["dumps"].as_array().cloned().unwrap_or_default();
    if dumps.is_empty() {
        println!("dumps: none");
    } else {
        let mut table = Table::new(&["dump", "time (UTC)", "databases", "size", "new stored"]);
        for d in &dumps {
            let databases: Vec<&str> = d["databases"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            table.row(vec![
                d["id"].as_str().unwrap_or("").chars().take(8).collect(),
                d["time"].as_str().unwrap_or("").replace('T', " "),
                databases.join(","),
                bytes(d["size_bytes"].as_u64().unwrap_or(0)),
                bytes(d["stored_bytes"].as_u64().unwrap_or(0)),
            ]);
        }
        table.print();
    }
    let jobs = view["jobs"].as_array().cloned().unwrap_or_default();
    if !jobs.is_empty() {
        let mut table = Table::new(&["job", "started (UTC)", "outcome", "took", "stored", "error"]);
        for j in jobs.iter().take(10) {
            table.row(vec![
                j["kind"].as_str().unwrap_or("").to_string(),
                j["started"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(19)
                    .collect::<String>()
                    .replace('T', " "),
                j["outcome"].as_str().unwrap_or("").to_string(),
                format!(
                    "{:.1}s",
                    j["duration_ms"].as_i64().unwrap_or(0) as f64 / 1000.0
                ),
                j["stored_bytes"].as_u64().map(bytes).unwrap_or_default(),
                j["error"].as_str().unwrap_or("").to_string(),
            ]);
        }
        println!("recent daemon jobs:");
        table.print();
    }
    let wal = &view["wal"];
    for (tli, first, last) in state.wal.ranges() {
        println!(
            "wal timeline {tli}: {first} … {last} ({} segments)",
            state.wal.segments.get(&tli).map_or(0, |s| s.len())
        );
    }
    for gap in state.wal.gaps() {
        println!(
            "wal GAP on timeline {}: {} … {} missing",
            gap.timeline, gap.from, gap.to
        );
    }
    let latest = state.wal.latest_timeline(1);
    for off in state.wal.off_latest() {
        let (timeline, first, last) = (off.timeline, &off.first, &off.last);
        let why = match &off.left_at {
            Some(lsn) => format!("timeline {latest} left it at {lsn}"),
            None => format!("timeline {latest} did not branch from it"),
        };
        println!(
            "wal timeline {timeline}: {first} … {last} not replayed by a restore to the latest timeline ({latest}): {why}; --target-timeline {timeline} follows it"
        );
    }
    if let Some(t) = wal["last_push"].as_str() {
        println!(
            "last push: {t} ({})",
            wal["last_pushed_file"].as_str().unwrap_or("")
        );
    }
    let server = &wal["server"];
    if let Some(lag) = server["lag_bytes"].as_u64() {
        println!(
            "server at {} ({}): archive {} behind",
            server["server_lsn"].as_str().unwrap_or(""),
            server["current_segment"].as_str().unwrap_or(""),
            bytes(lag)
        );
    } else if let Some(e) = server["error"].as_str() {
        println!("server: not reachable ({e})");
    }
}
