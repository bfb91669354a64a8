//! Server settings.

#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::options::Options;
use crate::reactor::{self, Backend};

/// What happens beyond [`ServerConfig::max_backpressure`], on top of the cap itself.
///
/// The cap always holds: while a connection's unsent output (its driver's queue, what
/// the kernel holds for it, TLS records not yet written) is over the limit, a send is
/// refused with [`UsageError::BufferFull`](crate::UsageError::BufferFull) and the message
/// is not queued, and the loop stops reading from the connection (and delivering what it
/// already read) until the output drains below half the limit, so TCP slows the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BackpressurePolicy {
    /// Only the cap: refused sends, paused reading. The default.
    #[default]
    DropNew,
    /// The cap, and close with 1008 once the output has stayed over the limit for
    /// `grace` (`Duration::ZERO`: at the first refused send, like uWebSockets'
    /// `closeOnBackpressureLimit`).
    Close {
        /// How long the output may stay over the limit.
        grace: Duration,
    },
}

/// What a panic in a handler does (see [`Handler`](super::Handler)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PanicPolicy {
    /// The panicking connection fails: its handler is dropped without another call (no
    /// `on_close`), it leaves its topics, the peer gets the output already queued and
    /// then close 1011 "the handler panicked" (an HTTP 500 when the upgrade closure
    /// panicked), and the server closes TCP once that is written, within the close
    /// timeout; [`Stats::handler_panics`](super::Stats::handler_panics) counts it. The loop
    /// and its other connections go on. The default.
    #[default]
    CloseConnection,
    /// The panic ends the loop, as a panicking thread would: its connections are dropped
    /// without `on_close` (they leave their topics and stop counting in
    /// [`Stats::connections_open`](super::Stats::connections_open) and against
    /// `max_connections`), the other loops go on, and the server's `wait` and `shutdown`
    /// report "an event loop panicked". For applications that would rather stop than go on
    /// beside state a panic may have left half-changed (a `Mutex` shared by handlers).
    EndLoop,
}

/// Server settings. Every limit has a default; see each field.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Event loops (threads). Default: the number of CPUs.
    pub threads: usize,
    /// IO backend. Default [`Backend::Auto`].
    pub backend: Backend,
    /// Driver options (`max_length`, `accept_protocols`, `additional_headers`, head limits).
    pub options: Options,
    /// Most open connections over all loops; beyond, new ones get 503 and are closed (on
    /// wss closed without an answer: a plaintext 503 would be a broken TLS record).
    /// Default: what the current soft open-file limit allows, minus a reserve
    /// ([`reactor::default_max_connections`]); the limit is not changed, see
    /// [`raise_open_file_limit`](crate::raise_open_file_limit).
    pub max_connections: usize,
    /// Time a client has to complete its upgrade request. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time the peer has to answer our close frame before TCP is dropped. Default 5 s.
    pub close_timeout: Duration,
    /// With `Some(t)`: after `t` without input, send a ping; after another `t` still
    /// without input, close with 1001. Default `None` (off). A peer still taking our
    /// queued output (the kernel sees it acknowledged) counts as alive, since its pong
    /// waits behind that output ([`Delivery`](crate::session::Delivery)).
    pub idle_timeout: Option<Duration>,
    /// The cap on a connection's unsent output (see [`BackpressurePolicy`]). Default 1 MiB.
    /// A connection's memory is bounded by this, one read buffer and the message being
    /// assembled (`Options::max_length`; with permessage-deflate, inflated as it arrives,
    /// plus an inflate stream of about 47 KB while a compressed message comes in pieces).
    pub max_backpressure: usize,
    /// Default [`BackpressurePolicy::DropNew`]: the cap only.
    pub backpressure_policy: BackpressurePolicy,
    /// What a handler's panic does. Default [`PanicPolicy::CloseConnection`].
    pub panic_policy: PanicPolicy,
    /// Size of each loop's read buffer on epoll (at least 1 byte; 0 counts as 1). Default
    /// 64 KiB. io_uring receives into its own ring of 32 KiB buffers instead.
    pub read_buffer_size: usize,
    /// How long an io_uring loop that has run out of completions keeps looking for new
    /// ones before it sleeps in the kernel. Default 20 µs; `Duration::ZERO` sleeps at once.
    /// A sleeping loop is woken by the kernel, and where that wake-up is slow (a VM's
    /// cross-CPU interrupt) a few connections echoing one message each wait on it every
    /// time: at 10 connections × 1 KiB it nearly doubled io_uring's msgs/s on a 2-vCPU VM,
    /// at less CPU per message. While polls find nothing the loop skips the next 1, 3, 7 …
    /// 63 of them, so a lightly loaded loop rarely spins. epoll loops do not spin.
    pub busy_poll: Duration,
    /// TLS for every accepted connection (wss). Default `None`; see [`Server::bind_tls`](super::Server::bind_tls).
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS settings for `wss://` connections of a [`ClientReactor`](crate::client::ClientReactor).
    /// Default `None`: verify against the system roots.
    #[cfg(feature = "tls")]
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: Backend::Auto,
            options: Options::default(),
            max_connections: reactor::default_max_connections(),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            idle_timeout: None,
            max_backpressure: 1 << 20,
            backpressure_policy: BackpressurePolicy::DropNew,
            panic_policy: PanicPolicy::CloseConnection,
            read_buffer_size: 64 * 1024,
            busy_poll: Duration::from_micros(20),
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "tls")]
            client_tls: None,
        }
    }
}
