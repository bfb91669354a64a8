//! permessage-deflate (RFC 7692) end to end: a client and a server driver negotiate it with
//! fuzz-chosen parameters, then the input drives both. Messages the client or the server
//! sends are compressed, cut into fuzz-sized reads and must arrive exactly as sent; raw
//! frames with fuzz-chosen RSV1, opcode and (compressed or not) payload go to the server,
//! which must deliver them within its limit or fail the connection with the right code.
//!
//! Byte 0 picks the parameters: bit 0 server_no_context_takeover, bit 1
//! client_no_context_takeover, bits 2–4 server_max_window_bits − 8, bits 5–7
//! client_max_window_bits − 8. Byte 1: compression level (`% 10`); byte 2: the threshold
//! under which messages go uncompressed (`% 64`). Both sides use the same options, so the
//! offer is accepted unless the server declines it (then the run goes on without deflate).
//! Then operations, each an opcode byte `op` and its arguments:
//!
//! | `op % 8` | arguments | operation |
//! |---|---|---|
//! | 0 | u16 `len`, bytes | client `send_binary` (`send_text` of the bytes made ASCII if `op & 0x10`), `len % 4097`; padded with bytes that repeat only every 700 if `op & 0x80` (further back than a 9-bit window reaches) |
//! | 1 | `chunk` | all client output to the server, `chunk` bytes a read (0: one read) |
//! | 2 | `b0`, `len`, key(4), bytes | a raw masked frame to the server: first byte `b0`, `len` bytes of payload, one read |
//! | 3 | u16 `len`, bytes | server `send_binary` (`send_text` of the bytes made ASCII if `op & 0x10`), padded as op 0; `op & 0x20`: as a `SharedFrame` (`send_shared`, as pub/sub does), with, if `op & 0x80`, the frame's compressed variant for another window (`9 + len % 7` bits) made first; `op & 0x40` (without 0x20, no arguments): the last shared frame again (its compressed variant is reused) |
//! | 4 | `chunk` | all server output to the client, `chunk` bytes a read (0: one read) |
//! | 5 | | server `close_connection(1000)` |
//! | 6 | `n`, byte | a message of `n * 64` repeated bytes from the client (deflate's best case; over `max_length` from `n = 65`) |
//! | 7 | | both sides `receive_eof` |
//!
//! Checked, server side: nothing panics; `poll_event` consumes all input when it reports no
//! event and converges; no message is longer than `max_length` (the inflated size counts);
//! at most one `Close`, no event after it; until a raw frame was fed, every message is
//! exactly the next one the client sent and nothing fails; after one, an error is a
//! protocol error whose close code is the one sent and reported (1002, 1007 or 1009).
//! Client side: never an `Error` (the server writes only valid frames, compressed with the
//! agreed window), and its messages are exactly the ones the server sent, in order.
//!
//! On the wire, both ways: every compressed message inflates with a decoder whose window is
//! the one agreed for its sender (9 bits for an agreed 8, zlib's smallest raw window). The
//! drivers' own decoders use a 15-bit window, which takes any stream, so only this check
//! sees a sender that compresses with a larger window than it agreed to. It relies on
//! zlib-rs refusing a match from past its window ("invalid distance too far back"), which
//! it does in this target's build (a driver changed to compress with 15 bits fails on the
//! seeds, for plain and shared messages). In the crate's test builds (debug and release)
//! the same decoder took matches up to 280 bytes past a 9-bit window, so
//! `tests/deflate.rs` (`every_sender_keeps_to_its_agreed_window`) checks the window by the
//! compressed size instead.

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;

mod common;
use common::{Input, handshake};
use flate2::{Decompress, FlushDecompress, Status as InflateStatus};
use websocket_driver::protocol::frame::{OpCode, SharedFrame, Status, parse_header};
use websocket_driver::protocol::mask::apply_mask;
use websocket_driver::{DeflateOptions, Driver, Error, Event, Message, MessageType, Options, code};

const MAX_LENGTH: usize = 4096;
const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Text(String),
    Binary(Vec<u8>),
}

