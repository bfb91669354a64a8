//! What the connection task and its two halves share: the published state and the
//! commands senders queue.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use ::tokio::sync::{Notify, oneshot};

use crate::protocol::driver::ReadyState;

pub(super) fn state_code(state: ReadyState) -> u8 {
    match state {
        ReadyState::Connecting => 0,
        ReadyState::Open => 1,
        ReadyState::Closing => 2,
        ReadyState::Closed => 3,
    }
}

fn state_from(code: u8) -> ReadyState {
    match code {
        0 => ReadyState::Connecting,
        1 => ReadyState::Open,
        2 => ReadyState::Closing,
        _ => ReadyState::Closed,
    }
}

/// What the connection task publishes for its senders.
#[derive(Debug)]
pub(super) struct Shared {
    /// Bytes senders queued that the task has not handed to the driver yet (a control
    /// frame's count too, so that `flush` waits for it; only data counts against the
    /// limit's check).
    pub(super) queued: AtomicUsize,
    /// The driver's unwritten output.
    pub(super) buffered: AtomicUsize,
    pub(super) state: AtomicU8,
    /// The task has ended; nothing more will be written.
    pub(super) finished: AtomicBool,
    /// A sender queued the close: later sends are refused at once, as the driver would
    /// (they were accepted, then dropped unsent, while the task had not applied it yet).
    pub(super) close_queued: AtomicBool,
    /// A command accepted by a sender was refused when the task came to it (the connection
    /// had closed meanwhile): its bytes will never be written, so `flush` fails.
    pub(super) dropped: AtomicBool,
    /// Woken when the buffer shrinks, the state changes or the task ends.
    pub(super) changed: Notify,
    /// The receiver waits for an event (receiver to task).
    pub(super) demand: Notify,
    pub(super) protocol: Option<String>,
    pub(super) limit: usize,
}

impl Shared {
    /// Queued and buffered bytes. Read in this order, a command the task is handing over
    /// may be counted in both for a moment (never in neither): an over-estimate, which
    /// makes a waiting sender wait a little longer, never pass the limit.
    pub(super) fn total(&self) -> usize {
        self.queued.load(Ordering::Acquire) + self.buffered.load(Ordering::Acquire)
    }

    /// Counts `cost` more queued bytes if the output is at or under the limit now.
    ///
    /// `buffered` is read after `queued`, each time: the task hands a command over by
    /// storing the grown `buffered` first and taking its cost off `queued` after, so a
    /// sender that sees the smaller `queued` sees the grown `buffered` too. Read the other
    /// way round, a sender could find the command in neither (the old `buffered`, then the
    /// new `queued`) and let a second message past the limit.
    pub(super) fn try_count(&self, cost: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                let buffered = self.buffered.load(Ordering::Acquire);
                (queued + buffered <= self.limit).then_some(queued + cost)
            })
            .is_ok()
    }

    /// Counts `cost` more queued bytes whatever the limit (a control frame).
    pub(super) fn count(&self, cost: usize) {
        self.queued.fetch_add(cost, Ordering::AcqRel);
    }

    /// Whether sends are still taken: connecting or open, and no close queued.
    pub(super) fn takes_sends(&self) -> bool {
        matches!(self.state(), ReadyState::Connecting | ReadyState::Open)
            && !self.close_queued.load(Ordering::Acquire)
    }

    pub(super) fn state(&self) -> ReadyState {
        state_from(self.state.load(Ordering::Acquire))
    }

    /// Publishes the stream's unwritten bytes (the driver's, and a frame written around
    /// it) and state; wakes waiters when either improved.
    pub(super) fn publish(&self, buffered: usize, state: ReadyState) {
        let old = self.buffered.swap(buffered, Ordering::AcqRel);
        let state = state_code(state);
        let old_state = self.state.swap(state, Ordering::AcqRel);
        if buffered < old || state != old_state {
            self.changed.notify_waiters();
        }
    }

    pub(super) fn finish(&self) {
        self.state
            .store(state_code(ReadyState::Closed), Ordering::Release);
        self.finished.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// One whole message for the connection task.
#[derive(Debug)]
pub(super) enum Command {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
    /// A flush's marker: its [`Ack::Written`] completes once everything queued before it
    /// has been written.
    Flush,
}

impl Command {
    /// Bytes counted as queued until the task hands the command to the driver: the
    /// payload, and at least one byte (an empty control frame is still waited for); none
    /// for a flush's marker, which is not counted.
    pub(super) fn cost(&self) -> usize {
        match self {
            Command::Text(t) => t.len(),
            Command::Binary(b) => b.len(),
            Command::Ping(p) | Command::Pong(p) => p.len(),
            Command::Close(_, reason) => 2 + reason.len(),
            Command::Flush => return 0,
        }
        .max(1)
    }

    /// A control frame: it does not wait on the byte limit.
    pub(super) fn is_control(&self) -> bool {
        matches!(
            self,
            Command::Ping(_) | Command::Pong(_) | Command::Close(..)
        )
    }
}

/// What a confirmed command waits for; the connection task completes it or drops it (the
/// waiting [`Receipt`](super::Receipt) then fails).
#[derive(Debug)]
pub(super) enum Ack {
    /// The frame was handed to the transport.
    Written(oneshot::Sender<()>),
    /// A pong with the ping's payload arrived.
    Pong(oneshot::Sender<()>),
}

/// A command as queued by a sender, with its confirmation if one was asked for.
pub(super) type Queued = (Command, Option<Ack>);
