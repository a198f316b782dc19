//! Subscription periods: where an allowance period starts and ends.
//!
//! Calendar periods start at local midnight in the account's time zone (a
//! day; an ISO week from Monday; the first of a month; January 1st), so a
//! "day" across a DST change is 23 or 25 hours long. Anniversary periods
//! start at the subscription start plus whole periods, added in the
//! account's time zone from the original start each time, so a subscription
//! started on January 31st renews on February 28th (or 29th) and then again
//! on March 31st.

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ToSpan, Unit, Zoned};

/// Parses an IANA time zone name (empty or `UTC`: UTC).
pub fn parse_time_zone(name: &str) -> Result<TimeZone, String> {
    if name.is_empty() || name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|_| format!("unknown IANA time zone {name:?}"))
}

/// Length of an allowance period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodUnit {
    /// One day.
    Day,
    /// One week.
    Week,
    /// One month.
    Month,
    /// One year.
    Year,
}

impl PeriodUnit {
    fn unit(self) -> Unit {
        match self {
            PeriodUnit::Day => Unit::Day,
            PeriodUnit::Week => Unit::Week,
            PeriodUnit::Month => Unit::Month,
            PeriodUnit::Year => Unit::Year,
        }
    }

    fn times(self, n: i64) -> Span {
        match self {
            PeriodUnit::Day => n.days(),
            PeriodUnit::Week => n.weeks(),
            PeriodUnit::Month => n.months(),
            PeriodUnit::Year => n.years(),
        }
    }
}

/// Where periods are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anchor {
    /// Calendar boundaries in the account's time zone.
    Calendar,
    /// Whole periods from the subscription start.
    Anniversary,
}

/// A half-open interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// First instant of the period.
    pub start: Timestamp,
    /// First instant after it.
    pub end: Timestamp,
}

/// A date computation left the supported range (years -9999..=9999).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("period boundary out of range: {0}")]
pub struct PeriodError(String);

impl From<jiff::Error> for PeriodError {
    fn from(e: jiff::Error) -> Self {
        PeriodError(e.to_string())
    }
}

/// How one subscription's periods are cut.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Period length.
    pub unit: PeriodUnit,
    /// Calendar or anniversary.
    pub anchor: Anchor,
    /// The account's time zone.
    #[serde(with = "jiff::fmt::serde::tz::required")]
    pub time_zone: TimeZone,
    /// When the subscription started.
    pub start: Timestamp,
}

impl Schedule {
    /// The period that contains `at`.
    pub fn containing(&self, at: Timestamp) -> Result<Window, PeriodError> {
        let local = at.to_zoned(self.time_zone.clone());
        let (start, end) = match self.anchor {
            Anchor::Calendar => {
                let start = self.calendar_start(&local)?;
                let end = self.calendar_start(&start.checked_add(self.unit.times(1))?)?;
                (start, end)
            }
            Anchor::Anniversary => {
                let n = self.anniversary_index(&local)?;
                (self.nth(n)?, self.nth(n + 1)?)
            }
        };
        Ok(Window {
            start: start.timestamp(),
            end: end.timestamp(),
        })
    }

    fn calendar_start(&self, local: &Zoned) -> Result<Zoned, PeriodError> {
        let date = local.date();
        let first = match self.unit {
            PeriodUnit::Day => date,
            PeriodUnit::Week => date.checked_sub(i64::from(date.weekday().to_monday_zero_offset()).days())?,
            PeriodUnit::Month => date.first_of_month(),
            PeriodUnit::Year => date.first_of_year(),
        };
        Ok(first.to_zoned(self.time_zone.clone())?.start_of_day()?)
    }

    fn origin(&self) -> Zoned {
        self.start.to_zoned(self.time_zone.clone())
    }

    /// Start of anniversary period `n` (0 is the first), added from the
    /// original start so month-end clamping never accumulates.
    fn nth(&self, n: i64) -> Result<Zoned, PeriodError> {
        Ok(self.origin().checked_add(self.unit.times(n))?)
    }

    fn index_of(&self, local: &Zoned) -> Result<i64, PeriodError> {
        let span = self.origin().until((self.unit.unit(), local))?;
        Ok(match self.unit {
            PeriodUnit::Day => i64::from(span.get_days()),
            PeriodUnit::Week => i64::from(span.get_weeks()),
            PeriodUnit::Month => i64::from(span.get_months()),
            PeriodUnit::Year => i64::from(span.get_years()),
        })
    }

