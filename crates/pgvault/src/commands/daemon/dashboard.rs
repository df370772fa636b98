//! The dashboard: one server-rendered HTML page, no scripts, no external resources.
//! Clusters at a glance, then per cluster a timeline of backups and dumps with the
//! recoverable window drawn, WAL continuity, schedules, job history and sizes.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::DaemonState;
use crate::output::bytes;

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(value: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0) as u64;
    let rounded = if secs >= 3600 { secs / 60 * 60 } else { secs };
    format!(
        "{} ago",
        humantime::format_duration(std::time::Duration::from_secs(rounded))
    )
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;font-size:13px;color:#c5cad6}
main{padding:16px 24px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:20px}
.card{background:#fff;border-radius:6px;padding:12px 16px;min-width:240px;box-shadow:0 1px 2px #0002}
.badge{display:inline-block;padding:4px 12px;border-radius:4px;color:#fff;font-weight:600}
.status-healthy{background:#1b873f} .status-late{background:#b7791f} .status-failing{background:#c62828}
section.cluster{background:#fff;border-radius:6px;padding:12px 16px;margin-bottom:20px;box-shadow:0 1px 2px #0002}
h2{margin:4px 0 8px;font-size:18px} h3{font-size:14px;margin:14px 0 6px;color:#4a5568}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #e2e5ea;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.error{color:#c62828} .ok{color:#1b873f} .muted{color:#718096}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:4px 16px;font-size:13px}
svg text{font-size:11px;fill:#4a5568}
";

pub fn render(state: &DaemonState, now: DateTime<Utc>) -> String {
    let mut html = String::new();
    let repository = state
        .info
        .as_ref()
        .and_then(|i| i["repository"].as_str())
        .unwrap_or("(not read yet)");
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"30\"><title>pgvault</title><style>{STYLE}</style></head><body><header><h1>pgvault</h1><p>repository {} · page built {} UTC · repository read {}</p></header><main>",
        esc(repository),
        when(now),
        state.refreshed.map_or("never".to_string(), |t| age(t, now)),
    );
    if let Some(error) = &state.info_error {
        let _ = write!(
            html,
            "<p class=\"error\" id=\"repository-error\">cannot read the repository: {}</p>",
            esc(error)
        );
    }
    html.push_str("<div class=\"cards\">");
    for cluster in state.clusters() {
        let (health, reason) = state.health(&cluster, now);
        let info = state.cluster_info(&cluster);
        let last_backup = info
            .and_then(|i| i["backups"].as_array()?.last().cloned())
            .and_then(|b| time(&b["stop_time"]));
        let _ = write!(
            html,
            "<div class=\"card\" id=\"card-{c}\"><h2>{c}</h2><span class=\"badge status-{h}\">{h}</span><p>last backup: {b}</p>{r}</div>",
            c = esc(&cluster),
            h = health.as_str(),
            b = last_backup.map_or("none".to_string(), |t| age(t, now)),
            r = if reason.is_empty() { String::new() } else { format!("<p class=\"error\">{}</p>", esc(&reason)) },
        );
    }
    html.push_str("</div>");
    for cluster in state.clusters() {
        cluster_section(&mut html, state, &cluster, now);
    }
    if let Some(totals) = state.info.as_ref().map(|i| &i["totals"]) {
        let _ = write!(
            html,
            "<section class=\"cluster\"><h2>Repository</h2><p>{} logical in {} stored ({:.1}x)</p></section>",
            bytes(totals["logical_bytes"].as_u64().unwrap_or(0)),
            bytes(totals["stored_bytes"].as_u64().unwrap_or(0)),
            totals["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    html.push_str("</main></body></html>\n");
    html
}

fn cluster_section(html: &mut String, state: &DaemonState, cluster: &str, now: DateTime<Utc>) {
    let (health, _) = state.health(cluster, now);
    let _ = write!(
        html,
        "<section class=\"cluster\" id=\"cluster-{c}\"><h2>{c} <span class=\"badge status-{h}\">{h}</span></h2>",
        c = esc(cluster),
        h = health.as_str()
    );
    let info = state.cluster_info(cluster);
    match info {
        None => html.push_str("<p class=\"muted\">not in the repository yet: run <code>pgvault setup</code> for this cluster</p>"),
        Some(info) => {
            facts(html, info, now);
            timeline(html, state, cluster, info, now);
            wal(html, info);
        }
    }
    schedules(html, state, cluster, now);
    history(html, state, cluster);
    if let Some(info) = info {
        backups(html, info);
    }
    html.push_str("</section>");
}

fn facts(html: &mut String, info: &Value, now: DateTime<Utc>) {
    let version = info["pg_version"].as_u64().unwrap_or(0);
    let window = match (
        time(&info["recoverable"]["from"]),
        time(&info["recoverable"]["to"]),
    ) {
        (Some(from), Some(to)) => format!("{} … {}", when(from), when(to)),
        _ => "nothing yet".to_string(),
    };
    let wal = &info["wal"];
    let last_push = time(&wal["last_push"]).map_or("never".to_string(), |t| age(t, now));
    let lag = match (
        wal["server"]["lag_bytes"].as_u64(),
        wal["server"]["error"].as_str(),
    ) {
        (Some(lag), _) => bytes(lag),
        (None, Some(e)) => format!("server not reachable: {e}"),
        _ => "unknown (no pg-conn)".to_string(),
    };
    let corrupted: u64 = info["backups"].as_array().map_or(0, |b| {
        b.iter()
            .map(|b| b["corrupted_pages"].as_u64().unwrap_or(0))
            .sum()
    });
    let _ = write!(
        html,
        "<div class=\"facts\"><div>PostgreSQL {}.{}</div><div>system id {}</div><div>recoverable: {}</div><div>last WAL push: {}</div><div>archive lag: {}</div><div>corrupted pages: {}</div></div>",
        version / 10000,
        version % 10000,
        esc(info["system_identifier"].as_str().unwrap_or("")),
        esc(&window),
        esc(&last_push),
        esc(&lag),
        corrupted
    );
}

/// Backups (blue), dumps (purple) and failed jobs (red) on a time axis, over the
/// recoverable window (green).
fn timeline(
    html: &mut String,
    state: &DaemonState,
    cluster: &str,
    info: &Value,
    now: DateTime<Utc>,
) {
    let backups: Vec<DateTime<Utc>> = info["backups"].as_array().map_or(Vec::new(), |b| {
        b.iter().filter_map(|b| time(&b["stop_time"])).collect()
    });
    let dumps: Vec<DateTime<Utc>> = info["dumps"].as_array().map_or(Vec::new(), |d| {
        d.iter().filter_map(|d| time(&d["time"])).collect()
    });
    let failures: Vec<DateTime<Utc>> = state.history.get(cluster).map_or(Vec::new(), |h| {
        h.iter()
            .filter(|r| r.outcome != crate::jobs::Outcome::Ok)
            .map(|r| r.started)
            .collect()
    });
    let window = (
        time(&info["recoverable"]["from"]),
        time(&info["recoverable"]["to"]),
    );
    let earliest = backups
        .iter()
        .chain(&dumps)
        .chain(&failures)
        .chain(window.0.iter())
        .min()
        .copied()
        .unwrap_or(now);
    let start = earliest.min(now - chrono::Duration::minutes(10));
    let span = (now - start).num_milliseconds().max(1) as f64;
    const WIDTH: f64 = 1000.0;
    let x = |t: DateTime<Utc>| 10.0 + (t - start).num_milliseconds() as f64 / span * (WIDTH - 20.0);
    let _ = write!(
        html,
        "<h3>Timeline</h3><svg class=\"timeline\" viewBox=\"0 0 {WIDTH} 70\" width=\"100%\" height=\"70\" role=\"img\" aria-label=\"timeline of {c}\"><line x1=\"10\" y1=\"35\" x2=\"{e}\" y2=\"35\" stroke=\"#a0aec0\"/>",
        c = esc(cluster),
        e = WIDTH - 10.0
    );
    if let (Some(from), Some(to)) = window {
        let _ = write!(
            html,
            "<rect class=\"window\" x=\"{:.1}\" y=\"27\" width=\"{:.1}\" height=\"16\" fill=\"#38a169\" opacity=\"0.45\"><title>recoverable {} … {}</title></rect>",
            x(from),
            (x(to) - x(from)).max(2.0),
            when(from),
            when(to)
        );
    }
    for t in &backups {
        let _ = write!(html, "<rect class=\"backup\" x=\"{:.1}\" y=\"20\" width=\"4\" height=\"30\" fill=\"#2b6cb0\"><title>backup {}</title></rect>", x(*t) - 2.0, when(*t));
    }
    for t in &dumps {
        let _ = write!(html, "<circle class=\"dump\" cx=\"{:.1}\" cy=\"14\" r=\"5\" fill=\"#6b46c1\"><title>dump {}</title></circle>", x(*t), when(*t));
    }
    for t in &failures {
        let _ = write!(html, "<circle class=\"failure\" cx=\"{:.1}\" cy=\"56\" r=\"5\" fill=\"#c62828\"><title>failed job {}</title></circle>", x(*t), when(*t));
    }
    let _ = write!(
        html,
        "<text x=\"10\" y=\"68\">{}</text><text x=\"{}\" y=\"68\" text-anchor=\"end\">now</text></svg><p class=\"muted\">blue: backups ({}), purple: dumps ({}), green: recoverable window, red: failed jobs</p>",
        when(start),
        WIDTH - 10.0,
        backups.len(),
        dumps.len()
    );
}

fn wal(html: &mut String, info: &Value) {
    let wal = &info["wal"];
    html.push_str("<h3>WAL continuity</h3><table><tr><th>timeline</th><th>first</th><th>last</th><th>segments</th></tr>");
    for tli in wal["timelines"].as_array().cloned().unwrap_or_default() {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            tli["timeline"],
            esc(tli["first"].as_str().unwrap_or("")),
            esc(tli["last"].as_str().unwrap_or("")),
            tli["segments"]
        );
    }
    html.push_str("</table>");
    let gaps = wal["gaps"].as_array().cloned().unwrap_or_default();
    if gaps.is_empty() {
        html.push_str("<p class=\"ok\" id=\"wal-continuous\">continuous: no gaps</p>");
    } else {
        for gap in gaps {
            let _ = write!(
                html,
                "<p class=\"error\">GAP on timeline {}: {} … {} missing</p>",
                gap["timeline"],
                esc(gap["from"].as_str().unwrap_or("")),
                esc(gap["to"].as_str().unwrap_or(""))
            );
        }
    }
}

fn schedules(html: &mut String, state: &DaemonState, cluster: &str, now: DateTime<Utc>) {
    html.push_str("<h3>Schedules</h3><table><tr><th>job</th><th>schedule</th><th>last run</th><th>outcome</th><th>took</th><th>last success</th><th>next run</th></tr>");
    for spec in state.specs.iter().filter(|s| s.cluster == cluster) {
        let Some(job) = state.jobs.get(&(spec.cluster.clone(), spec.kind)) else {
            continue;
        };
        let (last, outcome, took) = match &job.last {
            Some(r) => (
                age(r.started, now),
                format!(
                    "<span class=\"{}\">{}</span>",
                    if r.outcome == crate::jobs::Outcome::Ok {
                        "ok"
                    } else {
                        "error"
                    },
                    r.outcome.as_str()
                ),
                format!("{:.1}s", r.duration_seconds()),
            ),
            None => ("never".to_string(), String::new(), String::new()),
        };
        let next = match (job.running_since, job.next_run) {
            (Some(since), _) => format!("running since {}", age(since, now)),
            (None, Some(t)) => when(t),
            (None, None) => String::new(),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            spec.kind.as_str(),
            esc(&spec.schedule.to_string()),
            last,
            outcome,
            took,
            job.last_success.map_or("never".to_string(), |t| age(t, now)),
            esc(&next)
        );
    }
    html.push_str("</table>");
}

fn history(html: &mut String, state: &DaemonState, cluster: &str) {
    html.push_str("<h3>Job history</h3><table><tr><th>started (UTC)</th><th>job</th><th>trigger</th><th>outcome</th><th>took</th><th>stored</th><th>error</th></tr>");
    for r in state
        .history
        .get(cluster)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let ok = r.outcome == crate::jobs::Outcome::Ok;
        let _ = write!(
            html,
            "<tr class=\"job-{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"num\">{:.1}s</td><td class=\"num\">{}</td><td class=\"error\">{}</td></tr>",
            r.outcome.as_str(),
            when(r.started),
            esc(&r.kind),
            esc(&r.trigger),
            if ok { "ok" } else { "error" },
            r.outcome.as_str(),
            r.duration_seconds(),
            r.stored_bytes.map(bytes).unwrap_or_default(),
            esc(r.error.as_deref().unwrap_or(""))
        );
    }
    html.push_str("</table>");
}

fn backups(html: &mut String, info: &Value) {
    html.push_str("<h3>Backups and dumps</h3><table><tr><th>what</th><th>id</th><th>time (UTC)</th><th>size</th><th>new stored</th><th>dedup</th><th>WAL</th></tr>");
    let backups = info["backups"].as_array().cloned().unwrap_or_default();
    for b in backups.iter().rev().take(10) {
        let _ = write!(
            html,
            "<tr><td>backup</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.1}x</td><td>{}</td></tr>",
            esc(&b["id"].as_str().unwrap_or("").chars().take(12).collect::<String>()),
            time(&b["stop_time"]).map(when).unwrap_or_default(),
            bytes(b["size_bytes"].as_u64().unwrap_or(0)),
            bytes(b["stored_bytes"].as_u64().unwrap_or(0)),
            b["dedup_ratio"].as_f64().unwrap_or(0.0),
            if b["wal_complete"].as_bool() == Some(true) { "complete".to_string() } else { "<span class=\"error\">incomplete</span>".to_string() }
        );
    }
    let dumps = info["dumps"].as_array().cloned().unwrap_or_default();
    for d in dumps.iter().rev().take(10) {
        let size = d["size_bytes"].as_u64().unwrap_or(0);
        let stored = d["stored_bytes"].as_u64().unwrap_or(0);
        let _ = write!(
            html,
            "<tr><td>dump</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.1}x</td><td></td></tr>",
            esc(&d["id"].as_str().unwrap_or("").chars().take(12).collect::<String>()),
            time(&d["time"]).map(when).unwrap_or_default(),
            bytes(size),
            bytes(stored),
            size as f64 / stored.max(1) as f64
        );
    }
    html.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }
}
