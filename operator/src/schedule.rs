//! Cron schedules of FaultTests: the five standard fields, in UTC (as a
//! CronJob on Kubernetes 1.20 reads them), as bit sets over which the next
//! and the latest tick are found by walking days, then hours and minutes.

/// A parsed cron schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Day of month and day of week both restricted: either may match
    /// (cron's rule); otherwise both must.
    either_day: bool,
}

const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
];
const DAY: i64 = 86_400;
/// How far a search goes before it says the schedule never fires
/// (February 30th): a leap cycle and then some.
const HORIZON_DAYS: i64 = 366 * 5;

impl Schedule {
    /// Parses `s`; the error says which field is wrong and how.
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let fields: Vec<&str> = s.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "spec.schedule {s:?} has {} fields; a cron schedule has five (minute hour day-of-month month day-of-week), e.g. \"0 3 * * *\"",
                fields.len()
            ));
        }
        let mut sets = [0u64; 5];
        for (i, (field, (name, lo, hi))) in fields.iter().zip(FIELDS).enumerate() {
            for part in field.split(',') {
                let (range, step) = match part.split_once('/') {
                    Some((r, st)) => match st.parse::<u32>() {
                        Ok(n) if n > 0 => (r, n),
                        _ => {
                            return Err(format!(
                                "spec.schedule {s:?}: bad step {st:?} in the {name} field"
                            ));
                        }
                    },
                    None => (part, 1),
                };
                let number = |b: &str| match b.parse::<u32>() {
                    Ok(n) if (lo..=hi).contains(&n) => Ok(n),
                    _ => Err(format!(
                        "spec.schedule {s:?}: {b:?} is not a {name} ({lo}-{hi})"
                    )),
                };
                let (from, to) = if range == "*" {
                    (lo, hi)
                } else if let Some((a, b)) = range.split_once('-') {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(format!(
                            "spec.schedule {s:?}: the range {range:?} in the {name} field runs backwards"
                        ));
                    }
                    (a, b)
                } else {
                    let n = number(range)?;
                    // `5/15` means from 5 to the end in steps of 15.
                    (n, if step > 1 { hi } else { n })
                };
                for v in (from..=to).step_by(step as usize) {
                    sets[i] |= 1 << v;
                }
            }
        }
        // Sunday is both 0 and 7.
        if sets[4] & (1 << 7) != 0 {
            sets[4] |= 1;
        }
        Ok(Schedule {
            minutes: sets[0],
            hours: sets[1],
            days: sets[2],
            months: sets[3],
            weekdays: sets[4],
            either_day: fields[2] != "*" && fields[4] != "*",
        })
    }

    fn day_matches(&self, day: i64) -> bool {
        let (_, month, dom) = civil(day);
        if self.months & (1 << month) == 0 {
            return false;
        }
        let weekday = (day + 4).rem_euclid(7); // 1970-01-01 was a Thursday
        let by_dom = self.days & (1 << dom) != 0;
        let by_dow = self.weekdays & (1 << weekday) != 0;
        if self.either_day {
            by_dom || by_dow
        } else {
            by_dom && by_dow
        }
    }

    fn minutes_of_day(&self) -> impl DoubleEndedIterator<Item = i64> + '_ {
        (0..24i64)
            .filter(|h| self.hours & (1 << h) != 0)
            .flat_map(|h| {
                (0..60i64)
                    .filter(|m| self.minutes & (1 << m) != 0)
                    .map(move |m| h * 3600 + m * 60)
            })
    }

    /// The first tick strictly after `t` (Unix seconds), if any within
    /// five years.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        let start = (t.div_euclid(60) + 1) * 60;
        let first = start.div_euclid(DAY);
        (first..first + HORIZON_DAYS)
            .filter(|&d| self.day_matches(d))
            .find_map(|d| {
                self.minutes_of_day()
                    .map(|s| d * DAY + s)
                    .find(|&ts| ts >= start)
            })
    }

    /// The latest tick at or before `t`, if any within five years.
    pub fn latest_at_or_before(&self, t: i64) -> Option<i64> {
        let last = t.div_euclid(DAY);
        (last - HORIZON_DAYS..=last)
            .rev()
            .filter(|&d| self.day_matches(d))
            .find_map(|d| {
                self.minutes_of_day()
                    .rev()
                    .map(|s| d * DAY + s)
                    .find(|&ts| ts <= t)
            })
    }
}

