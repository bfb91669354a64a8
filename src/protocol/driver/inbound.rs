//! The inbound half of [`Driver`]: the client's read of the handshake response, frame
//! parsing, message reassembly, control frames and failing the connection on a protocol
//! error.

use std::borrow::Cow;

use super::outbound::cut_at_char_boundary;
use super::{
    Driver, Event, Handshake, Message, Negotiated, REFUSED_BODY_MAX, REFUSED_CHUNKED_MAX,
    ReadyState, RefusedBody, Role,
};
use crate::protocol::deflate::{DeflateState, InflateError, compressed_limit_fragmented};
use crate::protocol::error::{Error, HandshakeError, ProtocolError, code, is_valid_close_code};
use crate::protocol::frame::{
    FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, Status, parse_header,
};
use crate::protocol::handshake::{Response, validate_response};
use crate::protocol::mask::apply_mask;
use crate::protocol::utf8::Utf8Validator;

#[derive(Debug, Clone, Copy)]
pub(super) enum Stage {
    /// Collecting a frame header; `len` bytes of it are in `buf`.
    Header { buf: [u8; MAX_HEADER_LEN], len: u8 },
    /// Reading the payload of `header`; `done` bytes of it are read.
    Payload { header: FrameHeader, done: u64 },
    /// Closed or failed: input is ignored.
    Stopped,
}

/// Whether a frame is a message by itself or a control frame: one that can be handed out
/// as it is, when its whole payload is in one read.
fn is_whole_frame(header: &FrameHeader) -> bool {
    let opcode = header.opcode;
    opcode.is_control() || (header.fin && opcode != OpCode::Continuation)
}

pub(super) const HEADER_START: Stage = Stage::Header {
    buf: [0; MAX_HEADER_LEN],
    len: 0,
};

/// A message being reassembled reserves the rest of its current frame at once when the
/// frame ends within this many bytes of the message's start; beyond, its buffer grows by
/// doubling from what arrived. So a peer that declares a frame and sends little makes a
/// connection reserve (not fill) at most this much.
pub const EAGER_RESERVE: usize = 1 << 20;

/// A data message being reassembled (fragmented, or one frame split across reads).
#[derive(Debug)]
pub(super) struct PartialMessage {
    text: bool,
    /// RSV1 on its first frame: its deflate data is inflated into `buf` as it arrives
    /// (`wire` counts it), so only the inflated message is held.
    compressed: bool,
    /// Frames after the first so far (each may carry a flush's overhead when compressed).
    continuations: u32,
    /// The message so far (inflated, if compressed).
    buf: Vec<u8>,
    /// Compressed: the deflate bytes received so far, which the wire limit bounds.
    wire: usize,
    /// Compressed: the buffer lent to the transport for deflate data, inflated from when
    /// it comes back (kept between loans).
    staging: Vec<u8>,
    utf8: Utf8Validator,
    /// `buf` is with the transport ([`Driver::lend_payload_buffer`]).
    lent: bool,
}

impl PartialMessage {
    fn new(header: &FrameHeader) -> Box<PartialMessage> {
        Box::new(PartialMessage {
            text: header.opcode == OpCode::Text,
            compressed: header.rsv != 0,
            continuations: 0,
            buf: Vec::new(),
            wire: 0,
            staging: Vec::new(),
            utf8: Utf8Validator::new(),
            lent: false,
        })
    }

    /// Inflates `piece` of this compressed message's deflate data onto the message (and
    /// counts it against the wire limit).
    fn inflate(
        &mut self,
        deflate: &mut DeflateState,
        piece: &[u8],
        max_length: usize,
    ) -> Result<(), ProtocolError> {
        self.wire += piece.len();
        deflate
            .inflate_piece(piece, &mut self.buf, max_length)
            .map_err(|e| inflate_failure(e, max_length))
    }

    /// Makes room for `more` bytes of a frame that has `remaining` (at least `more`) left,
    /// never past `max` (the message limit, which the header check guarantees the frame
    /// fits): the rest of the frame at once when it ends within [`EAGER_RESERVE`] (no
    /// copies as it grows); past that, doubling from what actually arrived, so a declared
    /// length is not trusted further. A message that already holds earlier fragments at
    /// least doubles too, so many small fragments cost amortized O(1) copying each, not a
    /// copy of the whole message per fragment (RFC 6455 §10.4).
    fn reserve(&mut self, more: usize, remaining: u64, max: usize) {
        let needed = self.buf.len() + more;
        if needed <= self.buf.capacity() {
            return;
        }
        let frame_end = self.buf.len() as u64 + remaining;
        let target = if frame_end <= EAGER_RESERVE as u64 {
            (frame_end as usize).max(self.buf.len() * 2)
        } else {
            needed.max(self.buf.len() * 2)
        }
        .min(max);
        self.buf.reserve_exact(target - self.buf.len());
    }
}

