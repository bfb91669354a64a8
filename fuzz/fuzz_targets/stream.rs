//! A whole connection: a real handshake between a client and a server driver, then the
//! fuzz input drives the server (bytes "from the client", in fuzz-chosen reads, and the
//! server's own sends), and everything the server writes goes to the client driver in
//! fuzz-chosen chunks.
//!
//! The input is a list of operations, each an opcode byte `op` and its arguments. Payloads
//! that run past the end of the input are padded, so long messages need no long inputs.
//!
//! | `op % 16` | arguments | operation |
//! |---|---|---|
//! | 0–3 | `len`, bytes | one read of `len` raw bytes (0: the rest of the input) to the server |
//! | 4–6 | `b0`, `l`, [ext len], key(4), payload, `chunk` | a masked frame: first byte `b0`; length `l` (≤ 125), `126 + (l - 126) * 32` (126..=253), a u16 in the 126 form (254), a u64 in the 127 form (255); fed in reads of `chunk` bytes (0: one read) |
//! | 7 | u16 `len`, bytes | server `send_text` (`send(Text)` when not UTF-8), `len % 4097`; `op & 0x20`: `send_shared` of a `SharedFrame`; else `op & 0x40`: `send_message_owned` |
//! | 8 | u16 `len`, bytes | server `send_binary` (`send(Binary)` if `op & 0x10`); `op & 0x20`: `send_shared`; else `op & 0x40`: `send_message_owned`, `OWNED_MIN` bytes longer if `op & 0x80` (queued by value, written from its own allocation) |
//! | 9, 10 | `len`, bytes | server `send_ping` / `send_pong` (over 125 must fail) |
//! | 11 | u16 `code`, `len`, reason | server `close_connection` (`code` indexes a list of valid codes unless `op & 0x10`) |
//! | 12, 13 | `chunk` | all server output to the client, `chunk` bytes a read (0: one read); `op & 0x20`: gathered from `pending_output_vectored` with `1 + op >> 6` slices a write |
//! | 14 | `n` | up to `8 * n` bytes of server output to the client, one read; `op & 0x20`: through `take_output` (as io_uring sends: the batch stays in flight, `n` bytes of it written now, and must be written whole before anything else) |
//! | 15 | | server `receive_eof` |
//!
//! Flushes use `pending_output` + `consume_output`, or `poll_output` if `op & 0x10`. A batch
//! taken with `take_output` and not yet written whole goes first; once written, its buffer
//! goes back to the driver (`provide_output_buffer`), as the reactor's pool would.
//!
//! Checked, server side: nothing panics; `poll_event` consumes all input when it reports no
//! event and converges; `Open` first; at most one `Close`; no event after `Close`; errors are
//! protocol errors (or I/O at EOF); sends succeed exactly while open and fail with the
//! documented usage errors otherwise.
//!
//! Checked, client side (the server must only write valid frames): the client never reports
//! an `Error` (in particular no `Error::Protocol`); at most one `Close`; no `Message` after
//! `Close`; and the client's events are exactly, in order, what the server sent: its
//! messages, pings and pongs (sent or automatic), and its close frame (sent, echoed or the
//! one failing the connection). At the end every send is written (`is_sent`), and after EOF
//! both drivers are finished.

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;

mod common;
use common::{Input, handshake_with};
use websocket_driver::protocol::driver::{OWNED_MIN, Outgoing};
use websocket_driver::protocol::frame::{SharedFrame, Status, parse_header};
use websocket_driver::{
    Driver, Error, Event, Message, MessageType, Options, ReadyState, SendToken, UsageError, code,
};

const MAX_LENGTH: usize = 4096;

/// What the client must report next, from what the server put on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Open,
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
}

/// Follows the server's output stream (101 response, then frames) as the client reads it.
#[derive(Clone)]
struct Wire {
    response_left: usize,
    header: Vec<u8>,
    payload_left: u64,
}

