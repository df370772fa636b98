//! Recovery settings for a restored data directory, in the form the server version
//! expects: from 12 on, settings in `postgresql.auto.conf` plus `recovery.signal` (or
//! `standby.signal`); `recovery.conf` is gone.

use std::fmt;

use crate::conn::quote_literal;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Replay all available WAL.
    End,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(String),
    Lsn(String),
    Xid(String),
    Name(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::End => f.write_str("end of the archived WAL"),
            Target::Immediate => f.write_str("the end of the backup (immediate)"),
            Target::Time(t) => write!(f, "time {t}"),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "transaction {x}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
        }
    }
}

/// Whether transaction `xid` is at or after `next_xid`, a snapshot's xmax (no transaction
/// from there on had ended), and so commits after that snapshot. `xid` is in either form
/// recovery_target_xid accepts: epoch-qualified, or a plain 32-bit id, which is compared
/// as the server compares ids, modulo 2^32 (valid within 2^31 transactions).
pub fn xid_assigned_since(xid: u64, next_xid: u64) -> bool {
    if xid > u64::from(u32::MAX) {
        xid >= next_xid
    } else {
        (xid as u32).wrapping_sub(next_xid as u32) as i32 >= 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    pub fn parse(text: &str) -> Result<TargetAction, String> {
        match text {
            "promote" => Ok(TargetAction::Promote),
            "pause" => Ok(TargetAction::Pause),
            "shutdown" => Ok(TargetAction::Shutdown),
            other => Err(format!(
                "--target-action {other:?}: use promote, pause or shutdown"
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// Everything recovery needs to know.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    pub restore_command: String,
    pub target: Target,
    /// Stop just before the target instead of just after it.
    pub exclusive: bool,
    /// `latest`, `current` or a timeline number; `None` keeps the server's default.
    pub timeline: Option<String>,
    pub action: TargetAction,
    /// Start as a standby (`standby.signal`), optionally streaming from a primary.
    pub standby: bool,
    pub primary_conninfo: Option<String>,
    pub primary_slot_name: Option<String>,
}

/// Settings pgvault owns in `postgresql.auto.conf`: any earlier value is removed first
/// so that a restored directory never keeps the source's recovery settings.
pub const MANAGED_SETTINGS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "primary_conninfo",
    "primary_slot_name",
];

/// Settings for `postgresql.auto.conf`, and the signal file to create.
pub type RecoveryConfiguration = (Vec<(String, String)>, &'static str);

/// The recovery configuration for a server of `major` (12 or later): settings for
/// `postgresql.auto.conf` and the name of the signal file to create.
pub fn configuration(
    major: u32,
    options: &RecoveryOptions,
) -> Result<RecoveryConfiguration, String> {
    if major < 12 {
        return Err(format!(
            "PostgreSQL {major} uses recovery.conf, which pgvault does not write; restore into 12 or later"
        ));
    }
    let mut settings = vec![(
        "restore_command".to_string(),
        options.restore_command.clone(),
    )];
    let mut push = |key: &str, value: &str| settings.push((key.to_string(), value.to_string()));
    match &options.target {
        Target::End => {}
        Target::Immediate => push("recovery_target", "immediate"),
        Target::Time(t) => push("recovery_target_time", t),
        Target::Lsn(l) => push("recovery_target_lsn", l),
        Target::Xid(x) => push("recovery_target_xid", x),
        Target::Name(n) => push("recovery_target_name", n),
    }
    let has_target = options.target != Target::End;
    if options.exclusive && has_target && options.target != Target::Immediate {
        push("recovery_target_inclusive", "false");
    }
    if let Some(timeline) = &options.timeline {
        push("recovery_target_timeline", timeline);
    }
    if has_target && !options.standby {
        push("recovery_target_action", options.action.as_str());
    }
    if let Some(conninfo) = &options.primary_conninfo {
        push("primary_conninfo", conninfo);
    }
    if let Some(slot) = &options.primary_slot_name {
        push("primary_slot_name", slot);
    }
    let signal = if options.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    Ok((settings, signal))
}

/// A server setting to write with the recovery settings (`KEY=VALUE`, e.g.
/// `recovery_min_apply_delay=1h`, or a `restore_command` of one's own): the name
/// lower-cased, as the server reads it. Recovery targets are refused: they choose the
/// backup to restore, so they are given as targets.
pub fn parse_extra_setting(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err("write NAME=VALUE".to_string());
    };
    let key = key.trim().to_ascii_lowercase();
    let mut chars = key.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !valid {
        return Err(format!("{key:?} is not a setting name"));
    }
    if key.starts_with("recovery_target") {
        return Err(format!(
            "{key} is given with the target options (--target-time, --target-lsn, --target-xid, --target-name, --target, --target-exclusive, --target-timeline, --target-action), which also choose the backup"
        ));
    }
    Ok((key, value.trim_start().to_string()))
}

/// `settings` with `extra` added, an extra setting replacing one of the same name.
pub fn with_extra_settings(
    mut settings: Vec<(String, String)>,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    for (key, value) in extra {
        settings.retain(|(other, _)| other != key);
        settings.push((key.clone(), value.clone()));
    }
    settings
}

/// Rewrites the text of `postgresql.auto.conf`: drops pgvault-managed settings and
/// earlier values of `settings`, then appends `settings`.
pub fn rewrite_auto_conf(existing: &str, settings: &[(String, String)]) -> String {
    let mut out: String = existing
        .lines()
        .filter(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            !MANAGED_SETTINGS.contains(&key) && !settings.iter().any(|(k, _)| k == key)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    out.push_str("# recovery settings written by pgvault restore\n");
    for (key, value) in settings {
        out.push_str(&format!("{key} = {}\n", quote_literal(value)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_settings_are_named_settings_and_no_targets() {
        assert_eq!(
            parse_extra_setting("Recovery_Min_Apply_Delay = 1h"),
            Ok(("recovery_min_apply_delay".into(), "1h".into()))
        );
        let own = parse_extra_setting("restore_command=cp /arch/%f %p").expect("valid");
        assert_eq!(own.1, "cp /arch/%f %p");
        assert!(parse_extra_setting("no value").is_err());
        assert!(parse_extra_setting("bad name=1").is_err());
        assert!(parse_extra_setting("=1").is_err());
        let target = parse_extra_setting("recovery_target_time=2026-01-01").expect_err("a target");
        assert!(target.contains("--target-time"), "{target}");
        let settings = vec![
            ("restore_command".to_string(), "pgvault".to_string()),
            ("recovery_target".to_string(), "immediate".to_string()),
        ];
        assert_eq!(
            with_extra_settings(settings, std::slice::from_ref(&own)),
            vec![
                ("recovery_target".to_string(), "immediate".to_string()),
                own
            ]
        );
    }

    #[test]
    fn transaction_ids_compare_as_the_server_compares_them() {
        let next = (3u64 << 32) | 1000;
        // Epoch-qualified ids compare as numbers.
        assert!(xid_assigned_since(next, next));
        assert!(xid_assigned_since(next + 1, next));
        assert!(!xid_assigned_since(next - 1, next));
        assert!(!xid_assigned_since((2u64 << 32) | 5000, next));
        // Plain ids compare modulo 2^32, ignoring the epoch.
        assert!(xid_assigned_since(1000, next));
        assert!(xid_assigned_since(1001, next));
        assert!(!xid_assigned_since(999, next));
        // Across wraparound: 10 follows 4294967000.
        let near_wrap = (3u64 << 32) | 4_294_967_000;
        assert!(xid_assigned_since(10, near_wrap));
        assert!(!xid_assigned_since(4_294_966_000, near_wrap));
    }

    fn options(target: Target) -> RecoveryOptions {
        RecoveryOptions {
            restore_command: "pgvault archive-get %f \"%p\"".into(),
            target,
            exclusive: false,
            timeline: None,
            action: TargetAction::Promote,
            standby: false,
            primary_conninfo: None,
            primary_slot_name: None,
        }
    }

    #[test]
    fn targets_become_settings() {
        let (settings, signal) =
            configuration(15, &options(Target::Lsn("0/3000060".into()))).expect("config");
        assert_eq!(signal, "recovery.signal");
        assert!(settings.contains(&("recovery_target_lsn".into(), "0/3000060".into())));
        assert!(settings.contains(&("recovery_target_action".into(), "promote".into())));
        let mut exclusive = options(Target::Xid("1234".into()));
        exclusive.exclusive = true;
        let (settings, _) = configuration(17, &exclusive).expect("config");
        assert!(settings.contains(&("recovery_target_inclusive".into(), "false".into())));
        let mut standby = options(Target::End);
        standby.standby = true;
        standby.primary_conninfo = Some("host=db1".into());
        let (settings, signal) = configuration(16, &standby).expect("config");
        assert_eq!(signal, "standby.signal");
        assert!(!settings.iter().any(|(k, _)| k == "recovery_target_action"));
        assert!(configuration(11, &options(Target::End)).is_err());
    }

    #[test]
    fn auto_conf_keeps_other_settings_and_replaces_ours() {
        let existing =
            "# Do not edit\nwork_mem = '64MB'\nrestore_command = 'old'\narchive_mode = 'on'\n";
        let text = rewrite_auto_conf(
            existing,
            &[("restore_command".into(), "cp /a/%f \"%p\" # it's".into())],
        );
        assert!(text.contains("work_mem = '64MB'"));
        assert!(!text.contains("'old'"));
        assert!(text.contains("restore_command = 'cp /a/%f \"%p\" # it''s'"));
    }
}
