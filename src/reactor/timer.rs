//! A hashed timer wheel: O(1) to arm, coarse (TICK) resolution, no allocation per timer
//! beyond the slot vectors' growth.
//!
//! Each connection has at most one deadline and, in steady state, one wheel entry: moving
//! a deadline later (every read, with an idle timeout) keeps the entry that is already
//! armed, which fires early and re-arms for the new time; only an earlier deadline arms a
//! new entry and makes the old one stale (an entry carries the `seq` it was armed with, and
//! entries whose `seq` no longer matches the connection's are dropped when they come up).
//! So the wheel holds at most two entries per connection, however often deadlines move.

use crate::instant::CompactInstant;
use std::time::{Duration, Instant};

/// Wheel resolution.
pub const TICK: Duration = Duration::from_millis(50);
const SLOTS: usize = 1024;

/// A timer entry: connection slab key and the arming sequence number. 8 bytes: a burst of
/// accepts leaves one handshake entry per connection in the wheel for the handshake
/// timeout, so this is part of what each new connection costs (a slab key fits 32 bits: a
/// loop never holds 2^32 connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    key: u32,
    pub seq: u32,
}

/// Slots and due lists that a burst grew past this many entries give their memory back
/// once drained, so a burst of connections does not leave its timer memory behind.
const KEEP_CAPACITY: usize = 256;

impl Entry {
    pub fn new(key: usize, seq: u32) -> Entry {
        debug_assert!(u32::try_from(key).is_ok(), "slab key {key} over 32 bits");
        Entry {
            key: key as u32,
            seq,
        }
    }

    /// The connection's slab key.
    pub fn key(&self) -> usize {
        self.key as usize
    }
}

/// A connection's one deadline, and the sequence number and tick of its live wheel entry.
#[derive(Debug, Default, Clone, Copy)]
pub struct Deadline {
    at: Option<CompactInstant>,
    seq: u32,
    /// The live entry's tick + 1 (wrapping; 0: no live entry). Entries sit within the
    /// wheel's horizon of its cursor, so wrapping comparisons are exact.
    armed: u32,
}