impl Wire {
    /// Advances over `bytes`; true if the last one completed the header of a data frame
    /// with a non-empty payload.
    fn advance(&mut self, bytes: &[u8]) -> bool {
        let mut at_cut = false;
        for &b in bytes {
            at_cut = false;
            if self.response_left > 0 {
                self.response_left -= 1;
            } else if self.payload_left > 0 {
                self.payload_left -= 1;
            } else {
                self.header.push(b);
                match parse_header(&self.header, 0) {
                    Ok(Status::Partial) => {}
                    Ok(Status::Complete(h, _)) => {
                        self.header.clear();
                        self.payload_left = h.payload_len;
                        at_cut = h.payload_len > 0 && !h.opcode.is_control();
                    }
                    // The client reports it; the check there fails the run.
                    Err(_) => self.header.clear(),
                }
            }
        }
        at_cut
    }
}

struct Server {
    driver: Driver,
    wire: Wire,
    opened: bool,
    closed: bool,
    last_token: Option<SendToken>,
    /// A batch from `take_output` the "kernel" still holds, and how much of it is written.
    in_flight: Outgoing,
    in_flight_sent: usize,
}

struct Client {
    driver: Driver,
    closed: bool,
    expect: VecDeque<Expect>,
}

impl Server {
    /// One read from the transport: poll until the read is used up and no event comes.
    fn feed(&mut self, input: &mut [u8], client: &mut Client) {
        let total = input.len();
        let mut pos = 0;
        let mut polls = 0usize;
        loop {
            polls += 1;
            assert!(polls <= total + 16, "server poll_event does not converge");
            let before = self.driver.ready_state();
            let (n, event) = self.driver.poll_event(&mut input[pos..]);
            assert!(n <= total - pos, "server consumed more than it was given");
            pos += n;
            let Some(event) = event else {
                assert_eq!(pos, total, "server: no event, but input left over");
                return;
            };
            assert!(!self.closed, "server reported {event:?} after Close");
            if !matches!(event, Event::Open) {
                assert!(self.opened, "server reported {event:?} before Open");
            }
            match event {
                Event::Open => {
                    assert!(!self.opened, "server reported Open twice");
                    self.opened = true;
                }
                Event::Message(Message::Text(t)) => assert!(t.len() <= MAX_LENGTH),
                Event::Message(Message::Binary(b)) => assert!(b.len() <= MAX_LENGTH),
                Event::Ping(p) => {
                    assert!(p.len() <= 125);
                    if before == ReadyState::Open {
                        client.expect.push_back(Expect::Pong(p.to_vec()));
                    }
                }
                Event::Pong(p) => assert!(p.len() <= 125),
                Event::Error(Error::Protocol(e)) => {
                    if before == ReadyState::Open {
                        // The failing close frame: the error's code and (up to 123 bytes of) its text.
                        let mut reason = e.to_string();
                        reason.truncate(123);
                        client
                            .expect
                            .push_back(Expect::Close(e.close_code(), reason));
                    }
                    assert_eq!(self.driver.ready_state(), ReadyState::Closed);
                }
                Event::Error(Error::Io(_)) => {
                    assert_eq!(before, ReadyState::Closed, "I/O error outside EOF")
                }
                Event::Error(e) => panic!("server reported an unexpected error: {e:?}"),
                Event::Close { code: c, .. } => {
                    self.closed = true;
                    if before == ReadyState::Open {
                        // A close frame from the peer while open is echoed (code only).
                        client.expect.push_back(Expect::Close(c, String::new()));
                    }
                    assert_eq!(self.driver.ready_state(), ReadyState::Closed);
                }
            }
        }
    }

