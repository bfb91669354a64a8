//! The write side of [`WebSocketStream`]: sends (waiting above the limit, queued whole),
//! [`Reply`] for events lent by `recv`, large data messages written straight from the
//! payload (the [`Outbox`] keeps what the transport has not taken), and the gathered writes
//! of the driver's output.

use std::borrow::Cow;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use ::tokio::io::{AsyncRead, AsyncWrite};

use super::read::Slot;
use super::{DIRECT_MIN, Phase, SPARE_MAX, WRITE_PARTS, WebSocketStream, not_open};
use crate::protocol::driver::{Driver, Message, MessageType, ReadyState, Role, SendToken};
use crate::protocol::error::{Error, UsageError};
use crate::protocol::frame::{FrameHeader, MAX_HEADER_LEN, OpCode, encode_header};

/// Answers to an event from [`WebSocketStream::recv`], queued while the event still
/// borrows the read buffer. Each `send*` queues one whole frame without waiting; the
/// frames go out once the stream needs input again (see [`WebSocketStream::recv`] for
/// when, and for how backpressure applies), except that a large data message with
/// nothing queued before it is written at once, straight from the payload, as far as the
/// transport takes it. Fails with [`UsageError::NotOpen`] once closing.
#[derive(Debug)]
pub struct Reply<'a, S> {
    pub(super) sending: Sending<'a, S>,
    pub(super) open: bool,
}

impl<S: AsyncWrite + Unpin> Reply<'_, S> {
    pub(super) fn queue(&mut self, data: Data<'_>) -> Result<(), Error> {
        if !self.open {
            return Err(not_open());
        }
        // No task waits on this write: a transport that would block leaves the frame to
        // the driver, written on the stream's next poll (which registers the real waker).
        let mut cx = Context::from_waker(Waker::noop());
        self.sending.data(&mut cx, data)
    }

    /// Queues a message as it came: text as text, binary as binary.
    pub fn send_message(&mut self, message: &Message<'_>) -> Result<(), Error> {
        self.queue(Data::of(message))
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: &str) -> Result<(), Error> {
        self.queue(Data::Text(text))
    }

    /// Queues a binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), Error> {
        self.queue(Data::Binary(data))
    }

    /// Queues `data` as `kind` (see [`WebSocketStream::send`]).
    pub fn send(&mut self, data: &[u8], kind: MessageType) -> Result<(), Error> {
        match kind {
            MessageType::Text | MessageType::Binary => self.queue(Data::typed(data, kind)?),
            _ if !self.open => Err(not_open()),
            _ => self.sending.driver.send(data, kind).map(drop),
        }
    }
}

/// A data message's payload.
#[derive(Clone, Copy)]
pub(super) enum Data<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

impl<'a> Data<'a> {
    pub(super) fn of(message: &'a Message<'_>) -> Data<'a> {
        match message {
            Message::Text(t) => Data::Text(t),
            Message::Binary(b) => Data::Binary(b),
        }
    }

    /// `data` as text (checked) or binary.
    pub(super) fn typed(data: &'a [u8], kind: MessageType) -> Result<Data<'a>, Error> {
        Ok(match kind {
            MessageType::Text => {
                Data::Text(simdutf8::basic::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?)
            }
            _ => Data::Binary(data),
        })
    }

    pub(super) fn bytes(self) -> &'a [u8] {
        match self {
            Data::Text(t) => t.as_bytes(),
            Data::Binary(b) => b,
        }
    }
}

/// A frame written around the driver that the transport has not taken all of yet: it
/// goes out before anything the driver queued after it.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    pub(super) bytes: Vec<u8>,
    pub(super) pos: usize,
    /// Bytes went out since the last flush.
    pub(super) unflushed: bool,
}

impl Outbox {
    pub(super) fn len(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.bytes.len() {
            self.pos = 0;
            self.bytes.clear();
            if self.bytes.capacity() > SPARE_MAX {
                self.bytes = Vec::new();
            }
        }
    }
}

