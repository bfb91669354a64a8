//! The client side of the opening handshake against an arbitrary "server": its response,
//! fed in fuzz-chosen chunks, then whatever follows it on the stream as frames, then EOF.
//!
//! Input layout:
//! - byte 0: bits 0–1 the response's form: 0 raw bytes; 1 a 101 head carrying the right
//!   `Sec-WebSocket-Accept`, the rest of the input continuing it (more header lines, the
//!   blank line, frames); 2 the same with an open `Sec-WebSocket-Extensions:
//!   permessage-deflate` line; 3 the same with an open `Sec-WebSocket-Protocol: ` line.
//!   Bit 2: the client offers the subprotocols `chat` and `superchat`; bit 3: it offers
//!   permessage-deflate with byte 1's parameters.
//! - byte 1: the deflate offer (no context takeover each way, window bits 8–15 each way).
//! - byte 2 picks the chunking (0: everything in one read), byte 3 seeds the chunk sizes.
//! - the rest: the stream from the "server".
//!
//! Checked: nothing panics; feeding the stream in chunks gives exactly the events of one
//! read, a non-101 response's body included; the first event is `Open` or a handshake
//! `Error` (or, on a cut-off response, the `Error` that EOF brings); after `Open`, the
//! agreed subprotocol is one the client offered and the agreed deflate parameters keep to
//! the offer, and the message the client queued while connecting is in its output; after a
//! handshake `Error`, only a `Close` with 1006 follows, that queued message is dropped, and
//! a non-101 status's body is at most 1 KiB; a bare 101 with the right key opens; at most
//! one `Close` and nothing after it; at EOF the client closes.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;
use common::Chunks;
use websocket_driver::protocol::frame::Status;
use websocket_driver::protocol::handshake::{HeadLimits, RequestParser, validate_request};
use websocket_driver::{
    DeflateOptions, DeflateParams, Driver, Error, Event, HandshakeError, Options, ReadyState, code,
};

const OFFERED: [&str; 2] = ["chat", "superchat"];
/// What the client queues before the response comes.
const EARLY: &str = "sent while connecting";

/// An event as compared between runs (the opening's agreement included).
#[derive(Debug, PartialEq)]
enum Seen {
    Open(Option<String>, Option<DeflateParams>),
    Handshake(HandshakeError),
    /// Any other error, by its `Debug` form.
    Error(String),
    Message(bool, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
}

fn options(form: u8, deflate: u8) -> Options {
    let mut options = Options::default()
        .max_length(4096)
        .max_handshake_size(2048)
        .max_headers(24);
    if form & 4 != 0 {
        options = options.accept_protocols(OFFERED);
    }
    if form & 8 != 0 {
        options = options.deflate_options(DeflateOptions {
            server_no_context_takeover: deflate & 1 != 0,
            client_no_context_takeover: deflate & 2 != 0,
            server_max_window_bits: 8 + ((deflate >> 2) & 7),
            client_max_window_bits: 8 + (deflate >> 5),
            ..DeflateOptions::default()
        });
    }
    options
}

/// Polls until the driver wants more input, recording what comes out. Returns whether it
/// consumed all of `input` (it must, when it has no event to give).
fn drain(client: &mut Driver, input: &mut [u8], seen: &mut Vec<Seen>) {
    let total = input.len();
    let mut pos = 0;
    let mut guard = 0usize;
    loop {
        guard += 1;
        assert!(guard <= total + 16, "poll_event does not converge");
        let (n, event) = client.poll_event(&mut input[pos..]);
        assert!(n <= total - pos);
        pos += n;
        let Some(event) = event else {
            assert_eq!(pos, total, "no event but input left over");
            return;
        };
        seen.push(match event {
            Event::Open => Seen::Open(
                client.protocol().map(str::to_owned),
                client.deflate_params(),
            ),
            Event::Error(Error::Handshake(e)) => Seen::Handshake(e),
            Event::Error(e) => Seen::Error(format!("{e:?}")),
            Event::Message(m) => Seen::Message(m.is_text(), m.as_bytes().to_vec()),
            Event::Ping(p) => Seen::Ping(p.to_vec()),
            Event::Pong(p) => Seen::Pong(p.to_vec()),
            Event::Close { code, reason } => Seen::Close(code, reason.to_string()),
        });
    }
}

/// One client against `body` in the given form, fed in `chunks`: its events, and whether
/// the message it queued while connecting was still in its output when the stream ended.
fn run(form: u8, deflate: u8, body: &[u8], mut chunks: Chunks) -> (Vec<Seen>, bool) {
    let options = options(form, deflate);
    let mut client = Driver::make_client("ws://localhost/", &options)
        .expect("make_client refused the target's options");
    assert!(client.start_connection());
    let request = client.pending_output().to_vec();
    client.consume_output(request.len());
    // The key's answer, as a server computes it from the client's own request.
    let mut parser = RequestParser::new(HeadLimits {
        max_size: 4096,
        max_headers: 32,
    });
    let Ok(Status::Complete(parsed, used)) = parser.parse(&request) else {
        panic!("the client's request does not parse");
    };
    assert_eq!(used, request.len());
    let accept = validate_request(&parsed).expect("the client's request is not a valid upgrade");
    client.send_text(EARLY).expect("a send while connecting");
    assert!(client.pending_output().is_empty(), "sent before the open");

    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n"
    );
    let mut stream = match form & 3 {
        0 => Vec::new(),
        1 => head.into_bytes(),
        2 => format!("{head}Sec-WebSocket-Extensions: permessage-deflate").into_bytes(),
        _ => format!("{head}Sec-WebSocket-Protocol: ").into_bytes(),
    };
    stream.extend_from_slice(body);

