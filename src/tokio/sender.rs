//! [`WsSender`]: the cloneable sending half.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::tokio::sync::mpsc;

use super::shared::{Command, Shared};
use crate::protocol::driver::{Message, MessageType, ReadyState};
use crate::protocol::error::{Error, UsageError, is_valid_close_code};

/// The sending half of a connection: `Clone + Send + Sync`, for any number of tasks.
///
/// Every `send*` queues one whole message and is cancel-safe (see the module docs). It
/// fails with [`UsageError::NotOpen`] once the connection is closing or closed; a message
/// accepted just before the peer closed is dropped silently, as on the reactor's `Sender`.
#[derive(Debug, Clone)]
pub struct WsSender {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) shared: Arc<Shared>,
}

fn not_open() -> Error {
    UsageError::NotOpen.into()
}

impl WsSender {
    /// Waits until `ready` holds, or fails once the connection can no longer send.
    async fn wait_until(&self, ready: impl Fn(&Shared) -> bool) -> Result<(), Error> {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if !matches!(
                self.shared.state(),
                ReadyState::Connecting | ReadyState::Open
            ) {
                return Err(not_open());
            }
            if ready(&self.shared) {
                return Ok(());
            }
            notified.await;
        }
    }

    async fn submit(&self, command: Command) -> Result<(), Error> {
        let cost = command.cost();
        if cost > 0 {
            self.wait_until(|s| s.total() <= s.limit).await?;
        } else {
            self.wait_until(|_| true).await?;
        }
        let permit = self.commands.reserve().await.map_err(|_| not_open())?;
        // Nothing awaits from here on: the message is queued whole or not at all.
        self.shared.queued.fetch_add(cost, Ordering::AcqRel);
        permit.send(command);
        Ok(())
    }

    /// Sends `data` as `kind` (the seed's `send`): text must be UTF-8, pings and pongs at
    /// most 125 bytes, `Close(code)` takes the reason as `data`.
    pub async fn send(&self, data: impl Into<Vec<u8>>, kind: MessageType) -> Result<(), Error> {
        let data = data.into();
        match kind {
            MessageType::Text => {
                let text = String::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                self.send_text(text).await
            }
            MessageType::Binary => self.send_binary(data).await,
            MessageType::Ping => self.send_ping(data).await,
            MessageType::Pong => self.send_pong(data).await,
            MessageType::Close(c) => {
                let reason = String::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                self.close_connection(c, reason).await
            }
        }
    }

    /// Sends a received message back as it came: text as text, binary as binary.
    pub async fn send_message(&self, message: Message<'_>) -> Result<(), Error> {
        match message {
            Message::Text(t) => self.send_text(t.into_owned()).await,
            Message::Binary(b) => self.send_binary(b.into_owned()).await,
        }
    }

    /// Sends a text message.
    pub async fn send_text(&self, text: impl Into<String>) -> Result<(), Error> {
        self.submit(Command::Text(text.into())).await
    }

    /// Sends a binary message.
    pub async fn send_binary(&self, data: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.submit(Command::Binary(data.into())).await
    }

    /// Sends a ping (at most 125 bytes); the pong arrives as [`Event::Pong`](crate::Event::Pong).
    pub async fn send_ping(&self, payload: impl Into<Vec<u8>>) -> Result<(), Error> {
        let payload = payload.into();
        if payload.len() > 125 {
            return Err(UsageError::ControlPayloadTooLong.into());
        }
        self.submit(Command::Ping(payload)).await
    }

    /// Sends an unsolicited pong (a heartbeat that needs no answer).
    pub async fn send_pong(&self, payload: impl Into<Vec<u8>>) -> Result<(), Error> {
        let payload = payload.into();
        if payload.len() > 125 {
            return Err(UsageError::ControlPayloadTooLong.into());
        }
        self.submit(Command::Pong(payload)).await
    }

    /// Starts the close handshake (the seed's `close-connection`): the close frame goes out
    /// after every message queued before it; [`Event::Close`] arrives when the peer answers
    /// (or after [`Config::close_timeout`], with 1006).
    ///
    /// [`Event::Close`]: crate::Event::Close
    /// [`Config::close_timeout`]: super::Config::close_timeout
    pub async fn close_connection(
        &self,
        code: u16,
        reason: impl Into<String>,
    ) -> Result<(), Error> {
        let reason = reason.into();
        if !is_valid_close_code(code) {
            return Err(UsageError::InvalidCloseCode(code).into());
        }
        if reason.len() > 123 {
            return Err(UsageError::CloseReasonTooLong.into());
        }
        self.submit(Command::Close(code, reason)).await
    }

    /// Waits until everything queued so far has been written to the stream. Fails if the
    /// connection ended with bytes unwritten.
    pub async fn flush(&self) -> Result<(), Error> {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.shared.total() == 0 {
                return Ok(());
            }
            if self.shared.finished.load(Ordering::Acquire) {
                return Err(not_open());
            }
            notified.await;
        }
    }

    /// Bytes queued and not yet written (the browser API's `bufferedAmount`).
    pub fn buffered_amount(&self) -> usize {
        self.shared.total()
    }

    /// The connection state, as last published by the connection task.
    pub fn ready_state(&self) -> ReadyState {
        self.shared.state()
    }

    /// Whether messages can still be sent.
    pub fn is_open(&self) -> bool {
        self.shared.state() == ReadyState::Open
    }

    /// The agreed subprotocol, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.shared.protocol.as_deref()
    }

    /// `"hybi-13"`.
    pub fn version(&self) -> &'static str {
        "hybi-13"
    }
}
