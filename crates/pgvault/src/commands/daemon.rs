//! `pgvault daemon`: runs the scheduled jobs of every configured cluster and serves
//! `/metrics` and a read-only dashboard.
//!
//! Each job is a child `pgvault` process (`backup`, `dump`, `expire` or `verify` with
//! `--output json`): the exact code path an operator runs by hand, its own repository
//! lock, and a crash or out-of-memory in one job never takes the daemon down. The daemon
//! keeps no state of its own: job history goes to the repository ([`crate::jobs`]), the
//! rest is read back from it (`pgvault info`'s view) every `refresh-interval`.
//!
//! Rules: one task per (cluster, job kind) runs its job, then sleeps until the next
//! occurrence plus jitter, so the same job never overlaps itself; `expire` waits for the
//! daemon's other jobs and they wait for it (it takes the repository's exclusive lock).
//! On SIGTERM or SIGINT no new job starts; running ones get `shutdown-timeout` to
//! finish, then are killed, recorded as aborted, and their repository locks removed.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::sync::{watch, Notify, RwLock};

use super::archive::parse_duration;
use crate::cli::DaemonArgs;
use crate::config::{read_secret_file, ConfigFile, DaemonSection};
use crate::context::Context;
use crate::jobs::{self, JobRecord, Outcome};
use crate::schedule::Schedule;

mod dashboard;
mod metrics;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";
/// Records per cluster shown on the dashboard and in `info`.
pub const HISTORY_SHOWN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum JobKind {
    Backup,
    Dump,
    Expire,
    Verify,
}

impl JobKind {
    fn parse(text: &str) -> Option<JobKind> {
        match text {
            "backup" => Some(JobKind::Backup),
            "dump" => Some(JobKind::Dump),
            "expire" => Some(JobKind::Expire),
            "verify" => Some(JobKind::Verify),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Dump => "dump",
            JobKind::Expire => "expire",
            JobKind::Verify => "verify",
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub cluster: String,
    pub kind: JobKind,
    pub schedule: Schedule,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    token: Option<String>,
    pub jitter: Duration,
    pub run_missed: bool,
    pub shutdown_timeout: Duration,
    pub refresh: Duration,
    /// A job is late when a scheduled run this old has not succeeded.
    pub late_after: Duration,
    pub history_keep: usize,
}

impl Settings {
    fn from_config(section: &DaemonSection, listen_flag: Option<&str>) -> Result<Settings> {
        let listen_text = listen_flag
            .or(section.listen.as_deref())
            .unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            anyhow::anyhow!(
                "daemon listen {listen_text:?}: write an address and port such as 127.0.0.1:9187"
            )
        })?;
        let token = match &section.token_file {
            Some(path) => Some(read_secret_file(path, "daemon token")?),
            None => None,
        };
        if !listen.ip().is_loopback() && token.is_none() {
            bail!("daemon listen {listen} is reachable from other machines: set token-file in [daemon] (clients then send Authorization: Bearer TOKEN), or listen on 127.0.0.1");
        }
        let duration = |value: &Option<String>, default: &str, what: &str| {
            parse_duration(value.as_deref().unwrap_or(default), what)
        };
        Ok(Settings {
            listen,
            token,
            jitter: duration(&section.jitter, "0s", "daemon jitter")?,
            run_missed: section.run_missed.unwrap_or(true),
            shutdown_timeout: duration(&section.shutdown_timeout, "5m", "daemon shutdown-timeout")?,
            refresh: duration(&section.refresh_interval, "60s", "daemon refresh-interval")?
                .max(Duration::from_secs(1)),
            late_after: duration(&section.late_after, "1h", "daemon late-after")?,
            history_keep: section.history_keep.unwrap_or(100).max(1),
        })
    }
}