    /// Sends a data message the way `op` picks: as a `SharedFrame` (`op & 0x20`), by value
    /// (`op & 0x40`), or with `plain`.
    fn send_by(
        &mut self,
        op: u8,
        message: Message<'static>,
        plain: impl FnOnce(&mut Driver) -> Result<SendToken, Error>,
    ) -> Result<Option<SendToken>, Error> {
        if op & 0x20 != 0 {
            let kind = match message {
                Message::Text(_) => MessageType::Text,
                Message::Binary(_) => MessageType::Binary,
            };
            let frame = SharedFrame::new(message.as_bytes(), kind).expect("a shared frame");
            self.driver.send_shared(&frame).map(|()| None)
        } else if op & 0x40 != 0 {
            self.driver.send_message_owned(message).map(Some)
        } else {
            plain(&mut self.driver).map(Some)
        }
    }

    /// Checks a send's result (`None`: a send without a token, `send_shared`).
    fn sent(
        &mut self,
        before: ReadyState,
        result: Result<Option<SendToken>, Error>,
        expect: Expect,
        client: &mut Client,
    ) {
        match result {
            Ok(token) => {
                assert_eq!(
                    before,
                    ReadyState::Open,
                    "a send succeeded while {before:?}"
                );
                if let Some(token) = token {
                    if let Some(last) = self.last_token {
                        assert!(token >= last, "send tokens out of order");
                    }
                    self.last_token = Some(token);
                }
                client.expect.push_back(expect);
            }
            Err(Error::Usage(UsageError::NotOpen)) => {
                assert_ne!(before, ReadyState::Open, "NotOpen while open");
            }
            Err(e) => panic!("unexpected send error {e:?} for {expect:?}"),
        }
    }

    /// Writes up to `limit` more bytes of the batch in flight; when it is written whole,
    /// its buffer goes back to the driver. Returns how many bytes it wrote.
    fn write_in_flight(&mut self, client: &mut Client, limit: usize) -> usize {
        let left = self.in_flight.len() - self.in_flight_sent;
        let want = left.min(limit);
        let mut read = Vec::with_capacity(want);
        self.in_flight.parts(self.in_flight_sent, |part| {
            let take = part.len().min(want - read.len());
            read.extend_from_slice(&part[..take]);
        });
        assert_eq!(
            read.len(),
            want,
            "the batch's parts are shorter than its length"
        );
        self.in_flight_sent += want;
        if !self.in_flight.is_empty() && self.in_flight_sent == self.in_flight.len() {
            let buf = self.in_flight.set_own(Vec::new());
            self.in_flight.clear();
            self.in_flight_sent = 0;
            self.driver.provide_output_buffer(buf);
        }
        if !read.is_empty() {
            self.wire.advance(&read);
            client.feed(&mut read);
        }
        want
    }

    /// Up to `limit` bytes through `take_output`: the batch in flight first, then a new one.
    fn flush_taken(&mut self, client: &mut Client, limit: usize) {
        let moved = self.write_in_flight(client, limit);
        if moved < limit
            && self.in_flight.is_empty()
            && self.driver.take_output(&mut self.in_flight)
        {
            let left = self.driver.buffered_amount();
            assert_eq!(left, 0, "take_output left {left} bytes behind");
            self.write_in_flight(client, limit - moved);
        }
    }

    /// All pending output, gathered from up to `slices` parts per write of at most `chunk`
    /// bytes (a short `writev`), after the batch in flight.
    fn flush_vectored(&mut self, client: &mut Client, chunk: usize, slices: usize) {
        self.write_in_flight(client, usize::MAX);
        loop {
            let mut parts = [std::io::IoSlice::new(&[]); 4];
            let n = self.driver.pending_output_vectored(&mut parts[..slices]);
            let mut read = Vec::new();
            for part in &parts[..n] {
                let take = part.len().min(chunk - read.len());
                read.extend_from_slice(&part[..take]);
                if read.len() == chunk {
                    break;
                }
            }
            if read.is_empty() {
                assert_eq!(n, 0, "empty slices in the pending output");
                break;
            }
            assert!(
                read.starts_with(self.driver.pending_output())
                    || self.driver.pending_output().starts_with(&read),
                "pending_output and pending_output_vectored disagree"
            );
            self.driver.consume_output(read.len());
            self.wire.advance(&read);
            client.feed(&mut read);
        }
    }

