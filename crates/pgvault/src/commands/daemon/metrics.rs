//! `GET /metrics` in the Prometheus text format (version 0.0.4). Times are Unix seconds;
//! every series is labelled with its cluster (and job kind) so one Prometheus rule
//! covers every cluster.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::DaemonState;

/// Label values escaped as the text format requires.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn parse_time(value: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

#[derive(Default)]
struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        let sample = (labels, value);
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(family) => family.samples.push(sample),
            None => self.families.push(Family {
                name,
                help,
                kind,
                samples: vec![sample],
            }),
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for family in &self.families {
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
            for (labels, value) in &family.samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{} {value}", family.name);
                } else {
                    let _ = writeln!(out, "{}{{{labels}}} {value}", family.name);
                }
            }
        }
        out
    }
}

pub fn render(state: &DaemonState, now: DateTime<Utc>) -> String {
    let mut m = Exposition::default();
    m.add(
        "pgvault_daemon_start_time_seconds",
        "gauge",
        "When the daemon started.",
        &[],
        seconds(state.started),
    );
    if let Some(t) = state.refreshed {
        m.add(
            "pgvault_status_refresh_time_seconds",
            "gauge",
            "When the repository was last read for these metrics.",
            &[],
            seconds(t),
        );
    }
    m.add(
        "pgvault_repository_up",
        "gauge",
        "1 when the last read of the repository succeeded.",
        &[],
        if state.info_error.is_none() && state.info.is_some() {
            1.0
        } else {
            0.0
        },
    );
    for spec in &state.specs {
        let cluster = spec.cluster.as_str();
        let kind = spec.kind.as_str();
        let labels = [("cluster", cluster), ("job", kind)];
        let Some(job) = state.jobs.get(&(spec.cluster.clone(), spec.kind)) else {
            continue;
        };
        if let Some(t) = job.last_success {
            m.add(
                "pgvault_job_last_success_time_seconds",
                "gauge",
                "Start of the job's last successful run.",
                &labels,
                seconds(t),
            );
            m.add(
                "pgvault_job_last_success_age_seconds",
                "gauge",
                "Seconds since the start of the job's last successful run.",
                &labels,
                seconds(now) - seconds(t),
            );
        }
        if let Some(last) = &job.last {
            m.add(
                "pgvault_job_last_ok",
                "gauge",
                "1 when the job's last run succeeded, 0 when it failed or was aborted.",
                &labels,
                if last.outcome == crate::jobs::Outcome::Ok {
                    1.0
                } else {
                    0.0
                },
            );
            m.add(
                "pgvault_job_last_duration_seconds",
                "gauge",
                "Duration of the job's last run.",
                &labels,
                last.duration_seconds(),
            );
            m.add(
                "pgvault_job_last_run_time_seconds",
                "gauge",
                "Start of the job's last run.",
                &labels,
                seconds(last.started),
            );
            if let Some(error) = &last.error {
                let short: String = error.chars().take(300).collect();
                m.add(
                    "pgvault_job_last_error_info",
                    "gauge",
                    "The error of the job's last run when it failed (in the label).",
                    &[("cluster", cluster), ("job", kind), ("error", &short)],
                    1.0,
                );
            }
        }
        m.add(
            "pgvault_job_running",
            "gauge",
            "1 while the job runs.",
            &labels,
            if job.running_since.is_some() {
                1.0
            } else {
                0.0
            },
        );
        if let Some(t) = job.next_run {
            m.add(
                "pgvault_job_next_run_time_seconds",
                "gauge",
                "When the job runs next.",
                &labels,
                seconds(t),
            );
        }
        for outcome in ["ok", "failed", "aborted"] {
            m.add(
                "pgvault_job_runs_total",
                "counter",
                "Runs since the daemon started, by outcome.",
                &[("cluster", cluster), ("job", kind), ("outcome", outcome)],
                job.runs.get(outcome).copied().unwrap_or(0) as f64,
            );
        }
    }
    for cluster in state.clusters() {
        let (health, _) = state.health(&cluster, now);
        for status in ["healthy", "late", "failing"] {
            m.add(
                "pgvault_cluster_status",
                "gauge",
                "1 for the cluster's current status: healthy, late or failing.",
                &[("cluster", &cluster), ("status", status)],
                if health.as_str() == status { 1.0 } else { 0.0 },
            );
        }
        let Some(info) = state.cluster_info(&cluster) else {
            continue;
        };
        let labels = [("cluster", cluster.as_str())];
        let backups = info["backups"].as_array().cloned().unwrap_or_default();
        m.add(
            "pgvault_backups",
            "gauge",
            "Backups in the repository.",
            &labels,
            backups.len() as f64,
        );
        if let Some(last) = backups.last() {
            if let Some(t) = parse_time(&last["stop_time"]) {
                m.add(
                    "pgvault_backup_last_time_seconds",
                    "gauge",
                    "Stop time of the newest backup.",
                    &labels,
                    seconds(t),
                );
                m.add(
                    "pgvault_backup_last_age_seconds",
                    "gauge",
                    "Seconds since the newest backup stopped.",
                    &labels,
                    seconds(now) - seconds(t),
                );
            }
            m.add(
                "pgvault_backup_last_size_bytes",
                "gauge",
                "Logical size of the newest backup.",
                &labels,
                last["size_bytes"].as_f64().unwrap_or(0.0),
            );
            m.add(
                "pgvault_backup_last_stored_bytes",
                "gauge",
                "Bytes the newest backup added to the repository.",
                &labels,
                last["stored_bytes"].as_f64().unwrap_or(0.0),
            );
            m.add(
                "pgvault_backup_last_corrupted_pages",
                "gauge",
                "Pages with a bad checksum found by the newest backup.",
                &labels,
                last["corrupted_pages"].as_f64().unwrap_or(0.0),
            );
        }
        let corrupted: f64 = backups
            .iter()
            .map(|b| b["corrupted_pages"].as_f64().unwrap_or(0.0))
            .sum();
        m.add(
            "pgvault_corrupted_pages",
            "gauge",
            "Pages with a bad checksum recorded by any backup in the repository.",
            &labels,
            corrupted,
        );
        let dumps = info["dumps"].as_array().cloned().unwrap_or_default();
        m.add(
            "pgvault_dumps",
            "gauge",
            "Logical dumps in the repository.",
            &labels,
            dumps.len() as f64,
        );
        if let Some(t) = dumps.last().and_then(|d| parse_time(&d["time"])) {
            m.add(
                "pgvault_dump_last_time_seconds",
                "gauge",
                "Time of the newest dump.",
                &labels,
                seconds(t),
            );
            m.add(
                "pgvault_dump_last_age_seconds",
                "gauge",
                "Seconds since the newest dump.",
                &labels,
                seconds(now) - seconds(t),
            );
        }
        let wal = &info["wal"];
        if let Some(t) = parse_time(&wal["last_push"]) {
            m.add(
                "pgvault_wal_last_push_time_seconds",
                "gauge",
                "When the newest WAL file reached the repository.",
                &labels,
                seconds(t),
            );
            m.add(
                "pgvault_wal_lag_seconds",
                "gauge",
                "Seconds since the newest WAL file reached the repository.",
                &labels,
                seconds(now) - seconds(t),
            );
        }
        if let Some(lag) = wal["server"]["lag_bytes"].as_f64() {
            m.add(
                "pgvault_wal_lag_bytes",
                "gauge",
                "WAL the server has written that is not yet archived (needs pg-conn).",
                &labels,
                lag,
            );
        }
        m.add(
            "pgvault_wal_gaps",
            "gauge",
            "Missing ranges in the WAL archive.",
            &labels,
            wal["gaps"].as_array().map_or(0, |g| g.len()) as f64,
        );
        m.add(
            "pgvault_wal_stored_bytes",
            "gauge",
            "Bytes of archived WAL in the repository.",
            &labels,
            wal["stored_bytes"].as_f64().unwrap_or(0.0),
        );
        if let (Some(from), Some(to)) = (
            parse_time(&info["recoverable"]["from"]),
            parse_time(&info["recoverable"]["to"]),
        ) {
            m.add(
                "pgvault_recoverable_start_time_seconds",
                "gauge",
                "Earliest instant a restore can reach.",
                &labels,
                seconds(from),
            );
            m.add(
                "pgvault_recoverable_end_time_seconds",
                "gauge",
                "Latest instant a restore can reach.",
                &labels,
                seconds(to),
            );
        }
    }
    if let Some(totals) = state.info.as_ref().map(|i| &i["totals"]) {
        m.add(
            "pgvault_repository_logical_bytes",
            "gauge",
            "Bytes of everything the repository holds, before deduplication and compression.",
            &[],
            totals["logical_bytes"].as_f64().unwrap_or(0.0),
        );
        m.add(
            "pgvault_repository_stored_bytes",
            "gauge",
            "Bytes the repository occupies in storage.",
            &[],
            totals["stored_bytes"].as_f64().unwrap_or(0.0),
        );
        m.add(
            "pgvault_repository_dedup_ratio",
            "gauge",
            "Logical bytes per stored byte.",
            &[],
            totals["ratio"].as_f64().unwrap_or(0.0),
        );
    }
    m.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut m = Exposition::default();
        m.add(
            "x_total",
            "counter",
            "Help.",
            &[("error", "a \"b\"\\c\nd")],
            2.0,
        );
        m.add("x_total", "counter", "Help.", &[("error", "e")], 3.0);
        assert_eq!(
            m.render(),
            "# HELP x_total Help.\n# TYPE x_total counter\nx_total{error=\"a \\\"b\\\"\\\\c\\nd\"} 2\nx_total{error=\"e\"} 3\n"
        );
    }
}