/// Every `[clusters.NAME.schedule]` entry, validated.
pub fn job_specs(config: &ConfigFile) -> Result<Vec<JobSpec>> {
    let mut specs = Vec::new();
    for (cluster, section) in &config.clusters {
        for (kind, text) in &section.schedule {
            let kind_parsed = JobKind::parse(kind).with_context(|| {
                format!("[clusters.{cluster}.schedule] {kind}: unknown job; use backup, dump, expire or verify")
            })?;
            let schedule = Schedule::parse(text)
                .map_err(|e| anyhow::anyhow!("[clusters.{cluster}.schedule] {kind} = {e}"))?;
            specs.push(JobSpec {
                cluster: cluster.clone(),
                kind: kind_parsed,
                schedule,
            });
        }
    }
    Ok(specs)
}

/// What the daemon knows about one job.
#[derive(Debug, Clone, Default)]
pub struct JobState {
    pub last: Option<JobRecord>,
    pub last_success: Option<DateTime<Utc>>,
    pub running_since: Option<DateTime<Utc>>,
    pub next_run: Option<DateTime<Utc>>,
    /// Runs since the daemon started, by outcome.
    pub runs: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Late,
    Failing,
}

impl Health {
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Late => "late",
            Health::Failing => "failing",
        }
    }
}

#[derive(Debug)]
pub struct DaemonState {
    pub settings: Settings,
    pub started: DateTime<Utc>,
    pub specs: Vec<JobSpec>,
    pub jobs: BTreeMap<(String, JobKind), JobState>,
    /// Newest first, per cluster.
    pub history: BTreeMap<String, Vec<JobRecord>>,
    /// `pgvault info --output json` as of `refreshed`.
    pub info: Option<Value>,
    pub info_error: Option<String>,
    pub refreshed: Option<DateTime<Utc>>,
}

impl DaemonState {
    pub fn clusters(&self) -> Vec<String> {
        let mut names: Vec<String> = self.specs.iter().map(|s| s.cluster.clone()).collect();
        names.dedup();
        names
    }

