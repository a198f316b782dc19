//! A sidecar's share of a fixed window counted in a shared store (the Envoy
//! rate-limit windows on Redis).
//!
//! The shared count is every hit the fleet counted plus the hits sidecars
//! took ahead of use and hold. A sidecar that holds enough counts a call
//! locally; otherwise it makes a trip: it gives back what it holds, adds the
//! call's hits, and asks for `want` more, which the store grants only while
//! the count stays within the limit. Every hit allowed was therefore booked
//! at a moment the shared count was within the limit, so a window never
//! allows more than its limit across the fleet. What a sidecar holds and does
//! not use is given back when it idles, or lapses with its window; until
//! then the others count it as used.

use std::time::Duration;

use jiff::Timestamp;

/// One sidecar's share of one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowShare {
    /// Hits taken ahead of use and not used yet.
    held: u64,
    /// The shared count at the last trip's answer.
    seen: u64,
    /// Hits this sidecar counted in the window.
    counted: u64,
    /// When it first counted in the window.
    since: Timestamp,
    /// When it last counted.
    last: Timestamp,
    /// When the window ends.
    ends: Timestamp,
}

/// What a trip gives back and adds: `add` (negative when the held part is
/// larger than the call's hits) and `want` more to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trip {
    /// Hits to add to the shared count, less what is given back.
    pub add: i64,
    /// Hits to take ahead of use, if the count stays within the limit.
    pub want: u64,
}

impl WindowShare {
    /// A share of a window ending at `ends`, first used at `now`.
    pub fn new(now: Timestamp, ends: Timestamp) -> Self {
        WindowShare {
            held: 0,
            seen: 0,
            counted: 0,
            since: now,
            last: now,
            ends,
        }
    }

    /// Counts `hits` from what is held: the window's count as this sidecar
    /// knows it (at most `limit`: the hits were booked within it), or `None`
    /// when too little is held (or nothing, for a check of zero hits), and
    /// a trip must count them.
    pub fn serve(&mut self, hits: u64, limit: u64, now: Timestamp) -> Option<u64> {
        if self.held < hits || self.held == 0 {
            return None;
        }
        self.held -= hits;
        self.note(hits, now);
        Some(self.seen.saturating_sub(self.held).min(limit))
    }

    /// The trip for `hits` that [`serve`](Self::serve) could not count: it
    /// gives back everything held (so nothing held is both counted as used
    /// by this call and spent later) and asks for the sidecar's burn over
    /// `horizon`, at most a quarter of what the window had left at the last
    /// trip, and nothing if that would not cover another call like this
    /// one (a check of zero hits takes nothing).
    pub fn trip(&mut self, hits: u64, limit: u64, horizon: Duration, now: Timestamp) -> Trip {
        let back = std::mem::take(&mut self.held);
        let elapsed = now.duration_since(self.since).as_secs_f64().max(1.0);
        let burn = self.counted.saturating_add(hits) as f64 / elapsed;
        let want = ((burn * horizon.as_secs_f64()).ceil() as u64).min(limit.saturating_sub(self.seen) / 4);
        Trip {
            add: clamp_i64(hits) - clamp_i64(back),
            want: if hits > 0 && want >= hits { want } else { 0 },
        }
    }

    /// A trip's answer: the shared count with the call's hits (`count`) and
    /// what it granted on top. Returns the count to judge the call by.
    pub fn took(&mut self, hits: u64, count: u64, granted: u64, now: Timestamp) -> u64 {
        self.held = self.held.saturating_add(granted);
        self.seen = count.saturating_add(granted);
        self.note(hits, now);
        count
    }

    /// Takes everything held, to give back; 0 if the window has ended (its
    /// count lapses with it) or nothing is held.
    pub fn give_back(&mut self, now: Timestamp) -> u64 {
        if now >= self.ends {
            return 0;
        }
        let back = std::mem::take(&mut self.held);
        self.seen = self.seen.saturating_sub(back);
        back
    }

    /// The hits held and not used.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The last time this sidecar counted in the window.
    pub fn last_used(&self) -> Timestamp {
        self.last
    }

    /// The window has ended at `now`.
    pub fn ended(&self, now: Timestamp) -> bool {
        now >= self.ends
    }

