//! Retention arithmetic: which backups a policy keeps, and why. Pure functions of the
//! backups' times, the policy and "now", so every rule is testable with a synthetic
//! clock.
//!
//! Rules (a backup is kept if any rule keeps it):
//! - pinned backups are always kept;
//! - `keep_last N`: the N newest;
//! - `keep_daily/weekly/monthly N`: the newest backup of each of the N newest calendar
//!   days / ISO weeks / months that have a backup, in the policy's time zone;
//! - `recovery_window W`: every backup that finished within W of now, plus the newest
//!   one that finished before now − W, so that every instant of the window can be
//!   reached by replaying WAL from a retained backup (Barman's recovery window).

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Duration, Utc};
use chrono_tz::Tz;

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub keep_last: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub recovery_window: Option<Duration>,
    /// Calendar buckets are days, weeks and months in this zone.
    pub zone: Tz,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.recovery_window.is_none()
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// When the backup became consistent (its stop time): the earliest instant it serves.
    pub time: DateTime<Utc>,
    pub pinned: bool,
}

/// The calendar bucket (year, day/week/month number) of a local time.
type BucketOf = fn(&DateTime<Tz>) -> (i32, u32);

/// The reasons each candidate is kept; empty means it expires.
pub fn plan(candidates: &[Candidate], policy: &Policy, now: DateTime<Utc>) -> Vec<Vec<String>> {
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); candidates.len()];
    // Newest first, ties broken by position so the result is deterministic.
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|a, b| candidates[*b].time.cmp(&candidates[*a].time).then(b.cmp(a)));

    for (i, candidate) in candidates.iter().enumerate() {
        if candidate.pinned {
            reasons[i].push("pinned".into());
        }
    }
    if let Some(n) = policy.keep_last {
        for (rank, &i) in order.iter().take(n as usize).enumerate() {
            reasons[i].push(format!("keep-last {} (#{})", n, rank + 1));
        }
    }
    let buckets: [(&str, Option<u32>, BucketOf); 3] = [
        ("keep-daily", policy.keep_daily, |t| (t.year(), t.ordinal())),
        ("keep-weekly", policy.keep_weekly, |t| {
            let week = t.iso_week();
            (week.year(), week.week())
        }),
        ("keep-monthly", policy.keep_monthly, |t| {
            (t.year(), t.month())
        }),
    ];
    for (rule, count, bucket_of) in buckets {
        let Some(n) = count else { continue };
        let mut seen = BTreeSet::new();
        for &i in &order {
            if seen.len() >= n as usize {
                break;
            }
            let local = candidates[i].time.with_timezone(&policy.zone);
            if seen.insert(bucket_of(&local)) {
                reasons[i].push(format!("{rule} {n} ({})", local.format(bucket_label(rule))));
            }
        }
    }
    if let Some(window) = policy.recovery_window {
        let start = now - window;
        let mut anchor_kept = false;
        for &i in &order {
            if candidates[i].time >= start {
                reasons[i].push(format!("recovery-window {}", describe_duration(window)));
            } else if !anchor_kept {
                reasons[i].push(format!(
                    "recovery-window {}: base for {}",
                    describe_duration(window),
                    start.format("%Y-%m-%d %H:%M:%S UTC")
                ));
                anchor_kept = true;
            }
        }
    }
    reasons
}

fn bucket_label(rule: &str) -> &'static str {
    match rule {
        "keep-daily" => "%Y-%m-%d",
        "keep-weekly" => "%G-W%V",
        _ => "%Y-%m",
    }
}

/// Parses a positive duration like `14d`, `36h`, `2w`, `90m` or `1d12h` (humantime's
/// units, as every other duration option; a day is 24 hours).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "cannot read duration {text:?}: use a number with a unit, e.g. 14d, 36h, 2w or 1d12h"
        )
    };
    let parsed = humantime::parse_duration(text.trim()).map_err(|_| bad())?;
    match Duration::from_std(parsed) {
        Ok(duration) if duration > Duration::zero() => Ok(duration),
        _ => Err(bad()),
    }
}