impl Driver {
    /// Feeds bytes read from the transport and returns `(consumed, event)`.
    ///
    /// With no event, all of `input` was consumed. With an event, call again with
    /// `&mut input[consumed..]` (and finally with an empty slice) until no event comes.
    /// Payloads are unmasked in place, so an unfragmented message that arrived in one read
    /// is handed out borrowed from `input` without a copy.
    ///
    /// Before [`Driver::start_connection`] nothing is read: `(0, None)`, the input left
    /// for later (a server has not answered the upgrade yet, a client has not sent its
    /// request, so no frame can be theirs to answer).
    #[inline]
    pub fn poll_event<'i>(&mut self, input: &'i mut [u8]) -> (usize, Option<Event<'i>>) {
        // Checked here, inlined into the caller: most calls find no queue at all.
        if self.occasional.is_some()
            && let Some(event) = self.next_queued()
        {
            return (0, Some(event));
        }
        if self.state == ReadyState::Connecting {
            match self.handshake.as_deref() {
                Some(Handshake::Server(_)) => return (0, None),
                Some(Handshake::Client(hs)) if !hs.request.is_empty() => return (0, None),
                Some(Handshake::Client(_) | Handshake::Refused(_)) => {
                    return self.read_response(input);
                }
                _ => {}
            }
        }
        self.read_frames(input)
    }

    /// The transport ended (EOF or error). Queues `Error` if a frame or message was cut
    /// off, and `Close` 1006 unless the connection already reported its close.
    pub fn receive_eof(&mut self) {
        self.transport_ended(None);
    }

    /// The transport failed with `error` (a refused connect, a reset): queues
    /// `Error::Io(error)` in place of `receive_eof`'s generic error, then ends the
    /// connection as `receive_eof` does. Nothing is reported once the close has been.
    pub fn receive_error(&mut self, error: std::io::Error) {
        self.transport_ended(Some(error));
    }

    /// Reports why the transport ended (`error`, else what a clean EOF cut short), then
    /// 1006, unless the close was already reported.
    fn transport_ended(&mut self, error: Option<std::io::Error>) {
        if self.close_reported {
            self.state = ReadyState::Closed;
            return;
        }
        // A refusing response whose body ran to the close: the refusal is what failed.
        if let Some(Handshake::Refused(refused)) = self.handshake.as_deref() {
            let error = refused.to_error();
            self.fail_handshake(&error);
            self.queue_event(Event::Error(Error::Handshake(error.clone())));
            self.queue_close(code::ABNORMAL, error.to_string());
            return;
        }
        let cut_off = self.message.is_some()
            || matches!(
                self.stage,
                Stage::Payload { .. } | Stage::Header { len: 1.., .. }
            );
        let why = match error {
            Some(error) => Some(Error::Io(error)),
            None if self.state == ReadyState::Connecting && self.role == Role::Client => {
                Some(Error::Handshake(HandshakeError::Incomplete))
            }
            None if cut_off => Some(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ))),
            None => None,
        };
        if let Some(why) = why {
            self.queue_event(Event::Error(why));
        }
        if self.state == ReadyState::Connecting {
            // Nothing more can be written: the frames queued for a connection that never
            // opened (and what is left of the handshake) are dropped, not offered as the
            // closed driver's output.
            self.out.truncate(self.out_pos);
            self.handshake_left = 0;
        }
        self.stop();
        self.queue_close(code::ABNORMAL, String::new());
    }

    fn read_response<'i>(&mut self, input: &'i mut [u8]) -> (usize, Option<Event<'i>>) {
        let hs = match self.handshake.as_deref_mut() {
            Some(Handshake::Client(hs)) => hs,
            Some(Handshake::Refused(refused)) => {
                if !refused.take(input) {
                    return (input.len(), None);
                }
                let error = refused.to_error();
                return self.handshake_failed(error, input.len());
            }
            _ => unreachable!("checked by the caller"),
        };
        // Interim 1xx responses (100 Continue, 103 Early Hints from a proxy or a CDN) may
        // come before the 101, and a client must take them (RFC 9110 §15.2): skipped.
        let mut interim = 0;
        let (response, used) = loop {
            match hs.parser.parse(&input[interim..]) {
                Ok(Status::Partial) => return (input.len(), None),
                Ok(Status::Complete(response, used))
                    if (100..200).contains(&response.status) && response.status != 101 =>
                {
                    hs.parser.reset();
                    interim += used;
                }
                Ok(Status::Complete(response, used)) => break (response, interim + used),
                Err(e) => return self.handshake_failed(e, input.len()),
            }
        };
        match validate_response(
            &response,
            &hs.expected_accept,
            &hs.offered,
            hs.deflate.as_ref(),
        ) {
            Ok(agreed) => {
                let deflate = agreed
                    .deflate
                    .zip(hs.deflate.as_ref())
                    .map(|(p, d)| DeflateState::new(p, Role::Client, d));
                self.set_agreed(agreed.protocol, deflate);
                self.handshake = None;
                self.state = ReadyState::Open;
                (used, Some(Event::Open))
            }
            Err(HandshakeError::UnexpectedStatus { status, .. }) => {
                // The error carries the start of the body, the same however the reads
                // fall: wait for what the response declares, else for the close.
                let rest = &input[used..];
                let mut refused = RefusedBody::new(status, &response);
                if !refused.take(rest) {
                    self.handshake = Some(Box::new(Handshake::Refused(refused)));
                    return (input.len(), None);
                }
                self.handshake_failed(refused.to_error(), input.len())
            }
            Err(e) => self.handshake_failed(e, input.len()),
        }
    }

    /// The client's handshake failed with `error`: returns the `Error` event (`Close` 1006
    /// queued after it) with `consumed` bytes: the rest of the stream is not read.
    fn handshake_failed<'i>(
        &mut self,
        error: HandshakeError,
        consumed: usize,
    ) -> (usize, Option<Event<'i>>) {
        self.fail_handshake(&error);
        self.queue_close(code::ABNORMAL, error.to_string());
        (consumed, Some(Event::Error(Error::Handshake(error))))
    }

    /// The connection never opens: frames queued for it are dropped.
    fn fail_handshake(&mut self, error: &HandshakeError) {
        self.handshake = Some(Box::new(Handshake::Failed(error.clone())));
        self.out
            .truncate(self.out_pos + self.handshake_left as usize);
        self.stop();
    }

    /// RSV bits a frame may carry: RSV1 once permessage-deflate is agreed.
    fn allowed_rsv(&self) -> u8 {
        if self.deflate().is_some() { 0b100 } else { 0 }
    }

    fn check_header(&self, h: &FrameHeader) -> Result<(), ProtocolError> {
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        // RSV1 (allowed only with deflate) marks a message's first frame; never a control
        // frame or a continuation (RFC 7692 §6).
        if h.rsv != 0 && (h.opcode.is_control() || h.opcode == OpCode::Continuation) {
            return Err(ProtocolError::ReservedBits(h.rsv));
        }
        let (buffered, compressed, continuations) = match (h.opcode, &self.message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(m)) => (
                if m.compressed { m.wire } else { m.buf.len() } as u64,
                m.compressed,
                m.continuations as usize + 1,
            ),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::UnfinishedMessage);
            }
            _ => (0, h.rsv != 0, 0),
        };
        let len = buffered + h.payload_len;
        // A compressed message is judged by its inflated size as it inflates; its wire
        // size may exceed max_length only by deflate's worst-case overhead (a flush's
        // worth more for each fragment).
        let max = if compressed {
            compressed_limit_fragmented(self.max_length, continuations)
        } else {
            self.max_length
        };
        if !h.opcode.is_control() && len > max as u64 {
            return Err(if compressed {
                ProtocolError::CompressedTooLarge {
                    len,
                    wire_max: max,
                    max: self.max_length,
                }
            } else {
                ProtocolError::MessageTooLarge {
                    len,
                    max: self.max_length,
                }
            });
        }
        Ok(())
    }

    /// Inflates a whole compressed message into an event, or fails the connection: 1009
    /// past `max_length`, 1007 for bad deflate data or text that is not UTF-8.
    fn inflated<'i>(
        &mut self,
        total: usize,
        pos: usize,
        text: bool,
        compressed: &[u8],
    ) -> (usize, Option<Event<'i>>) {
        let max = self.max_length;
        let deflate = rsv1_deflate(&mut self.agreed);
        match deflate.inflate(compressed, max) {
            Ok(bytes) => self.inflated_message(total, pos, text, bytes),
            Err(e) => self.fail(total, inflate_failure(e, max)),
        }
    }

    /// A compressed message's inflated bytes as its event (1007 for text that is not
    /// UTF-8).
    fn inflated_message<'i>(
        &mut self,
        total: usize,
        pos: usize,
        text: bool,
        bytes: Vec<u8>,
    ) -> (usize, Option<Event<'i>>) {
        let message = if text {
            match String::from_utf8(bytes) {
                Ok(text) => Message::Text(Cow::Owned(text)),
                Err(_) => return self.fail(total, ProtocolError::InvalidUtf8),
            }
        } else {
            Message::Binary(Cow::Owned(bytes))
        };
        (pos, Some(Event::Message(message)))
    }

    /// Fast path: a frame whose whole payload is in this read (from `pos`) and that is a
    /// whole message or a control frame, handed out borrowed from `input`. The stage is
    /// already back at the start of a header.
    #[inline(always)]
    fn whole_frame<'i>(
        &mut self,
        header: FrameHeader,
        input: &'i mut [u8],
        pos: usize,
        total: usize,
    ) -> (usize, Option<Event<'i>>) {
        let end = pos + header.payload_len as usize;
        let payload = &mut input[pos..end];
        if let Some(key) = header.mask {
            apply_mask(payload, key, 0);
        }
        let payload: &'i [u8] = payload;
        let opcode = header.opcode;
        if header.rsv != 0 {
            return self.inflated(total, end, opcode == OpCode::Text, payload);
        }
        match opcode {
            OpCode::Text => match simdutf8::basic::from_utf8(payload) {
                Ok(text) => (
                    end,
                    Some(Event::Message(Message::Text(Cow::Borrowed(text)))),
                ),
                Err(_) => self.fail(total, ProtocolError::InvalidUtf8),
            },
            OpCode::Binary => (
                end,
                Some(Event::Message(Message::Binary(Cow::Borrowed(payload)))),
            ),
            _ => match self.control_frame(opcode, Cow::Borrowed(payload)) {
                Ok(event) => (end, event),
                Err(e) => self.fail(total, e),
            },
        }
    }

    fn read_frames<'i>(&mut self, input: &'i mut [u8]) -> (usize, Option<Event<'i>>) {
        let total = input.len();
        let mut pos = 0;
        loop {
            match self.stage {
                Stage::Stopped => return (total, None),
                Stage::Header { len, .. } => {
                    if pos == total {
                        return (total, None);
                    }
                    let have = len as usize;
                    let avail = &input[pos..];
                    let allowed = self.allowed_rsv();
                    let parsed = if have == 0 {
                        // The usual case: the header starts in this read. The stage is
                        // not copied out (its bytes are not needed).
                        parse_header(avail, allowed)
                    } else {
                        let Stage::Header { buf, .. } = &mut self.stage else {
                            unreachable!("matched above")
                        };
                        let take = (MAX_HEADER_LEN - have).min(avail.len());
                        buf[have..have + take].copy_from_slice(&avail[..take]);
                        parse_header(&buf[..have + take], allowed)
                    };
                    let header = match parsed {
                        Err(e) => return self.fail(total, e),
                        Ok(Status::Partial) => {
                            // Fewer than 14 bytes remain: keep them for the next read.
                            let rest = total - pos;
                            if have == 0 {
                                let mut buf = [0; MAX_HEADER_LEN];
                                buf[..rest].copy_from_slice(avail);
                                self.stage = Stage::Header {
                                    buf,
                                    len: rest as u8,
                                };
                            } else if let Stage::Header { len, .. } = &mut self.stage {
                                *len = (have + rest) as u8;
                            }
                            return (total, None);
                        }
                        Ok(Status::Complete(header, n)) => {
                            pos += n - have;
                            header
                        }
                    };
                    if let Err(e) = self.check_header(&header) {
                        return self.fail(total, e);
                    }
                    if header.opcode == OpCode::Continuation
                        && let Some(m) = self.message.as_deref_mut()
                    {
                        m.continuations = m.continuations.saturating_add(1);
                    }
                    // A control frame's payload is kept only while its own frame is read
                    // (taken at its end, dropped by `stop`): none is left.
                    debug_assert!(
                        self.occasional
                            .as_deref()
                            .is_none_or(|o| o.control.is_empty()),
                        "a control payload left from an earlier frame"
                    );
                    if is_whole_frame(&header) && (total - pos) as u64 >= header.payload_len {
                        // Handed out straight from the header just parsed: storing the
                        // stage and reading it back at once stalls on the store (the
                        // costliest lines of a subscriber's profile, 20-byte frames).
                        if have != 0 {
                            self.stage = HEADER_START;
                        }
                        return self.whole_frame(header, input, pos, total);
                    }
                    self.stage = Stage::Payload { header, done: 0 };
                }
                Stage::Payload { header, done } => {
                    let remaining = header.payload_len - done;
                    let avail = (total - pos) as u64;
                    let opcode = header.opcode;
                    if done == 0 && is_whole_frame(&header) && avail >= remaining {
                        self.stage = HEADER_START;
                        return self.whole_frame(header, input, pos, total);
                    }
                    let take = remaining.min(avail) as usize;
                    if take == 0 && remaining > 0 {
                        // The read ended right after the header: nothing to do until the
                        // payload arrives (which may then take the fast path).
                        self.stage = Stage::Payload { header, done };
                        return (pos, None);
                    }
                    let chunk = &mut input[pos..pos + take];
                    if let Some(key) = header.mask {
                        apply_mask(chunk, key, done as usize);
                    }
                    pos += take;
                    let done = done + take as u64;
                    if opcode.is_control() {
                        self.keep_control(chunk);
                    } else {
                        let max_length = self.max_length;
                        let message = self
                            .message
                            .get_or_insert_with(|| PartialMessage::new(&header));
                        assert!(!message.lent, "input while the payload buffer is lent");
                        if message.compressed {
                            // Inflated as it comes; its text is checked once whole.
                            let deflate = rsv1_deflate(&mut self.agreed);
                            if let Err(e) = message.inflate(deflate, chunk, max_length) {
                                return self.fail(total, e);
                            }
                        } else {
                            if message.text && message.utf8.feed(chunk).is_err() {
                                return self.fail(total, ProtocolError::InvalidUtf8);
                            }
                            message.reserve(chunk.len(), remaining, max_length);
                            message.buf.extend_from_slice(chunk);
                        }
                    }
                    if done < header.payload_len {
                        self.stage = Stage::Payload { header, done };
                        return (pos, None);
                    }
                    self.stage = HEADER_START;
                    if opcode.is_control() {
                        let payload = self.take_control();
                        return match self.control_frame(opcode, Cow::Owned(payload)) {
                            Ok(event) => (pos, event),
                            Err(e) => self.fail(total, e),
                        };
                    }
                    if header.fin {
                        let mut message = self.message.take().expect("a data frame has a message");
                        if message.compressed {
                            let max = self.max_length;
                            let deflate = rsv1_deflate(&mut self.agreed);
                            if let Err(e) = deflate.inflate_end(&mut message.buf, message.wire, max)
                            {
                                return self.fail(total, inflate_failure(e, max));
                            }
                            return self.inflated_message(total, pos, message.text, message.buf);
                        }
                        let event = if message.text {
                            if !message.utf8.is_complete() {
                                return self.fail(total, ProtocolError::InvalidUtf8);
                            }
                            match String::from_utf8(message.buf) {
                                Ok(text) => Message::Text(Cow::Owned(text)),
                                Err(_) => return self.fail(total, ProtocolError::InvalidUtf8),
                            }
                        } else {
                            Message::Binary(Cow::Owned(message.buf))
                        };
                        return (pos, Some(Event::Message(event)));
                    }
                }
            }
        }
    }

    fn control_frame<'i>(
        &mut self,
        opcode: OpCode,
        payload: Cow<'i, [u8]>,
    ) -> Result<Option<Event<'i>>, ProtocolError> {
        match opcode {
            OpCode::Ping => {
                // Answered until the peer's Close is in (RFC 6455 §5.5.2), after ours too: a
                // Pong is not a data frame (§5.5.1).
                if matches!(self.state, ReadyState::Open | ReadyState::Closing) {
                    self.answer_ping(&payload);
                }
                Ok(Some(Event::Ping(payload)))
            }
            OpCode::Pong => Ok(Some(Event::Pong(payload))),
            _ => {
                let (close_code, reason) = match payload.len() {
                    0 => (code::NO_STATUS, String::new()),
                    1 => return Err(ProtocolError::CloseFrameTooShort),
                    _ => {
                        let c = u16::from_be_bytes([payload[0], payload[1]]);
                        if !is_valid_close_code(c) {
                            return Err(ProtocolError::InvalidCloseCode(c));
                        }
                        let reason = std::str::from_utf8(&payload[2..])
                            .map_err(|_| ProtocolError::InvalidUtf8)?;
                        (c, reason.to_string())
                    }
                };
                if matches!(self.state, ReadyState::Open | ReadyState::Connecting) {
                    // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an empty one.
                    let echo = if close_code == code::NO_STATUS {
                        &[][..]
                    } else {
                        &payload[..2]
                    };
                    self.push_frame(OpCode::Close, echo);
                }
                self.close_received = true;
                self.stop();
                self.queue_close(close_code, reason);
                // Nothing else is queued while frames are parsed, so this is the Close.
                Ok(self.next_queued())
            }
        }
    }

    /// Bytes of the data frame being received still to come (0 between frames and in a
    /// control frame): what [`Driver::lend_payload_buffer`] could lend room for. A
    /// transport may size its next receive by it (the reactor sets the socket's receive
    /// low-water mark from it).
    #[inline]
    pub fn payload_to_come(&self) -> u64 {
        match self.stage {
            Stage::Payload { header, done } if !header.opcode.is_control() => {
                header.payload_len - done
            }
            _ => 0,
        }
    }

    /// Lends the buffer a data message is being reassembled in, so that the transport
    /// receives the rest of the current frame straight into it instead of into a receive
    /// buffer the driver then copies from: only while a data frame's payload is being
    /// received with at least `min` bytes of it still to come. Returns the buffer (its
    /// length: the bytes so far) and how many bytes may be appended to it, never past the
    /// frame (room for all of it when the message ends within [`EAGER_RESERVE`], else grown
    /// by doubling, as for input fed to [`Driver::poll_event`]).
    ///
    /// `None` while a buffer is lent, between frames, in a control frame and once fewer
    /// than `min` bytes of the frame are to come: the transport then reads into its own
    /// buffer and feeds [`Driver::poll_event`] as usual. What is lent is the driver's own
    /// buffer, moved out: no copy, and nothing is allocated beyond what reassembling the
    /// message would have allocated anyway. A compressed (permessage-deflate) message's
    /// data goes instead into a buffer of its own, empty when lent and with room for at
    /// most `min` bytes, which is inflated into the message when it comes back.
    ///
    /// Give the buffer back with [`Driver::payload_received`] before feeding
    /// [`Driver::poll_event`] more bytes. Commands (sends, a close) may come in between,
    /// and so may [`Driver::receive_eof`] (a buffer given back after it is dropped).
    ///
    /// ```no_run
    /// use std::io::Read;
    /// # fn receive(driver: &mut websocket_driver::Driver, socket: &mut std::net::TcpStream)
    /// # -> std::io::Result<()> {
    /// // Once 64 KiB or more of a data frame are still to come, read them straight into
    /// // the message, 64 KiB a read at most (safe Rust zeroes what it reads into; an
    /// // `unsafe` transport need not).
    /// const READ: usize = 64 * 1024;
    /// while let Some((mut buf, room)) = driver.lend_payload_buffer(READ) {
    ///     let start = buf.len();
    ///     buf.resize(start + room.min(READ), 0);
    ///     let n = socket.read(&mut buf[start..]).unwrap_or(0); // an error ends it too
    ///     buf.truncate(start + n);
    ///     driver.payload_received(buf, n);
    ///     if n == 0 {
    ///         driver.receive_eof();
    ///         break;
    ///     }
    /// }
    /// // Then the events, as after any read.
    /// while let (_, Some(event)) = driver.poll_event(&mut []) {
    ///     println!("{event:?}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[inline]
    pub fn lend_payload_buffer(&mut self, min: usize) -> Option<(Vec<u8>, usize)> {
        // A transport asks before every read; between frames the answer is no, found here
        // rather than in a call.
        if !matches!(self.stage, Stage::Payload { .. }) {
            return None;
        }
        self.lend_payload_buffer_now(min)
    }

    fn lend_payload_buffer_now(&mut self, min: usize) -> Option<(Vec<u8>, usize)> {
        let remaining = self.payload_to_come();
        let Stage::Payload { header, .. } = self.stage else {
            return None;
        };
        if remaining < min.max(1) as u64 {
            return None;
        }
        let max_length = self.max_length;
        let message = self
            .message
            .get_or_insert_with(|| PartialMessage::new(&header));
        if message.lent {
            return None;
        }
        if message.compressed {
            // Deflate data goes to a buffer of its own, inflated into the message when it
            // comes back: at most `min` of it at a time.
            message.staging.clear();
            message.staging.reserve_exact(min.max(1));
            let room = message.staging.capacity().min(remaining as usize);
            message.lent = true;
            return Some((std::mem::take(&mut message.staging), room));
        }
        message.reserve(min.max(1), remaining, max_length);
        let room = (message.buf.capacity() - message.buf.len()).min(remaining as usize);
        message.lent = true;
        Some((std::mem::take(&mut message.buf), room))
    }

    /// Takes back the buffer from [`Driver::lend_payload_buffer`] with `n` bytes of the
    /// frame appended (at most the room it was lent with): unmasks them and checks text
    /// as it arrives. Then [`Driver::poll_event`] (with no input, or the next read) goes
    /// on, with the message once its last frame is whole, or with the failure of text
    /// that is not UTF-8. A buffer that comes back after the connection stopped is
    /// dropped.
    ///
    /// # Panics
    ///
    /// If `n` is more than the buffer holds or more than the frame still owes (a transport
    /// that appended more than the room it was lent). [`Driver::poll_event`] with input
    /// panics while a buffer is lent and not given back.
    pub fn payload_received(&mut self, mut buf: Vec<u8>, n: usize) {
        let Stage::Payload { header, done } = self.stage else {
            return;
        };
        let Some(message) = self.message.as_deref_mut().filter(|m| m.lent) else {
            return;
        };
        assert!(
            n <= buf.len() && n as u64 <= header.payload_len - done,
            "no more than the frame's payload is received into its buffer"
        );
        let piece = buf.len() - n..;
        if let Some(key) = header.mask {
            apply_mask(&mut buf[piece.clone()], key, done as usize);
        }
        message.lent = false;
        let failure = if message.compressed {
            let deflate = rsv1_deflate(&mut self.agreed);
            let inflated = message.inflate(deflate, &buf[piece], self.max_length);
            buf.clear();
            message.staging = buf;
            inflated.err()
        } else {
            let bad_text = message.text && message.utf8.feed(&buf[piece]).is_err();
            message.buf = buf;
            bad_text.then_some(ProtocolError::InvalidUtf8)
        };
        if let Some(failure) = failure {
            // The error comes before the close `fail` queues, as it does from `poll_event`.
            let (_, error): (usize, Option<Event<'static>>) = self.fail(0, failure);
            if let Some(error) = error {
                self.queue_event_first(error);
            }
            return;
        }
        if n == 0 && done == 0 && header.opcode != OpCode::Continuation {
            // Nothing of a message's first frame came: as if the buffer had never been
            // lent, so the frame can still arrive whole through `poll_event` (which hands
            // such a frame out borrowed and expects no message under way).
            self.message = None;
            return;
        }
        self.stage = Stage::Payload {
            header,
            done: done + n as u64,
        };
    }

    /// Fails the connection: send the error's close code (if no close was sent yet),
    /// stop parsing, report `Error` now and `Close` next.
    fn fail<'i>(&mut self, consumed: usize, error: ProtocolError) -> (usize, Option<Event<'i>>) {
        let close_code = error.close_code();
        let reason = error.to_string();
        if self.state == ReadyState::Open {
            let mut payload = close_code.to_be_bytes().to_vec();
            payload.extend_from_slice(
                cut_at_char_boundary(&reason, MAX_CONTROL_PAYLOAD - 2).as_bytes(),
            );
            self.push_frame(OpCode::Close, &payload);
        }
        self.stop();
        self.queue_close(close_code, reason);
        (consumed, Some(Event::Error(Error::Protocol(error))))
    }
}

