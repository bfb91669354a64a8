//! The `Driver`: one WebSocket connection as a sans-IO state machine.

use std::borrow::Cow;
use std::collections::VecDeque;

use super::error::{Error, HandshakeError, ProtocolError, UsageError, code, is_valid_close_code};
use super::frame::{
    MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, Status, parse_header, write_frame,
};
use super::handshake::{
    self, ClientUrl, Request, ResponseParser, client_request, generate_key, select_protocol,
    server_response, validate_request, validate_response,
};
use super::mask::{apply_mask, random_mask};
use super::options::Options;
use super::utf8::Utf8Validator;

/// Which end of the connection a driver plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts the upgrade; reads masked frames, writes unmasked ones.
    Server,
    /// Requests the upgrade; masks every frame it writes.
    Client,
}

/// The connection state, as the seed's `ready-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadyState {
    /// Before the handshake completes. Sends are queued.
    Connecting,
    /// Messages flow both ways.
    Open,
    /// This side sent a close frame and waits for the peer's.
    Closing,
    /// The close handshake finished, failed, or the transport ended.
    Closed,
}

/// A received message: borrowed from the read buffer when it arrived as one frame in one
/// read, owned when it was reassembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, valid UTF-8.
    Text(Cow<'a, str>),
    /// A binary message.
    Binary(Cow<'a, [u8]>),
}

impl Message<'_> {
    /// The payload bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The text, if a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(t) => Some(t),
            Message::Binary(_) => None,
        }
    }

    /// Whether a text message.
    pub fn is_text(&self) -> bool {
        matches!(self, Message::Text(_))
    }

    /// Copies a borrowed payload so the message outlives the read buffer.
    pub fn into_owned(self) -> Message<'static> {
        match self {
            Message::Text(t) => Message::Text(Cow::Owned(t.into_owned())),
            Message::Binary(b) => Message::Binary(Cow::Owned(b.into_owned())),
        }
    }
}

