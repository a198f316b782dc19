//! What an account spent lately, hour by hour for the last day: the burn
//! rates over the last hour and day, and from them the runway.
//!
//! The history is kept where the account's records are applied: on a
//! stand-alone account as each record is made, on a shared account (the
//! Redis store) as the sidecars' reports bring their records in, so it
//! costs no write of its own. A mirror keeps none (what one sidecar
//! spends is not the account's rate). It is 25 hourly slots at most and
//! none once a day has passed without a record.
//!
//! The last hour's burn is read as a sliding window over the slots: the
//! current hour's charges, and the previous hour's in proportion to the
//! part of it still inside the window. For a steady rate this is exact;
//! otherwise it assumes the previous hour was spent evenly.

use std::collections::VecDeque;

use jiff::{SignedDuration, Timestamp};

const HOUR: i64 = 3_600;

/// Slots kept: the current hour and the 24 before it.
const SLOTS: i64 = 25;

/// Charged in one hour: money in pico-units and allowance tokens
/// (weighted), stored as `[hour, money, tokens]` with the hour counted
/// from the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Slot(i64, i128, i128);

/// The recent history of an account's charges.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Burn(VecDeque<Slot>);

/// Charged per hour, over the last hour and averaged over the last day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Money (pico-units) in the last hour.
    pub money_last_hour: i128,
    /// Money (pico-units) per hour over the last day.
    pub money_last_day: i128,
    /// Allowance tokens in the last hour.
    pub tokens_last_hour: i128,
    /// Allowance tokens per hour over the last day.
    pub tokens_last_day: i128,
}

impl Burn {
    /// Nothing charged in the last day.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Counts `money` and allowance `tokens` charged `at`; charges older
    /// than the slots kept are left out.
    pub fn record(&mut self, at: Timestamp, money: i128, tokens: i128) {
        if money == 0 && tokens == 0 {
            return;
        }
        let hour = at.as_second().div_euclid(HOUR);
        let newest = self.0.back().map_or(hour, |s| s.0.max(hour));
        if hour <= newest - SLOTS {
            return;
        }
        match self.0.binary_search_by_key(&hour, |s| s.0) {
            Ok(i) => {
                self.0[i].1 += money;
                self.0[i].2 += tokens;
            }
            Err(i) => self.0.insert(i, Slot(hour, money, tokens)),
        }
        self.prune(at.max(Timestamp::from_second(newest * HOUR).unwrap_or(at)));
    }

    /// Forgets the slots past the last day as of `now`.
    pub fn prune(&mut self, now: Timestamp) {
        let hour = now.as_second().div_euclid(HOUR);
        while self.0.front().is_some_and(|s| s.0 <= hour - SLOTS) {
            self.0.pop_front();
        }
    }

    /// The burn rates at `now`.
    pub fn rates(&self, now: Timestamp) -> Rates {
        let second = now.as_second();
        let hour = second.div_euclid(HOUR);
        // The part of the previous hour still inside the last hour.
        let inside = HOUR - second.rem_euclid(HOUR);
        let slot = |h: i64| self.0.iter().find(|s| s.0 == h).copied().unwrap_or_default();
        let (current, previous) = (slot(hour), slot(hour - 1));
        let (mut money_day, mut tokens_day) = (0, 0);
        for s in self.0.iter().filter(|s| s.0 > hour - SLOTS && s.0 <= hour) {
            // The oldest slot is in the day only for the part the current
            // hour has not replaced yet.
            let share = if s.0 == hour - (SLOTS - 1) { inside } else { HOUR };
            money_day += s.1 * i128::from(share) / i128::from(HOUR);
            tokens_day += s.2 * i128::from(share) / i128::from(HOUR);
        }
        Rates {
            money_last_hour: current.1 + previous.1 * i128::from(inside) / i128::from(HOUR),
            money_last_day: money_day / 24,
            tokens_last_hour: current.2 + previous.2 * i128::from(inside) / i128::from(HOUR),
            tokens_last_day: tokens_day / 24,
        }
    }
}

/// When `left` runs out at `per_hour` from `now`: `None` when nothing is
/// burning (or nothing is left to run out of, `Some(now)`).
pub fn runs_out(now: Timestamp, left: i128, per_hour: i128) -> Option<Timestamp> {
    if left <= 0 {
        return Some(now);
    }
    if per_hour <= 0 {
        return None;
    }
    let seconds = left.saturating_mul(i128::from(HOUR)) / per_hour;
    let seconds = i64::try_from(seconds).ok()?;
    now.checked_add(SignedDuration::from_secs(seconds)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// 600 a minute for 30 hours: 36,000 an hour by either window, to the
    /// unit, whatever the minute of the hour it is read at.
    #[test]
    fn a_steady_rate_reads_the_same_over_the_hour_and_the_day() {
        let mut burn = Burn::default();
        let start = at("2026-12-01T00:00:30Z");
        for minute in 0..30 * 60 {
            burn.record(start + SignedDuration::from_mins(minute), 600, 6);
        }
        assert!(burn.0.len() <= SLOTS as usize);
        for read in ["2026-12-02T06:00:00Z", "2026-12-02T06:00:01Z", "2026-12-02T05:59:59Z"] {
            let rates = burn.rates(at(read));
            // Read mid-minute, the window holds one record more or less.
            assert!((rates.money_last_hour - 36_000).abs() <= 600, "{read}: {rates:?}");
            assert!((rates.money_last_day - 36_000).abs() <= 600, "{read}: {rates:?}");
            assert!((rates.tokens_last_hour - 360).abs() <= 6, "{read}: {rates:?}");
        }
        let exact = burn.rates(at("2026-12-02T06:00:00Z"));
        assert_eq!((exact.money_last_hour, exact.money_last_day), (36_000, 36_000));
    }

    /// An hour of spending, then quiet: the hour's rate falls to zero an
    /// hour later, the day's an hour after a day, and the slots go.
    #[test]
    fn a_burst_ages_out_of_both_windows() {
        let mut burn = Burn::default();
        burn.record(at("2026-12-01T10:10:00Z"), 2_400, 0);
        let rates = burn.rates(at("2026-12-01T10:30:00Z"));
        assert_eq!((rates.money_last_hour, rates.money_last_day), (2_400, 100));
        assert_eq!(burn.rates(at("2026-12-01T11:30:00Z")).money_last_hour, 1_200);
        assert_eq!(burn.rates(at("2026-12-01T12:00:00Z")).money_last_hour, 0);
        assert_eq!(burn.rates(at("2026-12-02T10:30:00Z")).money_last_day, 50);
        assert_eq!(burn.rates(at("2026-12-02T11:00:00Z")).money_last_day, 0);
        burn.prune(at("2026-12-02T11:00:00Z"));
        assert!(burn.is_empty());
        // A record older than a day is left out.
        burn.record(at("2026-12-02T12:00:00Z"), 1, 0);
        burn.record(at("2026-12-01T11:00:00Z"), 1_000, 0);
        assert_eq!(burn.0.len(), 1);
    }

    #[test]
    fn runway_is_what_is_left_over_the_rate() {
        let now = at("2026-12-01T00:00:00Z");
        assert_eq!(runs_out(now, 36_000, 12_000), Some(at("2026-12-01T03:00:00Z")));
        assert_eq!(runs_out(now, 36_000, 0), None);
        assert_eq!(runs_out(now, 0, 5), Some(now));
    }
}