/// The permessage-deflate state a compressed (RSV1) message inflates through: RSV1 is
/// accepted only once deflate is agreed. A function of the field, so that it borrows
/// `agreed` alone, beside the message being reassembled.
fn rsv1_deflate(agreed: &mut Option<Box<Negotiated>>) -> &mut DeflateState {
    agreed
        .as_deref_mut()
        .and_then(|a| a.deflate.as_mut())
        .expect("RSV1 is accepted only with deflate")
}

/// The protocol error of a compressed message that could not be inflated: 1009 past
/// `max_length`, 1007 for bad deflate data.
fn inflate_failure(e: InflateError, max_length: usize) -> ProtocolError {
    match e {
        InflateError::TooBig => ProtocolError::InflatedTooLarge { max: max_length },
        InflateError::Corrupt => ProtocolError::InvalidCompressedData,
    }
}

impl RefusedBody {
    /// What the body of `response` (RFC 9112 §6.3) makes the error wait for: nothing for
    /// 1xx, 204 and 304 or an unreadable `Content-Length`; a chunked body decoded; else
    /// `Content-Length` bytes, and without it everything up to the close.
    fn new(status: u16, response: &Response) -> RefusedBody {
        let coding = response.header("transfer-encoding");
        let chunked = coding.is_some_and(|c| {
            c.rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
        });
        let want = if matches!(status, 100..=199 | 204 | 304) {
            0
        } else if coding.is_some() {
            usize::MAX
        } else {
            match response.header("content-length") {
                Some(v) => v.trim().parse::<usize>().unwrap_or(0),
                None => usize::MAX,
            }
        };
        RefusedBody {
            status,
            want: want.min(REFUSED_BODY_MAX),
            body: Vec::new(),
            chunked: (chunked && want > 0).then(Vec::new),
        }
    }

