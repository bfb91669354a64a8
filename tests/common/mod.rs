//! Helpers shared by the integration tests: in-memory driver pairs, owned events, raw
//! frame builders and a wire-frame parser.

#![allow(dead_code)]

use websocket_driver::protocol::frame::{OpCode, Status, parse_header, write_frame};
use websocket_driver::protocol::handshake::{HeadLimits, accept_key};
use websocket_driver::protocol::mask::apply_mask;
use websocket_driver::{
    Driver, Error, Event, HandshakeError, Message, Options, ProtocolError, Request, RequestParser,
    UsageError,
};

/// A fixed masking key for hand-built client frames.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// An error, comparable (the `Io` variant keeps only its kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Err {
    Protocol(ProtocolError),
    Handshake(HandshakeError),
    Usage(UsageError),
    Io(std::io::ErrorKind),
    Tls(String),
    /// A kind of error added after this helper (`Error` is non-exhaustive): its text.
    Other(String),
}

impl From<&Error> for Err {
    fn from(e: &Error) -> Self {
        match e {
            Error::Protocol(p) => Err::Protocol(p.clone()),
            Error::Handshake(h) => Err::Handshake(h.clone()),
            Error::Usage(u) => Err::Usage(u.clone()),
            Error::Io(io) => Err::Io(io.kind()),
            Error::Tls(e) => Err::Tls(e.to_string()),
            other => Err::Other(other.to_string()),
        }
    }
}

/// An event that outlives the read buffer and compares by value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Open,
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Error(Err),
    Close(u16, String),
}

impl Ev {
    pub fn is_close(&self) -> bool {
        matches!(self, Ev::Close(..))
    }
}

pub fn own(event: Event<'_>) -> Ev {
    match event {
        Event::Open => Ev::Open,
        Event::Message(Message::Text(t)) => Ev::Text(t.into_owned()),
        Event::Message(Message::Binary(b)) => Ev::Binary(b.into_owned()),
        Event::Ping(p) => Ev::Ping(p.into_owned()),
        Event::Pong(p) => Ev::Pong(p.into_owned()),
        Event::Error(e) => Ev::Error(Err::from(&e)),
        Event::Close { code, reason } => Ev::Close(code, reason),
    }
}

/// Feeds one read to the driver and collects every event, following the call order of the
/// `Driver` docs: call again with the rest after each event, until no event comes.
pub fn feed(driver: &mut Driver, input: &[u8]) -> Vec<Ev> {
    let mut buf = input.to_vec();
    let len = buf.len();
    let mut at = 0;
    let mut events = Vec::new();
    loop {
        let (used, event) = driver.poll_event(&mut buf[at..]);
        at += used;
        assert!(at <= len, "consumed more than the input");
        match event {
            None => {
                assert_eq!(at, len, "no event, yet input left unconsumed");
                return events;
            }
            Some(e) => {
                events.push(own(e));
                assert!(events.len() < 1_000_000, "event loop does not terminate");
            }
        }
    }
}

/// Drains queued events.
pub fn drain(driver: &mut Driver) -> Vec<Ev> {
    feed(driver, &[])
}

/// Signals the end of the transport and drains the events.
pub fn eof(driver: &mut Driver) -> Vec<Ev> {
    driver.receive_eof();
    drain(driver)
}

/// Takes all pending output (every part of it), marking it written.
pub fn take_output(driver: &mut Driver) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let part = driver.pending_output();
        if part.is_empty() {
            return out;
        }
        let n = part.len();
        out.extend_from_slice(part);
        driver.consume_output(n);
    }
}

/// Moves `from`'s pending output into `to` as one read; returns `to`'s events.
pub fn pump(from: &mut Driver, to: &mut Driver) -> Vec<Ev> {
    let bytes = take_output(from);
    feed(to, &bytes)
}