pub fn describe_duration(d: Duration) -> String {
    let secs = d.num_seconds();
    if secs % 86400 == 0 {
        format!("{}d", secs / 86400)
    } else if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else {
        format!("{}s", secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0)
            .single()
            .expect("valid time")
    }

    fn policy() -> Policy {
        Policy {
            keep_last: None,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            recovery_window: None,
            zone: chrono_tz::UTC,
        }
    }

    fn kept(candidates: &[Candidate], policy: &Policy, now: DateTime<Utc>) -> Vec<usize> {
        plan(candidates, policy, now)
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(i, _)| i)
            .collect()
    }

    /// A backup every 6 hours for 60 days, starting 2026-01-01 00:00 UTC.
    fn every_six_hours() -> Vec<Candidate> {
        (0..240)
            .map(|i| Candidate {
                time: at(2026, 1, 1, 0) + Duration::hours(6 * i),
                pinned: false,
            })
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let c = every_six_hours();
        let p = Policy {
            keep_last: Some(3),
            ..policy()
        };
        assert_eq!(kept(&c, &p, at(2026, 3, 2, 0)), vec![237, 238, 239]);
    }

    #[test]
    fn daily_weekly_monthly_keep_the_newest_of_each_bucket() {
        let c = every_six_hours();
        let now = at(2026, 3, 2, 0);
        let daily = Policy {
            keep_daily: Some(3),
            ..policy()
        };
        // Days 58, 59, 60 (Feb 27, 28, Mar 1): the 18:00 backup of each.
        assert_eq!(kept(&c, &daily, now), vec![231, 235, 239]);
        let weekly = Policy {
            keep_weekly: Some(2),
            ..policy()
        };
        // 2026-03-01 is a Sunday: weeks 2026-W09 (ends Mar 1) and W08 (ends Feb 22).
        let w = kept(&c, &weekly, now);
        assert_eq!(w.len(), 2);
        assert_eq!(c[w[1]].time, at(2026, 3, 1, 18));
        assert_eq!(c[w[0]].time, at(2026, 2, 22, 18));
        let monthly = Policy {
            keep_monthly: Some(5),
            ..policy()
        };
        // Only three months have backups: the last of January, February, March.
        let m = kept(&c, &monthly, now);
        let times: Vec<_> = m.iter().map(|i| c[*i].time).collect();
        assert_eq!(
            times,
            vec![at(2026, 1, 31, 18), at(2026, 2, 28, 18), at(2026, 3, 1, 18)]
        );
    }

    #[test]
    fn calendar_buckets_follow_the_time_zone() {
        // 23:00 UTC on Jan 1 is already Jan 2 in Berlin.
        let c = vec![
            Candidate {
                time: at(2026, 1, 1, 20),
                pinned: false,
            },
            Candidate {
                time: at(2026, 1, 1, 23),
                pinned: false,
            },
        ];
        let utc = Policy {
            keep_daily: Some(2),
            ..policy()
        };
        assert_eq!(kept(&c, &utc, at(2026, 1, 3, 0)), vec![1]);
        let berlin = Policy {
            zone: chrono_tz::Europe::Berlin,
            ..utc
        };
        assert_eq!(kept(&c, &berlin, at(2026, 1, 3, 0)), vec![0, 1]);
    }

    #[test]
    fn recovery_window_keeps_the_base_before_the_window() {
        let c = every_six_hours();
        let now = at(2026, 3, 1, 20);
        let p = Policy {
            recovery_window: Some(Duration::days(2)),
            ..policy()
        };
        let k = kept(&c, &p, now);
        // Window starts Feb 27 20:00: backups from Feb 28 00:00 on, plus Feb 27 18:00.
        assert_eq!(c[k[0]].time, at(2026, 2, 27, 18));
        assert_eq!(c[k[1]].time, at(2026, 2, 28, 0));
        assert_eq!(k.last(), Some(&239));
        assert_eq!(k.len(), 9);
        // The instant the window promises is covered by the oldest retained backup.
        assert!(c[k[0]].time <= now - Duration::days(2));
    }

    #[test]
    fn rules_combine_and_pins_always_stay() {
        let mut c = every_six_hours();
        c[5].pinned = true;
        let p = Policy {
            keep_last: Some(1),
            keep_monthly: Some(1),
            recovery_window: Some(Duration::hours(7)),
            ..policy()
        };
        let plan = plan(&c, &p, at(2026, 3, 1, 20));
        let k: Vec<usize> = (0..c.len()).filter(|i| !plan[*i].is_empty()).collect();
        // pin, window base (Mar 1 12:00), last/monthly/window (Mar 1 18:00)
        assert_eq!(k, vec![5, 238, 239]);
        assert!(plan[239].len() >= 3, "{:?}", plan[239]);
        assert_eq!(plan[5], vec!["pinned".to_string()]);
    }

    #[test]
    fn no_backups_and_one_backup() {
        let p = Policy {
            recovery_window: Some(Duration::days(7)),
            ..policy()
        };
        assert!(plan(&[], &p, at(2026, 1, 1, 0)).is_empty());
        let old = vec![Candidate {
            time: at(2020, 1, 1, 0),
            pinned: false,
        }];
        // The only backup is older than the window: it is the window's base.
        assert_eq!(kept(&old, &p, at(2026, 1, 1, 0)), vec![0]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("14d"), Ok(Duration::days(14)));
        assert_eq!(parse_duration("1d12h"), Ok(Duration::hours(36)));
        assert_eq!(parse_duration("2w"), Ok(Duration::days(14)));
        assert!(parse_duration("14").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("0d").is_err());
        assert_eq!(parse_duration("90m"), Ok(Duration::minutes(90)));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::minutes(90)));
        assert_eq!(describe_duration(Duration::days(14)), "14d");
    }
}
