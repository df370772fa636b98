//! Replication helpers: `standby create` seeds a streaming standby from the repository
//! (so a new replica does not read the whole primary), and `replication status` shows
//! how far standbys and slots are behind, failing past `--max-lag` for monitoring.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use pg::conn::{quote_literal, Connection};
use repo::restore::SyncMethod;
use serde_json::{json, Value};

use super::archive::{load_identity, parse_duration, parse_size};
use super::setup::{connect, connect_to};
use crate::cli::{ReplicationStatusArgs, RestoreArgs, StandbyCreateArgs};
use crate::context::Context;
use crate::output::{bytes, note, print_json, Table};

fn valid_slot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `conninfo` naming the standby `name` to the primary, unless it names itself already.
fn with_application_name(conninfo: &str, name: &str) -> String {
    if conninfo.contains("application_name") {
        return conninfo.to_string();
    }
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        let separator = if conninfo.contains('?') { '&' } else { '?' };
        format!("{conninfo}{separator}application_name={name}")
    } else {
        format!("{conninfo} application_name={name}")
    }
}

pub fn standby_create(ctx: &Context, args: &StandbyCreateArgs) -> Result<()> {
    let pgdata = ctx.pgdata.clone().context(
        "standby create needs --pgdata DIR (or PGDATA) for the new standby's data directory",
    )?;
    if let Some(slot) = &args.slot {
        if !valid_slot_name(slot) {
            bail!("slot name {slot:?}: use 1 to 63 lower-case letters, digits and '_'");
        }
    }
    let (mut primary, info) = connect_to(Some(&args.primary_conn))
        .context("cannot reach the primary given by --primary-conn")?;
    let identity = {
        let repo = ctx.open()?;
        load_identity(&repo, &ctx.cluster)?
    };
    if info.system_identifier.to_string() != identity.system_identifier {
        bail!(
            "--primary-conn is a server with system identifier {}, but cluster {:?} in the repository is {}: choose the --cluster this primary archives to{}",
            info.system_identifier,
            ctx.cluster,
            identity.system_identifier,
            identity.upgrade_hint(info.server_version_num)
        );
    }
    let conninfo = match &args.slot {
        Some(slot) => with_application_name(&args.primary_conn, slot),
        None => args.primary_conn.clone(),
    };
    let restore = RestoreArgs {
        backup: Some(args.backup.clone()),
        target_time: None,
        target_lsn: None,
        target_xid: None,
        target_name: None,
        target: None,
        target_exclusive: false,
        target_timeline: None,
        target_action: "pause".to_string(),
        standby: true,
        primary_conn: Some(conninfo),
        primary_slot: args.slot.clone(),
        tablespace_map: args.tablespace_map.clone(),
        tablespace_map_all: args.tablespace_map_all.clone(),
        db_include: Vec::new(),
        db_exclude: Vec::new(),
        recovery_option: Vec::new(),
        waldir: args.waldir.clone(),
        config_to: args.config_to.clone(),
        archive_mode: "preserve".to_string(),
        delta: None,
        force: args.force,
        hold: "24h".to_string(),
        sync_method: SyncMethod::Fsync,
    };
    super::restore::restore(ctx, &restore)?;
    // After the restore, so a failed restore leaves no slot holding WAL on the primary.
    // WAL from before the slot's creation comes from the repository (restore_command).
    let slot_report = match &args.slot {
        Some(slot) => Some(ensure_slot(&mut primary, slot)?),
        None => None,
    };
    if ctx.json() {
        return print_json(&json!({
            "pgdata": pgdata,
            "slot": args.slot,
            "slot_created": slot_report.as_ref().map(|created| *created),
        }));
    }
    if let (Some(slot), Some(created)) = (&args.slot, slot_report) {
        note!(
            ctx,
            "{} physical replication slot {slot} on the primary",
            if created {
                "created"
            } else {
                "using the existing"
            }
        );
    }
    note!(ctx,
        "standby ready in {}: start it (pg_ctl -D {} start); it replays WAL from the repository, then streams from the primary",
        pgdata.display(),
        pgdata.display()
    );
    Ok(())
}