pub fn limits(options: &Options) -> HeadLimits {
    HeadLimits {
        max_size: options.max_handshake_size,
        max_headers: options.max_headers,
    }
}

/// Parses a complete request head (in one read).
pub fn parse_request(head: &[u8]) -> Request {
    match RequestParser::new(limits(&Options::default())).parse(head) {
        Ok(Status::Complete(request, used)) => {
            assert_eq!(used, head.len(), "request head followed by extra bytes");
            request
        }
        other => panic!("request did not parse: {other:?}"),
    }
}

/// A started client and the request it sent.
pub fn started_client(options: &Options) -> (Driver, Vec<u8>) {
    let mut client = Driver::make_client("ws://localhost/chat", options).unwrap();
    assert!(client.start_connection());
    let request = take_output(&mut client);
    (client, request)
}

/// The `Sec-WebSocket-Accept` a client's request expects.
pub fn expected_accept(request: &[u8]) -> String {
    let req = parse_request(request);
    accept_key(req.header("Sec-WebSocket-Key").expect("client sent a key"))
}

/// A client and a server, connected in memory, both open with nothing pending.
pub fn open_pair(client_options: &Options, server_options: &Options) -> (Driver, Driver) {
    let (mut client, request) = started_client(client_options);
    let mut server = Driver::make_server(&parse_request(&request), server_options).unwrap();
    assert!(server.start_connection());
    assert_eq!(drain(&mut server), vec![Ev::Open]);
    assert_eq!(pump(&mut server, &mut client), vec![Ev::Open]);
    assert!(client.pending_output().is_empty());
    assert!(server.pending_output().is_empty());
    (client, server)
}

/// An open server driver (its 101 response already taken).
pub fn open_server(options: &Options) -> Driver {
    open_pair(&Options::default(), options).1
}

/// An open client driver and the server it talks to.
pub fn open_client(options: &Options) -> (Driver, Driver) {
    open_pair(options, &Options::default())
}

/// A frame from hand-picked parts: `b0` is the first header byte (FIN, RSV, opcode), the
/// length uses the shortest form, and the payload is masked when `mask` is given.
pub fn raw_frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![b0];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
        let start = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[start..], key, 0);
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame as a client sends it (`b0`: FIN, RSV and opcode).
pub fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(b0, payload, Some(MASK))
}

/// A whole masked client frame of a known opcode.
pub fn masked(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, opcode, payload, Some(MASK));
    out
}

/// A close payload: code then reason.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// A frame read back from a driver's output, payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame, if it has one.
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, OpCode::Close);
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Splits bytes a driver wrote into frames; panics on anything that is not whole frames.
pub fn parse_frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (header, n) = match parse_header(bytes, 0b111) {
            Ok(Status::Complete(h, n)) => (h, n),
            other => panic!("bad frame in output: {other:?}"),
        };
        let len = header.payload_len as usize;
        assert!(bytes.len() >= n + len, "truncated frame in output");
        let mut payload = bytes[n..n + len].to_vec();
        if let Some(key) = header.mask {
            apply_mask(&mut payload, key, 0);
        }
        frames.push(Frame {
            fin: header.fin,
            rsv: header.rsv,
            opcode: header.opcode,
            mask: header.mask,
            payload,
        });
        bytes = &bytes[n + len..];
    }
    frames
}

/// A 101 response for a client's request, with extra header lines (each ending in CRLF).
pub fn response_for(request: &[u8], extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{extra}\r\n",
        expected_accept(request)
    )
    .into_bytes()
}

/// Asserts the event list is a protocol error followed by exactly one close with `code`.
pub fn assert_failed(events: &[Ev], error: ProtocolError, code: u16) {
    assert_eq!(events.len(), 2, "expected Error then Close, got {events:?}");
    assert_eq!(events[0], Ev::Error(Err::Protocol(error)));
    assert!(
        matches!(events[1], Ev::Close(c, _) if c == code),
        "{events:?}"
    );
}
