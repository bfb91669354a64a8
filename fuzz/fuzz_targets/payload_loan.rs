//! The payload loan against plain reads: two drivers of the same role get the same bytes
//! from their peer, one only through `poll_event` in fuzz-sized reads (as the blocking
//! runtime reads), the other receiving the rest of each data frame straight into the
//! message's buffer whenever the driver lends it (`lend_payload_buffer` /
//! `payload_received`, as the reactor and the tokio stream do), in fuzz-sized pieces. Both
//! must report the same events (messages byte for byte, pings, pongs, errors, the close)
//! and write the same frames.
//!
//! Byte 0 picks the connection: bit 0 offers permessage-deflate (the peer compresses its
//! own messages, op 1), bit 1 a `max_length` of 2 MiB (else 64 KiB), so frames past
//! `EAGER_RESERVE` (1 MiB), whose lent buffer grows by doubling, are reached; bit 2 the
//! client role (the two drivers are clients, the frames the target builds are unmasked
//! and op 1's messages come from a server driver; else they are servers, the frames
//! masked, the messages from a client driver). Then operations, each an opcode byte `op`
//! and its arguments:
//!
//! | `op % 8` | arguments | operation |
//! |---|---|---|
//! | 0 | `kind`, `size`, key(4), [`at`] | a frame the target builds (masked with `key` to a server): FIN from `op & 0x10`, RSV1 from `op & 0x20`; `kind % 8` picks text, binary, continuation (of the message under way, text or binary), ping, pong, close, or an opcode from `kind >> 3` (reserved ones included); `size` a length class (below); text is valid UTF-8 with 2-, 3- and 4-byte characters, continued across fragments so characters straddle frames and pieces, and with `op & 0x40` one byte at `at` made invalid; binary is up to 16 input bytes, then a pattern |
//! | 1 | u16 `len`, bytes | the peer driver's `send_binary` (`send_text` of the bytes as ASCII if `op & 0x10`) of `len % 8192 * 16` bytes (up to 16 from the input, then a repeating pattern): compressed when deflate is agreed |
//! | 2 | `len`, bytes | `len` raw bytes |
//! | 3 | `chunk`, `min`, u16 `piece` | deliver what was built: plain reads of `chunk * 37 + 1` bytes; the loan side lends with `min` (`min * min` + 1 bytes to come at least) and receives at most `piece * 8 + 1` bytes a time, polling events after every piece if `op & 0x10`, else only when it next reads; its own reads are `chunk * 53 + 1` bytes |
//! | 4 | `code` | both drivers: `close_connection` (a valid code) if `op & 0x10`, else `send_text("x")` |
//! | 5 | | both drivers: everything built is delivered, then `receive_eof`; the run ends |
//! | 6, 7 | | nothing (room for the fuzzer to shift) |
//!
//! Size classes (`size`): below 100, that many bytes; below 200, `(size - 100) * 97`;
//! below 250, `(size - 200) * 1 531`; else `(size - 250) * 450 001` (past both limits).
//!
//! Checked: nothing panics; the two event lists are equal; the two outputs are the same
//! frames after every delivery (byte for byte from servers; from clients, whose masking
//! keys are random, the same frames unmasked); a lent buffer's room is at least 1 and never past what the frame still
//! owes; no message is longer than `max_length`; at most one `Close`, nothing after it.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;
use common::{Input, handshake};
use websocket_driver::protocol::frame::{Status, parse_header};
use websocket_driver::protocol::mask::apply_mask;
use websocket_driver::{Driver, Event, Message, Options, code};

/// Valid UTF-8 with characters of every width, repeated: a cut anywhere but at a
/// character boundary leaves an incomplete sequence for the next piece.
const TEXT: &[u8] = "aé€😀".as_bytes();

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Open,
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Error(String),
    Close(u16, String),
}