/// `tick` as stored in [`Deadline::armed`].
fn stamp(tick: u64) -> u32 {
    (tick as u32).wrapping_add(1).max(1)
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

    /// The tick whose slot holds an entry for `deadline`: deadlines past the wheel's
    /// horizon land in its last slot and are re-armed when they come up early.
    fn slot_tick(&self, deadline: Instant) -> u64 {
        let tick = self.tick_of(deadline).max(self.cursor);
        tick.min(self.cursor + SLOTS as u64 - 1)
    }

    /// Arms `entry` for `deadline`; returns the tick it sits at.
    pub fn arm(&mut self, deadline: Instant, entry: Entry) -> u64 {
        let tick = self.slot_tick(deadline);
        self.slots[(tick % SLOTS as u64) as usize].push(entry);
        self.armed += 1;
        tick
    }

    /// Replaces connection `key`'s deadline (`None` disarms it).
    pub fn reset(&mut self, key: usize, deadline: &mut Deadline, at: Option<Instant>) {
        deadline.at = at.map(CompactInstant::new);
        let Some(at) = at else {
            // The live entry, if any, finds nothing to fire and retires.
            return;
        };
        let tick = self.slot_tick(at);
        if deadline.armed != 0 && (stamp(tick).wrapping_sub(deadline.armed) as i32) >= 0 {
            // The live entry comes up no later: it re-arms for `at` then.
            return;
        }
        deadline.seq = deadline.seq.wrapping_add(1);
        let entry = Entry::new(key, deadline.seq);
        deadline.armed = stamp(self.arm(at, entry));
    }

    /// Whether an expired `entry` fires for its connection's `deadline`: stale entries are
    /// dropped, entries that came up early (beyond the horizon) are armed again, and a
    /// firing deadline is disarmed.
    pub fn fires(&mut self, entry: Entry, deadline: &mut Deadline, now: Instant) -> bool {
        if deadline.seq != entry.seq {
            return false;
        }
        deadline.armed = 0;
        match deadline.at.map(CompactInstant::get) {
            None => false,
            Some(at) if at > now => {
                deadline.armed = stamp(self.arm(at, entry));
                false
            }
            Some(_) => {
                deadline.at = None;
                true
            }
        }
    }

    /// Moves every entry due by `now` into `due`: the slots whose tick has passed (a
    /// slot's entries are due by its tick, so one not reached yet may hold deadlines still
    /// to come, which would fire late once re-armed behind the cursor).
    pub fn expire(&mut self, now: Instant, due: &mut Vec<Entry>) {
        let since = now.saturating_duration_since(self.start);
        let target = (since.as_nanos() / TICK.as_nanos()) as u64;
        while self.cursor <= target && self.armed > 0 {
            let slot = &mut self.slots[(self.cursor % SLOTS as u64) as usize];
            self.armed -= slot.len();
            due.append(slot);
            if slot.capacity() > KEEP_CAPACITY {
                *slot = Vec::new();
            }
            self.cursor += 1;
        }
        if self.armed == 0 {
            self.cursor = self.cursor.max(target);
        }
    }

    /// Empties a due list after use, giving back what a burst grew it to.
    pub fn recycle(due: &mut Vec<Entry>) {
        due.clear();
        if due.capacity() > KEEP_CAPACITY {
            *due = Vec::new();
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

    /// A loop that wakes a little after a tick (as it does) expires only the slots whose
    /// tick has passed: a deadline in the next slot is not taken early, re-armed behind
    /// the cursor and then slept past; the loop's next wake comes by its slot's tick.
    #[test]
    fn a_wake_just_after_a_tick_leaves_the_next_slot_due_on_time() {
        let t0 = Instant::now();
        let mut wheel = Wheel::new(t0);
        let mut deadline = Deadline::default();
        let at = t0 + 21 * TICK + TICK * 4 / 5;
        wheel.reset(1, &mut deadline, Some(at));
        let now = t0 + 21 * TICK + Duration::from_micros(1);
        let mut due = Vec::new();
        wheel.expire(now, &mut due);
        for entry in due.drain(..) {
            assert!(!wheel.fires(entry, &mut deadline, now));
        }
        let wake = now + wheel.next_timeout(now).unwrap();
        assert!(
            wake <= t0 + 22 * TICK,
            "{:?} after the slot's tick",
            wake - (t0 + 22 * TICK)
        );
        wheel.expire(wake, &mut due);
        let fired: Vec<bool> = due
            .drain(..)
            .map(|entry| wheel.fires(entry, &mut deadline, wake))
            .collect();
        assert_eq!(fired, [true]);
    }

    /// Pushing a deadline later again and again (an idle timeout reset by every read)
    /// keeps one entry; it fires once, at the last deadline, not before.
    #[test]
    fn moving_a_deadline_later_keeps_one_entry() {
        let t0 = Instant::now();
        let mut wheel = Wheel::new(t0);
        let mut deadline = Deadline::default();
        for i in 0..10_000u32 {
            let at = t0 + Duration::from_secs(1) + Duration::from_micros(u64::from(i) * 100);
            wheel.reset(7, &mut deadline, Some(at));
        }
        assert_eq!(wheel.armed, 1);
        let last = t0 + Duration::from_secs(1) + Duration::from_micros(9_999 * 100);
        let mut fired = Vec::new();
        let mut now = t0;
        while now < last + TICK * 2 {
            now += TICK / 2;
            let mut due = Vec::new();
            wheel.expire(now, &mut due);
            for entry in due {
                if wheel.fires(entry, &mut deadline, now) {
                    fired.push(now);
                }
            }
        }
        assert_eq!(fired.len(), 1);
        assert!(fired[0] >= last, "fired before its deadline");
        assert_eq!(wheel.armed, 0);
    }

    /// An earlier deadline arms a new entry and the later one goes stale.
    #[test]
    fn an_earlier_deadline_replaces_the_live_entry() {
        let t0 = Instant::now();
        let mut wheel = Wheel::new(t0);
        let mut deadline = Deadline::default();
        wheel.reset(1, &mut deadline, Some(t0 + Duration::from_secs(10)));
        wheel.reset(1, &mut deadline, Some(t0 + Duration::from_millis(200)));
        assert_eq!(wheel.armed, 2);
        let mut due = Vec::new();
        let now = t0 + Duration::from_millis(250);
        wheel.expire(now, &mut due);
        assert_eq!(due.len(), 1);
        assert!(wheel.fires(due[0], &mut deadline, now));
        // Disarmed and re-armed later: the stale 10 s entry must not fire it early.
        wheel.reset(1, &mut deadline, Some(t0 + Duration::from_secs(20)));
        let mut due = Vec::new();
        let now = t0 + Duration::from_secs(11);
        wheel.expire(now, &mut due);
        assert!(due.into_iter().all(|e| !wheel.fires(e, &mut deadline, now)));
    }

    #[test]
    fn fires_no_earlier_than_the_deadline() {
        let t0 = Instant::now();
        let mut wheel = Wheel::new(t0);
        wheel.arm(t0 + Duration::from_millis(120), Entry::new(1, 0));
        wheel.arm(t0 + Duration::from_secs(600), Entry::new(2, 0));
        let mut due = Vec::new();
        wheel.expire(t0 + Duration::from_millis(100), &mut due);
        assert!(due.is_empty());
        wheel.expire(t0 + Duration::from_millis(150), &mut due);
        assert_eq!(due, vec![Entry::new(1, 0)]);
        due.clear();
        // Beyond the horizon: comes up at the horizon, for the loop to re-arm.
        wheel.expire(
            t0 + TICK * SLOTS as u32 + Duration::from_millis(100),
            &mut due,
        );
        assert_eq!(due, vec![Entry::new(2, 0)]);
        assert_eq!(wheel.next_timeout(t0), None);
    }

    /// A burst of connections (here 20 000 handshake deadlines in one tick) costs 8 bytes
    /// an entry while armed, and gives its memory back once the entries came up.
    #[test]
    fn a_burst_gives_its_timer_memory_back() {
        assert_eq!(std::mem::size_of::<Entry>(), 8);
        let t0 = Instant::now();
        let mut wheel = Wheel::new(t0);
        let at = t0 + Duration::from_secs(10);
        for key in 0..20_000 {
            wheel.arm(at, Entry::new(key, 0));
        }
        let slot = (wheel.slot_tick(at) % SLOTS as u64) as usize;
        assert!(wheel.slots[slot].capacity() >= 20_000);
        let mut due = Vec::new();
        wheel.expire(at, &mut due);
        assert_eq!(due.len(), 20_000);
        assert_eq!(due[19_999].key(), 19_999);
        assert!(wheel.slots.iter().all(|s| s.capacity() <= KEEP_CAPACITY));
        Wheel::recycle(&mut due);
        assert!(due.is_empty() && due.capacity() <= KEEP_CAPACITY);
        // Small slots keep their memory: the steady state allocates nothing.
        wheel.arm(at + TICK, Entry::new(1, 1));
        let slot = (wheel.slot_tick(at + TICK) % SLOTS as u64) as usize;
        let mut due = Vec::with_capacity(8);
        wheel.expire(at + TICK, &mut due);
        assert_eq!(due, vec![Entry::new(1, 1)]);
        assert!(wheel.slots[slot].capacity() >= 1);
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;

    /// Model check: random resets (earlier, later, disarm, far past the horizon, in the
    /// past) of a few connections whose slots are reused with fresh `Deadline`s (a closed
    /// connection's entries stay in the wheel), with the loop waking as `next_timeout`
    /// says: every deadline fires exactly once, never before it, and at most a tick late.
    #[test]
    fn random_deadlines_fire_once_on_time_with_key_reuse() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let t0 = Instant::now();
        let mut wheel = Wheel::new(t0);
        const KEYS: usize = 6;
        let mut deadlines = [Deadline::default(); KEYS];
        let mut model: [Option<Instant>; KEYS] = [None; KEYS];
        // When each deadline is due at the latest: its time, or when it was set if later.
        let mut due_by: [Instant; KEYS] = [t0; KEYS];
        let mut now = t0;
        let mut due = Vec::new();
        let mut fired = 0u32;
        for step in 0..200_000u32 {
            let key = rnd(KEYS as u64) as usize;
            match rnd(10) {
                0 => {
                    // The connection closes and its key is reused.
                    deadlines[key].clear();
                    deadlines[key] = Deadline::default();
                    model[key] = None;
                }
                1 => {
                    wheel.reset(key, &mut deadlines[key], None);
                    model[key] = None;
                }
                r => {
                    let at = match r {
                        2 => now
                            .checked_sub(Duration::from_millis(rnd(500)))
                            .unwrap_or(now),
                        3 => now + TICK * SLOTS as u32 * (1 + rnd(3) as u32),
                        _ => now + Duration::from_millis(rnd(3_000)),
                    };
                    wheel.reset(key, &mut deadlines[key], Some(at));
                    model[key] = Some(at);
                    due_by[key] = at.max(now);
                }
            }
            // Advance: to the wheel's next wake, or less.
            let wait = wheel
                .next_timeout(now)
                .unwrap_or(Duration::from_millis(200))
                .min(Duration::from_millis(rnd(200)));
            now += wait;
            wheel.expire(now, &mut due);
            for entry in due.drain(..) {
                let key = entry.key();
                if wheel.fires(entry, &mut deadlines[key], now) {
                    let at = model[key]
                        .take()
                        .unwrap_or_else(|| panic!("step {step}: key {key} fired with no deadline"));
                    assert!(at <= now, "step {step}: fired early");
                    fired += 1;
                }
            }
            // Anything overdue by more than a tick (after a wake at the wheel's time) is
            // a missed timer.
            for (key, at) in model.iter().enumerate() {
                if let Some(at) = at {
                    let next = now + wheel.next_timeout(now).unwrap_or(Duration::MAX / 4);
                    assert!(
                        next <= due_by[key] + TICK * 2,
                        "step {step}: key {key} due at {:?}, next wake {:?}",
                        *at - t0,
                        next - t0
                    );
                }
            }
        }
        assert!(fired > 10_000, "{fired} fired");
    }
}