    /// The `info` view of one cluster, when the repository knows it.
    pub fn cluster_info(&self, cluster: &str) -> Option<&Value> {
        self.info.as_ref()?["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == cluster)
    }

    /// Failing when a job's last run failed; late when a run scheduled more than
    /// `late-after` ago has not succeeded; healthy otherwise. With the reason.
    pub fn health(&self, cluster: &str, now: DateTime<Utc>) -> (Health, String) {
        let mut late = None;
        for spec in self.specs.iter().filter(|s| s.cluster == cluster) {
            let Some(state) = self.jobs.get(&(spec.cluster.clone(), spec.kind)) else {
                continue;
            };
            if let Some(last) = &state.last {
                if last.outcome != Outcome::Ok {
                    return (
                        Health::Failing,
                        format!(
                            "{} {}: {}",
                            spec.kind.as_str(),
                            last.outcome.as_str(),
                            last.error.as_deref().unwrap_or("")
                        ),
                    );
                }
            }
            let horizon =
                now - chrono::Duration::from_std(self.settings.late_after).unwrap_or_default();
            if let Some(due) = spec.schedule.last_at_or_before(horizon) {
                let overdue = match state.last_success {
                    Some(success) => success < due,
                    None => due >= self.started,
                };
                if overdue && late.is_none() {
                    late = Some(format!(
                        "{} due {} has not succeeded",
                        spec.kind.as_str(),
                        due.format("%Y-%m-%d %H:%M:%S UTC")
                    ));
                }
            }
        }
        match late {
            Some(reason) => (Health::Late, reason),
            None => (Health::Healthy, String::new()),
        }
    }
}

type Shared = Arc<Mutex<DaemonState>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, DaemonState> {
    // A panicked holder leaves plain data behind; keep serving it.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn daemon(ctx: Context, args: &DaemonArgs) -> Result<()> {
    let config_path = ctx.config_path.clone().context(
        "the daemon reads clusters and schedules from a config file: pass --config FILE (or PGVAULT_CONFIG, or /etc/pgvault/pgvault.toml)",
    )?;
    let config = ConfigFile::load(Some(&config_path))?;
    let settings = Settings::from_config(
        &config.daemon.clone().unwrap_or_default(),
        args.listen.as_deref(),
    )?;
    let specs = job_specs(&config)?;
    if specs.is_empty() {
        bail!(
            "config file {} schedules no jobs: add e.g. backup = \"0 2 * * *\" under [clusters.NAME.schedule]",
            config_path.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the daemon's runtime")?;
    runtime.block_on(run(Arc::new(ctx), settings, specs))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("daemon worker thread failed")?
}

async fn run(ctx: Arc<Context>, settings: Settings, specs: Vec<JobSpec>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    // The repository must open now: a wrong passphrase or URL is a start-up error.
    let opened = {
        let ctx = ctx.clone();
        let clusters: Vec<String> = {
            let mut c: Vec<String> = specs.iter().map(|s| s.cluster.clone()).collect();
            c.dedup();
            c
        };
        blocking(move || {
            let repo = ctx.open()?;
            let mut known = BTreeMap::new();
            for cluster in clusters {
                let entries = jobs::entries(&repo, &cluster)?;
                let recent = jobs::recent(&repo, &cluster, HISTORY_SHOWN)?;
                known.insert(cluster, (entries, recent));
            }
            Ok(known)
        })
        .await?
    };
    let started = Utc::now();
    let mut job_states = BTreeMap::new();
    let mut missed = Vec::new();
    for spec in &specs {
        let (entries, recent) = &opened[&spec.cluster];
        let of_kind = || entries.iter().filter(|e| e.kind == spec.kind.as_str());
        let last_started = of_kind().map(|e| e.started).max();
        let state = JobState {
            last: recent
                .iter()
                .find(|r| r.kind == spec.kind.as_str())
                .cloned(),
            last_success: of_kind()
                .filter(|e| e.outcome == Outcome::Ok)
                .map(|e| e.started)
                .max(),
            ..JobState::default()
        };
        let due = spec.schedule.last_at_or_before(started);
        let was_missed = matches!((last_started, due), (Some(last), Some(due)) if last < due);
        missed.push(settings.run_missed && was_missed);
        job_states.insert((spec.cluster.clone(), spec.kind), state);
    }
    let history = opened
        .into_iter()
        .map(|(cluster, (_, recent))| (cluster, recent))
        .collect();
    let shared: Shared = Arc::new(Mutex::new(DaemonState {
        settings: settings.clone(),
        started,
        specs: specs.clone(),
        jobs: job_states,
        history,
        info: None,
        info_error: None,
        refreshed: None,
    }));
    tracing::warn!(
        "pgvault daemon on http://{}: {} scheduled jobs for {} clusters",
        settings.listen,
        specs.len(),
        lock(&shared).clusters().len()
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (abort_tx, abort_rx) = watch::channel(false);
    let refresh_now = Arc::new(Notify::new());
    let expire_gate = Arc::new(RwLock::new(()));

    let mut tasks = tokio::task::JoinSet::new();
    for (spec, run_first) in specs.into_iter().zip(missed) {
        tasks.spawn(job_loop(JobLoop {
            ctx: ctx.clone(),
            spec,
            run_first,
            shared: shared.clone(),
            shutdown: shutdown_rx.clone(),
            abort: abort_rx.clone(),
            refresh_now: refresh_now.clone(),
            expire_gate: expire_gate.clone(),
        }));
    }
    let refresher = tokio::spawn(refresh_loop(
        ctx.clone(),
        shared.clone(),
        refresh_now.clone(),
        shutdown_rx.clone(),
    ));
    let app = Router::new()
        .route("/", get(dashboard_page))
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared.clone());
    let mut server_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_shutdown.wait_for(|stop| *stop).await;
            })
            .await
    });

    wait_for_signal().await?;
    let running = lock(&shared)
        .jobs
        .values()
        .filter(|j| j.running_since.is_some())
        .count();
    tracing::warn!(
        "shutting down: no new jobs; waiting up to {} for {running} running job(s)",
        humantime::format_duration(settings.shutdown_timeout)
    );
    let _ = shutdown_tx.send(true);
    let grace = tokio::time::sleep(settings.shutdown_timeout);
    tokio::pin!(grace);
    let mut aborted = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                if joined.is_none() {
                    break;
                }
            }
            _ = &mut grace, if !aborted => {
                tracing::warn!("shutdown-timeout reached: killing running jobs");
                let _ = abort_tx.send(true);
                aborted = true;
            }
            _ = wait_for_signal(), if !aborted => {
                tracing::warn!("second signal: killing running jobs");
                let _ = abort_tx.send(true);
                aborted = true;
            }
        }
    }
    refresher.abort();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("dashboard server: {e}"),
        Err(e) => tracing::warn!("dashboard server task: {e}"),
    }
    tracing::warn!("daemon stopped");
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

