//! The daemon's job history, kept in the repository as one named file per finished job:
//! `jobs/<cluster>/<start time>-<kind>-<outcome>`.
//!
//! Why the repository and not a local database: the history then lives where the
//! backups live, survives the loss of the machine running the daemon, is encrypted like
//! everything else, and `pgvault info` anywhere shows it. Each record is written once
//! (immutable, as the repository format requires); the name alone tells kind, start
//! and outcome, so "when did the last backup succeed" is one LIST without reading
//! records.

use anyhow::{Context as _, Result};
use chrono::{DateTime, NaiveDateTime, Utc};
use repo::Repository;
use repo::StoreOutcome;
use serde::{Deserialize, Serialize};

const NAME_TIME_FORMAT: &str = "%Y%m%dT%H%M%S%.6fZ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    /// Stopped by a daemon shutdown that could not wait for it.
    Aborted,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        }
    }

    fn parse(text: &str) -> Option<Outcome> {
        match text {
            "ok" => Some(Outcome::Ok),
            "failed" => Some(Outcome::Failed),
            "aborted" => Some(Outcome::Aborted),
            _ => None,
        }
    }
}

/// One finished job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobRecord {
    pub cluster: String,
    /// backup, dump, expire or verify.
    pub kind: String,
    /// `schedule`, or `missed` for the catch-up run at daemon start.
    pub trigger: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub outcome: Outcome,
    /// New bytes the job stored in the repository, when it stores any.
    pub stored_bytes: Option<u64>,
    /// The backup or dump it created.
    pub result_id: Option<String>,
    /// The job's one-line error, secrets removed.
    pub error: Option<String>,
    pub hostname: String,
}

impl JobRecord {
    pub fn duration_seconds(&self) -> f64 {
        (self.finished - self.started).num_milliseconds().max(0) as f64 / 1000.0
    }

    fn name(&self) -> String {
        format!(
            "{}{}-{}-{}",
            prefix(&self.cluster),
            self.started.format(NAME_TIME_FORMAT),
            self.kind,
            self.outcome.as_str()
        )
    }
}

/// What a record's name says, without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEntry {
    pub name: String,
    pub started: DateTime<Utc>,
    pub kind: String,
    pub outcome: Outcome,
}

fn prefix(cluster: &str) -> String {
    format!("jobs/{cluster}/")
}

fn parse_entry(name: &str, cluster: &str) -> Option<JobEntry> {
    let rest = name.strip_prefix(&prefix(cluster))?;
    let (time, rest) = rest.split_once('-')?;
    let (kind, outcome) = rest.rsplit_once('-')?;
    let started = NaiveDateTime::parse_from_str(time, NAME_TIME_FORMAT)
        .ok()?
        .and_utc();
    Some(JobEntry {
        name: name.to_string(),
        started,
        kind: kind.to_string(),
        outcome: Outcome::parse(outcome)?,
    })
}

pub fn record(repo: &Repository, job: &JobRecord) -> Result<()> {
    let data = serde_json::to_vec(job).context("encode job record")?;
    let name = job.name();
    match repo
        .store_file(&name, &data)
        .with_context(|| format!("cannot store job record {name}"))?
    {
        StoreOutcome::Created { .. } | StoreOutcome::AlreadyStored { .. } => Ok(()),
        StoreOutcome::Conflict { .. } => {
            anyhow::bail!("job record {name} exists with other content; not replaced")
        }
    }
}

/// Every record of `cluster`, oldest first, from one listing.
pub fn entries(repo: &Repository, cluster: &str) -> Result<Vec<JobEntry>> {
    let mut found: Vec<JobEntry> = repo
        .list_files(&prefix(cluster))?
        .iter()
        .filter_map(|m| parse_entry(&m.key, cluster))
        .collect();
    found.sort_by(|a, b| a.started.cmp(&b.started).then(a.name.cmp(&b.name)));
    Ok(found)
}

pub fn load(repo: &Repository, entry: &JobEntry) -> Result<JobRecord> {
    let file = repo
        .find_file(&entry.name)?
        .with_context(|| format!("job record {} vanished", entry.name))?;
    serde_json::from_slice(&file.data).with_context(|| format!("job record {}", entry.name))
}

/// The newest `n` records of `cluster`, newest first.
pub fn recent(repo: &Repository, cluster: &str, n: usize) -> Result<Vec<JobRecord>> {
    entries(repo, cluster)?
        .iter()
        .rev()
        .take(n)
        .map(|e| load(repo, e))
        .collect()
}

/// Deletes all but the newest `keep` records of each kind of `cluster`; returns how
/// many went. History is retention-managed data, like expired backups.
pub fn prune(repo: &Repository, cluster: &str, keep: usize) -> Result<usize> {
    let all = entries(repo, cluster)?;
    let mut removed = 0;
    let kinds: std::collections::BTreeSet<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    for kind in kinds {
        let of_kind: Vec<&JobEntry> = all.iter().filter(|e| e.kind == kind).collect();
        for entry in &of_kind[..of_kind.len().saturating_sub(keep)] {
            repo.delete_file(&entry.name)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes what must never reach pages, logs or metrics: passwords in conninfo strings
/// and URLs, and the values of secret-looking settings.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // password=VALUE (conninfo), quoted or not.
    while let Some(at) = rest.find("password=") {
        let (before, after) = rest.split_at(at + "password=".len());
        out.push_str(before);
        out.push_str("***");
        let end = if let Some(quoted) = after.strip_prefix('\'') {
            quoted.find('\'').map_or(after.len(), |i| i + 2)
        } else {
            after
                .find(|c: char| c.is_whitespace() || c == '&' || c == '"')
                .unwrap_or(after.len())
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    // scheme://user:secret@host
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        result.push_str(head);
        let authority_end = tail.find(['/', ' ', '"', '\'']).unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at_sign), Some(colon)) if colon < at_sign => {
                result.push_str(&authority[..colon]);
                result.push_str(":***");
                result.push_str(&authority[at_sign..]);
            }
            _ => result.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    result.push_str(rest);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_time_kind_and_outcome() {
        let started = DateTime::parse_from_rfc3339("2026-11-25T10:00:01.25Z")
            .expect("time")
            .with_timezone(&Utc);
        let job = JobRecord {
            cluster: "main".into(),
            kind: "backup".into(),
            trigger: "schedule".into(),
            started,
            finished: started,
            outcome: Outcome::Failed,
            stored_bytes: None,
            result_id: None,
            error: Some("boom".into()),
            hostname: "h".into(),
        };
        let name = job.name();
        assert_eq!(name, "jobs/main/20261125T100001.250000Z-backup-failed");
        let entry = parse_entry(&name, "main").expect("parses");
        assert_eq!(entry.started, started);
        assert_eq!(entry.kind, "backup");
        assert_eq!(entry.outcome, Outcome::Failed);
        assert_eq!(parse_entry(&name, "other"), None);
        assert_eq!(parse_entry("jobs/main/garbage", "main"), None);
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact("cannot connect to host=db password=s3cret user=x: refused"),
            "cannot connect to host=db password=*** user=x: refused"
        );
        assert_eq!(redact("password='a b' dbname=x"), "password=*** dbname=x");
        assert_eq!(
            redact("postgresql://app:hunter2@db:5432/x failed"),
            "postgresql://app:***@db:5432/x failed"
        );
        assert_eq!(
            redact("sftp://backup@host/path and s3://bucket/p"),
            "sftp://backup@host/path and s3://bucket/p"
        );
    }
}
