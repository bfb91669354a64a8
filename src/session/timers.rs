//! Every per-connection deadline, sans-IO: the opening handshake timeout, the close
//! handshake timeout, the idle keepalive and the backpressure grace.
//!
//! [`Timers`] reads no clock: each input carries `now`, and the runtime sleeps (or arms
//! its timer wheel, or sets a socket read timeout) until [`Timers::poll_timeout`].
//!
//! Call order:
//!
//! 1. Inputs, as they happen:
//!    - [`Timers::handshake_started`] when the opening handshake begins (a server accepted
//!      TCP, a client sent its upgrade request);
//!    - [`Timers::opened`] when the connection opened ([`Event::Open`](crate::Event::Open));
//!    - [`Timers::received`] whenever bytes arrived from the peer;
//!    - [`Timers::close_started`] once the close handshake began (the driver is
//!      `Closing`; a server refusing an upgrade calls it to bound the response's flush);
//!    - [`Timers::closed`] once the driver is `Closed`;
//!    - [`Timers::buffered`] with whether the outgoing buffer is over the limit, after
//!      anything that may change it.
//! 2. Output: [`Timers::poll_timeout`], the earliest deadline (`None`: nothing to wait for).
//!    Recompute it after every input.
//! 3. When the clock reaches it: [`Timers::handle_timeout`], which acts on the driver (a
//!    ping, or an abort) and returns what the runtime must do ([`Expired`]). Before the
//!    server has a driver (the request is still being read), [`Timers::is_expired`] says
//!    whether to drop the connection. A runtime that can ask its kernel how its output is
//!    being delivered calls [`Timers::handle_timeout_with_delivery`] instead (see
//!    [`Delivery`]).
//!
//! The durations come in as a [`TimerConfig`] on each call rather than living in
//! [`Timers`], so the per-connection state stays small (the reactor holds one per
//! connection, tens of thousands of them).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use websocket_driver::session::{Expired, TimerConfig, Timers};
//! # use websocket_driver::{Options, RequestParser, make_client, make_server};
//! # use websocket_driver::protocol::frame::Status;
//! # let mut client = make_client("ws://example.com/", &Options::default()).unwrap();
//! # client.start_connection();
//! # let mut parser = RequestParser::new(Options::default().head_limits());
//! # let Ok(Status::Complete(request, _)) = parser.parse(client.pending_output()) else {
//! #     unreachable!()
//! # };
//! # let mut server = make_server(&request, &Options::default()).unwrap();
//! # server.start_connection();
//! let config = TimerConfig {
//!     idle: Some(Duration::from_secs(30)),
//!     ..TimerConfig::default()
//! };
//! let mut timers = Timers::new();
//! let t0 = Instant::now();
//! timers.opened(t0, &config);
//! assert_eq!(timers.poll_timeout(), Some(t0 + Duration::from_secs(30)));
//! // Thirty silent seconds later: a ping goes out.
//! let t1 = timers.poll_timeout().unwrap();
//! assert_eq!(timers.handle_timeout(t1, &config, &mut server), Expired::Ping);
//! ```

use std::time::{Duration, Instant};

use crate::instant::CompactInstant;
use crate::protocol::driver::{Driver, ReadyState};
use crate::protocol::error::code;

/// The durations the timers arm. Default: handshake 10 s, close 5 s, no idle keepalive,
/// no backpressure grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// Time the opening handshake may take.
    pub handshake: Duration,
    /// Time the peer has to answer our close frame (or to take an idle close) before the
    /// transport is dropped.
    pub close: Duration,
    /// With `Some(t)`: after `t` without input, send a ping; after another `t` still
    /// without input, close with 1001.
    pub idle: Option<Duration>,
    /// With `Some(g)`: an outgoing buffer over the limit for `g` aborts with 1008.
    pub backpressure_grace: Option<Duration>,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            handshake: Duration::from_secs(10),
            close: Duration::from_secs(5),
            idle: None,
            backpressure_grace: None,
        }
    }
}

/// What [`Timers::handle_timeout`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Expired {
    /// No deadline had passed.
    Nothing,
    /// The peer was silent for an idle period: a ping is queued on the driver; write it.
    Ping,
    /// The peer stayed silent another idle period after the ping: the driver was aborted
    /// with 1001 "idle timeout" (a close frame and the `Close` event are queued). Write the
    /// output; the close timeout now bounds how long that may take.
    IdleClose,
    /// A deadline passed and the driver was aborted with this code (1006 for the opening
    /// or close handshake, 1008 for the backpressure grace); its `Close` event is queued.
    /// Drop the transport now.
    Drop(u16),
}

