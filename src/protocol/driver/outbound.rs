//! The outbound half of [`Driver`]: the commands that queue frames, and the output buffer
//! the transport drains.

use std::borrow::Cow;

use super::{Driver, Message, MessageType, ReadyState, Role, SendToken};
use crate::protocol::error::{Error, UsageError, is_valid_close_code};
use crate::protocol::frame::{FrameRef, MAX_CONTROL_PAYLOAD, OpCode, write_frame, write_header};
use crate::protocol::mask::{apply_mask, random_mask};

/// From this many payload bytes up, [`Driver::send_message_owned`] queues an owned payload
/// as it is instead of copying it into the output. Below it the copy into the (pooled,
/// cache-warm) output buffer costs about as much as a separate part of a gathered write.
pub const OWNED_MIN: usize = 64 * 1024;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary, so
/// a text cut to fit (a close reason in its frame, a proxy's challenges in an error) stays
/// valid UTF-8.
pub(crate) fn cut_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Output waiting (bytes) from which a new pong replaces an unsent one at the end of the
/// output instead of joining it (see `Driver::answer_ping`).
pub(super) const PONGS_COALESCE_AT: usize = 16 * 1024;

/// A fresh mask key for a client's frame; none for a server's.
/// Whether `data` can be sent as `kind` at all, whatever the connection's state: text
/// and a close reason are UTF-8, a ping's or pong's payload at most 125 bytes, a close
/// code one that may be sent with a reason of at most 123 bytes. For senders that queue
/// a message for later (another thread's `Sender`), which must refuse it while someone
/// can still hear why.
pub(crate) fn check_sendable(data: &[u8], kind: MessageType) -> Result<(), UsageError> {
    match kind {
        MessageType::Text => simdutf8::basic::from_utf8(data)
            .map(drop)
            .map_err(|_| UsageError::InvalidUtf8),
        MessageType::Binary => Ok(()),
        MessageType::Ping | MessageType::Pong if data.len() > MAX_CONTROL_PAYLOAD => {
            Err(UsageError::ControlPayloadTooLong)
        }
        MessageType::Ping | MessageType::Pong => Ok(()),
        MessageType::Close(code) if !is_valid_close_code(code) => {
            Err(UsageError::InvalidCloseCode(code))
        }
        MessageType::Close(_) if data.len() > MAX_CONTROL_PAYLOAD - 2 => {
            Err(UsageError::CloseReasonTooLong)
        }
        MessageType::Close(_) => std::str::from_utf8(data)
            .map(drop)
            .map_err(|_| UsageError::InvalidUtf8),
    }
}

fn frame_mask(role: Role) -> Option<[u8; 4]> {
    match role {
        Role::Client => Some(random_mask()),
        Role::Server => None,
    }
}

impl Driver {
    // ----- commands -----

