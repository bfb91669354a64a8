//! A hashed timer wheel: O(1) to arm, coarse (TICK) resolution, no allocation per timer
//! beyond the slot vectors' growth.
//!
//! Each connection has at most one deadline. Arming again makes older entries stale: an
//! entry carries the `seq` it was armed with, and the loop ignores entries whose `seq` no
//! longer matches the connection's.

use std::time::{Duration, Instant};

/// Wheel resolution.
pub const TICK: Duration = Duration::from_millis(50);
const SLOTS: usize = 1024;

/// A timer entry: connection slab key and the arming sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub key: usize,
    pub seq: u32,
}

/// A connection's one deadline, and the sequence number of its live wheel entry.
#[derive(Debug, Default, Clone, Copy)]
pub struct Deadline {
    at: Option<Instant>,
    seq: u32,
}

impl Deadline {
    /// Disarms it (entries already in the wheel will not fire).
    pub fn clear(&mut self) {
        self.at = None;
    }
}

#[derive(Debug)]
pub struct Wheel {
    start: Instant,
    /// The next tick to expire.
    cursor: u64,
    slots: Vec<Vec<Entry>>,
    armed: usize,
}

impl Wheel {
    pub fn new(now: Instant) -> Wheel {
        Wheel {
            start: now,
            cursor: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            armed: 0,
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.start);
        // Round up so an entry never fires before its deadline.
        since.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// Arms `entry` for `deadline`. Deadlines past the wheel's horizon land in its last
    /// slot; the loop re-arms them when they come up early.
    pub fn arm(&mut self, deadline: Instant, entry: Entry) {
        let tick = self.tick_of(deadline).max(self.cursor);
        let tick = tick.min(self.cursor + SLOTS as u64 - 1);
        self.slots[(tick % SLOTS as u64) as usize].push(entry);
        self.armed += 1;
    }

    /// Replaces connection `key`'s deadline; entries armed before go stale.
    pub fn reset(&mut self, key: usize, deadline: &mut Deadline, at: Option<Instant>) {
        deadline.at = at;
        deadline.seq = deadline.seq.wrapping_add(1);
        if let Some(at) = at {
            self.arm(
                at,
                Entry {
                    key,
                    seq: deadline.seq,
                },
            );
        }
    }

    /// Whether an expired `entry` fires for its connection's `deadline`: stale entries are
    /// dropped, entries that came up early (beyond the horizon) are armed again, and a
    /// firing deadline is disarmed.
    pub fn fires(&mut self, entry: Entry, deadline: &mut Deadline, now: Instant) -> bool {
        if deadline.seq != entry.seq {
            return false;
        }
        match deadline.at {
            None => false,
            Some(at) if at > now => {
                self.arm(at, entry);
                false
            }
            Some(_) => {
                deadline.at = None;
                true
            }
        }
    }

    /// Moves every entry due by `now` into `due`.
    pub fn expire(&mut self, now: Instant, due: &mut Vec<Entry>) {
        let target = self.tick_of(now);
        while self.cursor <= target && self.armed > 0 {
            let slot = &mut self.slots[(self.cursor % SLOTS as u64) as usize];
            self.armed -= slot.len();
            due.append(slot);
            self.cursor += 1;
        }
        if self.armed == 0 {
            self.cursor = self.cursor.max(target);
        }
    }

    /// How long the loop may sleep before the next slot could be due.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.armed == 0 {
            return None;
        }
        let next =
            self.start + Duration::from_nanos((TICK.as_nanos() as u64).saturating_mul(self.cursor));
        Some(next.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_no_earlier_than_the_deadline() {
        let t0 = Instant::now();
        let mut wheel = Wheel::new(t0);
        wheel.arm(t0 + Duration::from_millis(120), Entry { key: 1, seq: 0 });
        wheel.arm(t0 + Duration::from_secs(600), Entry { key: 2, seq: 0 });
        let mut due = Vec::new();
        wheel.expire(t0 + Duration::from_millis(100), &mut due);
        assert!(due.is_empty());
        wheel.expire(t0 + Duration::from_millis(150), &mut due);
        assert_eq!(due, vec![Entry { key: 1, seq: 0 }]);
        due.clear();
        // Beyond the horizon: comes up at the horizon, for the loop to re-arm.
        wheel.expire(
            t0 + TICK * SLOTS as u32 + Duration::from_millis(100),
            &mut due,
        );
        assert_eq!(due, vec![Entry { key: 2, seq: 0 }]);
        assert_eq!(wheel.next_timeout(t0), None);
    }
}