    /// Moves up to `limit` bytes of server output to the client, `chunk` bytes a read.
    fn flush(&mut self, client: &mut Client, chunk: usize, limit: usize, copy: bool) {
        let mut moved = self.write_in_flight(client, limit);
        while moved < limit {
            let pending = self.driver.pending_output();
            if pending.is_empty() {
                break;
            }
            let n = pending.len().min(chunk).min(limit - moved);
            self.wire.advance(&pending[..n]);
            let mut read = if copy {
                let mut buf = vec![0u8; n];
                assert_eq!(self.driver.poll_output(&mut buf), n);
                buf
            } else {
                let buf = pending[..n].to_vec();
                self.driver.consume_output(n);
                buf
            };
            moved += n;
            client.feed(&mut read);
        }
    }
}

impl Client {
    fn feed(&mut self, input: &mut [u8]) {
        let total = input.len();
        let mut pos = 0;
        let mut polls = 0usize;
        loop {
            polls += 1;
            assert!(polls <= total + 16, "client poll_event does not converge");
            let (n, event) = self.driver.poll_event(&mut input[pos..]);
            assert!(n <= total - pos, "client consumed more than it was given");
            pos += n;
            let Some(event) = event else {
                assert_eq!(pos, total, "client: no event, but input left over");
                break;
            };
            self.check(event);
        }
        // The client's pongs and close echoes go nowhere.
        let n = self.driver.pending_output().len();
        self.driver.consume_output(n);
    }

    fn check(&mut self, event: Event<'_>) {
        if let Event::Error(e) = &event {
            match e {
                Error::Protocol(p) => {
                    panic!("client got a protocol error from the server's output: {p:?}")
                }
                other => panic!("client reported an error: {other:?}"),
            }
        }
        if matches!(event, Event::Message(_)) {
            assert!(!self.closed, "client reported a Message after Close");
        }
        if matches!(event, Event::Close { .. }) {
            assert!(!self.closed, "client reported Close twice");
            self.closed = true;
        }
        assert!(
            !self.closed || matches!(event, Event::Close { .. }),
            "client event after Close: {event:?}"
        );
        let got = match event {
            Event::Open => Expect::Open,
            Event::Message(Message::Text(t)) => Expect::Text(t.into_owned()),
            Event::Message(Message::Binary(b)) => Expect::Binary(b.into_owned()),
            Event::Ping(p) => Expect::Ping(p.into_owned()),
            Event::Pong(p) => Expect::Pong(p.into_owned()),
            Event::Close { code, reason } => Expect::Close(code, reason),
            Event::Error(_) => unreachable!(),
        };
        let want = self.expect.pop_front();
        assert_eq!(
            Some(&got),
            want.as_ref(),
            "client event differs from what the server sent"
        );
    }
}

