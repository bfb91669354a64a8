//! The driver on tokio (feature `tokio`): WebSockets over any `AsyncRead + AsyncWrite`
//! (`TcpStream`, a TLS stream, a hyper upgrade, a duplex pipe).
//!
//! [`accept`] (server) and [`connect`] / [`client`] (client) complete the opening handshake
//! and return the connection split in two:
//!
//! - [`WsSender`]: cloneable, for any task; async `send_text`, `send_binary`, `send_ping`,
//!   `close_connection`… Each call queues one whole message; it waits while the connection's
//!   outgoing buffer is over [`Config::max_backpressure`] (1 MiB by default).
//!   [`WsSender::send_with_receipt`] also hands back a [`Receipt`] that resolves once the
//!   frame is written (the seed's `:callback`), and [`WsSender::ping`] one that resolves
//!   with the matching pong (the seed's `send-ping` callback).
//! - [`WsReceiver`]: the driver's [`Event`]s in order (`Open`, `Message`, `Ping`, `Pong`,
//!   `Error`, `Close`), through [`WsReceiver::next`] or as a `futures_core::Stream`. `Close`
//!   comes exactly once, then `None`.
//!
//! One spawned task per connection owns the [`Driver`] and the stream: it reads, runs
//! [`Driver::poll_event`], hands owned events to the receiver, applies the senders'
//! commands and writes the driver's output.
//!
//! Input is parsed as the receiver asks for events (like a synchronous read loop): while
//! the connection is open, the task parses the next event only when the receiver waits
//! for one, and applies the commands queued before that first. So an app that answers a
//! message before asking for the next one gets its answer out before anything the
//! following frames cause (a protocol error's close frame, a pong), which keeps the
//! Autobahn suite strict; and a receiver that stops asking stops the reading (TCP pushes
//! back on the peer). Keep polling [`WsReceiver::next`] (in a `select!` beside your other
//! work) for pings to be answered and closes to be seen. Once closing, input is parsed as
//! it comes.
//!
//! Through an HTTP proxy: [`connect_via_proxy`] (`ws://`), or [`tunnel`] and then TLS and
//! [`client`] (`wss://`).
//!
//! Seed-style callbacks: implement [`Handler`] and [`run`] it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), websocket_driver::Error> {
//! use websocket_driver::tokio::{accept, connect};
//! use websocket_driver::{Event, Options};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
//! let (stream, _) = listener.accept().await?;
//! let (tx, mut rx) = accept(stream, &Options::default()).await?;
//! while let Some(event) = rx.next().await {
//!     if let Event::Message(message) = event {
//!         let _ = tx.send_message(message).await; // echo
//!     }
//! }
//!
//! let (tx, mut rx) = connect("ws://127.0.0.1:9001/", &Options::default()).await?;
//! tx.send_text("Hi").await?;
//! # Ok(()) }
//! ```
//!
//! Cancellation: every `send*` future is cancel-safe. Dropped before it completes, it
//! queued nothing; once it completed, the whole message will be written (or the connection
//! closes). The connection task never writes part of a frame on a caller's behalf, so an
//! aborted task cannot leave a half-sent message on the wire.
//!
//! [`Event`]: crate::Event
//! [`Driver`]: crate::Driver
//! [`Driver::poll_event`]: crate::Driver::poll_event

mod config;
mod connection;
mod handler;
mod handshake;
mod proxy;
mod receiver;
mod sender;
mod shared;
mod stream;

pub use config::Config;
pub use connection::spawn;
pub use handler::{Handler, run};
pub use handshake::{accept, accept_with, client, client_with, connect, connect_with};
pub use proxy::{connect_via_proxy, tunnel};
pub use receiver::WsReceiver;
pub use sender::{Receipt, WsSender};
pub use stream::{Reply, WebSocketStream};