struct JobLoop {
    ctx: Arc<Context>,
    spec: JobSpec,
    run_first: bool,
    shared: Shared,
    shutdown: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
    refresh_now: Arc<Notify>,
    expire_gate: Arc<RwLock<()>>,
}

/// A delay in [0, jitter), different for every run.
fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let random = std::collections::hash_map::RandomState::new().hash_one(Utc::now());
    Duration::from_millis(random % (max.as_millis() as u64).max(1))
}

async fn job_loop(mut job: JobLoop) {
    let key = (job.spec.cluster.clone(), job.spec.kind);
    let mut trigger = if job.run_first { "missed" } else { "schedule" };
    let mut run_now = job.run_first;
    loop {
        if !run_now {
            let now = Utc::now();
            let Some(next) = job.spec.schedule.next_after(now) else {
                tracing::warn!(
                    "cluster {}: {} schedule {} has no next occurrence",
                    job.spec.cluster,
                    job.spec.kind.as_str(),
                    job.spec.schedule
                );
                return;
            };
            let delay = (next - now).to_std().unwrap_or_default()
                + jitter(lock(&job.shared).settings.jitter);
            if let Some(state) = lock(&job.shared).jobs.get_mut(&key) {
                state.next_run = chrono::Duration::from_std(delay).ok().map(|d| now + d);
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = job.shutdown.wait_for(|stop| *stop) => return,
            }
        }
        if *job.shutdown.borrow() {
            return;
        }
        run_job(&mut job, trigger).await;
        job.refresh_now.notify_one();
        trigger = "schedule";
        run_now = false;
    }
}

async fn run_job(job: &mut JobLoop, trigger: &str) {
    let gate = job.expire_gate.clone();
    let (_exclusive, _shared) = if job.spec.kind == JobKind::Expire {
        (Some(gate.write().await), None)
    } else {
        (None, Some(gate.read().await))
    };
    // A shutdown may have come while this job waited for `expire` (or expire for it).
    if *job.shutdown.borrow() {
        return;
    }
    let key = (job.spec.cluster.clone(), job.spec.kind);
    let started = Utc::now();
    if let Some(state) = lock(&job.shared).jobs.get_mut(&key) {
        state.running_since = Some(started);
        state.next_run = None;
    }
    tracing::info!(
        "cluster {}: {} started ({trigger})",
        job.spec.cluster,
        job.spec.kind.as_str()
    );
    let result = run_child(&job.ctx, &job.spec, &mut job.abort).await;
    let finished = Utc::now();
    let (outcome, stored_bytes, result_id, error) = match result {
        Ok(ChildResult::Done(report)) => (
            Outcome::Ok,
            report["stored_bytes"].as_u64(),
            report["id"].as_str().map(str::to_string),
            None,
        ),
        Ok(ChildResult::Failed(error)) => (Outcome::Failed, None, None, Some(error)),
        Ok(ChildResult::Killed) => (
            Outcome::Aborted,
            None,
            None,
            Some("killed at daemon shutdown".to_string()),
        ),
        Err(e) => (Outcome::Failed, None, None, Some(format!("{e:#}"))),
    };
    let record = JobRecord {
        cluster: job.spec.cluster.clone(),
        kind: job.spec.kind.as_str().to_string(),
        trigger: trigger.to_string(),
        started,
        finished,
        outcome,
        stored_bytes,
        result_id,
        error: error.map(|e| jobs::redact(&e)),
        hostname: repo::hostname(),
    };
    match outcome {
        Outcome::Ok => tracing::info!(
            "cluster {}: {} ok in {:.1}s",
            record.cluster,
            record.kind,
            record.duration_seconds()
        ),
        _ => tracing::warn!(
            "cluster {}: {} {}: {}",
            record.cluster,
            record.kind,
            outcome.as_str(),
            record.error.as_deref().unwrap_or("")
        ),
    }
    let ctx = job.ctx.clone();
    let stored = record.clone();
    let keep = lock(&job.shared).settings.history_keep;
    let persisted = blocking(move || {
        let repo = ctx.open()?;
        jobs::record(&repo, &stored)?;
        jobs::prune(&repo, &stored.cluster, keep)?;
        if stored.outcome == Outcome::Aborted {
            // The killed process cannot release its lock; a dead pid's lock is stale.
            repo::lock::remove_locks(repo.storage(), false)?;
        }
        Ok(())
    })
    .await;
    if let Err(e) = persisted {
        tracing::warn!(
            "cluster {}: cannot record the {} job in the repository: {}",
            record.cluster,
            record.kind,
            jobs::redact(&format!("{e:#}"))
        );
    }
    let mut state = lock(&job.shared);
    let history = state.history.entry(record.cluster.clone()).or_default();
    history.insert(0, record.clone());
    history.truncate(HISTORY_SHOWN);
    if let Some(js) = state.jobs.get_mut(&key) {
        js.running_since = None;
        if outcome == Outcome::Ok {
            js.last_success = Some(started);
        }
        *js.runs.entry(outcome.as_str()).or_default() += 1;
        js.last = Some(record);
    }
}

