//! How big a slice to ask for: each source's burn and the admission rates,
//! measured on the mirror and smoothed over a few seconds.

use std::collections::HashMap;
use std::time::Duration;

use jiff::Timestamp;

use crate::engine::Account;
use crate::engine::limits::{Lacking, Permits};
use crate::engine::source::SourceRef;

/// Consumption per source and admissions, and their rates.
#[derive(Debug)]
pub struct Rates {
    /// Consumption per source at the last measure.
    used: HashMap<SourceRef, i128>,
    /// Units per second per source, smoothed.
    burn: HashMap<SourceRef, f64>,
    /// Requests and tokens admitted since the last measure.
    admitted: (u64, u64),
    /// Requests and tokens admitted per second, smoothed.
    per_second: (f64, f64),
    measured_at: Timestamp,
}

impl Rates {
    /// Nothing measured yet, at `now`.
    pub fn new(now: Timestamp) -> Rates {
        Rates {
            used: HashMap::new(),
            burn: HashMap::new(),
            admitted: (0, 0),
            per_second: (0.0, 0.0),
            measured_at: now,
        }
    }

    /// A request admitted with `tokens` tokens.
    pub fn admitted(&mut self, tokens: u64) {
        self.admitted.0 += 1;
        self.admitted.1 += tokens;
    }

    /// Updates the rates from what `mirror` has used by `now` (at most
    /// every 50 ms).
    pub fn measure(&mut self, mirror: &Account, now: Timestamp) {
        let dt = now.duration_since(self.measured_at).as_secs_f64();
        if dt < 0.05 {
            return;
        }
        self.measured_at = now;
        let alpha = (dt / 2.0).min(1.0);
        for (source, _, used) in mirror.levels(now) {
            let before = self.used.insert(source.clone(), used).unwrap_or(used);
            let rate = ((used - before).max(0) as f64) / dt;
            let burn = self.burn.entry(source).or_insert(0.0);
            *burn += alpha * (rate - *burn);
        }
        let (requests, tokens) = std::mem::take(&mut self.admitted);
        self.per_second.0 += alpha * (requests as f64 / dt - self.per_second.0);
        self.per_second.1 += alpha * (tokens as f64 / dt - self.per_second.1);
    }

    /// Slices worth asking for ahead of need: sources of `mirror` whose
    /// unused part is below half of what the `horizon`'s burn would take.
    pub fn wants(&self, mirror: &Account, horizon: Duration, now: Timestamp) -> Vec<(SourceRef, i128)> {
        mirror
            .levels(now)
            .into_iter()
            .filter_map(|(source, available, _)| {
                let burn = self.burn.get(&source).copied().unwrap_or(0.0);
                let target = (burn * horizon.as_secs_f64()).ceil() as i128;
                (target > 0 && available * 2 < target).then(|| (source, target - available))
            })
            .collect()
    }

    /// Permits for the coming `horizon`, at least what is `lacking`.
    /// Budgets' permits are asked for as they lack: the shared account
    /// lends a fair share of what is left beside them.
    pub fn permits(&self, lacking: Lacking, horizon: Duration) -> Lacking {
        let (requests_rate, tokens_rate) = self.per_second;
        let ahead = |rate: f64| (rate * horizon.as_secs_f64()).ceil() as u64;

        lacking
            .into_iter()
            .map(|(key, lack)| {
                if key.scope.is_budget() {
                    return (key, lack);
                }
                let scaled = Permits {
                    requests: if lack.requests > 0 {
                        lack.requests.max(ahead(requests_rate))
                    } else {
                        0
                    },
                    tokens: if lack.tokens > 0 {
                        lack.tokens.max(i128::from(ahead(tokens_rate)))
                    } else {
                        0
                    },
                    slots: lack.slots,
                    money: 0,
                };
                (key, scaled)
            })
            .collect()
    }
}