    /// The number of the anniversary period containing `local`.
    fn anniversary_index(&self, local: &Zoned) -> Result<i64, PeriodError> {
        // `until` truncates toward zero, and clamping may shift a boundary by
        // a day, so settle the estimate against the real boundaries.
        let mut n = self.index_of(local)?;
        while self.nth(n)?.timestamp() > local.timestamp() {
            n -= 1;
        }
        while self.nth(n + 1)?.timestamp() <= local.timestamp() {
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn schedule(unit: PeriodUnit, anchor: Anchor, tz: &str, start: &str) -> Schedule {
        Schedule {
            unit,
            anchor,
            time_zone: TimeZone::get(tz).unwrap(),
            start: ts(start),
        }
    }

    #[test]
    fn calendar_day_across_spring_forward_is_23_hours() {
        // Europe/Paris springs forward on 2026-03-29.
        let s = schedule(
            PeriodUnit::Day,
            Anchor::Calendar,
            "Europe/Paris",
            "2026-01-01T00:00:00Z",
        );
        let w = s.containing(ts("2026-03-29T12:00:00Z")).unwrap();
        assert_eq!(w.start, ts("2026-03-28T23:00:00Z"));
        assert_eq!(w.end, ts("2026-03-29T22:00:00Z"));
        let fall = s.containing(ts("2026-10-25T12:00:00Z")).unwrap();
        assert_eq!(fall.end.duration_since(fall.start).as_secs(), 25 * 3600);
    }

    #[test]
    fn calendar_day_where_midnight_does_not_exist() {
        // America/Santiago skips 00:00 -> 01:00 on 2026-09-06.
        let s = schedule(
            PeriodUnit::Day,
            Anchor::Calendar,
            "America/Santiago",
            "2026-01-01T00:00:00Z",
        );
        let w = s.containing(ts("2026-09-06T12:00:00Z")).unwrap();
        assert_eq!(w.start.to_zoned(s.time_zone.clone()).hour(), 1);
        assert_eq!(w.end.duration_since(w.start).as_secs(), 23 * 3600);
    }

    #[test]
    fn calendar_month_week_and_year_boundaries() {
        let s = schedule(
            PeriodUnit::Month,
            Anchor::Calendar,
            "America/New_York",
            "2026-01-15T00:00:00Z",
        );
        // 2026-03-01T04:59Z is still February 28th in New York.
        let w = s.containing(ts("2026-03-01T04:59:59Z")).unwrap();
        assert_eq!(w.start, ts("2026-02-01T05:00:00Z"));
        assert_eq!(w.end, ts("2026-03-01T05:00:00Z"));
        let week = Schedule {
            unit: PeriodUnit::Week,
            ..s.clone()
        };
        // 2026-11-29 is a Sunday; its ISO week began Monday 2026-11-23.
        assert_eq!(
            week.containing(ts("2026-11-29T12:00:00Z")).unwrap().start,
            ts("2026-11-23T05:00:00Z")
        );
        let year = Schedule {
            unit: PeriodUnit::Year,
            ..s
        };
        assert_eq!(
            year.containing(ts("2026-12-31T12:00:00Z")).unwrap().end,
            ts("2027-01-01T05:00:00Z")
        );
    }

    #[test]
    fn anniversary_month_clamps_without_drift() {
        let s = schedule(PeriodUnit::Month, Anchor::Anniversary, "UTC", "2026-01-31T10:00:00Z");
        let feb = s.containing(ts("2026-02-28T10:00:00Z")).unwrap();
        assert_eq!(feb.start, ts("2026-02-28T10:00:00Z"));
        assert_eq!(feb.end, ts("2026-03-31T10:00:00Z"));
        let before = s.containing(ts("2026-02-28T09:59:59Z")).unwrap();
        assert_eq!(before.start, ts("2026-01-31T10:00:00Z"));
        let leap = s.containing(ts("2028-02-29T10:00:00Z")).unwrap();
        assert_eq!(leap.start, ts("2028-02-29T10:00:00Z"));
        assert_eq!(leap.end, ts("2028-03-31T10:00:00Z"));
    }

    #[test]
    fn anniversary_day_keeps_wall_clock_across_dst() {
        let s = schedule(
            PeriodUnit::Day,
            Anchor::Anniversary,
            "Europe/Paris",
            "2026-03-28T09:00:00Z",
        );
        // 10:00 Paris time every day: 09:00Z before the change, 08:00Z after.
        let w = s.containing(ts("2026-03-29T12:00:00Z")).unwrap();
        assert_eq!(w.start, ts("2026-03-29T08:00:00Z"));
        assert_eq!(w.end, ts("2026-03-30T08:00:00Z"));
    }
}
