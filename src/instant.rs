//! An [`Instant`] in 8 bytes instead of 16, for the deadlines kept per connection (tens of
//! thousands of them): nanoseconds after a process-wide base, which is taken from the
//! first instant stored (minus an hour, so instants from just before it still fit). No
//! clock is read.

use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static BASE: OnceLock<Instant> = OnceLock::new();

fn base(first: Instant) -> Instant {
    *BASE.get_or_init(|| {
        // The earliest of (an hour, a minute, a second, nothing) before `first` that the
        // platform's clock can represent.
        [3600, 60, 1, 0]
            .into_iter()
            .find_map(|s| first.checked_sub(Duration::from_secs(s)))
            .unwrap_or(first)
    })
}

/// A compact instant (never before the process-wide base; earlier ones are clamped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct CompactInstant(NonZeroU64);

impl CompactInstant {
    pub fn new(at: Instant) -> CompactInstant {
        let nanos = at.saturating_duration_since(base(at)).as_nanos();
        // 584 years of nanoseconds fit; + 1 keeps zero free for `Option`'s niche.
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1;
        CompactInstant(NonZeroU64::new(nanos).expect("non-zero"))
    }

    /// `now + t`, or the latest instant there is room for when that overflows (a timeout
    /// of `Duration::MAX`, "never": about 584 years on).
    pub fn after(now: Instant, t: Duration) -> CompactInstant {
        match now.checked_add(t) {
            Some(at) => CompactInstant::new(at),
            None => {
                base(now);
                CompactInstant(NonZeroU64::MAX)
            }
        }
    }

    pub fn get(self) -> Instant {
        let base = *BASE
            .get()
            .expect("a CompactInstant was made, so the base is set");
        base + Duration::from_nanos(self.0.get() - 1)
    }
}

/// `now + t`, saturating: a timeout of `Duration::MAX` ("never") is a deadline a century
/// away instead of an overflow's panic.
pub(crate) fn deadline_after(now: Instant, t: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(t).unwrap_or(now + CENTURY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_orders() {
        let now = Instant::now();
        let later = now + Duration::from_millis(1500);
        assert_eq!(CompactInstant::new(now).get(), now);
        assert_eq!(CompactInstant::new(later).get(), later);
        assert!(CompactInstant::new(now) < CompactInstant::new(later));
        assert_eq!(std::mem::size_of::<Option<CompactInstant>>(), 8);
    }
}
