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
//! | 0 | u16 `len`, bytes | client `send_binary` (`send_text` of the bytes made ASCII if `op & 0x10`), `len % 4097` |
//! | 1 | `chunk` | all client output to the server, `chunk` bytes a read (0: one read) |
//! | 2 | `b0`, `len`, key(4), bytes | a raw masked frame to the server: first byte `b0`, `len` bytes of payload, one read |
//! | 3 | u16 `len`, bytes | server `send_binary` (`send_text` of the bytes made ASCII if `op & 0x10`) |
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

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;

mod common;
use common::{Input, handshake};
use websocket_driver::{DeflateOptions, Driver, Error, Event, Message, Options, code};

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
    let bytes = input.padded(len, |i| b"abcabd"[i % 6]);
    if text {
        Sent::Text(bytes.iter().map(|&b| (b & 0x7f) as char).collect())
    } else {
        Sent::Binary(bytes)
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

    while let Some(op) = input.byte() {
        let text = op & 0x10 != 0;
        match op % 8 {
            0 | 6 => {
                let message = if op % 8 == 0 {
                    let Some(len) = input.u16() else { break };
                    message(&mut input, text, usize::from(len) % (MAX_LENGTH + 1))
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
                flush(&mut client.driver, chunk, |read| server.feed(read));
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
                flush(&mut client.driver, 0, |read| server.feed(read));
                server.tainted = true;
                server.feed(&mut frame);
            }
            3 => {
                let Some(len) = input.u16() else { break };
                let message = message(&mut input, text, usize::from(len) % (MAX_LENGTH + 1));
                if send(&mut server.driver, &message) {
                    client.expect.push_back(message);
                }
            }
            4 => {
                let Some(chunk) = input.byte() else { break };
                flush(&mut server.driver, chunk, |read| client.feed(read));
            }
            5 => {
                server.closing |= server.driver.close_connection(code::NORMAL, "").is_ok();
            }
            _ => break,
        }
    }
    flush(&mut client.driver, 0, |read| server.feed(read));
    flush(&mut server.driver, 0, |read| client.feed(read));
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