impl Sent {
    fn of(message: Message<'_>) -> Sent {
        match message {
            Message::Text(t) => Sent::Text(t.into_owned()),
            Message::Binary(b) => Sent::Binary(b.into_owned()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Sent::Text(t) => t.len(),
            Sent::Binary(b) => b.len(),
        }
    }
}

/// A message to send: `len` bytes, binary, or text made of the bytes' low seven bits.
/// Short inputs are padded with a repeating pattern (compressible, as real data is).
fn message(input: &mut Input<'_>, text: bool, len: usize) -> Sent {
    from_bytes(input.padded(len, |i| b"abcabd"[i % 6]), text)
}

/// A message padded with bytes that repeat only every `FAR` bytes: its matches lie
/// further back than a 9-bit window (512 bytes) reaches, so compressing it with a larger
/// window than the one agreed shows on the other side.
fn far_message(input: &mut Input<'_>, text: bool, len: usize) -> Sent {
    const FAR: usize = 700;
    let far = |i: usize| ((i % FAR) as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0];
    from_bytes(input.padded(len, far), text)
}

fn from_bytes(bytes: Vec<u8>, text: bool) -> Sent {
    if text {
        Sent::Text(bytes.iter().map(|&b| (b & 0x7f) as char).collect())
    } else {
        Sent::Binary(bytes)
    }
}

/// RFC 7692's window rule on one direction's bytes: each compressed message (from its
/// RSV1 frame to FIN) must inflate with the sender's agreed window, with the decoder's
/// context kept across messages unless the sender resets its own.
struct WindowCheck {
    window_bits: u8,
    no_context_takeover: bool,
    inflate: Decompress,
    wire: Vec<u8>,
    /// The compressed message being reassembled.
    message: Option<Vec<u8>>,
}

impl WindowCheck {
    fn new(window_bits: u8, no_context_takeover: bool) -> WindowCheck {
        let window_bits = window_bits.max(9);
        WindowCheck {
            window_bits,
            no_context_takeover,
            inflate: Decompress::new_with_window_bits(false, window_bits),
            wire: Vec::new(),
            message: None,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.wire.extend_from_slice(bytes);
        loop {
            let (header, used) = match parse_header(&self.wire, 0b100) {
                Ok(Status::Complete(header, used)) => (header, used),
                Ok(Status::Partial) => return,
                Err(e) => panic!("a driver wrote a frame that does not parse: {e:?}"),
            };
            let end = used + header.payload_len as usize;
            if self.wire.len() < end {
                return;
            }
            let mut payload = self.wire[used..end].to_vec();
            self.wire.drain(..end);
            if let Some(mask) = header.mask {
                apply_mask(&mut payload, mask, 0);
            }
            if header.opcode.is_control() {
                continue;
            }
            if header.opcode != OpCode::Continuation && header.rsv & 0b100 != 0 {
                self.message = Some(Vec::new());
            }
            if let Some(message) = &mut self.message {
                message.extend_from_slice(&payload);
            }
            if header.fin
                && let Some(message) = self.message.take()
            {
                self.inflate_message(message);
            }
        }
    }

    fn inflate_message(&mut self, mut compressed: Vec<u8>) {
        compressed.extend_from_slice(&[0, 0, 0xff, 0xff]);
        if self.no_context_takeover {
            self.inflate.reset(false);
        }
        // zlib checks a match's distance against its window only for what lies before the
        // current output buffer, so the output goes out 64 bytes at a time: then a match
        // further back than the window fails as "invalid distance too far back".
        let mut out = [0u8; 64];
        let mut at = 0;
        loop {
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(&compressed[at..], &mut out, FlushDecompress::Sync)
                .unwrap_or_else(|e| {
                    panic!(
                        "a compressed message does not inflate with the agreed {}-bit window: {e}",
                        self.window_bits
                    )
                });
            let used = (self.inflate.total_in() - in_before) as usize;
            let produced = (self.inflate.total_out() - out_before) as usize;
            at += used;
            let drained = at == compressed.len() && produced < out.len();
            if drained || status == InflateStatus::StreamEnd || (used == 0 && produced == 0) {
                return;
            }
        }
    }
}

struct Server {
    driver: Driver,
    /// Messages the client sent, not yet delivered.
    expect: VecDeque<Sent>,
    /// A raw frame was fed: from then on anything may fail, and nothing is predicted.
    tainted: bool,
    closed: bool,
    /// The close code the last error announced.
    failed_with: Option<u16>,
    /// The server started the close: what the client sends after may go unread.
    closing: bool,
}

/// Feeds one read to `driver` and hands every event to `on_event`, checking
/// `poll_event`'s contract: all input consumed when no event comes, and an end within the
/// same bound as the `stream` target's (an event consumes input, except the few queued
/// ones: open, error, close).
fn feed(driver: &mut Driver, input: &mut [u8], who: &str, mut on_event: impl FnMut(Event<'_>)) {
    let len = input.len();
    let mut at = 0;
    for _ in 0..len + 16 {
        let (used, event) = driver.poll_event(&mut input[at..]);
        at += used;
        assert!(at <= len, "{who}: consumed more than it was given");
        let Some(event) = event else {
            assert_eq!(at, len, "{who}: no event, yet input left");
            return;
        };
        on_event(event);
    }
    panic!("{who}: poll_event does not converge");
}

impl Server {
    fn feed(&mut self, input: &mut [u8]) {
        let Server {
            driver,
            expect,
            tainted,
            closed,
            failed_with,
            ..
        } = self;
        feed(driver, input, "server", |event| {
            assert!(!*closed, "server: an event after Close");
            match event {
                Event::Message(m) => {
                    let got = Sent::of(m);
                    assert!(got.len() <= MAX_LENGTH, "server: a message over max_length");
                    if !*tainted {
                        assert_eq!(
                            Some(&got),
                            expect.front(),
                            "server: not the message the client sent"
                        );
                    }
                    expect.pop_front();
                }
                Event::Error(Error::Protocol(e)) => {
                    assert!(*tainted, "server: {e} from the client's own frames");
                    let sent = e.close_code();
                    assert!(
                        [code::PROTOCOL_ERROR, code::INVALID_PAYLOAD, code::TOO_BIG]
                            .contains(&sent),
                        "server: {e} closes with {sent}"
                    );
                    *failed_with = Some(sent);
                }
                Event::Error(Error::Io(_)) => {}
                Event::Error(e) => panic!("server: unexpected error {e}"),
                Event::Close { code: got, .. } => {
                    if let Some(sent) = *failed_with {
                        assert_eq!(got, sent, "server: Close differs from the error's code");
                    }
                    *closed = true;
                }
                Event::Open | Event::Ping(_) | Event::Pong(_) => {}
            }
        });
    }
}

struct Client {
    driver: Driver,
    /// Messages the server sent, not yet delivered.
    expect: VecDeque<Sent>,
    closed: bool,
}

impl Client {
    fn feed(&mut self, input: &mut [u8]) {
        let Client {
            driver,
            expect,
            closed,
        } = self;
        feed(driver, input, "client", |event| match event {
            Event::Message(m) => {
                assert!(!*closed, "client: a message after Close");
                assert_eq!(
                    Some(Sent::of(m)),
                    expect.pop_front(),
                    "client: not the message the server sent"
                );
            }
            Event::Error(Error::Io(_)) => {}
            Event::Error(e) => panic!("client: {e} on the server's output"),
            Event::Close { .. } => {
                assert!(!*closed, "client: two Close events");
                *closed = true;
            }
            Event::Open | Event::Ping(_) | Event::Pong(_) => {}
        });
    }
}

/// Everything `from` has to write, in reads of `chunk` bytes (0: one read).
fn flush(from: &mut Driver, chunk: u8, mut to: impl FnMut(&mut [u8])) {
    let mut bytes = Vec::new();
    loop {
        let part = from.pending_output();
        if part.is_empty() {
            break;
        }
        let n = part.len();
        bytes.extend_from_slice(part);
        from.consume_output(n);
    }
    let chunk = if chunk == 0 {
        bytes.len().max(1)
    } else {
        chunk as usize
    };
    for read in bytes.chunks_mut(chunk) {
        to(read);
    }
}

fn options(params: u8, level: u8, threshold: u8) -> Options {
    Options::default()
        .max_length(MAX_LENGTH)
        .deflate_options(DeflateOptions {
            server_no_context_takeover: params & 1 != 0,
            client_no_context_takeover: params & 2 != 0,
            server_max_window_bits: 8 + ((params >> 2) & 7),
            client_max_window_bits: 8 + (params >> 5),
            level: u32::from(level % 10),
            threshold: usize::from(threshold % 64),
        })
}

fn send(driver: &mut Driver, message: &Sent) -> bool {
    match message {
        Sent::Text(t) => driver.send_text(t).is_ok(),
        Sent::Binary(b) => driver.send_binary(b).is_ok(),
    }
}

/// `message` as one shared frame (what a publish builds once for every subscriber).
fn shared(message: &Sent) -> SharedFrame {
    let made = match message {
        Sent::Text(t) => SharedFrame::new(t.as_bytes(), MessageType::Text),
        Sent::Binary(b) => SharedFrame::new(b, MessageType::Binary),
    };
    made.expect("a shared frame of valid text or binary")
}

fn run(mut input: Input<'_>) {
    let (Some(params), Some(level), Some(threshold)) = (input.byte(), input.byte(), input.byte())
    else {
        return;
    };
    let options = options(params, level, threshold);

    let (client_driver, server_driver) = handshake(&options);
    let mut server = Server {
        driver: server_driver,
        expect: VecDeque::new(),
        tainted: false,
        closed: false,
        failed_with: None,
        closing: false,
    };
    server.feed(&mut []);
    let mut client = Client {
        driver: client_driver,
        expect: VecDeque::new(),
        closed: false,
    };
    flush(&mut server.driver, 0, |read| client.feed(read));
    assert!(!client.closed, "the client refused the server's response");
    // What each side agreed to, checked on the bytes it writes from here on.
    let agreed = server.driver.deflate_params();
    assert_eq!(
        agreed,
        client.driver.deflate_params(),
        "the two sides disagree"
    );
    let mut to_client =
        agreed.map(|p| WindowCheck::new(p.server_max_window_bits, p.server_no_context_takeover));
    let mut to_server =
        agreed.map(|p| WindowCheck::new(p.client_max_window_bits, p.client_no_context_takeover));
    let mut last_shared: Option<(SharedFrame, Sent)> = None;

    while let Some(op) = input.byte() {
        let text = op & 0x10 != 0;
        match op % 8 {
            0 | 6 => {
                let message = if op % 8 == 0 {
                    let Some(len) = input.u16() else { break };
                    let len = usize::from(len) % (MAX_LENGTH + 1);
                    if op & 0x80 != 0 {
                        far_message(&mut input, text, len)
                    } else {
                        message(&mut input, text, len)
                    }
                } else {
                    let Some(n) = input.byte() else { break };
                    let len = usize::from(n) * 64;
                    let byte = input.byte().unwrap_or(b'z') & 0x7f;
                    if text {
                        Sent::Text((byte as char).to_string().repeat(len))
                    } else {
                        Sent::Binary(vec![byte; len])
                    }
                };
                if send(&mut client.driver, &message) {
                    // Over the server's limit it must fail the connection (1009).
                    server.tainted |= message.len() > MAX_LENGTH;
                    server.expect.push_back(message);
                }
            }
            1 => {
                let Some(chunk) = input.byte() else { break };
                flush(&mut client.driver, chunk, |read| {
                    if let Some(check) = &mut to_server {
                        check.feed(read);
                    }
                    server.feed(read)
                });
            }
            2 => {
                let (Some(b0), Some(len)) = (input.byte(), input.byte()) else {
                    break;
                };
                let len = usize::from(len % 126);
                let mut frame = vec![b0, 0x80 | len as u8];
                frame.extend_from_slice(&MASK);
                let start = frame.len();
                frame.extend_from_slice(&input.payload(len, 0));
                for (i, b) in frame[start..].iter_mut().enumerate() {
                    *b ^= MASK[i % 4];
                }
                // What the client already put on the wire goes first.
                flush(&mut client.driver, 0, |read| {
                    if let Some(check) = &mut to_server {
                        check.feed(read);
                    }
                    server.feed(read)
                });
                server.tainted = true;
                server.feed(&mut frame);
            }
            3 if op & 0x60 == 0x40 => {
                if let Some((frame, message)) = &last_shared
                    && server.driver.send_shared(frame).is_ok()
                {
                    client.expect.push_back(message.clone());
                }
            }
            3 => {
                let Some(len) = input.u16() else { break };
                let len_bytes = usize::from(len) % (MAX_LENGTH + 1);
                let message = if op & 0x80 != 0 {
                    far_message(&mut input, text, len_bytes)
                } else {
                    message(&mut input, text, len_bytes)
                };
                if op & 0x20 != 0 {
                    let frame = shared(&message);
                    if op & 0x80 != 0 {
                        let other_window = 9 + (len % 7) as u8;
                        frame.prepare_deflate(other_window, u32::from(len % 10));
                    }
                    if server.driver.send_shared(&frame).is_ok() {
                        client.expect.push_back(message.clone());
                    }
                    last_shared = Some((frame, message));
                } else if send(&mut server.driver, &message) {
                    client.expect.push_back(message);
                }
            }
            4 => {
                let Some(chunk) = input.byte() else { break };
                flush(&mut server.driver, chunk, |read| {
                    if let Some(check) = &mut to_client {
                        check.feed(read);
                    }
                    client.feed(read)
                });
            }
            5 => {
                server.closing |= server.driver.close_connection(code::NORMAL, "").is_ok();
            }
            _ => break,
        }
    }
    flush(&mut client.driver, 0, |read| {
        if let Some(check) = &mut to_server {
            check.feed(read);
        }
        server.feed(read)
    });
    flush(&mut server.driver, 0, |read| {
        if let Some(check) = &mut to_client {
            check.feed(read);
        }
        client.feed(read)
    });
    if !server.tainted && !server.closing {
        assert!(
            server.expect.is_empty(),
            "server: client messages never delivered"
        );
    }
    if !client.closed {
        assert!(
            client.expect.is_empty(),
            "client: server messages never delivered"
        );
    }
    server.driver.receive_eof();
    server.feed(&mut []);
    client.driver.receive_eof();
    client.feed(&mut []);
    assert!(
        server.closed && client.closed,
        "EOF must end both sides with Close"
    );
}

fuzz_target!(|data: &[u8]| run(Input { data }));
