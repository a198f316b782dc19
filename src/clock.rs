//! Where "now" comes from. The engine never reads a clock; the service
//! asks one of these and passes the instant in.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use jiff::{SignedDuration, Timestamp};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that moves only when told: for tests that need hold expiry or
/// period resets without waiting.
#[derive(Debug)]
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    /// A clock stopped at `at`.
    pub fn new(at: Timestamp) -> ManualClock {
        ManualClock(Mutex::new(at))
    }

    /// Moves the clock by `by`.
    pub fn advance(&self, by: SignedDuration) {
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now = now.checked_add(by).unwrap_or(*now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The system clock moved by an offset: set to another clock's reading
/// (the Redis store's `TIME`), so every sidecar of a fleet shares one time
/// base for expiries and period resets whatever its host's clock says.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_ns: AtomicI64,
}

impl OffsetClock {
    /// Aligns the clock with `reference`, read halfway between `before`
    /// and `after` (system instants around the reading).
    pub fn align(&self, reference: Timestamp, before: Timestamp, after: Timestamp) {
        let midpoint = before.as_nanosecond() / 2 + after.as_nanosecond() / 2;
        let offset = reference.as_nanosecond() - midpoint;
        self.offset_ns
            .store(i64::try_from(offset).unwrap_or(0), Ordering::Relaxed);
    }

    /// The current offset from the system clock.
    pub fn offset(&self) -> SignedDuration {
        SignedDuration::from_nanos(self.offset_ns.load(Ordering::Relaxed))
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let now = Timestamp::now();
        now.checked_add(self.offset()).unwrap_or(now)
    }
}
