//! [`Config`]: the adapter's own settings, beside the driver's [`Options`](crate::Options).

use std::time::Duration;

use crate::session::timers::TimerConfig;

/// Settings of the tokio adapter, beside the driver's [`Options`](crate::Options).
#[derive(Debug, Clone)]
pub struct Config {
    /// Outgoing bytes (queued by senders and not yet written) over which `send` waits.
    /// Default 1 MiB. A message is admitted while the buffer is at or under the limit,
    /// whatever its own size.
    pub max_backpressure: usize,
    /// Time the peer has to complete the opening handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time the peer has to answer our close frame (and, once closed, to take the last
    /// bytes and end the stream) before it is dropped. Default 5 s.
    pub close_timeout: Duration,
    /// Size of the connection's read buffer. Default 64 KiB. A binary frame that fits it
    /// (and `max_length`) is read whole before the driver parses it, so
    /// [`WebSocketStream::recv`] lends its payload instead of reassembling it; for `recv`,
    /// a frame up to twice this size too, the buffer growing for it (and shrinking back
    /// after 64 events without another). Of a larger frame (or a text frame, whose UTF-8 is
    /// checked as it arrives, to fail fast), what remains once at least this much is still
    /// to come is received straight into the message's own buffer: only what arrived with
    /// the header is copied there from the read buffer.
    ///
    /// [`WebSocketStream::recv`]: super::WebSocketStream::recv
    pub read_buffer_size: usize,
    /// With `Some(t)`: after `t` without input, send a ping; after another `t` still
    /// without input, close with 1001 "idle timeout" (the close frame then has
    /// [`Config::close_timeout`] to get out). Default `None` (off). Besides input, a
    /// peer that keeps taking our output counts as alive: at an idle deadline with output
    /// waiting on a full transport, any write that moved some of it since the previous
    /// deadline starts the period over (a peer reading a long download more slowly than
    /// we produce it hears the ping, and answers it, only after everything queued before
    /// it; see [`Delivery`](crate::session::Delivery), which the reactor and the blocking
    /// runtimes read from the kernel). A peer that stops reading stops taking output once
    /// the buffers between are full, and is then pinged and closed as a silent one.
    ///
    /// With the split API, the connection task reads only as the [`WsReceiver`] asks
    /// for events; while it holds input back (the receiver not polled, or its queue
    /// full) the peer's pongs go unheard, so the clock stops: a busy application is not
    /// taken for a silent peer, and a silent peer is found once it asks again.
    ///
    /// [`WsReceiver`]: super::WsReceiver
    pub idle_timeout: Option<Duration>,
    /// Output that the transport takes none of for this long (the peer reads nothing)
    /// fails the connection: [`Event::Error`](crate::Event::Error) with a `TimedOut` I/O
    /// error, then `Close` 1006, and a send or flush waiting on it fails. The clock runs
    /// while output waits and a poll of the stream (a `next`, a send, a flush, or the split
    /// API's connection task) has found the transport full; each byte it takes starts it
    /// over, so a slow reader is not cut off, only one that stopped. (Output a layer inside
    /// the transport holds, a TLS stream's records, counts as taken once the layer took it;
    /// while only the layer's flush is left, the layer waking that flush, its socket having
    /// taken bytes, starts the clock over.) Default 30 s (as the
    /// blocking runtimes' [`Timeouts::write`](crate::blocking::Timeouts::write));
    /// `Duration::MAX`: never.
    pub write_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_backpressure: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            read_buffer_size: 64 * 1024,
            idle_timeout: None,
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Sets [`Config::max_backpressure`].
    pub fn max_backpressure(mut self, bytes: usize) -> Self {
        self.max_backpressure = bytes;
        self
    }

    /// Sets [`Config::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`Config::close_timeout`].
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Sets [`Config::read_buffer_size`].
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.read_buffer_size = bytes.max(1);
        self
    }

    /// Sets [`Config::idle_timeout`] (`None`: off).
    pub fn idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.idle_timeout = timeout.into();
        self
    }

    /// Sets [`Config::write_timeout`].
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// The deadlines' durations (the adapter has no backpressure grace: senders wait).
    pub(super) fn timer_config(&self) -> TimerConfig {
        TimerConfig {
            handshake: self.handshake_timeout,
            close: self.close_timeout,
            idle: self.idle_timeout,
            backpressure_grace: None,
        }
    }
}