/// Creates the physical slot `name` reserving WAL now; `false` when it existed.
fn ensure_slot(primary: &mut Connection, name: &str) -> Result<bool> {
    let existing = primary.query_one_value(&format!(
        "SELECT slot_type FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(name)
    ))?;
    match existing.as_deref() {
        Some("physical") => Ok(false),
        Some(other) => {
            bail!("slot {name} exists on the primary as a {other} slot: choose another --slot name")
        }
        None => {
            primary
                .execute(&format!(
                    "SELECT pg_create_physical_replication_slot({}, true)",
                    quote_literal(name)
                ))
                .with_context(|| format!("cannot create replication slot {name} on the primary"))?;
            Ok(true)
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum MaxLag {
    Bytes(u64),
    Seconds(f64),
}

impl MaxLag {
    fn parse(text: &str) -> Result<MaxLag> {
        // Sizes first: humantime reads "16M" as sixteen months.
        if let Ok(size) = parse_size(text, "--max-lag") {
            return Ok(MaxLag::Bytes(size));
        }
        parse_duration(text, "--max-lag")
            .map(|d| MaxLag::Seconds(d.as_secs_f64()))
            .map_err(|_| {
                anyhow::anyhow!(
                    "--max-lag {text:?}: write a size such as 16MiB or a time such as 30s"
                )
            })
    }

    /// Why `what` is past the limit, if it is.
    fn exceeded(&self, what: &str, lag_bytes: u64, lag_seconds: Option<f64>) -> Option<String> {
        match *self {
            MaxLag::Bytes(max) if lag_bytes > max => Some(format!(
                "{what} is {} behind (max-lag {})",
                bytes(lag_bytes),
                bytes(max)
            )),
            MaxLag::Seconds(max) => match lag_seconds {
                Some(s) if s > max => Some(format!(
                    "{what} is {} behind (max-lag {})",
                    humantime::format_duration(Duration::from_secs_f64(s.round())),
                    humantime::format_duration(Duration::from_secs_f64(max))
                )),
                _ => None,
            },
            _ => None,
        }
    }
}

fn text(row: &[Option<String>], i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

fn number(row: &[Option<String>], i: usize) -> f64 {
    text(row, i).parse().unwrap_or(0.0)
}

pub fn status(ctx: &Context, args: &ReplicationStatusArgs) -> Result<()> {
    let max_lag = args.max_lag.as_deref().map(MaxLag::parse).transpose()?;
    let (mut conn, info) = connect(ctx)?;
    let mut violations = Vec::new();
    let mut check = |what: &str, lag_bytes: u64, lag_seconds: Option<f64>| {
        if let Some(reason) = max_lag.and_then(|m| m.exceeded(what, lag_bytes, lag_seconds)) {
            violations.push(reason);
        }
    };
    let report: Value = if info.in_recovery {
        let row = conn
            .query_rows(
                "SELECT coalesce(pg_last_wal_receive_lsn()::text, ''), coalesce(pg_last_wal_replay_lsn()::text, ''), \
                 coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::bigint::text, \
                 CASE WHEN pg_last_wal_receive_lsn() IS DISTINCT FROM pg_last_wal_replay_lsn() \
                      THEN coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) ELSE 0 END::text",
            )?
            .into_iter()
            .next()
            .unwrap_or_default();
        let receiver = conn
            .query_rows(
                "SELECT status, coalesce(sender_host, ''), coalesce(sender_port::text, ''), coalesce(slot_name, '') FROM pg_stat_wal_receiver",
            )?
            .into_iter()
            .next();
        let lag_bytes = number(&row, 2) as u64;
        let lag_seconds = number(&row, 3);
        check("this standby", lag_bytes, Some(lag_seconds));
        json!({
            "role": "standby",
            "receive_lsn": text(&row, 0),
            "replay_lsn": text(&row, 1),
            "lag_bytes": lag_bytes,
            "lag_seconds": lag_seconds,
            "receiver": receiver.map(|r| json!({
                "status": text(&r, 0),
                "sender": format!("{}:{}", text(&r, 1), text(&r, 2)),
                "slot": text(&r, 3),
            })),
        })
    } else {
        let current = conn
            .query_one_value("SELECT pg_current_wal_lsn()::text")?
            .unwrap_or_default();
        let standbys: Vec<Value> = conn
            .query_rows(
                "SELECT application_name, coalesce(client_addr::text, 'local'), state, \
                 coalesce(sent_lsn::text, ''), coalesce(write_lsn::text, ''), coalesce(flush_lsn::text, ''), coalesce(replay_lsn::text, ''), \
                 coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint::text, \
                 coalesce(extract(epoch FROM replay_lag), 0)::text, sync_state \
                 FROM pg_stat_replication ORDER BY application_name",
            )?
            .iter()
            .map(|r| {
                let lag_bytes = number(r, 7) as u64;
                let lag_seconds = number(r, 8);
                check(&format!("standby {}", text(r, 0)), lag_bytes, Some(lag_seconds));
                json!({
                    "name": text(r, 0), "client": text(r, 1), "state": text(r, 2),
                    "sent_lsn": text(r, 3), "write_lsn": text(r, 4), "flush_lsn": text(r, 5),
                    "replay_lsn": text(r, 6), "lag_bytes": lag_bytes, "lag_seconds": lag_seconds,
                    "sync_state": text(r, 9),
                })
            })
            .collect();
        let slots: Vec<Value> = conn
            .query_rows(
                "SELECT slot_name, slot_type, active::text, coalesce(restart_lsn::text, ''), \
                 coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint::text, \
                 coalesce(to_jsonb(s) ->> 'wal_status', '') FROM pg_replication_slots s ORDER BY slot_name",
            )?
            .iter()
            .map(|r| {
                let retained = number(r, 4) as u64;
                // A slot holds WAL on the primary: too much retained is the alarm,
                // whether or not a standby is attached.
                check(&format!("slot {}", text(r, 0)), retained, None);
                json!({
                    "name": text(r, 0), "type": text(r, 1), "active": text(r, 2) == "true",
                    "restart_lsn": text(r, 3), "retained_bytes": retained, "wal_status": text(r, 5),
                })
            })
            .collect();
        json!({"role": "primary", "current_lsn": current, "standbys": standbys, "slots": slots})
    };
    if ctx.json() {
        let mut report = report;
        report["max_lag_exceeded"] = json!(violations);
        print_json(&report)?;
    } else {
        print_status(&report);
    }
    if !violations.is_empty() {
        bail!("{}", violations.join("; "));
    }
    Ok(())
}

fn print_status(report: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    if report["role"] == "standby" {
        println!(
            "standby: received {}, replayed {}, lag {} / {:.0}s",
            s(&report["receive_lsn"]),
            s(&report["replay_lsn"]),
            bytes(report["lag_bytes"].as_u64().unwrap_or(0)),
            report["lag_seconds"].as_f64().unwrap_or(0.0)
        );
        match &report["receiver"] {
            Value::Null => println!("wal receiver: not running (replaying from the archive)"),
            r => println!(
                "wal receiver: {} from {}{}",
                s(&r["status"]),
                s(&r["sender"]),
                if s(&r["slot"]).is_empty() {
                    String::new()
                } else {
                    format!(" through slot {}", s(&r["slot"]))
                }
            ),
        }
        return;
    }
    println!("primary at {}", s(&report["current_lsn"]));
    let standbys = report["standbys"].as_array().cloned().unwrap_or_default();
    if standbys.is_empty() {
        println!("standbys: none connected");
    } else {
        let mut table = Table::new(&[
            "standby", "client", "state", "sent", "write", "flush", "replay", "lag", "lag s",
            "sync",
        ]);
        for r in &standbys {
            table.row(vec![
                s(&r["name"]),
                s(&r["client"]),
                s(&r["state"]),
                s(&r["sent_lsn"]),
                s(&r["write_lsn"]),
                s(&r["flush_lsn"]),
                s(&r["replay_lsn"]),
                bytes(r["lag_bytes"].as_u64().unwrap_or(0)),
                format!("{:.1}", r["lag_seconds"].as_f64().unwrap_or(0.0)),
                s(&r["sync_state"]),
            ]);
        }
        table.print();
    }
    let slots = report["slots"].as_array().cloned().unwrap_or_default();
    if !slots.is_empty() {
        let mut table = Table::new(&[
            "slot",
            "type",
            "active",
            "restart lsn",
            "retained",
            "wal status",
        ]);
        for r in &slots {
            table.row(vec![
                s(&r["name"]),
                s(&r["type"]),
                if r["active"] == true {
                    "yes".into()
                } else {
                    "no".into()
                },
                s(&r["restart_lsn"]),
                bytes(r["retained_bytes"].as_u64().unwrap_or(0)),
                s(&r["wal_status"]),
            ]);
        }
        table.print();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_lag_is_a_size_or_a_time() {
        assert!(matches!(
            MaxLag::parse("16MiB"),
            Ok(MaxLag::Bytes(16777216))
        ));
        assert!(matches!(MaxLag::parse("30s"), Ok(MaxLag::Seconds(s)) if s == 30.0));
        assert!(matches!(MaxLag::parse("0"), Ok(MaxLag::Bytes(0))));
        assert!(matches!(
            MaxLag::parse("16M"),
            Ok(MaxLag::Bytes(16_000_000))
        ));
        let err = format!("{:#}", MaxLag::parse("soon").expect_err("bad"));
        assert!(err.contains("16MiB") && err.contains("30s"), "{err}");
        let limit = MaxLag::Bytes(1024);
        assert!(limit.exceeded("standby a", 1025, None).is_some());
        assert!(limit.exceeded("standby a", 1024, None).is_none());
        assert!(MaxLag::Seconds(5.0)
            .exceeded("slot b", 1 << 30, None)
            .is_none());
    }

    #[test]
    fn standbys_name_themselves_after_their_slot() {
        assert_eq!(
            with_application_name("host=p user=r", "s1"),
            "host=p user=r application_name=s1"
        );
        assert_eq!(
            with_application_name("postgresql://r@p/db", "s1"),
            "postgresql://r@p/db?application_name=s1"
        );
        assert_eq!(
            with_application_name("postgresql://r@p/db?sslmode=require", "s1"),
            "postgresql://r@p/db?sslmode=require&application_name=s1"
        );
        assert_eq!(
            with_application_name("host=p application_name=x", "s1"),
            "host=p application_name=x"
        );
        assert!(
            valid_slot_name("standby_1") && !valid_slot_name("Standby") && !valid_slot_name("")
        );
    }
}