/// Year, month (1-12) and day (1-31) of a day counted from 1970-01-01,
/// by jiff (which the Kubernetes types already bring); a day out of its
/// range has month 0, which no schedule matches.
fn civil(day: i64) -> (i64, u32, u32) {
    use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
    match Timestamp::from_second(day * DAY) {
        Ok(t) => {
            let d = t.to_zoned(TimeZone::UTC).date();
            (i64::from(d.year()), d.month() as u32, d.day() as u32)
        }
        Err(_) => (0, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        s.parse::<k8s_openapi::jiff::Timestamp>()
            .map(|t| t.as_second())
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn next(schedule: &str, after: &str) -> Option<i64> {
        Schedule::parse(schedule)
            .unwrap_or_else(|e| panic!("{e}"))
            .next_after(ts(after))
    }

    #[test]
    fn the_next_tick_follows_cron_rules() {
        let cases = [
            ("* * * * *", "2026-12-03T10:00:00Z", "2026-12-03T10:01:00Z"),
            ("* * * * *", "2026-12-03T10:00:30Z", "2026-12-03T10:01:00Z"),
            ("0 3 * * *", "2026-12-03T03:00:00Z", "2026-12-04T03:00:00Z"),
            ("0 3 * * *", "2026-12-03T02:59:59Z", "2026-12-03T03:00:00Z"),
            (
                "*/15 * * * *",
                "2026-12-03T10:16:00Z",
                "2026-12-03T10:30:00Z",
            ),
            (
                "5/20 * * * *",
                "2026-12-03T10:26:00Z",
                "2026-12-03T10:45:00Z",
            ),
            (
                "30 1 29 2 *",
                "2026-03-01T00:00:00Z",
                "2028-02-29T01:30:00Z",
            ),
            // 2026-12-06 is a Sunday, written both as 0 and as 7.
            ("0 0 * * 0", "2026-12-03T00:00:00Z", "2026-12-06T00:00:00Z"),
            ("0 0 * * 7", "2026-12-03T00:00:00Z", "2026-12-06T00:00:00Z"),
            // Both day fields restricted: the 10th or a Sunday, whichever first.
            ("0 0 10 * 0", "2026-12-03T00:00:00Z", "2026-12-06T00:00:00Z"),
            ("0 0 10 * 0", "2026-12-06T00:00:00Z", "2026-12-10T00:00:00Z"),
            (
                "0 12 31 12 *",
                "2026-12-31T12:00:00Z",
                "2027-12-31T12:00:00Z",
            ),
        ];
        for (schedule, after, want) in cases {
            assert_eq!(
                next(schedule, after),
                Some(ts(want)),
                "{schedule} after {after}"
            );
        }
        assert_eq!(next("0 0 30 2 *", "2026-01-01T00:00:00Z"), None);
    }

    #[test]
    fn the_latest_tick_is_at_or_before() {
        let s = Schedule::parse("0 3 * * *").expect("parse");
        assert_eq!(
            s.latest_at_or_before(ts("2026-12-03T03:00:00Z")),
            Some(ts("2026-12-03T03:00:00Z"))
        );
        assert_eq!(
            s.latest_at_or_before(ts("2026-12-03T02:00:00Z")),
            Some(ts("2026-12-02T03:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_name_the_field() {
        for (bad, says) in [
            ("0 3 * *", "has 4 fields"),
            ("61 * * * *", "not a minute"),
            ("* * * * mon-x", "not a day of week"),
            ("*/0 * * * *", "bad step"),
            ("* 5-2 * * *", "runs backwards"),
            ("* * 0 * *", "not a day of month"),
        ] {
            let e = Schedule::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
