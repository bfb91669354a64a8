//! [`WsSender`]: the cloneable sending half.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use ::tokio::sync::{mpsc, oneshot};

use super::shared::{Ack, Command, Queued, Shared};
use crate::protocol::driver::{Message, MessageType, ReadyState};
use crate::protocol::error::{Error, UsageError, is_valid_close_code};

/// The sending half of a connection: `Clone + Send + Sync`, for any number of tasks.
///
/// Every `send*` queues one whole message and is cancel-safe (see the module docs). It
/// fails with [`UsageError::NotOpen`] once the connection is closing or closed; a message
/// accepted just before the peer closed is dropped silently, as on the reactor's `Sender`.
#[derive(Debug, Clone)]
pub struct WsSender {
    pub(super) commands: mpsc::Sender<Queued>,
    pub(super) shared: Arc<Shared>,
}

fn not_open() -> Error {
    UsageError::NotOpen.into()
}

/// Checks `data` for a message of type `kind` and makes the command.
fn command(data: Vec<u8>, kind: MessageType) -> Result<Command, Error> {
    let control = |payload: Vec<u8>| {
        if payload.len() > 125 {
            return Err(Error::from(UsageError::ControlPayloadTooLong));
        }
        Ok(payload)
    };
    let text = |data: Vec<u8>| String::from_utf8(data).map_err(|_| UsageError::InvalidUtf8);
    Ok(match kind {
        MessageType::Text => Command::Text(text(data)?),
        MessageType::Binary => Command::Binary(data),
        MessageType::Ping => Command::Ping(control(data)?),
        MessageType::Pong => Command::Pong(control(data)?),
        MessageType::Close(code) => close_command(code, text(data)?)?,
    })
}

fn close_command(code: u16, reason: String) -> Result<Command, Error> {
    if !is_valid_close_code(code) {
        return Err(UsageError::InvalidCloseCode(code).into());
    }
    if reason.len() > 123 {
        return Err(UsageError::CloseReasonTooLong.into());
    }
    Ok(Command::Close(code, reason))
}