fn seen(event: Event<'_>) -> Seen {
    match event {
        Event::Open => Seen::Open,
        Event::Message(Message::Text(t)) => Seen::Text(t.into_owned()),
        Event::Message(Message::Binary(b)) => Seen::Binary(b.into_owned()),
        Event::Ping(p) => Seen::Ping(p.into_owned()),
        Event::Pong(p) => Seen::Pong(p.into_owned()),
        Event::Error(e) => Seen::Error(format!("{e:?}")),
        Event::Close { code, reason } => Seen::Close(code, reason),
    }
}

/// One driver and what it reported and wrote.
struct Side {
    driver: Driver,
    events: Vec<Seen>,
    output: Vec<u8>,
    max_length: usize,
}

impl Side {
    fn record(&mut self, event: Event<'_>) {
        let event = seen(event);
        let len = match &event {
            Seen::Text(t) => t.len(),
            Seen::Binary(b) => b.len(),
            _ => 0,
        };
        assert!(len <= self.max_length, "a message past max_length");
        // Checked at every event, so a `Close` can only be the last one.
        assert!(
            !matches!(self.events.last(), Some(Seen::Close(..))),
            "{event:?} after Close"
        );
        self.events.push(event);
    }

    /// Feeds one read until the driver took all of it and has nothing more to say.
    fn feed(&mut self, mut bytes: Vec<u8>) {
        let mut at = 0;
        for _ in 0..100_000 {
            let (used, event) = self.driver.poll_event(&mut bytes[at..]);
            at += used;
            match event {
                Some(event) => self.record(event),
                None => {
                    assert_eq!(at, bytes.len(), "no event, input left");
                    return;
                }
            }
        }
        panic!("poll_event does not converge");
    }

    fn take_output(&mut self) {
        let out = self.driver.pending_output().to_vec();
        self.driver.consume_output(out.len());
        self.output.extend_from_slice(&out);
    }

    /// Plain reads of `chunk` bytes.
    fn deliver_plain(&mut self, wire: &[u8], chunk: usize) {
        for read in wire.chunks(chunk) {
            self.feed(read.to_vec());
        }
        self.feed(Vec::new());
        self.take_output();
    }

    /// Through the loan whenever the driver lends, else reads of `chunk` bytes.
    fn deliver_lent(&mut self, wire: &[u8], chunk: usize, min: usize, piece: usize, poll: bool) {
        let mut at = 0;
        loop {
            let owed = self.driver.payload_to_come();
            if let Some((mut buf, room)) = self.driver.lend_payload_buffer(min) {
                assert!(room >= 1, "a loan with no room");
                assert!(
                    room as u64 <= owed && owed >= min.max(1) as u64,
                    "room {room} for {owed} bytes owed, min {min}"
                );
                assert!(
                    self.driver.lend_payload_buffer(1).is_none(),
                    "lent twice at once"
                );
                let n = room.min(piece).min(wire.len() - at);
                buf.extend_from_slice(&wire[at..at + n]);
                self.driver.payload_received(buf, n);
                at += n;
                if poll {
                    self.feed(Vec::new());
                }
                if n == 0 {
                    break;
                }
                continue;
            }
            if at == wire.len() {
                break;
            }
            let n = chunk.min(wire.len() - at);
            self.feed(wire[at..at + n].to_vec());
            at += n;
        }
        self.feed(Vec::new());
        self.take_output();
    }
}

/// How many of a payload's bytes come from the input (the rest is a pattern), so that a
/// large frame leaves the input to the operations after it.
const INPUT_BYTES: usize = 16;

/// `len` bytes: up to [`INPUT_BYTES`] from the input, then `pad(i)` for each byte `i` after.
fn padded(input: &mut Input<'_>, len: usize, pad: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut bytes = input.bytes(len.min(INPUT_BYTES)).to_vec();
    bytes.extend((bytes.len()..len).map(pad));
    bytes
}

/// A pattern that rarely repeats.
fn scattered(i: usize) -> u8 {
    (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0]
}

