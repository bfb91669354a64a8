//! The driver on tokio (feature `tokio`): WebSockets over any `AsyncRead + AsyncWrite`
//! (`TcpStream`, a TLS stream, a hyper upgrade, a duplex pipe).
//!
//! Two shapes, the same protocol underneath:
//!
//! - [`WebSocketStream`]: the connection driven inline by the task that polls it, with no
//!   task or channel in between (as tokio-tungstenite's and fastwebsockets' types are).
//!   [`WebSocketStream::accept`], [`WebSocketStream::connect`], [`WebSocketStream::client`]
//!   or [`WebSocketStream::from_driver`]; then [`WebSocketStream::next`] (a
//!   `futures_core::Stream` of [`Event`]s) and `send_text` / `send_binary` /
//!   `send_message` / … (a `futures_sink::Sink` of [`Message`]s), or
//!   [`WebSocketStream::recv`], which lends each event out of the read buffer with a
//!   [`Reply`] to answer it on: no copy, no allocation per message. The fastest way in.
//! - The split API, for sends from many tasks: [`accept`] (server) and [`connect`] /
//!   [`client`] (client) return the connection as a [`WsSender`] and a [`WsReceiver`]
//!   ([`WebSocketStream::spawn`] turns a stream into them). One spawned task per
//!   connection drives a [`WebSocketStream`]; the halves talk to it through channels, which
//!   costs a task switch and two channel hops per message (measured in
//!   `loadtest/results/tokio-adapters/`).
//!
//! [`WsSender`] is cloneable, for any task: async `send_text`, `send_binary`, `send_ping`,
//! `close_connection`… Each call queues one whole message; it waits while the connection's
//! outgoing buffer is over [`Config::max_backpressure`] (1 MiB by default). A peer that
//! takes none of our output for [`Config::write_timeout`] (30 s by default) fails the
//! connection, on both shapes: waiting sends and flushes fail, and the events say why.
//! [`WsSender::send_with_receipt`] also hands back a [`Receipt`] that resolves once the
//! frame is written (the seed's `:callback`), and [`WsSender::ping`] one that resolves with
//! the matching pong (the seed's `send-ping` callback). [`WsReceiver`] yields the driver's
//! [`Event`]s in order (`Open`, `Message`, `Ping`, `Pong`, `Error`, `Close`), through
//! [`WsReceiver::next`] or as a `futures_core::Stream`. `Close` comes exactly once, then
//! `None`.
//!
//! Input is parsed as the app asks for events (like a synchronous read loop): an app that
//! answers a message before asking for the next one gets its answer out before anything
//! the following frames cause (a protocol error's close frame, a pong), which keeps the
//! Autobahn suite strict; and an app that stops asking stops the reading (TCP pushes back
//! on the peer). Keep polling `next` (in a `select!` beside your other work) for pings to
//! be answered and closes to be seen. On the split API, once closing, input is parsed as
//! it comes.
//!
//! Through an HTTP proxy: [`connect_via_proxy`] (`ws://`), or [`tunnel`] and then TLS and
//! [`client`] (`wss://`).
//!
//! Seed-style callbacks: implement [`Handler`] and [`run`] it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), websocket_driver::Error> {
//! use websocket_driver::tokio::{WebSocketStream, accept, connect};
//! use websocket_driver::{Event, Options};
//!
//! // Inline: one task, no channels.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
//! let (tcp, _) = listener.accept().await?;
//! let mut ws = WebSocketStream::accept(tcp, &Options::default()).await?;
//! while let Some((event, mut reply)) = ws.recv().await {
//!     if let Event::Message(message) = event {
//!         reply.send_message(&message)?; // echo straight from the read buffer
//!     }
//! }
//!
//! // Split: a cloneable sender and a receiver.
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
//! Cancellation: every `send*` future, and `next` / `recv`, is cancel-safe. A send dropped
//! before it completes queued nothing; once it completed, the whole message will be
//! written (or the connection closes). Neither shape writes part of a frame on a caller's
//! behalf and abandons it, so an aborted task cannot leave a half-sent message on the
//! wire; a dropped `next` loses no input (everything read stays in the stream).
//!
//! [`Event`]: crate::Event
//! [`Message`]: crate::Message

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
#[cfg(feature = "hyper")]
pub(crate) use stream::{Side, SplitWakers};