enum ChildResult {
    /// Exit 0 with the command's JSON report.
    Done(Value),
    /// Non-zero exit, with its error line.
    Failed(String),
    Killed,
}

fn child_command(ctx: &Context, spec: &JobSpec) -> Result<tokio::process::Command> {
    let exe: PathBuf = std::env::current_exe().context("cannot find the pgvault executable")?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(ctx.child_args_for(&spec.cluster))
        .args(["--output", "json", spec.kind.as_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C on the daemon's terminal reaches the daemon,
        // which decides what happens to running jobs.
        .process_group(0)
        .kill_on_drop(true);
    Ok(command)
}

async fn run_child(
    ctx: &Context,
    spec: &JobSpec,
    abort: &mut watch::Receiver<bool>,
) -> Result<ChildResult> {
    let mut child = child_command(ctx, spec)?
        .spawn()
        .context("cannot start the job process")?;
    let mut stdout = child.stdout.take().context("no job stdout")?;
    let mut stderr = child.stderr.take().context("no job stderr")?;
    let out_reader = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text).await;
        text
    });
    let err_reader = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let status = tokio::select! {
        status = child.wait() => Some(status.context("waiting for the job process")?),
        _ = abort.wait_for(|stop| *stop) => None,
    };
    let Some(status) = status else {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Ok(ChildResult::Killed);
    };
    let stdout = out_reader.await.unwrap_or_default();
    let stderr = err_reader.await.unwrap_or_default();
    if status.success() {
        let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        return Ok(ChildResult::Done(report));
    }
    let error = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .map(str::to_string)
        .or_else(|| {
            stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("exited with {status}"));
    Ok(ChildResult::Failed(error))
}

async fn refresh_loop(
    ctx: Arc<Context>,
    shared: Shared,
    refresh_now: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let view = {
            let ctx = ctx.clone();
            blocking(move || {
                let repo = ctx.open()?;
                super::info::collect(&ctx, &repo)
            })
            .await
        };
        {
            let mut state = lock(&shared);
            match view {
                Ok(info) => {
                    state.info = Some(info);
                    state.info_error = None;
                }
                Err(e) => {
                    let message = jobs::redact(&format!("{e:#}"));
                    tracing::warn!("cannot read the repository for the dashboard: {message}");
                    state.info_error = Some(message);
                }
            }
            state.refreshed = Some(Utc::now());
        }
        let interval = lock(&shared).settings.refresh;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = refresh_now.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// `None` when the request may proceed.
fn refuse_unauthorized(state: &DaemonState, headers: &HeaderMap) -> Option<Response> {
    let token = state.settings.token.as_deref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "send Authorization: Bearer TOKEN (the daemon's token-file)\n",
        )
            .into_response(),
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics_page(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let state = lock(&shared);
    if let Some(refusal) = refuse_unauthorized(&state, &headers) {
        return refusal;
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&state, Utc::now()),
    )
        .into_response()
}