    /// Takes what it still wants of `input`; true once it has it all.
    fn take(&mut self, input: &[u8]) -> bool {
        let Some(raw) = self.chunked.as_mut() else {
            let n = (self.want - self.body.len()).min(input.len());
            self.body.extend_from_slice(&input[..n]);
            return self.body.len() == self.want;
        };
        let n = (REFUSED_CHUNKED_MAX - raw.len()).min(input.len());
        raw.extend_from_slice(&input[..n]);
        let ended = decode_chunked(raw, &mut self.body);
        self.body.truncate(self.want);
        ended || self.body.len() == self.want || raw.len() == REFUSED_CHUNKED_MAX
    }

    fn to_error(&self) -> HandshakeError {
        HandshakeError::UnexpectedStatus {
            status: self.status,
            body: String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
}

/// Decodes the chunked body in `raw` into `body` (from scratch: `raw` is small). True when
/// it ended: the last chunk, or bytes that are not the chunked coding (then `body` holds
/// what came before them).
fn decode_chunked(raw: &[u8], body: &mut Vec<u8>) -> bool {
    body.clear();
    let mut at = 0;
    loop {
        let Some(eol) = memchr::memmem::find(&raw[at..], b"\r\n") else {
            return false;
        };
        // The size in hex, before any `;extension`.
        let line = &raw[at..at + eol];
        let hex = line.split(|&b| b == b';').next().unwrap_or(line);
        let size = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| usize::from_str_radix(h.trim(), 16).ok());
        let Some(size) = size else { return true };
        if size == 0 {
            return true;
        }
        at += eol + 2;
        let data = &raw[at..];
        if data.len() < size {
            body.extend_from_slice(data);
            return false;
        }
        body.extend_from_slice(&data[..size]);
        at += size;
        match raw.get(at..at + 2) {
            Some(b"\r\n") => at += 2,
            Some(_) => return true,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::driver::testing::open_server_with;
    use crate::protocol::frame::encode_header;
    use crate::protocol::options::Options;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn open_server() -> Driver {
        open_server_with(&Options::default(), "").0
    }

    /// A client frame: header, then `payload` masked with [`KEY`].
    fn client_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            fin,
            rsv: 0,
            opcode,
            mask: Some(KEY),
            payload_len: payload.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut head, &header);
        let mut frame = head[..n].to_vec();
        frame.extend_from_slice(payload);
        apply_mask(&mut frame[n..], KEY, 0);
        frame
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Feeds `input` whole; returns the events it gave.
    fn feed(driver: &mut Driver, mut input: Vec<u8>) -> Vec<Event<'static>> {
        let mut events = Vec::new();
        let (mut at, len) = (0, input.len());
        loop {
            let (used, event) = driver.poll_event(&mut input[at..]);
            at += used;
            match event {
                Some(event) => events.push(owned(event)),
                None if at == len => return events,
                None => {}
            }
        }
    }

    fn owned(event: Event<'_>) -> Event<'static> {
        match event {
            Event::Message(m) => Event::Message(m.into_owned()),
            Event::Open => Event::Open,
            Event::Close { code, reason } => Event::Close { code, reason },
            Event::Error(e) => Event::Error(e),
            Event::Ping(p) => Event::Ping(Cow::Owned(p.into_owned())),
            Event::Pong(p) => Event::Pong(Cow::Owned(p.into_owned())),
        }
    }

    /// Interim 1xx responses before the 101 are skipped (RFC 9110 §15.2: a client must
    /// take them), whole or in pieces, and the frame after the 101 is read; they used to
    /// fail the handshake (`UnexpectedStatus { status: 100 }`, 1006).
    #[test]
    fn interim_responses_before_the_101_are_skipped() {
        use crate::protocol::handshake::accept_key;
        let interims = [
            "HTTP/1.1 100 Continue\r\n\r\n",
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 100 Continue\r\n\r\n",
        ];
        for interim in interims {
            for piece in [usize::MAX, 7, 1] {
                let mut client = Driver::make_client("ws://h/", &Options::default()).unwrap();
                client.start_connection();
                let request = String::from_utf8(client.pending_output().to_vec()).unwrap();
                client.consume_output(request.len());
                let key = request
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .unwrap();
                let mut wire = format!(
                    "{interim}HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    accept_key(key)
                )
                .into_bytes();
                wire.extend_from_slice(&[0x81, 2, b'h', b'i']);
                let events: Vec<_> = wire
                    .chunks(piece.min(wire.len()))
                    .flat_map(|chunk| feed(&mut client, chunk.to_vec()))
                    .collect();
                assert!(
                    matches!(&events[..], [Event::Open, Event::Message(Message::Text(t))] if t == "hi"),
                    "{interim:?} in pieces of {piece}: {events:?}"
                );
            }
        }
    }

    /// A control frame's payload split across reads is kept until its last byte (in the
    /// box it shares with the event queue), and the box is freed once the frame is whole,
    /// also when a message's fragments surround the control frame.
    #[test]
    fn a_control_frame_in_pieces_is_kept_until_whole_then_freed() {
        let mut driver = open_server_with(&Options::default(), "").0;
        let wire = [
            client_frame(false, OpCode::Text, b"be"),
            client_frame(true, OpCode::Ping, b"split ping"),
            client_frame(true, OpCode::Continuation, b"fore"),
        ]
        .concat();
        let mut events = Vec::new();
        for byte in wire {
            let mut piece = [byte];
            let (used, event) = driver.poll_event(&mut piece);
            assert_eq!(used, 1);
            events.extend(event.map(owned));
            while let (_, Some(event)) = driver.poll_event(&mut []) {
                events.push(owned(event));
            }
        }
        assert!(
            matches!(&events[..], [Event::Ping(p), Event::Message(Message::Text(t))]
                if &p[..] == b"split ping" && t == "before"),
            "{events:?}"
        );
        assert!(driver.occasional.is_none(), "nothing kept once whole");
    }

    /// The server's frames in `wire`, as (opcode, payload) pairs.
    fn frames_of(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !wire.is_empty() {
            let (opcode, len) = (wire[0] & 0x0f, usize::from(wire[1] & 0x7f));
            frames.push((opcode, wire[2..2 + len].to_vec()));
            wire = &wire[2 + len..];
        }
        frames
    }

    /// RFC 6455 §5.5.3: a peer that pings without reading gets a pong per ping only until
    /// 16 KiB of our output waits; from there its pings share one pong, the last one's, so
    /// our output stops growing. A pong behind a message, or one partly written, is never
    /// replaced; pings after the output was written are each answered again.
    #[test]
    fn pings_while_pongs_wait_are_answered_by_the_last_pong_only() {
        use crate::protocol::driver::outbound::PONGS_COALESCE_AT;
        let mut driver = open_server();
        let payload = |i: u32| format!("{i:0120}").into_bytes();
        let pings: Vec<u8> = (0..1000u32)
            .flat_map(|i| client_frame(true, OpCode::Ping, &payload(i)))
            .collect();
        let events = feed(&mut driver, pings);
        assert_eq!(events.len(), 1000, "every ping is reported");
        let pong = OpCode::Pong as u8;
        let out = frames_of(driver.pending_output());
        // 122 bytes a pong: one each while less than 16 KiB waits; the pong that passes it
        // is replaced by each later one, and ends up the last ping's.
        let each = PONGS_COALESCE_AT.div_ceil(122) - 1;
        assert_eq!(out.len(), each + 1);
        for (i, frame) in out[..each].iter().enumerate() {
            assert_eq!(*frame, (pong, payload(i as u32)));
        }
        assert_eq!(out[each], (pong, payload(999)));
        assert!(driver.pending_output().len() < PONGS_COALESCE_AT + 2 * 122);
        // Written: the next pings are each answered.
        let n = driver.pending_output().len();
        driver.consume_output(n);
        assert!(
            driver.occasional.is_none(),
            "no record is kept once written"
        );
        for p in [b"a", b"b", b"c"] {
            feed(&mut driver, client_frame(true, OpCode::Ping, p));
        }
        assert_eq!(
            frames_of(driver.pending_output()),
            [
                (pong, b"a".to_vec()),
                (pong, b"b".to_vec()),
                (pong, b"c".to_vec())
            ]
        );
        let n = driver.pending_output().len();
        driver.consume_output(n);
        // Behind a large message: d, e and f share a pong, f's.
        driver.send_binary(&[0; 100]).unwrap();
        let big = vec![1u8; PONGS_COALESCE_AT];
        driver.send_binary(&big).unwrap();
        let message_bytes = driver.pending_output().len();
        for p in [b"d", b"e", b"f"] {
            feed(&mut driver, client_frame(true, OpCode::Ping, p));
        }
        assert_eq!(
            frames_of(&driver.pending_output()[message_bytes..]),
            [(pong, b"f".to_vec())]
        );
        // A message queued after the waiting pong: the next pong goes after it.
        driver.send_text("msg").unwrap();
        feed(&mut driver, client_frame(true, OpCode::Ping, b"g"));
        let text = OpCode::Text as u8;
        assert_eq!(
            frames_of(&driver.pending_output()[message_bytes..]),
            [
                (pong, b"f".to_vec()),
                (text, b"msg".to_vec()),
                (pong, b"g".to_vec())
            ]
        );
        // A pong already partly written is not replaced either.
        let n = driver.pending_output().len();
        driver.consume_output(n - 1);
        feed(&mut driver, client_frame(true, OpCode::Ping, b"h"));
        assert_eq!(
            driver.pending_output()[0],
            b'g',
            "the rest of pong g, then h"
        );
        assert_eq!(
            frames_of(&driver.pending_output()[1..]),
            [(pong, b"h".to_vec())]
        );
    }

    /// A whole final text frame at a frame boundary of an open connection, with no event
    /// queued, gets its event from one `poll_event`, whatever is wrong with it: the tokio
    /// stream's `recv` parses such a frame outside its poll and counts on an event.
    #[test]
    fn a_whole_text_frame_at_a_boundary_gives_an_event_at_once() {
        let text = |payload: &[u8]| client_frame(true, OpCode::Text, payload);
        let mut unmasked = vec![0x81, 5];
        unmasked.extend_from_slice(b"hello");
        let cases: [(&str, Options, Vec<u8>, Vec<u8>); 7] = [
            (
                "valid",
                Options::default(),
                vec![],
                text("héllo".as_bytes()),
            ),
            ("empty", Options::default(), vec![], text(b"")),
            ("bad UTF-8", Options::default(), vec![], text(&[b'a', 0xff])),
            ("unmasked", Options::default(), vec![], unmasked),
            (
                "over max_length",
                Options::default().max_length(4),
                vec![],
                text(b"hello"),
            ),
            (
                "inside a fragmented message, after a ping",
                Options::default(),
                [
                    client_frame(false, OpCode::Text, b"a"),
                    client_frame(true, OpCode::Ping, b""),
                ]
                .concat(),
                text(b"b"),
            ),
            (
                "after a message",
                Options::default(),
                text(b"first"),
                text(b"second"),
            ),
        ];
        for (name, options, before, mut frame) in cases {
            let mut driver = open_server_with(&options, "").0;
            for event in feed(&mut driver, before) {
                assert!(
                    matches!(event, Event::Message(_) | Event::Ping(_)),
                    "{name}: {event:?}"
                );
            }
            assert!(
                driver.occasional.is_none(),
                "{name}: events queued before the frame"
            );
            assert_eq!(driver.state, ReadyState::Open, "{name}");
            let len = frame.len();
            let (used, event) = driver.poll_event(&mut frame);
            assert_eq!(used, len, "{name}: the whole frame is taken");
            assert!(event.is_some(), "{name}: no event");
        }
    }

    /// Receives `wire` (the masked rest of the current frame) through lent buffers, at
    /// most `piece` bytes per receive; returns how many receives went through one.
    fn receive_lent(driver: &mut Driver, wire: &[u8], min: usize, piece: usize) -> usize {
        let mut at = 0;
        let mut lent = 0;
        while let Some((mut buf, room)) = driver.lend_payload_buffer(min) {
            assert!(room > 0 && room <= wire.len() - at, "room within the frame");
            let n = room.min(piece);
            buf.extend_from_slice(&wire[at..at + n]);
            driver.payload_received(buf, n);
            at += n;
            lent += 1;
        }
        assert_eq!(at, wire.len(), "the lent buffers took the whole rest");
        lent
    }

    #[test]
    fn the_rest_of_a_large_frame_is_received_into_the_message_buffer() {
        let mut driver = open_server();
        let payload = pattern(300_000);
        let frame = client_frame(true, OpCode::Binary, &payload);
        let header = frame.len() - payload.len();
        // The header and the first 10 000 bytes arrive as input.
        assert!(feed(&mut driver, frame[..header + 10_000].to_vec()).is_empty());
        let (buf, room) = driver.lend_payload_buffer(64 * 1024).expect("lent");
        assert_eq!(buf.len(), 10_000, "the bytes so far are in it");
        assert_eq!(room, payload.len() - 10_000, "room for exactly the rest");
        assert!(
            driver.lend_payload_buffer(1).is_none(),
            "lent once at a time"
        );
        driver.payload_received(buf, 0);
        // The rest arrives into the lent buffer, 50 000 bytes a receive.
        let lent = receive_lent(&mut driver, &frame[header + 10_000..], 1, 50_000);
        assert_eq!(lent, 6);
        let events = feed(&mut driver, Vec::new());
        assert!(
            matches!(&events[..], [Event::Message(Message::Binary(b))] if b[..] == payload[..]),
            "the message, unmasked"
        );
        // The next frame goes on as usual.
        let events = feed(&mut driver, client_frame(true, OpCode::Text, b"next"));
        assert!(matches!(&events[..], [Event::Message(Message::Text(t))] if t == "next"));
    }

    #[test]
    fn lent_only_while_at_least_min_bytes_of_a_data_frame_are_to_come() {
        let min = 64 * 1024;
        let mut driver = open_server();
        assert!(driver.lend_payload_buffer(1).is_none(), "not at a header");
        // A ping's payload is never lent, however little of it arrived.
        let ping = client_frame(true, OpCode::Ping, &[9; 100]);
        assert!(feed(&mut driver, ping[..10].to_vec()).is_empty());
        assert!(driver.lend_payload_buffer(1).is_none(), "a control frame");
        assert_eq!(feed(&mut driver, ping[10..].to_vec()).len(), 1);
        // At the limit: exactly `min` bytes to come.
        let payload = pattern(min + 100);
        let frame = client_frame(true, OpCode::Binary, &payload);
        let header = frame.len() - payload.len();
        assert!(feed(&mut driver, frame[..header + 99].to_vec()).is_empty());
        assert!(
            driver.lend_payload_buffer(min + 2).is_none(),
            "min + 1 bytes wanted"
        );
        let (buf, room) = driver
            .lend_payload_buffer(min + 1)
            .expect("min + 1 to come");
        assert_eq!(room, min + 1);
        driver.payload_received(buf, 0);
        let events = feed(&mut driver, frame[header + 99..].to_vec());
        assert!(
            matches!(&events[..], [Event::Message(Message::Binary(b))] if b[..] == payload[..])
        );
    }

    #[test]
    fn a_fragmented_message_goes_on_in_the_lent_buffer() {
        let mut driver = open_server();
        let first = pattern(70_000);
        let second: Vec<u8> = pattern(200_000).into_iter().rev().collect();
        assert!(feed(&mut driver, client_frame(false, OpCode::Binary, &first)).is_empty());
        let frame = client_frame(true, OpCode::Continuation, &second);
        let header = frame.len() - second.len();
        assert!(feed(&mut driver, frame[..header + 5].to_vec()).is_empty());
        let (buf, _) = driver.lend_payload_buffer(1).expect("lent");
        assert_eq!(
            buf.len(),
            70_005,
            "the first fragment and what arrived of the second"
        );
        driver.payload_received(buf, 0);
        receive_lent(&mut driver, &frame[header + 5..], 1, 65_536);
        let events = feed(&mut driver, Vec::new());
        let whole = [first, second].concat();
        assert!(matches!(&events[..], [Event::Message(Message::Binary(b))] if b[..] == whole[..]));
    }

    #[test]
    fn past_the_eager_reserve_a_lent_buffer_grows_by_doubling() {
        let mut driver = open_server();
        let payload = pattern(3 * EAGER_RESERVE);
        let frame = client_frame(true, OpCode::Binary, &payload);
        let header = frame.len() - payload.len();
        assert!(feed(&mut driver, frame[..header + 1000].to_vec()).is_empty());
        let mut at = header + 1000;
        while let Some((mut buf, room)) = driver.lend_payload_buffer(4096) {
            // Room for what arrived again (or `min`), never the declared 3 MiB at once.
            assert!(
                room <= buf.len().max(4096),
                "{room} bytes lent after {}",
                buf.len()
            );
            buf.extend_from_slice(&frame[at..at + room]);
            at += room;
            driver.payload_received(buf, room);
        }
        let events = feed(&mut driver, frame[at..].to_vec());
        assert!(
            matches!(&events[..], [Event::Message(Message::Binary(b))] if b[..] == payload[..])
        );
    }

    /// A compressed (RSV1) message's deflate data is received into the lent buffer the
    /// same way (a buffer of its own, inflated from as each piece comes back).
    #[test]
    fn a_compressed_frame_is_received_into_the_lent_buffer_and_inflated() {
        use crate::protocol::deflate::{DeflateOptions, DeflateParams, DeflateState};
        let (mut driver, response) = open_server_with(
            &Options::default().deflate(true),
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        );
        assert!(response.contains("permessage-deflate"), "deflate agreed");
        let params = DeflateParams {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        };
        let mut client = DeflateState::new(params, Role::Client, &DeflateOptions::default());
        // Four bits of entropy a byte: about half its size once compressed.
        let mut x = 7u32;
        let payload: Vec<u8> = (0..600_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                b'a' + (x % 16) as u8
            })
            .collect();
        let mut frame = Vec::new();
        client
            .write_frame(&mut frame, OpCode::Binary, &payload, Some(KEY))
            .expect("compressed");
        assert!(frame.len() > 200_000, "{} bytes on the wire", frame.len());
        assert!(feed(&mut driver, frame[..1000].to_vec()).is_empty());
        assert!(receive_lent(&mut driver, &frame[1000..], 1, 40_000) > 1);
        let events = feed(&mut driver, Vec::new());
        assert!(
            matches!(&events[..], [Event::Message(Message::Binary(b))] if b[..] == payload[..])
        );
    }

    /// A compressed message is inflated as it arrives: one that inflates past
    /// `max_length` fails with 1009 while most of its deflate data is still to come
    /// (through `poll_event` and through lent buffers alike), and nothing of it is held
    /// beyond `max_length` + 1 bytes of output. Without the client's context takeover, so
    /// the message inflates through a stream of its own; with it, through the kept one.
    #[test]
    fn a_compressed_message_that_inflates_too_far_fails_as_it_arrives() {
        use crate::protocol::deflate::{DeflateOptions, DeflateParams, DeflateState};
        for takeover in [false, true] {
            for lent in [false, true] {
                let offer = if takeover {
                    "Sec-WebSocket-Extensions: permessage-deflate\r\n"
                } else {
                    "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n"
                };
                let options = Options::default().deflate(true).max_length(100_000);
                let (mut driver, response) = open_server_with(&options, offer);
                assert!(response.contains("permessage-deflate"), "deflate agreed");
                let params = DeflateParams {
                    server_no_context_takeover: false,
                    client_no_context_takeover: !takeover,
                    server_max_window_bits: 15,
                    client_max_window_bits: 15,
                };
                let mut client =
                    DeflateState::new(params, Role::Client, &DeflateOptions::default());
                // 8 MB of zeros: a few KiB compressed, within the wire limit.
                let payload = vec![0u8; 8_000_000];
                let mut frame = Vec::new();
                client
                    .write_frame(&mut frame, OpCode::Binary, &payload, Some(KEY))
                    .expect("compressed");
                assert!(frame.len() < 100_000, "{} bytes on the wire", frame.len());
                let mut events = feed(&mut driver, frame[..20].to_vec());
                let mut at = 20;
                while events.is_empty() && at < frame.len() {
                    if lent {
                        let (mut buf, room) = driver.lend_payload_buffer(1).expect("lent");
                        let n = room.min(16).min(frame.len() - at);
                        buf.extend_from_slice(&frame[at..at + n]);
                        driver.payload_received(buf, n);
                        at += n;
                        events = feed(&mut driver, Vec::new());
                    } else {
                        let n = 16.min(frame.len() - at);
                        events = feed(&mut driver, frame[at..at + n].to_vec());
                        at += n;
                    }
                }
                assert!(
                    matches!(
                        &events[..],
                        [
                            Event::Error(Error::Protocol(ProtocolError::InflatedTooLarge {
                                max: 100_000
                            })),
                            Event::Close { code: 1009, .. }
                        ]
                    ),
                    "{events:?}"
                );
                // 100 000 bytes inflate from a small part of the wire's bytes.
                assert!(
                    at < frame.len() / 10,
                    "failed after {at} of {} bytes",
                    frame.len()
                );
            }
        }
    }

    #[test]
    fn lent_text_that_is_not_utf8_fails_the_connection_with_1007() {
        let mut driver = open_server();
        let mut payload = vec![b'a'; 100_000];
        payload[80_000] = 0xff;
        let frame = client_frame(true, OpCode::Text, &payload);
        let header = frame.len() - payload.len();
        assert!(feed(&mut driver, frame[..header + 100].to_vec()).is_empty());
        receive_lent(&mut driver, &frame[header + 100..], 1, 60_000);
        let events = feed(&mut driver, Vec::new());
        assert!(
            matches!(
                &events[..],
                [
                    Event::Error(Error::Protocol(ProtocolError::InvalidUtf8)),
                    Event::Close { code: 1007, .. }
                ]
            ),
            "{events:?}"
        );
        // The close frame went out with 1007.
        let out = driver.pending_output();
        assert_eq!(out[0] & 0x0f, OpCode::Close as u8);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 1007);
    }