/// What the driver reports, in order, from [`Driver::poll_event`].
#[derive(Debug)]
pub enum Event<'a> {
    /// The handshake completed; the connection is open.
    Open,
    /// A complete message.
    Message(Message<'a>),
    /// A ping arrived (a pong is already queued while open).
    Ping(Cow<'a, [u8]>),
    /// A pong arrived.
    Pong(Cow<'a, [u8]>),
    /// The peer broke the protocol or the handshake failed. A `Close` follows.
    Error(Error),
    /// The connection is closed. Reported exactly once. `code` is the peer's close code,
    /// the code this side failed the connection with, 1005 for a close frame without a
    /// code, or 1006 when the transport ended without a close handshake.
    Close {
        /// Close code.
        code: u16,
        /// Close reason (UTF-8, possibly empty).
        reason: String,
    },
}

/// What [`Driver::send`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageType {
    /// A text message (the bytes must be UTF-8).
    Text,
    /// A binary message.
    Binary,
    /// A ping (at most 125 bytes).
    Ping,
    /// An unsolicited pong (at most 125 bytes).
    Pong,
    /// A close frame with this code; the bytes are the reason (at most 123, UTF-8).
    Close(u16),
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary, so
/// a close reason cut to fit its frame stays valid UTF-8.
fn cut_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Identifies a send: it has reached the transport once [`Driver::is_sent`] says so.
/// Tokens of one driver are ordered like their sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SendToken(u64);

#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Collecting a frame header; `len` bytes of it are in `buf`.
    Header { buf: [u8; MAX_HEADER_LEN], len: u8 },
    /// Reading the payload of `header`; `done` bytes of it are read.
    Payload {
        header: super::frame::FrameHeader,
        done: u64,
    },
    /// Closed or failed: input is ignored.
    Stopped,
}

const HEADER_START: Stage = Stage::Header {
    buf: [0; MAX_HEADER_LEN],
    len: 0,
};

/// A data message being reassembled (fragmented, or one frame split across reads).
#[derive(Debug)]
struct PartialMessage {
    text: bool,
    buf: Vec<u8>,
    utf8: Utf8Validator,
}

#[derive(Debug)]
struct ClientHandshake {
    url: ClientUrl,
    request: Vec<u8>,
    expected_accept: String,
    offered: Vec<String>,
    parser: ResponseParser,
}

#[derive(Debug)]
enum Handshake {
    /// Server: the 101 response, until `start_connection`.
    Server(Vec<u8>),
    /// Client: the request (until `start_connection`) and the response check.
    Client(Box<ClientHandshake>),
    /// Client: the server's response was refused.
    Failed(Box<HandshakeError>),
    Done,
}

/// One WebSocket connection, without IO.
///
/// Bytes read from the transport go in; events and bytes to write come out. The driver
/// reads no clock, opens nothing and never blocks, so it runs over any transport.
///
/// # Inputs
/// - [`Driver::poll_event`] with bytes read from the transport (and with an empty slice to
///   drain queued events);
/// - [`Driver::receive_eof`] when the transport ends (EOF or error).
///
/// # Commands
/// [`Driver::start_connection`], [`Driver::send`], [`Driver::send_text`],
/// [`Driver::send_binary`], [`Driver::send_ping`], [`Driver::send_pong`],
/// [`Driver::close_connection`].
///
/// # Polled outputs
/// - events, from [`Driver::poll_event`];
/// - bytes to write, from [`Driver::pending_output`] + [`Driver::consume_output`] (zero-copy)
///   or [`Driver::poll_output`] (copies into the caller's buffer);
/// - [`Driver::is_finished`]: closed and everything written, so the transport may close.
///
/// # Call order
/// 1. Create with [`Driver::make_server`] (from a parsed request) or [`Driver::make_client`].
/// 2. [`Driver::start_connection`]: queues the 101 response (server, which is then open) or
///    the upgrade request (client).
/// 3. Loop: write out [`Driver::pending_output`]; read from the transport; call
///    [`Driver::poll_event`] on the read bytes until it has consumed them all and returns no
///    event (an event may come with fewer bytes consumed: call again with the rest).
/// 4. When the transport ends, call [`Driver::receive_eof`] and drain the events.
/// 5. Stop when [`Driver::is_finished`]. A server closes the TCP connection then; a
///    client waits for the server to close it (with a timeout of its own).
#[derive(Debug)]
pub struct Driver {
    role: Role,
    state: ReadyState,
    max_length: usize,
    protocol: Option<Box<str>>,
    handshake: Handshake,
    stage: Stage,
    /// Boxed: most connections have no message in progress most of the time.
    message: Option<Box<PartialMessage>>,
    control: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Handshake bytes at `out[out_pos..]` not yet written; only these go out while connecting.
    handshake_left: usize,
    frames_appended: u64,
    frames_written: u64,
    events: VecDeque<Event<'static>>,
    close_reported: bool,
}

impl Driver {
    fn new(role: Role, max_length: usize, handshake: Handshake) -> Driver {
        Driver {
            role,
            state: ReadyState::Connecting,
            max_length,
            protocol: None,
            handshake,
            stage: HEADER_START,
            message: None,
            control: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            handshake_left: 0,
            frames_appended: 0,
            frames_written: 0,
            events: VecDeque::new(),
            close_reported: false,
        }
    }

    /// A server driver for a parsed upgrade request (the seed's `make-server`).
    ///
    /// Fails with [`Error::Handshake`] for a request that is not a valid upgrade; answer it
    /// with [`handshake::error_response`]. The subprotocol is the first one the client
    /// offers that `options.accept_protocols` holds.
    pub fn make_server(request: &Request, options: &Options) -> Result<Driver, Error> {
        options.validate()?;
        let accept = validate_request(request)?;
        let protocol = select_protocol(request, &options.accept_protocols);
        let response = server_response(&accept, protocol.as_deref(), &options.additional_headers);
        let mut driver = Driver::new(
            Role::Server,
            options.max_length,
            Handshake::Server(response),
        );
        driver.protocol = protocol.map(String::into_boxed_str);
        Ok(driver)
    }

    /// A client driver for a `ws://` or `wss://` URL (the seed's `make-client`). TLS, if
    /// any, is the transport's business; the URL sets `Host` and the request target.
    pub fn make_client(url: &str, options: &Options) -> Result<Driver, Error> {
        options.validate()?;
        let url = ClientUrl::parse(url)?;
        let key = generate_key();
        let request = client_request(
            &url,
            &key,
            &options.accept_protocols,
            &options.additional_headers,
        );
        let hs = ClientHandshake {
            url,
            request,
            expected_accept: handshake::accept_key(&key),
            offered: options.accept_protocols.clone(),
            parser: ResponseParser::new(options.head_limits()),
        };
        Ok(Driver::new(
            Role::Client,
            options.max_length,
            Handshake::Client(Box::new(hs)),
        ))
    }

    /// Server or client.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Always `"hybi-13"` (RFC 6455).
    pub fn version(&self) -> &'static str {
        "hybi-13"
    }

    /// The agreed subprotocol, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The connection state.
    pub fn ready_state(&self) -> ReadyState {
        self.state
    }

    /// Whether the opening handshake completed (the connection was open at some point).
    pub fn is_handshake_complete(&self) -> bool {
        matches!(self.handshake, Handshake::Done) && self.state != ReadyState::Connecting
    }

    /// Why a client's opening handshake failed, if it did.
    pub fn handshake_error(&self) -> Option<&HandshakeError> {
        match &self.handshake {
            Handshake::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The parsed URL of a client driver.
    pub fn url(&self) -> Option<&ClientUrl> {
        match &self.handshake {
            Handshake::Client(hs) => Some(&hs.url),
            _ => None,
        }
    }

    /// Sends the handshake: the 101 response (server, which opens the connection and
    /// queues [`Event::Open`]) or the upgrade request (client). Returns false if the driver
    /// is not connecting or was already started.
    pub fn start_connection(&mut self) -> bool {
        if self.state != ReadyState::Connecting {
            return false;
        }
        match &mut self.handshake {
            Handshake::Server(response) => {
                let response = std::mem::take(response);
                self.prepend_handshake(response);
                self.handshake = Handshake::Done;
                self.state = ReadyState::Open;
                self.events.push_back(Event::Open);
                true
            }
            Handshake::Client(hs) if !hs.request.is_empty() => {
                let request = std::mem::take(&mut hs.request);
                self.prepend_handshake(request);
                true
            }
            _ => false,
        }
    }

    /// Handshake bytes go before frames queued while connecting.
    fn prepend_handshake(&mut self, bytes: Vec<u8>) {
        self.handshake_left = bytes.len();
        self.out.splice(self.out_pos..self.out_pos, bytes);
    }

    // ----- input -----

    /// Feeds bytes read from the transport and returns `(consumed, event)`.
    ///
    /// With no event, all of `input` was consumed. With an event, call again with
    /// `&mut input[consumed..]` (and finally with an empty slice) until no event comes.
    /// Payloads are unmasked in place, so an unfragmented message that arrived in one read
    /// is handed out borrowed from `input` without a copy.
    pub fn poll_event<'i>(&mut self, input: &'i mut [u8]) -> (usize, Option<Event<'i>>) {
        if let Some(event) = self.events.pop_front() {
            if self.events.is_empty() {
                // Events queue up only around open, errors and close: free the queue so an
                // idle connection holds no allocation for it.
                self.events = VecDeque::new();
            }
            return (0, Some(event));
        }
        if matches!(self.handshake, Handshake::Client(_)) && self.state == ReadyState::Connecting {
            return self.read_response(input);
        }
        self.read_frames(input)
    }

    /// The transport ended (EOF or error). Queues `Error` if a frame or message was cut
    /// off, and `Close` 1006 unless the connection already reported its close.
    pub fn receive_eof(&mut self) {
        if self.close_reported {
            self.state = ReadyState::Closed;
            return;
        }
        let cut_off = self.message.is_some()
            || matches!(
                self.stage,
                Stage::Payload { .. } | Stage::Header { len: 1.., .. }
            );
        if self.state == ReadyState::Connecting && self.role == Role::Client {
            self.events
                .push_back(Event::Error(Error::Handshake(HandshakeError::Incomplete)));
        } else if cut_off {
            self.events
                .push_back(Event::Error(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame",
                ))));
        }
        self.stop();
        self.queue_close(code::ABNORMAL, String::new());
    }

    fn read_response<'i>(&mut self, input: &'i mut [u8]) -> (usize, Option<Event<'i>>) {
        let Handshake::Client(hs) = &mut self.handshake else {
            unreachable!("checked by the caller")
        };
        let outcome = match hs.parser.parse(input) {
            Ok(Status::Partial) => return (input.len(), None),
            Ok(Status::Complete(response, used)) => {
                validate_response(&response, &hs.expected_accept, &hs.offered)
                    .map(|p| (p, used))
                    .map_err(|e| match e {
                        HandshakeError::UnexpectedStatus { status, .. } => {
                            // The body as far as it came with the head: Content-Length bytes,
                            // else everything up to the close (RFC 9112 §6.3), at most 1 KiB.
                            let rest = &input[used..];
                            let declared = response
                                .header("content-length")
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(rest.len());
                            let take = rest.len().min(declared).min(1024);
                            let body = String::from_utf8_lossy(&rest[..take]).into_owned();
                            HandshakeError::UnexpectedStatus { status, body }
                        }
                        other => other,
                    })
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok((protocol, used)) => {
                self.protocol = protocol.map(String::into_boxed_str);
                self.handshake = Handshake::Done;
                self.state = ReadyState::Open;
                (used, Some(Event::Open))
            }
            Err(e) => {
                self.handshake = Handshake::Failed(Box::new(e.clone()));
                // Frames queued for a connection that never opened are dropped.
                self.out.truncate(self.out_pos + self.handshake_left);
                self.stop();
                self.queue_close(code::ABNORMAL, e.to_string());
                (input.len(), Some(Event::Error(Error::Handshake(e))))
            }
        }
    }

    fn check_header(&self, h: &super::frame::FrameHeader) -> Result<(), ProtocolError> {
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        let buffered = match (h.opcode, &self.message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(m)) => m.buf.len() as u64,
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::UnfinishedMessage);
            }
            _ => 0,
        };
        let len = buffered + h.payload_len;
        if !h.opcode.is_control() && len > self.max_length as u64 {
            return Err(ProtocolError::MessageTooLarge {
                len,
                max: self.max_length,
            });
        }
        Ok(())
    }

    fn read_frames<'i>(&mut self, mut input: &'i mut [u8]) -> (usize, Option<Event<'i>>) {
        let total = input.len();
        let mut pos = 0;
        loop {
            match self.stage {
                Stage::Stopped => return (total, None),
                Stage::Header { mut buf, len } => {
                    if pos == total {
                        return (total, None);
                    }
                    let have = len as usize;
                    let avail = &input[pos..];
                    let parsed = if have == 0 {
                        parse_header(avail, 0)
                    } else {
                        let take = (MAX_HEADER_LEN - have).min(avail.len());
                        buf[have..have + take].copy_from_slice(&avail[..take]);
                        parse_header(&buf[..have + take], 0)
                    };
                    match parsed {
                        Err(e) => return self.fail(total, e),
                        Ok(Status::Partial) => {
                            // Fewer than 14 bytes remain: keep them for the next read.
                            let rest = total - pos;
                            if have == 0 {
                                buf[..rest].copy_from_slice(avail);
                            }
                            self.stage = Stage::Header {
                                buf,
                                len: (have + rest) as u8,
                            };
                            return (total, None);
                        }
                        Ok(Status::Complete(header, n)) => {
                            pos += n - have;
                            if let Err(e) = self.check_header(&header) {
                                return self.fail(total, e);
                            }
                            if header.opcode.is_control() {
                                self.control.clear();
                            }
                            self.stage = Stage::Payload { header, done: 0 };
                        }
                    }
                }
                Stage::Payload { header, done } => {
                    let remaining = header.payload_len - done;
                    let avail = (total - pos) as u64;
                    let opcode = header.opcode;
                    let whole =
                        opcode.is_control() || (header.fin && opcode != OpCode::Continuation);
                    if done == 0 && whole && avail >= remaining {
                        // Fast path: the whole frame is in this read; hand it out borrowed.
                        let len = remaining as usize;
                        self.stage = HEADER_START;
                        let payload = &mut std::mem::take(&mut input)[pos..pos + len];
                        pos += len;
                        if let Some(key) = header.mask {
                            apply_mask(payload, key, 0);
                        }
                        let payload: &'i [u8] = payload;
                        return match opcode {
                            OpCode::Text => match simdutf8::basic::from_utf8(payload) {
                                Ok(text) => (
                                    pos,
                                    Some(Event::Message(Message::Text(Cow::Borrowed(text)))),
                                ),
                                Err(_) => self.fail(total, ProtocolError::InvalidUtf8),
                            },
                            OpCode::Binary => (
                                pos,
                                Some(Event::Message(Message::Binary(Cow::Borrowed(payload)))),
                            ),
                            _ => match self.control_frame(opcode, Cow::Borrowed(payload)) {
                                Ok(event) => (pos, event),
                                Err(e) => self.fail(total, e),
                            },
                        };
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
                        self.control.extend_from_slice(chunk);
                    } else {
                        let message = self.message.get_or_insert_with(|| {
                            Box::new(PartialMessage {
                                text: opcode == OpCode::Text,
                                buf: Vec::new(),
                                utf8: Utf8Validator::new(),
                            })
                        });
                        if message.text && message.utf8.feed(chunk).is_err() {
                            return self.fail(total, ProtocolError::InvalidUtf8);
                        }
                        let needed = message.buf.len() + chunk.len();
                        if needed > message.buf.capacity() {
                            // Grow by doubling, from what actually arrived (a declared length
                            // is not trusted), and never past max_length: the header check
                            // guarantees `needed <= max_length`.
                            let target = needed.max(message.buf.len() * 2).min(self.max_length);
                            message.buf.reserve_exact(target - message.buf.len());
                        }
                        message.buf.extend_from_slice(chunk);
                    }
                    if done < header.payload_len {
                        self.stage = Stage::Payload { header, done };
                        return (pos, None);
                    }
                    self.stage = HEADER_START;
                    if opcode.is_control() {
                        let payload = std::mem::take(&mut self.control);
                        return match self.control_frame(opcode, Cow::Owned(payload)) {
                            Ok(event) => (pos, event),
                            Err(e) => self.fail(total, e),
                        };
                    }
                    if header.fin {
                        let message = self.message.take().expect("a data frame has a message");
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
                if self.state == ReadyState::Open {
                    self.push_frame(OpCode::Pong, &payload);
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
                self.stop();
                self.queue_close(close_code, reason);
                // Nothing else is queued while frames are parsed, so this is the Close.
                Ok(self.events.pop_front())
            }
        }
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

    fn stop(&mut self) {
        self.state = ReadyState::Closed;
        self.stage = Stage::Stopped;
        self.message = None;
        self.control = Vec::new();
    }

    /// Queues the `Close` event, the first time only.
    fn queue_close(&mut self, code: u16, reason: String) {
        if !self.close_reported {
            self.close_reported = true;
            self.events.push_back(Event::Close { code, reason });
        }
    }

    // ----- commands -----

    fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) -> SendToken {
        let mask = match self.role {
            Role::Client => Some(random_mask()),
            Role::Server => None,
        };
        let n = write_frame(&mut self.out, opcode, payload, mask);
        self.frames_appended += n as u64;
        SendToken(self.frames_appended)
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

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) -> Result<SendToken, Error> {
        self.writable()?;
        Ok(self.push_frame(OpCode::Text, text.as_bytes()))
    }

    /// Sends a binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<SendToken, Error> {
        self.writable()?;
        Ok(self.push_frame(OpCode::Binary, data))
    }

    /// Sends a ping. Match the pong with [`Event::Pong`]'s payload (the closure API's
    /// `send_ping` does that for you).
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
                self.out.truncate(self.out_pos + self.handshake_left);
                self.stop();
                self.queue_close(close_code, reason.to_string());
                Ok(SendToken(self.frames_appended))
            }
            ReadyState::Open => {
                let mut payload = Vec::with_capacity(2 + reason.len());
                payload.extend_from_slice(&close_code.to_be_bytes());
                payload.extend_from_slice(reason.as_bytes());
                let token = self.push_frame(OpCode::Close, &payload);
                self.state = ReadyState::Closing;
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
            self.out.truncate(self.out_pos + self.handshake_left);
        }
        self.stop();
        self.queue_close(close_code, reason.to_string());
    }

    // ----- output -----

    fn releasable_end(&self) -> usize {
        if self.state == ReadyState::Connecting {
            self.out_pos + self.handshake_left
        } else {
            self.out.len()
        }
    }

    /// Bytes ready for the transport, without copying. Report what was written with
    /// [`Driver::consume_output`].
    pub fn pending_output(&self) -> &[u8] {
        &self.out[self.out_pos..self.releasable_end()]
    }

    /// Marks the first `n` bytes of [`Driver::pending_output`] as written.
    pub fn consume_output(&mut self, n: usize) {
        assert!(
            n <= self.releasable_end() - self.out_pos,
            "consumed more than was pending"
        );
        self.out_pos += n;
        let handshake = n.min(self.handshake_left);
        self.handshake_left -= handshake;
        self.frames_written += (n - handshake) as u64;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= 64 * 1024 && self.out_pos * 2 >= self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Hands all pending output over as an owned buffer, for completion-based transports
    /// (io_uring) where the kernel holds the bytes until the send completes. `spare` (an
    /// empty buffer, e.g. from a pool) becomes the driver's new output buffer. The bytes
    /// count as written (for [`Driver::is_sent`]) from this moment.
    pub fn take_output(&mut self, spare: Vec<u8>) -> Option<Vec<u8>> {
        let end = self.releasable_end();
        let n = end - self.out_pos;
        if n == 0 {
            return None;
        }
        if end < self.out.len() {
            // Still connecting: only the handshake may go, frames stay queued behind it.
            let bytes = self.out[self.out_pos..end].to_vec();
            self.consume_output(n);
            return Some(bytes);
        }
        let mut taken = std::mem::replace(&mut self.out, spare);
        self.out.clear();
        taken.drain(..self.out_pos);
        self.out_pos = 0;
        let handshake = n.min(self.handshake_left);
        self.handshake_left -= handshake;
        self.frames_written += (n - handshake) as u64;
        Some(taken)
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
    pub fn buffered_amount(&self) -> usize {
        self.out.len() - self.out_pos
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

    /// Gives the driver an empty buffer (from a pool) to write into; ignored if the driver
    /// already has one.
    pub fn provide_output_buffer(&mut self, mut buf: Vec<u8>) {
        if self.out.capacity() == 0 {
            buf.clear();
            self.out = buf;
            self.out_pos = 0;
        }
    }

    /// Whether the send identified by `token` has been handed to the transport.
    pub fn is_sent(&self, token: SendToken) -> bool {
        self.frames_written >= token.0
    }

    /// Closed, with every queued byte written: the transport may close now.
    pub fn is_finished(&self) -> bool {
        self.state == ReadyState::Closed
            && self.pending_output().is_empty()
            && self.events.is_empty()
    }
}