async fn dashboard_page(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let state = lock(&shared);
    if let Some(refusal) = refuse_unauthorized(&state, &headers) {
        return refusal;
    }
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        dashboard::render(&state, Utc::now()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_daemon_configs_fail_on_one_line() {
        let config = ConfigFile::parse(
            "[clusters.main.schedule]\nbackup = \"0 2 * * *\"\nvacuum = \"@every 1h\"\n",
        )
        .expect("parses");
        let err = format!("{:#}", job_specs(&config).expect_err("unknown job"));
        assert!(
            err.contains("vacuum") && err.contains("backup, dump"),
            "{err}"
        );

        let config =
            ConfigFile::parse("[clusters.main.schedule]\nbackup = \"0 2 * *\"\n").expect("parses");
        let err = format!("{:#}", job_specs(&config).expect_err("bad cron"));
        assert!(err.contains("[clusters.main.schedule] backup"), "{err}");

        let section = DaemonSection {
            listen: Some("0.0.0.0:9187".into()),
            ..DaemonSection::default()
        };
        let err = format!(
            "{:#}",
            Settings::from_config(&section, None).expect_err("no token")
        );
        assert!(err.contains("token-file"), "{err}");
        let err = format!(
            "{:#}",
            Settings::from_config(&DaemonSection::default(), Some("localhost"))
                .expect_err("no port")
        );
        assert!(err.contains("127.0.0.1:9187"), "{err}");
    }

    fn state(last: Option<(Outcome, &str)>, last_success: Option<&str>) -> DaemonState {
        let at = |t: &str| {
            DateTime::parse_from_rfc3339(t)
                .expect("time")
                .with_timezone(&Utc)
        };
        let spec = JobSpec {
            cluster: "main".into(),
            kind: JobKind::Backup,
            schedule: Schedule::parse("0 2 * * *").expect("cron"),
        };
        let record = last.map(|(outcome, started)| JobRecord {
            cluster: "main".into(),
            kind: "backup".into(),
            trigger: "schedule".into(),
            started: at(started),
            finished: at(started),
            outcome,
            stored_bytes: None,
            result_id: None,
            error: Some("boom".into()),
            hostname: "h".into(),
        });
        let job = JobState {
            last: record,
            last_success: last_success.map(at),
            ..JobState::default()
        };
        DaemonState {
            settings: Settings {
                listen: DEFAULT_LISTEN.parse().expect("addr"),
                token: None,
                jitter: Duration::ZERO,
                run_missed: true,
                shutdown_timeout: Duration::from_secs(1),
                refresh: Duration::from_secs(1),
                late_after: Duration::from_secs(3600),
                history_keep: 10,
            },
            started: at("2026-11-20T00:00:00Z"),
            specs: vec![spec],
            jobs: [(("main".to_string(), JobKind::Backup), job)].into(),
            history: BTreeMap::new(),
            info: None,
            info_error: None,
            refreshed: None,
        }
    }

    #[test]
    fn health_is_failing_late_or_healthy() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        // Today's 02:00 run succeeded.
        let ok = state(
            Some((Outcome::Ok, "2026-11-25T02:00:01Z")),
            Some("2026-11-25T02:00:01Z"),
        );
        assert_eq!(ok.health("main", now).0, Health::Healthy);
        // The last run failed: failing, with the error.
        let failed = state(
            Some((Outcome::Failed, "2026-11-25T02:00:01Z")),
            Some("2026-11-24T02:00:01Z"),
        );
        let (health, reason) = failed.health("main", now);
        assert_eq!(health, Health::Failing);
        assert!(reason.contains("boom"), "{reason}");
        // Yesterday's success, nothing today although 02:00 is 8 hours past: late.
        let late = state(
            Some((Outcome::Ok, "2026-11-24T02:00:01Z")),
            Some("2026-11-24T02:00:01Z"),
        );
        assert_eq!(late.health("main", now).0, Health::Late);
        // Within late-after of the due time: not late yet.
        let early = DateTime::parse_from_rfc3339("2026-11-25T02:30:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(late.health("main", early).0, Health::Healthy);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