    #[test]
    fn a_buffer_back_after_the_connection_failed_is_dropped() {
        let mut driver = open_server();
        let payload = pattern(100_000);
        let frame = client_frame(true, OpCode::Binary, &payload);
        assert!(feed(&mut driver, frame[..20].to_vec()).is_empty());
        let (mut buf, _) = driver.lend_payload_buffer(1).expect("lent");
        driver.receive_eof();
        buf.extend_from_slice(&frame[20..120]);
        driver.payload_received(buf, 100);
        let events = feed(&mut driver, Vec::new());
        assert!(
            matches!(
                &events[..],
                [Event::Error(Error::Io(_)), Event::Close { code: 1006, .. }]
            ),
            "{events:?}"
        );
        assert!(driver.lend_payload_buffer(1).is_none());
    }

    /// The documented panic of `payload_received`: one byte more than the frame owes (its
    /// limit, every byte it owes, is what the other loan tests receive).
    #[test]
    #[should_panic(expected = "no more than the frame's payload")]
    fn receiving_past_the_frame_into_the_lent_buffer_panics() {
        let mut driver = open_server();
        let frame = client_frame(true, OpCode::Binary, &pattern(100_000));
        assert!(feed(&mut driver, frame[..1000].to_vec()).is_empty());
        let (mut buf, room) = driver.lend_payload_buffer(1).expect("lent");
        assert_eq!(room, frame.len() - 1000, "room for exactly the rest");
        buf.extend_from_slice(&frame[1000..]);
        buf.push(0);
        driver.payload_received(buf, room + 1);
    }