fn size_class(size: u8) -> usize {
    match size {
        0..100 => size as usize,
        100..200 => (size as usize - 100) * 97,
        200..250 => (size as usize - 200) * 1_531,
        _ => (size as usize - 250) * 450_001,
    }
}

/// A frame: first byte `b0`, masked with `key` if there is one (a client's).
fn frame(b0: u8, payload: &mut [u8], key: Option<[u8; 4]>) -> Vec<u8> {
    let len = payload.len();
    let masked = if key.is_some() { 0x80 } else { 0 };
    let mut f = vec![b0];
    if len < 126 {
        f.push(masked | len as u8);
    } else if len <= u16::MAX as usize {
        f.push(masked | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(masked | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(key) = key {
        f.extend_from_slice(&key);
        apply_mask(payload, key, 0);
    }
    f.extend_from_slice(payload);
    f
}

/// The frames in `wire` with their payloads unmasked: a client's output compared with
/// another client's, whose masking keys differ.
fn unmasked(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let Ok(Status::Complete(header, used)) = parse_header(&wire[at..], 0b111) else {
            panic!("a driver wrote a frame that does not parse");
        };
        let start = at + used;
        let end = start + header.payload_len as usize;
        let mut payload = wire[start..end].to_vec();
        if let Some(key) = header.mask {
            apply_mask(&mut payload, key, 0);
        }
        frames.push((wire[at], payload));
        at = end;
    }
    frames
}

/// Opens `client` with its server's 101.
fn open_client(client: &mut Driver, server: &mut Driver) {
    let mut response = server.pending_output().to_vec();
    server.consume_output(response.len());
    let len = response.len();
    let (used, event) = client.poll_event(&mut response);
    assert!(
        matches!(event, Some(Event::Open)),
        "the client did not open"
    );
    assert_eq!(used, len);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data };
    let mode = input.byte().unwrap_or(0);
    let max_length = if mode & 2 != 0 { 2 << 20 } else { 64 << 10 };
    let options = Options::default()
        .max_length(max_length)
        .deflate(mode & 1 != 0);
    let client_role = mode & 4 != 0;
    let (mut client_a, mut server_a) = handshake(&options);
    let (mut client_b, mut server_b) = handshake(&options);
    open_client(&mut client_a, &mut server_a);
    // The peer writes what the two drivers read; their 101s differ only in
    // `Sec-WebSocket-Accept` (each client sent its own key).
    let (mut peer, plain, lent) = if client_role {
        open_client(&mut client_b, &mut server_b);
        (server_a, client_a, client_b)
    } else {
        server_b.consume_output(server_b.pending_output().len());
        (client_a, server_a, server_b)
    };
    let side = |driver| Side {
        driver,
        events: Vec::new(),
        output: Vec::new(),
        max_length,
    };
    let (mut plain, mut lent) = (side(plain), side(lent));
    // A server reports `Open` at its first poll, a client did with its 101.
    for side in [&mut plain, &mut lent] {
        if !client_role {
            side.feed(Vec::new());
        } else {
            side.events.push(Seen::Open);
        }
    }
    let same_output = |plain: &Side, lent: &Side| {
        if client_role {
            assert_eq!(
                unmasked(&plain.output),
                unmasked(&lent.output),
                "the output differs"
            );
        } else {
            assert_eq!(plain.output, lent.output, "the output differs");
        }
    };

    let mut wire: Vec<u8> = Vec::new();
    // Text continued across fragments: where the pattern goes on; the message under way.
    let mut text_at = 0usize;
    let mut text_message = true;
    while let Some(op) = input.byte() {
        match op % 8 {
            0 => {
                let (Some(kind), Some(size)) = (input.byte(), input.byte()) else {
                    break;
                };
                let len = size_class(size);
                let key: [u8; 4] = input.padded(4, |i| i as u8).try_into().unwrap();
                let mut b0 = (op & 0x10) << 3 | (op & 0x20) << 1;
                let text = match kind % 8 {
                    0 => {
                        b0 |= 0x1;
                        text_message = true;
                        text_at = 0;
                        true
                    }
                    1 => {
                        b0 |= 0x2;
                        text_message = false;
                        false
                    }
                    2 => text_message,
                    3 => {
                        b0 |= 0x9;
                        false
                    }
                    4 => {
                        b0 |= 0xA;
                        false
                    }
                    5 => {
                        b0 |= 0x8;
                        false
                    }
                    _ => {
                        b0 |= kind >> 3 & 0x0f;
                        false
                    }
                };
                let mut payload = if text {
                    let p: Vec<u8> = (0..len).map(|i| TEXT[(text_at + i) % TEXT.len()]).collect();
                    text_at += len;
                    p
                } else if b0 & 0x0f == 0x8 && len >= 2 {
                    // A close frame: a valid code (most of the time) and a text reason.
                    let mut p = input.padded(2, |_| 0);
                    if op & 0x80 == 0 {
                        p = code::NORMAL.to_be_bytes().to_vec();
                    }
                    p.extend((2..len).map(|i| TEXT[(i - 2) % TEXT.len()]));
                    p
                } else {
                    padded(&mut input, len, scattered)
                };
                if op & 0x40 != 0 && !payload.is_empty() {
                    let at = input.u16().unwrap_or(0) as usize * 41 % payload.len();
                    payload[at] = 0xff;
                }
                let key = (!client_role).then_some(key);
                wire.extend_from_slice(&frame(b0, &mut payload, key));
            }
            1 => {
                let len = input.u16().unwrap_or(0) as usize % 8192 * 16;
                let bytes = padded(&mut input, len, |i| b"abcabd"[i % 6]);
                let sent = if op & 0x10 != 0 {
                    let text: String = bytes.iter().map(|&b| (b & 0x7f) as char).collect();
                    peer.send_text(&text)
                } else {
                    peer.send_binary(&bytes)
                };
                if sent.is_ok() {
                    let out = peer.pending_output().to_vec();
                    peer.consume_output(out.len());
                    wire.extend_from_slice(&out);
                }
            }
            2 => {
                let len = input.byte().unwrap_or(0) as usize;
                wire.extend_from_slice(input.bytes(len));
            }
            3 => {
                let chunk = input.byte().unwrap_or(0) as usize;
                let min = input.byte().unwrap_or(0) as usize;
                let piece = input.u16().unwrap_or(0) as usize * 8 + 1;
                plain.deliver_plain(&wire, chunk * 37 + 1);
                lent.deliver_lent(&wire, chunk * 53 + 1, min * min + 1, piece, op & 0x10 != 0);
                wire.clear();
                assert_eq!(plain.events, lent.events, "the events differ");
                same_output(&plain, &lent);
            }
            4 => {
                let which = input.byte().unwrap_or(0);
                for side in [&mut plain, &mut lent] {
                    if op & 0x10 != 0 {
                        let codes = [code::NORMAL, code::GOING_AWAY, 1008, 3000, 4999];
                        let _ = side
                            .driver
                            .close_connection(codes[which as usize % 5], "bye");
                    } else {
                        let _ = side.driver.send_text("x");
                    }
                    side.take_output();
                }
            }
            5 => break,
            _ => {}
        }
    }
    plain.deliver_plain(&wire, 4096);
    lent.deliver_lent(&wire, 4096, 1, 1 << 20, false);
    for side in [&mut plain, &mut lent] {
        side.driver.receive_eof();
        side.feed(Vec::new());
        side.take_output();
        assert!(
            side.events.iter().any(|e| matches!(e, Seen::Close(..))),
            "no Close after receive_eof"
        );
    }
    assert_eq!(plain.events, lent.events, "the events differ");
    same_output(&plain, &lent);
});