impl WsSender {
    /// Waits until `ready` holds, or fails once the connection can no longer send.
    async fn wait_until(&self, ready: impl Fn(&Shared) -> bool) -> Result<(), Error> {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if !self.shared.takes_sends() {
                return Err(not_open());
            }
            if ready(&self.shared) {
                return Ok(());
            }
            notified.await;
        }
    }

    async fn submit(&self, command: Command, ack: Option<Ack>) -> Result<(), Error> {
        // Control frames do not wait on the byte limit.
        let cost = command.cost();
        let control = command.is_control();
        loop {
            self.wait_until(|s| control || s.total() <= s.limit).await?;
            let permit = self.commands.reserve().await.map_err(|_| not_open())?;
            // Checked again and counted in one step, now that nothing awaits any more:
            // of the senders that found room together (or while waiting for a slot), one
            // takes it and the others wait again, so the output goes over the limit by at
            // most one message. The message is queued whole or not at all. The state too:
            // the peer's close may have been read while this send waited for a slot.
            if !self.shared.takes_sends() {
                return Err(not_open());
            }
            let counted = if control {
                self.shared.count(cost);
                true
            } else {
                self.shared.try_count(cost)
            };
            if counted {
                let close = matches!(command, Command::Close(..));
                permit.send((command, ack));
                if close {
                    self.shared.close_queued.store(true, Ordering::Release);
                }
                return Ok(());
            }
        }
    }

    /// Sends `data` as `kind` (the seed's `send`): text must be UTF-8, pings and pongs at
    /// most 125 bytes, `Close(code)` takes the reason as `data`.
    pub async fn send(&self, data: impl Into<Vec<u8>>, kind: MessageType) -> Result<(), Error> {
        self.submit(command(data.into(), kind)?, None).await
    }

    /// Sends like [`WsSender::send`] and returns, once the message is queued, a [`Receipt`]
    /// that resolves when its frame has been handed to the transport (the seed's
    /// `(send ws data :callback fn)`, the tokio way).
    ///
    /// "Handed to the transport" is the driver's [`SendToken`](crate::SendToken) sense:
    /// every byte of the frame was accepted by the stream's `write` (for a buffering stream
    /// such as TLS: by its buffer; the flush follows). The receipt fails with
    /// [`UsageError::NotOpen`] if the connection ended first (the frame was dropped or the
    /// transport failed before it got out). Waiting on it is optional: dropping it changes
    /// nothing about the send.
    ///
    /// Cost: one `tokio::sync::oneshot` channel per confirmed send (an allocation) and a
    /// queue entry in the connection task until the frame is written; other sends pay
    /// nothing. Cancel-safe like every `send*`.
    ///
    /// ```no_run
    /// # async fn demo(tx: websocket_driver::tokio::WsSender) -> Result<(), websocket_driver::Error> {
    /// use websocket_driver::MessageType;
    /// let receipt = tx.send_with_receipt("report", MessageType::Text).await?; // queued
    /// receipt.await?; // written to the socket
    /// # Ok(()) }
    /// ```
    pub async fn send_with_receipt(
        &self,
        data: impl Into<Vec<u8>>,
        kind: MessageType,
    ) -> Result<Receipt, Error> {
        let command = command(data.into(), kind)?;
        let (tx, rx) = oneshot::channel();
        self.submit(command, Some(Ack::Written(tx))).await?;
        Ok(Receipt(rx))
    }

    /// Sends a ping (at most 125 bytes) and returns, once it is queued, a [`Receipt`] that
    /// resolves when a pong with the same payload arrives (the seed's
    /// `(send-ping ws msg fn)`). The pong also comes out of the receiver as [`Event::Pong`].
    ///
    /// Pongs are matched by payload, oldest ping first, so give concurrent pings distinct
    /// payloads; a pong also answers every ping sent before its own (RFC 6455 lets a peer
    /// answer only the latest of several pings). The receipt fails with [`UsageError::NotOpen`]
    /// when the connection closes before the pong. Pongs are read like all input: while
    /// the connection is open, only as the [`WsReceiver`](super::WsReceiver) asks for
    /// events, so keep polling it.
    ///
    /// Cost: one `tokio::sync::oneshot` channel and a copy of the payload per ping, held by
    /// the connection task until the pong or the close (a dropped receipt's ping is kept as
    /// a placeholder, the newest 16 of those, so that its late pong answers it and not a
    /// later ping with the same payload).
    ///
    /// ```no_run
    /// # async fn demo(tx: websocket_driver::tokio::WsSender) -> Result<(), websocket_driver::Error> {
    /// let pong = tx.ping("are you there").await?;
    /// match tokio::time::timeout(std::time::Duration::from_secs(5), pong).await {
    ///     Ok(Ok(())) => println!("pong"),
    ///     Ok(Err(closed)) => println!("closed first: {closed}"),
    ///     Err(_) => println!("no pong within 5 s"),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// [`Event::Pong`]: crate::Event::Pong
    pub async fn ping(&self, payload: impl Into<Vec<u8>>) -> Result<Receipt, Error> {
        let command = command(payload.into(), MessageType::Ping)?;
        let (tx, rx) = oneshot::channel();
        self.submit(command, Some(Ack::Pong(tx))).await?;
        Ok(Receipt(rx))
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
        self.submit(Command::Text(text.into()), None).await
    }

    /// Sends a binary message.
    pub async fn send_binary(&self, data: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.submit(Command::Binary(data.into()), None).await
    }

    /// Sends a ping (at most 125 bytes); the pong arrives as [`Event::Pong`](crate::Event::Pong).
    /// To wait for it, use [`WsSender::ping`].
    pub async fn send_ping(&self, payload: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.send(payload, MessageType::Ping).await
    }

    /// Sends an unsolicited pong (a heartbeat that needs no answer).
    pub async fn send_pong(&self, payload: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.send(payload, MessageType::Pong).await
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
        self.submit(close_command(code, reason.into())?, None).await
    }

    /// Waits until everything queued so far (by any sender) has been written to the
    /// stream; what is queued after the call is not waited for. Fails if the connection
    /// ended with bytes unwritten, or a message accepted earlier was refused when the
    /// connection task came to it (the connection had closed meanwhile).
    ///
    /// A marker goes through the command queue behind what was queued before it (taking
    /// a slot there, so it may wait for one); cancel-safe: a dropped flush leaves the
    /// marker, which the task completes unheard.
    pub async fn flush(&self) -> Result<(), Error> {
        let settled = || {
            if self.shared.dropped.load(Ordering::Acquire) || self.shared.total() != 0 {
                Err(not_open())
            } else {
                Ok(())
            }
        };
        if self.shared.dropped.load(Ordering::Acquire) {
            return Err(not_open());
        }
        if self.shared.total() == 0 {
            return Ok(());
        }
        let Ok(permit) = self.commands.reserve().await else {
            // The task has ended: whatever was queued is written by now or never.
            return settled();
        };
        let (done, written) = oneshot::channel();
        permit.send((Command::Flush, Some(Ack::Written(done))));
        match written.await {
            Ok(()) if !self.shared.dropped.load(Ordering::Acquire) => Ok(()),
            _ => Err(not_open()),
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

    /// Whether messages can still be sent: the connection is connecting or open and no
    /// close has been queued (sends fail with [`UsageError::NotOpen`] otherwise).
    pub fn is_open(&self) -> bool {
        self.shared.takes_sends()
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

/// Resolves when what it confirms has happened: a frame handed to the transport
/// ([`WsSender::send_with_receipt`]) or the matching pong received ([`WsSender::ping`]).
/// Fails with [`UsageError::NotOpen`] if the connection ended first.
#[derive(Debug)]
#[must_use = "a receipt does nothing unless awaited (`send` needs none)"]
pub struct Receipt(oneshot::Receiver<()>);

impl Future for Receipt {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().0)
            .poll(cx)
            .map(|done| done.map_err(|_| not_open()))
    }
}