/// The write side as a send sees it.
#[derive(Debug)]
pub(super) struct Sending<'a, S> {
    pub(super) io: &'a mut S,
    pub(super) driver: &'a mut Driver,
    pub(super) outbox: &'a mut Outbox,
}

impl<S: AsyncWrite + Unpin> Sending<'_, S> {
    /// Sends a data message: written straight from the payload when that is safe and
    /// worth it, otherwise queued on the driver (a copy into its output).
    pub(super) fn data(&mut self, cx: &mut Context<'_>, data: Data<'_>) -> Result<(), Error> {
        if self.write_direct(cx, data) {
            return Ok(());
        }
        match data {
            Data::Text(t) => self.driver.send_text(t),
            Data::Binary(b) => self.driver.send_binary(b),
        }
        .map(drop)
    }

    /// A server's large data frame with nothing queued before it and no compression agreed:
    /// header and payload in one gathered write, with no copy into the driver's output; the part the transport
    /// does not take is kept in the outbox. False (nothing written) when not eligible or
    /// the transport would block or failed (the driver then queues the frame, and the
    /// stream meets the failure on its next write).
    pub(super) fn write_direct(&mut self, cx: &mut Context<'_>, data: Data<'_>) -> bool {
        let payload = data.bytes();
        // Not with permessage-deflate agreed: the driver compresses the message.
        if payload.len() < DIRECT_MIN
            || self.driver.role() != Role::Server
            || self.driver.ready_state() != ReadyState::Open
            || self.driver.buffered_amount() != 0
            || self.outbox.len() != 0
            || !self.io.is_write_vectored()
            || self.driver.deflate_params().is_some()
        {
            return false;
        }
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: match data {
                Data::Text(_) => OpCode::Text,
                Data::Binary(_) => OpCode::Binary,
            },
            mask: None,
            payload_len: payload.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let h = encode_header(&mut head, &header);
        let parts = [IoSlice::new(&head[..h]), IoSlice::new(payload)];
        let n = match Pin::new(&mut *self.io).poll_write_vectored(cx, &parts) {
            Poll::Ready(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        self.outbox.unflushed = true;
        if n < h {
            self.outbox.bytes.extend_from_slice(&head[n..h]);
            self.outbox.bytes.extend_from_slice(payload);
        } else if n < h + payload.len() {
            self.outbox.bytes.extend_from_slice(&payload[n - h..]);
        }
        true
    }
}

/// An owned message's buffer becomes the spare, for the next received message.
pub(super) fn recycle(message: Message<'_>, spare: &mut Vec<u8>) {
    let buffer = match message {
        Message::Binary(Cow::Owned(v)) => v,
        Message::Text(Cow::Owned(s)) => s.into_bytes(),
        _ => return,
    };
    if buffer.capacity() <= SPARE_MAX && buffer.capacity() > spare.capacity() {
        *spare = buffer;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketStream<S> {
    /// Writes the pending output until the transport would block; then flushes. While the
    /// connection is open, output left waiting on a full transport starts (or keeps) the
    /// write timeout's clock, and the timer is armed for it.
    pub(super) fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let before = self.unwritten();
        // A frame written straight from its payload went out since the last look.
        let went_direct = self.outbox.unflushed;
        let poll = self.poll_write_all(cx);
        if self.phase == Phase::Open {
            // Or the transport woke a flush of what its own buffer holds (TLS): its
            // socket took bytes.
            let progressed =
                went_direct || self.unwritten() < before || self.flush_watch.take_woken();
            self.stall.update(progressed, poll.is_pending(), super::now);
            if progressed {
                self.progress_marks = self.progress_marks.wrapping_add(1);
            }
            // Armed unless an earlier deadline is (its wake-up runs the deadlines, which
            // arm the next); firing that one here would leave it unhandled.
            if let Some(by) = self.stall.deadline(self.write_timeout)
                && self.armed.is_none_or(|armed| armed > by)
                && self.poll_deadline(cx, by)
            {
                // Already past: the next poll's deadlines fail the connection.
                cx.waker().wake_by_ref();
            }
        }
        poll
    }

    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if std::mem::take(&mut self.outbox.unflushed) {
            self.flushed = false;
        }
        // The receive loop asks after every event; most asks find everything written.
        if self.flushed && self.unwritten() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut parts = [IoSlice::new(&[]); WRITE_PARTS];
            // A frame written around the driver goes first.
            let direct = self.outbox.len();
            let mut k = 0;
            if direct > 0 {
                parts[0] = IoSlice::new(&self.outbox.bytes[self.outbox.pos..]);
                k = 1;
            }
            k += self.driver.pending_output_vectored(&mut parts[k..]);
            if k == 0 || parts[..k].iter().all(|p| p.is_empty()) {
                break;
            }
            let io = Pin::new(&mut self.io);
            let written = if k > 1 && io.is_write_vectored() {
                io.poll_write_vectored(cx, &parts[..k])
            } else {
                io.poll_write(cx, &parts[0])
            };
            match ready!(written) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    let from_outbox = n.min(direct);
                    self.outbox.consume(from_outbox);
                    self.driver.consume_output(n - from_outbox);
                    self.flushed = false;
                    self.progressed = true;
                    // Everything went (the usual case): no second look for more.
                    if self.unwritten() == 0 {
                        break;
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !self.flushed {
            if let Poll::Ready(flushed) = Pin::new(&mut self.io).poll_flush(cx) {
                flushed?;
                self.flushed = true;
            } else if self.phase == Phase::Open && ::tokio::task::coop::has_budget_remaining() {
                // Only the transport's own buffer holds output now: flush again with a
                // waker that notes the transport's wake-up (see `FlushWatch`). Not with the
                // task's coop budget spent: tokio then answers `Pending` and wakes the
                // waker itself (a forced yield), which is no progress of the transport.
                let io = &mut self.io;
                ready!(
                    self.flush_watch
                        .watch(cx, |watched| Pin::new(io).poll_flush(watched))
                )?;
                self.flushed = true;
            } else {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what the transport takes now; a failure ends the connection.
    pub(super) fn poll_write_best_effort(&mut self, cx: &mut Context<'_>) {
        if self.writing
            && let Poll::Ready(Err(e)) = self.poll_write_out(cx)
        {
            self.write_failed(e);
        }
    }

    /// Waits until the unwritten output is at or under the limit (writing meanwhile), or
    /// fails once the connection can no longer send.
    pub(crate) fn poll_send_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            self.note_state();
            if !self.can_send() {
                return Poll::Ready(Err(not_open()));
            }
            if self.unwritten() <= self.limit {
                return Poll::Ready(Ok(()));
            }
            self.poll_timers(cx);
            // A deadline may have closed the connection (an idle close, a dropped peer):
            // fail now, not at the next deadline's wake-up.
            self.note_state();
            if !self.writing || !self.can_send() {
                return Poll::Ready(Err(not_open()));
            }
            match ready!(self.poll_write_out(cx)) {
                Ok(()) => {}
                Err(e) => self.write_failed(e),
            }
            if self.driver.ready_state() == ReadyState::Connecting && self.held.is_none() {
                // A client handed over still connecting: what it queued waits for the
                // server's answer, which only a read brings, and the caller holds the
                // stream. Read it here; its event (`Open`, or the handshake's failure)
                // comes out of the next `next`/`recv` first.
                match ready!(self.poll_next_slot(cx, false)) {
                    Some(Slot::Owned(event)) => self.held = Some(event),
                    Some(Slot::Borrowed(..) | Slot::WholeText) => {
                        unreachable!("an owned parse hands out no ranges")
                    }
                    None => return Poll::Ready(Err(not_open())),
                }
            }
        }
    }

    pub(super) fn can_send(&self) -> bool {
        self.phase == Phase::Open
            && self.writing
            && matches!(
                self.driver.ready_state(),
                ReadyState::Connecting | ReadyState::Open
            )
    }

    /// Queues one frame with `queue` once the output is under the limit (data frames) or at
    /// once (control frames), then writes what the transport takes without waiting.
    pub(super) fn poll_submit<F>(
        &mut self,
        cx: &mut Context<'_>,
        waits: bool,
        queue: &mut Option<F>,
    ) -> Poll<Result<(), Error>>
    where
        F: FnOnce(&mut Sending<'_, S>, &mut Vec<u8>, &mut Context<'_>) -> Result<(), Error>,
    {
        if waits {
            ready!(self.poll_send_ready(cx))?;
        } else {
            self.note_state();
            if !self.can_send() {
                return Poll::Ready(Err(not_open()));
            }
        }
        let queue = queue.take().expect("polled after completion");
        let mut sending = Sending {
            io: &mut self.io,
            driver: &mut self.driver,
            outbox: &mut self.outbox,
        };
        queue(&mut sending, &mut self.spare, cx)?;
        self.note_state();
        self.poll_write_best_effort(cx);
        Poll::Ready(Ok(()))
    }

    pub(super) async fn submit<F>(&mut self, waits: bool, queue: F) -> Result<(), Error>
    where
        F: FnOnce(&mut Sending<'_, S>, &mut Vec<u8>, &mut Context<'_>) -> Result<(), Error>,
    {
        let mut queue = Some(queue);
        poll_fn(|cx| self.poll_submit(cx, waits, &mut queue)).await
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: impl AsRef<str>) -> Result<(), Error> {
        self.submit(true, |s, _, cx| s.data(cx, Data::Text(text.as_ref())))
            .await
    }

    /// Sends a binary message.
    pub async fn send_binary(&mut self, data: impl AsRef<[u8]>) -> Result<(), Error> {
        self.submit(true, |s, _, cx| s.data(cx, Data::Binary(data.as_ref())))
            .await
    }

    /// Sends a message as it came: text as text, binary as binary. A received message
    /// handed back here gives its buffer to the next received one.
    pub async fn send_message(&mut self, message: Message<'_>) -> Result<(), Error> {
        self.submit(true, |s, spare, cx| {
            s.data(cx, Data::of(&message))?;
            recycle(message, spare);
            Ok(())
        })
        .await
    }

    /// Sends `data` as `kind` (the seed's `send`): text must be UTF-8, pings and pongs at
    /// most 125 bytes, `Close(code)` takes the reason as `data`.
    pub async fn send(&mut self, data: impl AsRef<[u8]>, kind: MessageType) -> Result<(), Error> {
        let data = data.as_ref();
        match kind {
            MessageType::Text | MessageType::Binary => {
                let data = Data::typed(data, kind)?;
                self.submit(true, |s, _, cx| s.data(cx, data)).await
            }
            _ => {
                self.submit(false, |s, _, _| s.driver.send(data, kind).map(drop))
                    .await
            }
        }
    }

    /// Sends a ping (at most 125 bytes); the pong arrives as [`Event::Pong`](crate::Event::Pong).
    pub async fn send_ping(&mut self, payload: impl AsRef<[u8]>) -> Result<(), Error> {
        self.submit(false, |s, _, _| {
            s.driver.send_ping(payload.as_ref()).map(drop)
        })
        .await
    }

    /// Sends an unsolicited pong (a heartbeat that needs no answer).
    pub async fn send_pong(&mut self, payload: impl AsRef<[u8]>) -> Result<(), Error> {
        self.submit(false, |s, _, _| {
            s.driver.send_pong(payload.as_ref()).map(drop)
        })
        .await
    }

    /// Starts the close handshake (the seed's `close-connection`): the close frame goes out
    /// after everything queued before it; [`Event::Close`](crate::Event::Close) comes out of
    /// [`WebSocketStream::next`] when the peer answers (or after
    /// [`Config::close_timeout`](crate::tokio::Config::close_timeout), with 1006).
    pub async fn close_connection(&mut self, code: u16, reason: &str) -> Result<(), Error> {
        self.submit(false, |s, _, _| {
            s.driver.close_connection(code, reason).map(drop)
        })
        .await
    }

    /// Writes everything queued so far and flushes the transport. Fails if the transport
    /// failed (the error also comes out of [`WebSocketStream::next`]), if a client's
    /// handshake was refused (what was queued behind it is dropped), or if what is left
    /// cannot go out by the close timeout once the `Close` event was handed out (the
    /// deadline the stream's end keeps too).
    pub async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.poll_flush_all(cx)).await
    }

    pub(crate) fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if self.phase == Phase::Open {
                self.note_state();
            }
            if !self.writing {
                // Written and flushed, or it never will be (a transport that holds output
                // of its own, TLS, may still have been flushing it when the connection
                // failed).
                return Poll::Ready(if self.unwritten() == 0 && self.flushed {
                    Ok(())
                } else {
                    Err(not_open())
                });
            }
            match self.poll_write_out(cx) {
                Poll::Ready(Err(e)) => {
                    let err = Error::Io(io::Error::new(e.kind(), e.to_string()));
                    self.write_failed(e);
                    return Poll::Ready(Err(err));
                }
                Poll::Ready(Ok(())) => {
                    if self.driver.handshake_error().is_some() {
                        // A client handed over still connecting whose handshake failed:
                        // what was queued behind it was dropped, never written.
                        return Poll::Ready(Err(not_open()));
                    }
                    if self.driver.ready_state() != ReadyState::Connecting
                        || self.unwritten() == 0
                        || self.held.is_some()
                    {
                        return Poll::Ready(Ok(()));
                    }
                    // A client handed over still connecting: its frames wait behind the
                    // handshake, whose answer only a read brings (as in a send waiting on
                    // the limit). Its event comes out of the next `next`/`recv` first.
                    match ready!(self.poll_next_slot(cx, false)) {
                        Some(Slot::Owned(event)) => self.held = Some(event),
                        Some(Slot::Borrowed(..) | Slot::WholeText) => {
                            unreachable!("an owned parse hands out no ranges")
                        }
                        None => return Poll::Ready(Err(not_open())),
                    }
                }
                Poll::Pending => {
                    match self.phase {
                        Phase::Open => {}
                        Phase::Ending(_) => {
                            // `Close` was handed out: what is left has until the deadline
                            // `next` lingers by (the close timeout) to go; a peer that
                            // reads nothing would hold the flush for good.
                            let close = self.timer_config.close;
                            let deadline = *self.linger_by.get_or_insert_with(|| {
                                crate::instant::deadline_after(super::now(), close)
                            });
                            if !self.poll_deadline(cx, deadline) {
                                return Poll::Pending;
                            }
                            self.writing = false;
                            continue;
                        }
                        Phase::Done => {
                            self.writing = false;
                            continue;
                        }
                    }
                    // The flush waits on a peer that does not read (axum's `send`,
                    // `SinkExt::send`, `Sink::close`): the deadlines run, so the idle
                    // keepalive and the close timeout end it, as they end a `send` waiting
                    // on the limit. Not while the flush completes: an app that only sends
                    // reads no input, so its peer's pongs go unheard, and the keepalive
                    // would close a live peer.
                    self.poll_timers(cx);
                    self.note_state();
                    if self.writing {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Queues one frame with `queue` without waiting (a `Sink::start_send`).
    #[cfg_attr(not(feature = "hyper"), allow(dead_code))]
    pub(crate) fn start_send_with(
        &mut self,
        queue: impl FnOnce(&mut Driver) -> Result<SendToken, Error>,
    ) -> Result<(), Error> {
        if !self.can_send() {
            return Err(not_open());
        }
        queue(&mut self.driver)?;
        self.note_state();
        Ok(())
    }
}
