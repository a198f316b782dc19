//! The windows of Envoy's own per-descriptor limits (`limit` overrides in
//! a request): the caller chooses their keys, limits and lengths (up to a
//! year), so this sidecar keeps a budget of them apart from the rules'
//! windows. A flood of ever-new override windows is refused once the
//! budget is spent, and the rules' windows keep being counted, in memory
//! as in Redis (where each window is a key this sidecar created).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;

/// The override windows this sidecar has opened and that have not ended.
#[derive(Debug, Default)]
pub struct OverrideWindows(Mutex<Open>);

#[derive(Debug, Default)]
struct Open {
    /// The store keys of the open windows.
    keys: HashSet<Arc<str>>,
    /// The same with when each ends, soonest first: ended windows are let
    /// go of from the front, never by a scan.
    by_end: BTreeSet<(Timestamp, Arc<str>)>,
}

impl OverrideWindows {
    /// Whether the window `key`, which ends at `ends`, may be counted at
    /// `now`: one already open may; a new one only while fewer than `max`
    /// are open (ended windows are let go of first, and counted).
    pub fn admit(&self, key: &str, ends: Timestamp, now: Timestamp, max: usize) -> bool {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if open.keys.contains(key) {
            return true;
        }
        let mut ended = 0;
        while let Some(first) = open.by_end.first().filter(|(end, _)| *end <= now).cloned() {
            open.by_end.remove(&first);
            open.keys.remove(&first.1);
            ended += 1;
        }
        crate::telemetry::metrics::metrics().evicted("override_window", ended);
        if open.keys.len() >= max {
            return false;
        }
        let key: Arc<str> = Arc::from(key);
        open.keys.insert(Arc::clone(&key));
        open.by_end.insert((ends, key));
        true
    }

    /// How many are open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    #[test]
    fn a_full_budget_refuses_new_windows_until_one_ends() {
        let now = Timestamp::UNIX_EPOCH;
        let later = |s| now + SignedDuration::from_secs(s);
        let open = OverrideWindows::default();
        assert!(open.admit("a", later(60), now, 2));
        assert!(open.admit("b", later(3600), now, 2));
        assert!(!open.admit("c", later(60), now, 2), "the budget is spent");
        assert!(open.admit("a", later(60), now, 2), "an open window is still counted");
        // `a` ends: `c` takes its place, `b` stays.
        assert!(open.admit("c", later(120), later(60), 2));
        assert!(!open.admit("d", later(120), later(61), 2));
        assert!(open.admit("b", later(3600), later(61), 2));
        assert_eq!(open.len(), 2);
    }
}
