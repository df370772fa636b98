//! When daemon jobs run: a cron expression (5 fields, or 6 with seconds first, in UTC)
//! or a fixed interval written `@every 6h`.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        cron: Box<Cron>,
        text: String,
    },
    /// Occurrences at whole multiples of the interval since the Unix epoch, so that a
    /// restarted daemon keeps the same rhythm and can tell which run it missed.
    Every(Duration),
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if let Some(interval) = text.strip_prefix("@every") {
            let interval = humantime::parse_duration(interval.trim())
                .map_err(|e| format!("{text:?}: {e}; write e.g. \"@every 6h\""))?;
            if interval < Duration::from_secs(1) {
                return Err(format!("{text:?}: the interval must be at least 1s"));
            }
            return Ok(Schedule::Every(interval));
        }
        let fields = text.split_whitespace().count();
        if !(fields == 5 || fields == 6 || text.starts_with('@')) {
            return Err(format!(
                "{text:?}: a cron expression has 5 fields (minute hour day month weekday) or 6 (seconds first), or write \"@every 6h\""
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(text)
            .map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            text: text.to_string(),
        })
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { cron, .. } => cron.find_next_occurrence(&t, false).ok(),
            Schedule::Every(interval) => {
                let step = interval.as_millis() as i64;
                let now = t.timestamp_millis();
                DateTime::from_timestamp_millis((now.div_euclid(step) + 1) * step)
            }
        }
    }

    /// The last occurrence at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { cron, .. } => cron.find_previous_occurrence(&t, true).ok(),
            Schedule::Every(interval) => {
                let step = interval.as_millis() as i64;
                DateTime::from_timestamp_millis(t.timestamp_millis().div_euclid(step) * step)
            }
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron { text, .. } => f.write_str(text),
            Schedule::Every(interval) => {
                write!(f, "@every {}", humantime::format_duration(*interval))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn cron_with_five_and_six_fields() {
        let daily = Schedule::parse("0 2 * * *").expect("parses");
        assert_eq!(
            daily.next_after(at("2026-11-25T01:59:59Z")),
            Some(at("2026-11-25T02:00:00Z"))
        );
        assert_eq!(
            daily.next_after(at("2026-11-25T02:00:00Z")),
            Some(at("2026-11-26T02:00:00Z"))
        );
        assert_eq!(
            daily.last_at_or_before(at("2026-11-25T01:00:00Z")),
            Some(at("2026-11-24T02:00:00Z"))
        );
        let seconds = Schedule::parse("*/5 * * * * *").expect("parses");
        assert_eq!(
            seconds.next_after(at("2026-11-25T10:00:03Z")),
            Some(at("2026-11-25T10:00:05Z"))
        );
        let sunday = Schedule::parse("0 5 * * 0").expect("parses");
        // 2026-11-29 is a Sunday.
        assert_eq!(
            sunday.next_after(at("2026-11-25T00:00:00Z")),
            Some(at("2026-11-29T05:00:00Z"))
        );
    }

    #[test]
    fn intervals_keep_their_rhythm_across_restarts() {
        let hourly = Schedule::parse("@every 1h").expect("parses");
        assert_eq!(
            hourly.next_after(at("2026-11-25T10:20:00Z")),
            Some(at("2026-11-25T11:00:00Z"))
        );
        assert_eq!(
            hourly.last_at_or_before(at("2026-11-25T10:20:00Z")),
            Some(at("2026-11-25T10:00:00Z"))
        );
        assert_eq!(hourly.to_string(), "@every 1h");
    }

    #[test]
    fn bad_schedules_say_what_to_write() {
        for bad in ["0 2 * *", "@every", "@every 0s", "61 * * * *", "every day"] {
            let err = Schedule::parse(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }
}