/// How our output is being delivered, as the transport's kernel tells it at an idle
/// deadline ([`Timers::handle_timeout_with_delivery`]).
///
/// A keepalive ping waits behind every byte queued before it, in our buffers and in both
/// kernels' buffers. A peer that reads a long download more slowly than we produce it
/// hears the ping late, and its pong comes back late, however alive it is. So at an idle
/// deadline with output still waiting to be delivered, the peer taking some of it since the
/// last deadline counts as a sign of life, as input does.
///
/// What it cannot see: bytes the peer's kernel already acknowledged and its application
/// has not read yet. A peer whose own receive buffer holds more than two idle periods of its
/// reading is still closed as idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Bytes of ours the peer has acknowledged since the connection began (Linux: `TCP_INFO`'s
    /// `tcpi_bytes_acked`). Only its change between two idle deadlines is used.
    pub acked: u64,
    /// Whether output of ours is still waiting to be delivered: in our buffers, or in the
    /// kernel's send queue (unsent, or sent and not acknowledged).
    pub backlog: bool,
}

/// The deadlines of one connection. See the [module docs](self) for the call order.
#[derive(Debug, Clone, Default)]
pub struct Timers {
    /// When the opening handshake, or the close handshake if `closing`, must be over.
    handshake_by: Option<CompactInstant>,
    /// `handshake_by` is the close deadline (never extended once set).
    closing: bool,
    /// The peer has been silent since one idle period before this.
    idle_at: Option<CompactInstant>,
    /// A keepalive ping went out and nothing arrived since.
    ping_outstanding: bool,
    /// `acked_mark` holds the low 32 bits of [`Delivery::acked`] at the last idle deadline
    /// (since the last input). Only equality is compared, so the cut is safe unless exactly
    /// a multiple of 4 GiB was acknowledged in one idle period.
    acked_seen: bool,
    acked_mark: u32,
    /// The outgoing buffer is over the limit.
    over_limit: bool,
    /// When the outgoing buffer must be back under the limit.
    grace_by: Option<CompactInstant>,
}

impl Timers {
    /// No deadline armed.
    pub fn new() -> Timers {
        Timers::default()
    }

    /// The opening handshake began at `now`: it must be over by `now + config.handshake`.
    pub fn handshake_started(&mut self, now: Instant, config: &TimerConfig) {
        self.handshake_by = Some(CompactInstant::after(now, config.handshake));
        self.closing = false;
    }

    /// The connection opened at `now`: the handshake deadline is off, the idle keepalive
    /// (if configured) starts counting.
    pub fn opened(&mut self, now: Instant, config: &TimerConfig) {
        if !self.closing {
            self.handshake_by = None;
        }
        self.idle_at = config.idle.map(|t| CompactInstant::after(now, t));
        self.ping_outstanding = false;
        self.acked_seen = false;
    }

    /// Bytes arrived from the peer at `now`: the idle period restarts and an outstanding
    /// keepalive ping counts as answered (any input proves the peer alive). Only while the
    /// keepalive runs, from [`Timers::opened`] until closing: not during the opening
    /// handshake (a client reading a slow 101 would ping a connection not yet open), nor
    /// while closing (the close deadline alone applies then).
    pub fn received(&mut self, now: Instant, config: &TimerConfig) {
        if let Some(t) = config.idle
            && !self.closing
            && self.idle_at.is_some()
        {
            self.idle_at = Some(CompactInstant::after(now, t));
            self.ping_outstanding = false;
            self.acked_seen = false;
        }
    }

    /// The close handshake began at `now` (or a refusal is being written): the peer has
    /// until `now + config.close`, and the idle keepalive stops (it would ping a closing
    /// connection, which sends nothing more, and close it with 1001 before that deadline).
    /// Later calls keep the first deadline.
    pub fn close_started(&mut self, now: Instant, config: &TimerConfig) {
        if !self.closing {
            self.handshake_by = Some(CompactInstant::after(now, config.close));
            self.closing = true;
        }
        self.idle_at = None;
        self.ping_outstanding = false;
    }

    /// The driver is closed at `now`: no more keepalive, and the close deadline bounds the
    /// last writes — the one already running, or one from `now` (a peer's Close takes the
    /// driver from open to closed without a closing state that would have started it).
    pub fn closed(&mut self, now: Instant, config: &TimerConfig) {
        self.close_started(now, config);
    }

    /// Whether the outgoing buffer is over the limit at `now`. Going over starts the grace
    /// period (if configured); staying over keeps its start; going under cancels it.
    pub fn buffered(&mut self, now: Instant, over_limit: bool, config: &TimerConfig) {
        if over_limit {
            if !self.over_limit {
                self.grace_by = config
                    .backpressure_grace
                    .map(|g| CompactInstant::after(now, g));
            }
        } else {
            self.grace_by = None;
        }
        self.over_limit = over_limit;
    }

    /// Whether the last [`Timers::buffered`] said the buffer was over the limit.
    pub fn is_over_limit(&self) -> bool {
        self.over_limit
    }

    /// Whether a keepalive ping is waiting for any sign of life.
    pub fn is_ping_outstanding(&self) -> bool {
        self.ping_outstanding
    }

