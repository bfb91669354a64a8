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
    /// Size of the connection's read buffer. Default 64 KiB.
    pub read_buffer_size: usize,
    /// A binary frame up to this size (header included) is read whole before the driver
    /// parses it, the read buffer growing to fit (and shrinking back after 64 frames that did not
    /// need it): its payload is then lent by [`WebSocketStream::recv`] or copied once,
    /// instead of being reassembled from pieces. Larger frames, and text frames (whose
    /// UTF-8 is checked as it arrives, to fail fast), are reassembled by the driver. Default 2 MiB; the handshakes lower it to the driver's
    /// `max_length` (plus a header), so a frame the driver would refuse is not buffered.
    /// [`Config::read_buffer_size`] or less: never grow.
    ///
    /// [`WebSocketStream::recv`]: super::WebSocketStream::recv
    pub max_read_buffer_size: usize,
    /// With `Some(t)`: after `t` without input, send a ping; after another `t` still
    /// without input, close with 1001 "idle timeout" (the close frame then has
    /// [`Config::close_timeout`] to get out). Default `None` (off).
    ///
    /// Input counts when the connection task reads it, and while open it reads only as
    /// the [`WsReceiver`] asks for events: keep polling [`WsReceiver::next`], or a busy
    /// receiver looks like a silent peer.
    ///
    /// [`WsReceiver`]: super::WsReceiver
    /// [`WsReceiver::next`]: super::WsReceiver::next
    pub idle_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_backpressure: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            read_buffer_size: 64 * 1024,
            max_read_buffer_size: 2 << 20,
            idle_timeout: None,
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

    /// Sets [`Config::max_read_buffer_size`].
    pub fn max_read_buffer_size(mut self, bytes: usize) -> Self {
        self.max_read_buffer_size = bytes;
        self
    }

    /// This config with [`Config::max_read_buffer_size`] at most a frame of `max_length`.
    pub(crate) fn for_max_length(&self, max_length: usize) -> Config {
        let mut config = self.clone();
        config.max_read_buffer_size = config
            .max_read_buffer_size
            .min(max_length.saturating_add(crate::protocol::frame::MAX_HEADER_LEN));
        config
    }

    /// Sets [`Config::idle_timeout`] (`None`: off).
    pub fn idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.idle_timeout = timeout.into();
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