fn run(mut input: Input<'_>) {
    let options = Options::default().max_length(MAX_LENGTH);
    // The client takes the server's messages sent by value past `OWNED_MIN`.
    let client_options = Options::default().max_length(OWNED_MIN + MAX_LENGTH);

    // The handshake, for real: the client's request through the server's parser.
    let (client_driver, server_driver) = handshake_with(&client_options, &options);

    let mut client = Client {
        driver: client_driver,
        closed: false,
        expect: VecDeque::from([Expect::Open]),
    };
    let response_len = server_driver.pending_output().len();
    let mut server = Server {
        driver: server_driver,
        wire: Wire {
            response_left: response_len,
            header: Vec::new(),
            payload_left: 0,
        },
        opened: false,
        closed: false,
        last_token: None,
        in_flight: Outgoing::default(),
        in_flight_sent: 0,
    };
    // Drains the queued Open.
    server.feed(&mut [], &mut client);
    assert!(server.opened);

    while let Some(op) = input.byte() {
        let before = server.driver.ready_state();
        match op % 16 {
            // A read of raw bytes "from the client"; length 0 means the rest of the input.
            0..=3 => {
                let Some(len) = input.byte() else { break };
                let len = if len == 0 { usize::MAX } else { len as usize };
                let mut read = input.bytes(len).to_vec();
                server.feed(&mut read, &mut client);
            }
            // A masked frame with a fuzzed first byte, length, key and payload, in reads.
            4..=6 => {
                let (Some(b0), Some(l)) = (input.byte(), input.byte()) else {
                    break;
                };
                let mut frame = vec![b0];
                let len: u64 = match l {
                    0..=125 => l as u64,
                    126..=253 => 126 + (l as u64 - 126) * 32,
                    254 => input.u16().unwrap_or(0) as u64,
                    255 => u64::from_be_bytes(input.payload(8, 0).try_into().unwrap()),
                };
                match len {
                    0..=125 if l != 254 && l != 255 => frame.push(0x80 | len as u8),
                    0..=0xffff if l != 255 => {
                        frame.push(0x80 | 126);
                        frame.extend_from_slice(&(len as u16).to_be_bytes());
                    }
                    _ => {
                        frame.push(0x80 | 127);
                        frame.extend_from_slice(&len.to_be_bytes());
                    }
                }
                let key: [u8; 4] = input.payload(4, 0).try_into().unwrap();
                frame.extend_from_slice(&key);
                let plain = if len <= 0xffff {
                    input.payload(len as usize, b'a')
                } else {
                    input.bytes(len.min(1 << 20) as usize).to_vec()
                };
                frame.extend(plain.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
                let chunk = match input.byte() {
                    None | Some(0) => frame.len(),
                    Some(c) => c as usize,
                };
                for read in frame.chunks_mut(chunk.max(1)) {
                    server.feed(read, &mut client);
                }
            }
            7 => {
                let len = input.u16().unwrap_or(0) as usize % (MAX_LENGTH + 1);
                let data = input.payload(len, b'x');
                match std::str::from_utf8(&data) {
                    Ok(text) => {
                        let owned = Message::Text(text.to_string().into());
                        let result = server.send_by(op, owned, |d| d.send_text(text));
                        server.sent(before, result, Expect::Text(text.to_string()), &mut client);
                    }
                    Err(_) if op & 0x20 != 0 => match SharedFrame::new(&data, MessageType::Text) {
                        Err(Error::Usage(UsageError::InvalidUtf8)) => {}
                        Err(e) => panic!("a shared frame of invalid text: {e:?}"),
                        Ok(_) => panic!("a shared frame of invalid text was made"),
                    },
                    Err(_) => match server.driver.send(&data, MessageType::Text) {
                        Err(Error::Usage(UsageError::InvalidUtf8)) => {}
                        other => panic!("send of invalid text: {other:?}"),
                    },
                }
            }
            8 => {
                let mut len = input.u16().unwrap_or(0) as usize % (MAX_LENGTH + 1);
                if op & 0x60 == 0x40 && op & 0x80 != 0 {
                    len += OWNED_MIN;
                }
                let data = input.payload(len, 0xfe);
                let owned = Message::Binary(data.clone().into());
                let result = server.send_by(op, owned, |d| match op & 0x10 {
                    0 => d.send_binary(&data),
                    _ => d.send(&data, MessageType::Binary),
                });
                server.sent(before, result, Expect::Binary(data), &mut client);
            }
            9 | 10 => {
                let len = input.byte().unwrap_or(0) as usize;
                let data = input.payload(len, b'p');
                let (result, expect) = if op % 16 == 9 {
                    (
                        server.driver.send_ping(&data).map(Some),
                        Expect::Ping(data.clone()),
                    )
                } else {
                    (
                        server.driver.send_pong(&data).map(Some),
                        Expect::Pong(data.clone()),
                    )
                };
                if len > 125 {
                    assert!(
                        matches!(result, Err(Error::Usage(UsageError::ControlPayloadTooLong))),
                        "{result:?}"
                    );
                } else {
                    server.sent(before, result, expect, &mut client);
                }
            }
            11 => {
                let Some(c) = input.u16() else { break };
                // Mostly codes that may be sent, sometimes the raw value.
                let c = if op & 0x10 != 0 {
                    c
                } else {
                    [
                        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
                    ][c as usize % 11]
                };
                let len = input.byte().unwrap_or(0) as usize % 130;
                let reason = input.payload(len, b'r');
                let valid_code = matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999);
                match std::str::from_utf8(&reason) {
                    Ok(text) => {
                        let result = server.driver.close_connection(c, text).map(Some);
                        if !valid_code {
                            assert!(
                                matches!(result, Err(Error::Usage(UsageError::InvalidCloseCode(x))) if x == c),
                                "{result:?}"
                            );
                        } else if text.len() > 123 {
                            assert!(
                                matches!(result, Err(Error::Usage(UsageError::CloseReasonTooLong))),
                                "{result:?}"
                            );
                        } else {
                            server.sent(
                                before,
                                result,
                                Expect::Close(c, text.to_string()),
                                &mut client,
                            );
                            if before == ReadyState::Open {
                                assert_eq!(server.driver.ready_state(), ReadyState::Closing);
                            }
                        }
                    }
                    Err(_) => match server.driver.send(&reason, MessageType::Close(c)) {
                        Err(Error::Usage(UsageError::InvalidUtf8)) => {}
                        other => panic!("close with an invalid reason: {other:?}"),
                    },
                }
            }
            12 | 13 => {
                let chunk = match input.byte() {
                    None | Some(0) => usize::MAX,
                    Some(c) => c as usize,
                };
                if op & 0x20 != 0 {
                    server.flush_vectored(&mut client, chunk, 1 + (op >> 6) as usize);
                } else {
                    server.flush(&mut client, chunk, usize::MAX, op & 0x10 != 0);
                }
            }
            14 => {
                let limit = input.byte().unwrap_or(0) as usize * 8;
                if op & 0x20 != 0 {
                    server.flush_taken(&mut client, limit);
                } else {
                    server.flush(&mut client, usize::MAX, limit, op & 0x10 != 0);
                }
            }
            _ => {
                server.driver.receive_eof();
                server.feed(&mut [], &mut client);
                assert!(server.closed, "server: no Close after receive_eof");
            }
        }
    }

    // Everything the server wrote reaches the client.
    server.flush(&mut client, usize::MAX, usize::MAX, false);
    assert!(server.driver.pending_output().is_empty());
    if let Some(token) = server.last_token {
        assert!(
            server.driver.is_sent(token),
            "all output written, but a send is not marked sent"
        );
    }
    assert!(
        client.expect.is_empty(),
        "the client never saw {:?}",
        client.expect
    );

    // Then the transport ends on both sides.
    server.driver.receive_eof();
    server.feed(&mut [], &mut client);
    assert!(server.closed, "server: no Close after receive_eof");
    assert!(
        server.driver.pending_output().is_empty(),
        "server output after EOF"
    );
    assert!(server.driver.is_finished(), "server not finished after EOF");

    if !client.closed {
        client
            .expect
            .push_back(Expect::Close(code::ABNORMAL, String::new()));
    }
    client.driver.receive_eof();
    client.feed(&mut []);
    assert!(client.closed, "client: no Close after receive_eof");
    assert!(
        client.expect.is_empty(),
        "the client never saw {:?}",
        client.expect
    );
    assert!(client.driver.is_finished(), "client not finished after EOF");
}

fuzz_target!(|data: &[u8]| {
    run(Input { data });
});