    /// Commands may come while a buffer is lent: a send and a close started by this side
    /// leave the frame's reception as it would be without the loan.
    #[test]
    fn a_send_and_a_close_while_lent_change_nothing_the_loan_receives() {
        let payload = pattern(200_000);
        let frame = client_frame(true, OpCode::Binary, &payload);
        let ping = client_frame(true, OpCode::Ping, b"after");
        let mut plain = open_server();
        let mut lent = open_server();
        for driver in [&mut plain, &mut lent] {
            assert!(feed(driver, frame[..1000].to_vec()).is_empty());
        }
        let (mut buf, room) = lent.lend_payload_buffer(1).expect("lent");
        for driver in [&mut plain, &mut lent] {
            driver.send_text("x").expect("open");
            driver.close_connection(code::NORMAL, "bye").expect("open");
        }
        buf.extend_from_slice(&frame[1000..1000 + room]);
        lent.payload_received(buf, room);
        let mut rest = frame[1000..].to_vec();
        rest.extend_from_slice(&ping);
        let from_plain = feed(&mut plain, rest);
        let from_lent = feed(&mut lent, ping.clone());
        let describe = |events: &[Event<'_>]| format!("{events:?}");
        assert_eq!(describe(&from_plain), describe(&from_lent));
        assert!(
            matches!(&from_lent[..], [Event::Message(Message::Binary(b)), Event::Ping(p)]
                if b[..] == payload[..] && p[..] == b"after"[..]),
            "{from_lent:?}"
        );
        assert_eq!(plain.pending_output(), lent.pending_output());
    }
}
