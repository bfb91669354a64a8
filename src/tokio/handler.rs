//! Seed-style callbacks: the [`Handler`] trait and [`run`].

use std::future::Future;

use super::receiver::WsReceiver;
use super::sender::WsSender;
use crate::protocol::driver::{Event, Message};
use crate::protocol::error::Error;

/// Seed-style event handlers over the tokio adapter, like the reactor's
/// [`crate::server::Handler`] but async. Every method has an empty default. Run one with
/// [`run`].
///
/// ```no_run
/// use websocket_driver::Message;
/// use websocket_driver::tokio::{Handler, WsSender};
///
/// struct Echo;
/// impl Handler for Echo {
///     async fn on_message(&mut self, ws: &WsSender, message: Message<'static>) {
///         let _ = ws.send_message(message).await;
///     }
/// }
/// ```
pub trait Handler: Send {
    /// The connection is open.
    fn on_open(&mut self, ws: &WsSender) -> impl Future<Output = ()> + Send {
        let _ = ws;
        async {}
    }
    /// A complete message.
    fn on_message(
        &mut self,
        ws: &WsSender,
        message: Message<'static>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ws, message);
        async {}
    }
    /// The peer broke the protocol or the transport failed (a close follows).
    fn on_error(&mut self, ws: &WsSender, error: &Error) -> impl Future<Output = ()> + Send {
        let _ = (ws, error);
        async {}
    }
    /// The connection closed; called exactly once.
    fn on_close(
        &mut self,
        ws: &WsSender,
        code: u16,
        reason: &str,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ws, code, reason);
        async {}
    }
    /// A ping arrived (the pong is already queued).
    fn on_ping(&mut self, ws: &WsSender, payload: &[u8]) -> impl Future<Output = ()> + Send {
        let _ = (ws, payload);
        async {}
    }
    /// A pong arrived.
    fn on_pong(&mut self, ws: &WsSender, payload: &[u8]) -> impl Future<Output = ()> + Send {
        let _ = (ws, payload);
        async {}
    }
}

/// Runs `handler` on a connection until it closes, and returns the handler.
///
/// ```no_run
/// # use websocket_driver::tokio::{Handler, run, accept};
/// # struct Echo; impl Handler for Echo {}
/// # async fn demo(stream: tokio::net::TcpStream) -> Result<(), websocket_driver::Error> {
/// run(accept(stream, &Default::default()).await?, Echo).await;
/// # Ok(()) }
/// ```
pub async fn run<H: Handler>(connection: (WsSender, WsReceiver), mut handler: H) -> H {
    let (ws, mut events) = connection;
    while let Some(event) = events.next().await {
        match event {
            Event::Open => handler.on_open(&ws).await,
            Event::Message(m) => handler.on_message(&ws, m).await,
            Event::Ping(p) => handler.on_ping(&ws, &p).await,
            Event::Pong(p) => handler.on_pong(&ws, &p).await,
            Event::Error(e) => handler.on_error(&ws, &e).await,
            Event::Close { code, reason } => handler.on_close(&ws, code, &reason).await,
        }
    }
    handler
}