    let mut seen = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = chunks.next(stream.len() - pos);
        drain(&mut client, &mut stream[pos..pos + n], &mut seen);
        pos += n;
    }
    // The queued message leads the output once the connection opened (a client frame is
    // masked: known by its header).
    let out = client.pending_output();
    let early_sent = out.len() >= 6 + EARLY.len() && out[..2] == [0x81, 0x80 | EARLY.len() as u8];
    client.receive_eof();
    drain(&mut client, &mut [], &mut seen);
    assert_eq!(client.ready_state(), ReadyState::Closed, "open after EOF");
    assert!(client.is_finished() || !client.pending_output().is_empty());
    (seen, early_sent)
}

fn check(form: u8, deflate: u8, body: &[u8], seen: &[Seen], early_sent: bool) {
    let offer = options(form, deflate);
    let closes = seen.iter().filter(|s| matches!(s, Seen::Close(..))).count();
    assert!(closes <= 1, "Close reported {closes} times");
    if let Some(at) = seen.iter().position(|s| matches!(s, Seen::Close(..))) {
        assert_eq!(at, seen.len() - 1, "an event after Close: {seen:?}");
    }
    match seen.first() {
        Some(Seen::Open(protocol, params)) => {
            assert!(
                early_sent,
                "the message queued while connecting was not sent"
            );
            if let Some(p) = protocol {
                assert!(
                    offer.accept_protocols.iter().any(|o| o == p),
                    "agreed to {p:?}, which was not offered"
                );
            }
            match (params, &offer.deflate) {
                (None, _) => {}
                (Some(_), None) => panic!("deflate agreed without an offer"),
                (Some(agreed), Some(offered)) => {
                    assert!((8..=15).contains(&agreed.server_max_window_bits));
                    assert!((8..=15).contains(&agreed.client_max_window_bits));
                    assert!(agreed.server_max_window_bits <= offered.server_max_window_bits);
                    assert!(agreed.client_max_window_bits <= offered.client_max_window_bits);
                    assert!(
                        agreed.server_no_context_takeover || !offered.server_no_context_takeover
                    );
                    assert!(
                        agreed.client_no_context_takeover || !offered.client_no_context_takeover
                    );
                }
            }
            assert!(
                !seen[1..].iter().any(|s| matches!(s, Seen::Open(..))),
                "a second Open"
            );
        }
        Some(Seen::Handshake(e)) => {
            assert!(
                !early_sent,
                "a frame queued for a connection that never opened"
            );
            assert!(
                matches!(seen, [_, Seen::Close(c, _)] if *c == code::ABNORMAL),
                "after a handshake error: {seen:?}"
            );
            if let HandshakeError::UnexpectedStatus { status, body } = e {
                assert_ne!(*status, 101);
                assert!(
                    body.chars().count() <= 1024,
                    "a body of {} chars",
                    body.len()
                );
            }
        }
        other => panic!("the first client event is {other:?}"),
    }
    if form & 3 == 1 && body.starts_with(b"\r\n") {
        assert!(
            matches!(seen.first(), Some(Seen::Open(None, None))),
            "a bare 101 with the right key did not open: {seen:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (form, deflate) = (data[0], data[1]);
    let body = &data[4..];
    let whole = run(form, deflate, body, Chunks { mode: 0, state: 0 });
    check(form, deflate, body, &whole.0, whole.1);
    if data[2] != 0 {
        let chunks = Chunks {
            mode: data[2],
            state: u32::from(data[3]),
        };
        let chunked = run(form, deflate, body, chunks);
        check(form, deflate, body, &chunked.0, chunked.1);
        assert_eq!(
            whole, chunked,
            "chunked reads give other events than one read"
        );
    }
});