    fn note(&mut self, hits: u64, now: Timestamp) {
        self.counted = self.counted.saturating_add(hits);
        self.last = self.last.max(now);
    }
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    /// The store's side of a trip: adds, then grants `want` if the count
    /// stays within `limit`.
    fn store(shared: &mut u64, trip: Trip, limit: u64) -> (u64, u64) {
        *shared = shared.checked_add_signed(trip.add).unwrap();
        let granted = trip.want.min(limit.saturating_sub(*shared));
        let count = *shared;
        *shared += granted;
        (count, granted)
    }

    /// One call of `hits` at `now` through `share`: its count.
    fn call(share: &mut WindowShare, shared: &mut u64, hits: u64, limit: u64, now: Timestamp) -> u64 {
        if let Some(count) = share.serve(hits, limit, now) {
            return count;
        }
        let trip = share.trip(hits, limit, Duration::from_secs(2), now);
        let (count, granted) = store(shared, trip, limit);
        share.took(hits, count, granted, now)
    }

    #[test]
    fn one_sidecar_counts_exactly_and_takes_ahead_once_it_has_a_burn() {
        let mut shared = 0;
        let mut share = WindowShare::new(at(0), at(3600));
        let counts: Vec<u64> = (0..100)
            .map(|_| call(&mut share, &mut shared, 1, 1000, at(0)))
            .collect();
        assert_eq!(counts, (1..=100).collect::<Vec<_>>(), "its own count is exact");
        assert!(share.held() > 0, "a burn of 100/s takes ahead");
        assert_eq!(shared, 100 + share.held());
        assert_eq!(share.give_back(at(1)), shared - 100);
        assert_eq!(share.give_back(at(1)), 0);
    }

    #[test]
    fn sidecars_sharing_a_window_never_allow_more_than_its_limit() {
        let limit = 500;
        let mut shared = 0;
        let mut shares = [
            WindowShare::new(at(0), at(60)),
            WindowShare::new(at(0), at(60)),
            WindowShare::new(at(0), at(60)),
        ];
        let mut allowed = 0;
        for i in 0..3000u64 {
            let share = &mut shares[(i * 7 % 3) as usize];
            let hits = 1 + i % 3;
            if call(share, &mut shared, hits, limit, at(i as i64 / 100)) <= limit {
                allowed += hits;
            }
        }
        assert!(allowed <= limit, "{allowed} allowed against {limit}");
        assert!(allowed + 2 * 3 >= limit, "little stranded: {allowed}");
        let held: u64 = shares.iter().map(WindowShare::held).sum();
        assert!(shared >= allowed + held);
    }

    #[test]
    fn a_trip_gives_back_what_is_held_and_a_check_takes_nothing() {
        let mut shared = 0;
        let mut share = WindowShare::new(at(0), at(60));
        for _ in 0..20 {
            call(&mut share, &mut shared, 1, 1000, at(0));
        }
        let held = share.held();
        assert!(held > 0);
        let trip = share.trip(held + 1, 1000, Duration::from_secs(2), at(0));
        assert_eq!(trip.add, 1, "gives back {held}, adds {}", held + 1);
        assert_eq!(share.held(), 0);
        let check = share.trip(0, 1000, Duration::from_secs(2), at(0));
        assert_eq!(check, Trip { add: 0, want: 0 });
        let big = share.trip(300, 1000, Duration::from_secs(2), at(0));
        assert_eq!(
            big.want, 0,
            "a quarter of what is left would not cover another such call"
        );
    }

    #[test]
    fn near_the_limit_nothing_is_taken_ahead_and_an_ended_window_keeps_its_slice() {
        let mut shared = 0;
        let mut share = WindowShare::new(at(0), at(60));
        for _ in 0..9 {
            call(&mut share, &mut shared, 1, 10, at(0));
        }
        assert_eq!(
            (shared, share.held()),
            (9, 0),
            "a quarter of what is left rounds to nothing"
        );
        assert_eq!(call(&mut share, &mut shared, 1, 10, at(0)), 10);
        assert_eq!(call(&mut share, &mut shared, 1, 10, at(0)), 11, "over");
        let mut idle = WindowShare::new(at(0), at(60));
        for _ in 0..50 {
            call(&mut idle, &mut shared, 1, 1_000_000, at(0));
        }
        assert!(idle.held() > 0);
        assert_eq!(idle.give_back(at(60)), 0, "the window is over");
    }
}