    pub(super) fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) -> SendToken {
        let mask = frame_mask(self.role);
        write_frame(&mut self.out, opcode, payload, mask);
        SendToken(self.frames_appended())
    }

    /// Queues the pong for a received ping. RFC 6455 §5.5.3 lets an endpoint answer only the
    /// most recent of the pings it has not answered yet: once [`PONGS_COALESCE_AT`] bytes of
    /// output wait, a pong of ours still unsent at the end of the output is replaced by this
    /// one. So a peer that pings without reading grows our output to that much and no more,
    /// not by a pong per ping (the client's masked pong of an empty ping is three times its
    /// size); below it every ping gets its own pong, as peers (and Autobahn's 2.10) expect.
    pub(super) fn answer_ping(&mut self, payload: &[u8]) {
        let appended = self.frames_appended();
        if self.buffered_amount() >= PONGS_COALESCE_AT
            && let Some((start, len)) = self.occasional.as_deref().and_then(|o| o.pong)
        {
            let nothing_after = appended == start + u64::from(len)
                && self
                    .shared
                    .as_deref()
                    .is_none_or(|q| q.last_after().is_none_or(|after| after <= start));
            if nothing_after && self.frames_written <= start {
                self.out.truncate(self.out.len() - usize::from(len));
                self.push_frame(OpCode::Pong, payload);
                let len = self.frames_appended() - start;
                self.occasional().pong = Some((start, len as u8));
                return;
            }
        }
        // Only a pong behind other output can still be unsent when the next ping comes.
        let behind = self.buffered_amount() > 0;
        self.push_frame(OpCode::Pong, payload);
        if behind {
            let len = self.frames_appended() - appended;
            self.occasional().pong = Some((appended, len as u8));
        } else {
            self.forget_pong();
        }
    }

    /// Drops the record of the last automatic pong (written, or no longer last).
    pub(super) fn forget_pong(&mut self) {
        if let Some(occasional) = self.occasional.as_deref_mut()
            && occasional.pong.take().is_some()
        {
            self.release_occasional();
        }
    }

    /// Queues a data message: compressed (RSV1) when permessage-deflate is agreed and the
    /// message is worth it, plain otherwise.
    pub(super) fn push_data(&mut self, opcode: OpCode, payload: &[u8]) -> SendToken {
        if let Some(deflate) = self.agreed.as_deref_mut().and_then(|a| a.deflate.as_mut()) {
            let mask = frame_mask(self.role);
            if deflate
                .write_frame(&mut self.out, opcode, payload, mask)
                .is_some()
            {
                return SendToken(self.frames_appended());
            }
        }
        self.push_frame(opcode, payload)
    }

    fn writable(&self) -> Result<(), Error> {
        match self.state {
            ReadyState::Connecting | ReadyState::Open => Ok(()),
            _ => Err(UsageError::NotOpen.into()),
        }
    }

    /// Sends `data` as the given type (the seed's `send` with `:type` and `:code`).
    /// Queued while connecting; an error once closing or closed.
    pub fn send(&mut self, data: &[u8], kind: MessageType) -> Result<SendToken, Error> {
        match kind {
            MessageType::Text => {
                let text = simdutf8::basic::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                self.send_text(text)
            }
            MessageType::Binary => self.send_binary(data),
            MessageType::Ping => self.send_ping(data),
            MessageType::Pong => self.send_pong(data),
            MessageType::Close(c) => {
                let reason = std::str::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                self.close_connection(c, reason)
            }
        }
    }

    /// Sends a received message back as it came: text as text, binary as binary.
    pub fn send_message(&mut self, message: &Message<'_>) -> Result<SendToken, Error> {
        match message {
            Message::Text(t) => self.send_text(t),
            Message::Binary(b) => self.send_binary(b),
        }
    }

    /// Sends a message taken by value. An owned payload of [`OWNED_MIN`] bytes or more (a
    /// reassembled message, a buffer the application built) is not copied: its header goes
    /// into the output and the payload is queued behind it by ownership, written from its
    /// own allocation in the same gathered write and freed once written. A client masks it
    /// in place. Borrowed or shorter payloads, sends while connecting, and connections with
    /// permessage-deflate take [`Driver::send_message`]'s copying path. The token is due
    /// once the whole message, payload included, is written.
    pub fn send_message_owned(&mut self, message: Message<'_>) -> Result<SendToken, Error> {
        let (opcode, mut payload) = match message {
            Message::Text(Cow::Owned(text)) => (OpCode::Text, text.into_bytes()),
            Message::Binary(Cow::Owned(data)) => (OpCode::Binary, data),
            borrowed => return self.send_message(&borrowed),
        };
        self.writable()?;
        if payload.len() < OWNED_MIN || self.state != ReadyState::Open || self.deflate().is_some() {
            return Ok(self.push_data(opcode, &payload));
        }
        let mask = frame_mask(self.role);
        if let Some(mask) = mask {
            apply_mask(&mut payload, mask, 0);
        }
        write_header(&mut self.out, opcode, payload.len(), mask);
        self.queue_part(FrameRef::Owned(payload));
        Ok(SendToken(self.frames_appended()))
    }

    /// Queues a received message's payload to be sent back from the receive buffer it
    /// arrived in, at `start`, instead of copied into the output: its header goes into the
    /// output now, the payload once the transport hands the buffer over with
    /// [`Driver::hand_received`], which must happen before any output is taken (the
    /// reactor does both within one read). Only an open server connection without
    /// permessage-deflate sends this way (the frame goes out unmasked and uncompressed);
    /// returns `None` otherwise, queueing nothing.
    pub(crate) fn send_received(
        &mut self,
        opcode: OpCode,
        start: usize,
        len: usize,
    ) -> Option<SendToken> {
        if self.role != Role::Server || self.state != ReadyState::Open || self.deflate().is_some() {
            return None;
        }
        write_header(&mut self.out, opcode, len, None);
        self.queue_part(FrameRef::Received {
            buf: Vec::new(),
            start,
            len,
        });
        Some(SendToken(self.frames_appended()))
    }

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) -> Result<SendToken, Error> {
        self.writable()?;
        Ok(self.push_data(OpCode::Text, text.as_bytes()))
    }

    /// Sends a binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<SendToken, Error> {
        self.writable()?;
        Ok(self.push_data(OpCode::Binary, data))
    }

    /// Sends a ping. Match the pong with [`Event::Pong`](super::Event::Pong)'s payload (the
    /// closure API's `send_ping` does that for you).
    pub fn send_ping(&mut self, payload: &[u8]) -> Result<SendToken, Error> {
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(UsageError::ControlPayloadTooLong.into());
        }
        self.writable()?;
        Ok(self.push_frame(OpCode::Ping, payload))
    }

    /// Sends an unsolicited pong (a heartbeat that needs no reply).
    pub fn send_pong(&mut self, payload: &[u8]) -> Result<SendToken, Error> {
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(UsageError::ControlPayloadTooLong.into());
        }
        self.writable()?;
        Ok(self.push_frame(OpCode::Pong, payload))
    }

    /// Starts the close handshake (the seed's `close-connection`). While connecting, the
    /// connection closes at once with `Close(code, reason)` and nothing is sent. While open,
    /// a close frame is sent and the state becomes `Closing` until the peer answers.
    pub fn close_connection(&mut self, close_code: u16, reason: &str) -> Result<SendToken, Error> {
        if !is_valid_close_code(close_code) {
            return Err(UsageError::InvalidCloseCode(close_code).into());
        }
        if reason.len() > MAX_CONTROL_PAYLOAD - 2 {
            return Err(UsageError::CloseReasonTooLong.into());
        }
        match self.state {
            ReadyState::Connecting => {
                self.out
                    .truncate(self.out_pos + self.handshake_left as usize);
                self.stop();
                self.queue_close(close_code, reason.to_string());
                Ok(SendToken(self.frames_appended()))
            }
            ReadyState::Open => {
                let mut payload = Vec::with_capacity(2 + reason.len());
                payload.extend_from_slice(&close_code.to_be_bytes());
                payload.extend_from_slice(reason.as_bytes());
                let token = self.push_frame(OpCode::Close, &payload);
                self.state = ReadyState::Closing;
                // No message follows a close: the compressor is not needed while the peer
                // answers (its own stream stays for what it sends until then).
                if let Some(deflate) = self.deflate_mut() {
                    deflate.stop_compressing();
                }
                Ok(token)
            }
            ReadyState::Closing | ReadyState::Closed => Err(UsageError::NotOpen.into()),
        }
    }

    /// Ends the connection from this side without waiting for the peer: queues a close
    /// frame with `code` if the connection is open (the transport may not get to send it),
    /// stops reading and reports `Close(code, reason)` unless a close was reported already.
    /// For local policy decisions: timeouts, a peer that stopped reading, shutdown.
    ///
    /// A reason over 123 bytes is cut, on a character boundary, in the frame (the
    /// reported `Close` keeps it whole).
    pub fn abort(&mut self, close_code: u16, reason: &str) {
        if self.state == ReadyState::Open && is_valid_close_code(close_code) {
            let mut payload = close_code.to_be_bytes().to_vec();
            payload.extend_from_slice(
                cut_at_char_boundary(reason, MAX_CONTROL_PAYLOAD - 2).as_bytes(),
            );
            self.push_frame(OpCode::Close, &payload);
        }
        if self.state == ReadyState::Connecting {
            self.out
                .truncate(self.out_pos + self.handshake_left as usize);
        }
        self.stop();
        self.queue_close(close_code, reason.to_string());
    }

    // ----- output -----

    /// The position in the own byte stream after the last own byte queued: what is
    /// written plus what waits in the buffer behind the handshake (the buffer holds the
    /// handshake, then own frames; shared parts are not own bytes).
    #[inline]
    pub(super) fn frames_appended(&self) -> u64 {
        let pending = self.out.len() - self.out_pos - self.handshake_left as usize;
        self.frames_written + pending as u64
    }

    pub(super) fn releasable_end(&self) -> usize {
        if self.state == ReadyState::Connecting {
            self.out_pos + self.handshake_left as usize
        } else {
            self.out.len()
        }
    }

    /// Marks `n` of the driver's own bytes (no shared frame in between) as written.
    pub(super) fn consume_own(&mut self, n: usize) {
        assert!(
            n <= self.releasable_end() - self.out_pos,
            "consumed more than was pending"
        );
        self.out_pos += n;
        let handshake = n.min(self.handshake_left as usize);
        self.handshake_left -= handshake as u32;
        self.frames_written += (n - handshake) as u64;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            // Everything is written: a pong recorded as unsent no longer is.
            if self.occasional.is_some() {
                self.forget_pong();
            }
        } else if self.out_pos >= 64 * 1024 && self.out_pos * 2 >= self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Copies pending output into `buf`, marks it written, and returns how many bytes.
    pub fn poll_output(&mut self, buf: &mut [u8]) -> usize {
        let pending = self.pending_output();
        let n = pending.len().min(buf.len());
        buf[..n].copy_from_slice(&pending[..n]);
        self.consume_output(n);
        n
    }

    /// Bytes queued and not yet written (the browser API's `bufferedAmount`).
    #[inline]
    pub fn buffered_amount(&self) -> usize {
        self.out.len() - self.out_pos + self.shared.as_deref().map_or(0, |q| q.bytes())
    }

    /// Takes the output buffer when nothing is pending, so an idle connection holds none
    /// (a reactor returns it to its pool). The driver allocates anew if it must write.
    pub fn take_output_buffer(&mut self) -> Option<Vec<u8>> {
        if self.out_pos != self.out.len() || self.out.capacity() == 0 {
            return None;
        }
        self.out.clear();
        self.out_pos = 0;
        Some(std::mem::take(&mut self.out))
    }

    /// Whether the driver holds a buffer to write into (one it grew, or one from
    /// [`Driver::provide_output_buffer`]); [`Driver::take_output_buffer`] gives it up.
    pub fn has_output_buffer(&self) -> bool {
        self.out.capacity() != 0
    }

    /// Gives the driver an empty buffer (from a pool) to write into; ignored if the driver
    /// already has one.
    pub fn provide_output_buffer(&mut self, mut buf: Vec<u8>) {
        if self.out.capacity() == 0 {
            buf.clear();
            self.out = buf;
            self.out_pos = 0;
        }
    }

    /// A token that [`Driver::is_sent`] reports sent once everything queued so far (own
    /// frames, the handshake's too) has been handed to the transport: a flush's.
    #[cfg(feature = "tokio")]
    pub(crate) fn output_token(&self) -> SendToken {
        SendToken(self.frames_appended())
    }

    /// Whether the send identified by `token` has been handed to the transport.
    pub fn is_sent(&self, token: SendToken) -> bool {
        self.frames_written > token.0
            || (self.frames_written == token.0 && !self.owned_part_at(token.0))
    }

    /// Closed, with every queued byte written: the transport may close now.
    pub fn is_finished(&self) -> bool {
        self.state == ReadyState::Closed
            && self.pending_output().is_empty()
            && !self.has_queued_events()
    }
}
