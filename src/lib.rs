//! # websocket-driver (`wsd`)
//!
//! RFC 6455 WebSockets for servers and clients, with the API of the Common Lisp
//! `websocket-driver`: `make_server`, `make_client`, `start_connection`, `send`,
//! `send_text`, `send_binary`, `send_ping`, `close_connection`, `version`, `protocol`,
//! `ready_state`, and `open` / `message` / `error` / `close` events.
//!
//! Layers, each using only those below it: [`protocol`] is sans-IO (bytes in, events and
//! bytes out); [`session`] is sans-IO too and holds what every runtime does around a
//! driver (the server upgrade flow, the deadlines); [`reactor`] is the event loops (one
//! loop core over an epoll and an io_uring backend); the runtimes ([`server`] and
//! [`client::ClientReactor`] hosted on the reactor, [`blocking`] threads, `tokio`,
//! `hyper`) only move bytes, events and deadlines; [`WebSocket`] adds seed-style closures
//! over any transport.
//!
//! ```
//! use websocket_driver::{make_client, Event, Options};
//! let mut client = make_client("ws://localhost:5000/echo", &Options::default()).unwrap();
//! client.start_connection();
//! assert!(client.pending_output().starts_with(b"GET /echo HTTP/1.1\r\nHost: localhost:5000\r\n"));
//! client.send_text("Hi").unwrap(); // queued until the handshake completes
//! ```

// `unsafe` is allowed only in the reactor's backends (`reactor::uring`: kernel-shared
// memory; `reactor::epoll`: a receive into a vector's spare capacity; `reactor::low_water`:
// `setsockopt(SO_RCVLOWAT)`; `reactor::tcp_info`: `getsockopt(TCP_INFO)`) and in the unmask kernel's dispatch (`protocol::mask`,
// entering its AVX-512 or AVX2 build after the CPU check), each block with a `// SAFETY:`
// comment; the rest of the protocol layer is safe.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
// The completion half of the reactor's traits (owned send buffers) serves only io_uring.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

pub mod blocking;
pub mod client;
mod hosted;
#[cfg(feature = "hyper")]
pub mod hyper;
mod instant;
pub mod protocol;
pub mod reactor;
pub use hosted::server;
pub mod session;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tokio")]
pub mod tokio;
mod websocket;

pub use protocol::deflate::{DeflateOptions, DeflateParams};
pub use protocol::driver::{Driver, Event, Message, MessageType, ReadyState, Role, SendToken};
pub use protocol::error::{Error, HandshakeError, ProtocolError, TlsError, UsageError, code};
pub use protocol::handshake::{Request, RequestParser, is_websocket};
pub use protocol::options::Options;
pub use reactor::Backend;
pub use server::{Handler, Server, ServerConfig, ServerHandle, Upgrade, UpgradeRequest, Ws};
pub use websocket::WebSocket;

/// Raises this process's soft open-file limit (`RLIMIT_NOFILE`) as far as allowed, to the
/// hard limit, and returns the new soft limit.
///
/// Each connection holds a descriptor, and the usual soft limit (1024) caps a server at
/// about a thousand of them. The library never changes the limit on its own: call this
/// at startup, before building a [`ServerConfig`] (whose default `max_connections` follows
/// the soft limit read then), in programs that hold many connections.
///
/// ```no_run
/// let limit = websocket_driver::raise_open_file_limit()?;
/// let config = websocket_driver::ServerConfig::default(); // sized for `limit`
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// A server driver for an upgrade request (the seed's `make-server`).
pub fn make_server(request: &Request, options: &Options) -> Result<Driver, Error> {
    Driver::make_server(request, options)
}

/// A client driver for a `ws://` URL (the seed's `make-client`).
pub fn make_client(url: &str, options: &Options) -> Result<Driver, Error> {
    Driver::make_client(url, options)
}

/// The README's code blocks compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