    /// Whether no deadline is armed: [`Timers::poll_timeout`] is `None`, found without
    /// comparing instants (a transport asks on every poll).
    #[inline]
    pub fn is_unarmed(&self) -> bool {
        self.handshake_by.is_none() && self.grace_by.is_none() && self.idle_at.is_none()
    }

    /// The earliest armed deadline: call [`Timers::handle_timeout`] once the clock reaches
    /// it. `None`: nothing to wait for.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.handshake_by, self.grace_by, self.idle_at]
            .into_iter()
            .flatten()
            .min()
            .map(CompactInstant::get)
    }

    /// Whether a deadline has passed at `now` (for the time before a driver exists: a
    /// server still reading the request drops the connection then).
    pub fn is_expired(&self, now: Instant) -> bool {
        self.poll_timeout().is_some_and(|t| now >= t)
    }

    /// Acts on the deadlines that passed at `now`, in this order: the opening or close
    /// handshake (abort 1006), the backpressure grace (abort 1008), the idle keepalive
    /// (ping, or abort 1001 after an unanswered ping). Queued output and events are the
    /// caller's to write and dispatch.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        config: &TimerConfig,
        driver: &mut Driver,
    ) -> Expired {
        self.handle_timeout_with_delivery(now, config, driver, || None)
    }

    /// [`Timers::handle_timeout`], for a runtime that can say how its output is being
    /// delivered: `delivery` is asked (at most once, only at an idle deadline) and, with
    /// output waiting that the peer took some of since the previous idle deadline, the idle
    /// period starts over instead of a ping or the idle close (see [`Delivery`]); the
    /// outstanding ping, if any, stays outstanding. `None` from it: the plain rule.
    pub fn handle_timeout_with_delivery(
        &mut self,
        now: Instant,
        config: &TimerConfig,
        driver: &mut Driver,
        delivery: impl FnOnce() -> Option<Delivery>,
    ) -> Expired {
        if self.handshake_by.is_some_and(|t| now >= t.get()) {
            if driver.ready_state() == ReadyState::Connecting {
                // A connect that never completed is a failure the handler hears of, as
                // a refused one is: `Error` (timed out), then `Close` 1006.
                driver.receive_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "opening handshake timed out",
                ));
            } else {
                driver.abort(code::ABNORMAL, "close handshake timed out");
            }
            *self = Timers::default();
            return Expired::Drop(code::ABNORMAL);
        }
        if self.grace_by.is_some_and(|t| now >= t.get()) {
            driver.abort(code::POLICY_VIOLATION, "outgoing buffer limit exceeded");
            *self = Timers::default();
            return Expired::Drop(code::POLICY_VIOLATION);
        }
        if let (Some(t), Some(at)) = (config.idle, self.idle_at)
            && now >= at.get()
        {
            if let Some(delivery) = delivery() {
                let mark = delivery.acked as u32;
                let taken = self.acked_seen && mark != self.acked_mark;
                self.acked_seen = true;
                self.acked_mark = mark;
                if taken && delivery.backlog {
                    self.idle_at = Some(CompactInstant::after(now, t));
                    return Expired::Nothing;
                }
            }
            if self.ping_outstanding {
                // Two idle periods without a word: say why, then give the close frame
                // until the close timeout to get out.
                driver.abort(code::GOING_AWAY, "idle timeout");
                self.closed(now, config);
                return Expired::IdleClose;
            }
            let _ = driver.send_ping(b"");
            self.ping_outstanding = true;
            self.idle_at = Some(CompactInstant::after(now, t));
            return Expired::Ping;
        }
        Expired::Nothing
    }
}

/// Since when queued output has made no progress: a runtime's write timeout runs from
/// there. Kept apart from [`Timers`] (which the reactor holds per connection, where the
/// backpressure grace plays this part), for the runtimes that have a write timeout.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stall(Option<Instant>);

impl Stall {
    /// Records a write attempt: whether it `progressed` and whether output is still
    /// `pending`. The clock is read only when a stall starts or starts over.
    pub(crate) fn update(
        &mut self,
        progressed: bool,
        pending: bool,
        now: impl FnOnce() -> Instant,
    ) {
        self.0 = match self.0 {
            _ if !pending => None,
            Some(since) if !progressed => Some(since),
            _ => Some(now()),
        };
    }

    /// Whether output is waiting on a full transport (the last attempt left some unwritten).
    #[cfg(feature = "tokio")]
    #[inline]
    pub(crate) fn is_waiting(&self) -> bool {
        self.0.is_some()
    }

    /// When the pending output times out, if any is pending.
    #[inline]
    pub(crate) fn deadline(&self, timeout: Duration) -> Option<Instant> {
        self.0
            .map(|since| crate::instant::deadline_after(since, timeout))
    }
}

/// The error a connection fails with when its output made no progress for `timeout`.
pub(crate) fn write_timed_out(timeout: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("write timed out: the peer took no data for {timeout:?}"),
    )
}

/// The earlier of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests;
