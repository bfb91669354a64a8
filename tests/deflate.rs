//! permessage-deflate (RFC 7692) at the driver: negotiation in both roles (every parameter,
//! bad offers and bad responses), compressed frames both ways, RSV1 rules, the threshold,
//! context takeover, limits on the inflated size, corrupt data, and shared frames.

mod common;

use common::{
    Ev, MASK, assert_failed, client_frame, drain, eof, feed, open_pair, parse_frames,
    parse_request, pump, response_for, started_client, take_output,
};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use websocket_driver::protocol::deflate::{
    DEFAULT_DEFLATE_THRESHOLD, DeflateOptions, DeflateParams, FRAGMENT_FLUSH_OVERHEAD,
    accept_offer, compressed_limit, compressed_limit_fragmented,
};
use websocket_driver::protocol::frame::{OpCode, SharedFrame};
use websocket_driver::{
    Driver, Error, HandshakeError, MessageType, Options, ProtocolError, Role, UsageError,
};

const KEY_HEADERS: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n";

/// A compressible text of `len` bytes (JSON-like).
fn json(len: usize) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < len {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user{}\",\"text\":\"hello, world\",\"tags\":[\"a\",\"b\"]}},",
            i % 7
        ));
        i += 1;
    }
    s.truncate(len);
    s
}

/// Raw deflate of one message as a peer would send it: sync flush, tail removed.
fn deflate_with(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let start = c.total_in();
    loop {
        let used = (c.total_in() - start) as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(4096);
        }
        c.compress_vec(&data[used..], &mut out, FlushCompress::Sync)
            .unwrap();
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn deflate(data: &[u8]) -> Vec<u8> {
    deflate_with(
        &mut Compress::new_with_window_bits(Compression::default(), false, 15),
        data,
    )
}

/// Raw inflate of one message's payload (the tail restored), as a peer would.
fn inflate_with(d: &mut Decompress, payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    let start = d.total_in();
    while ((d.total_in() - start) as usize) < input.len() {
        let used = (d.total_in() - start) as usize;
        out.reserve(1 << 16);
        d.decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
            .unwrap();
    }
    out
}

fn inflate(payload: &[u8]) -> Vec<u8> {
    inflate_with(&mut Decompress::new_with_window_bits(false, 15), payload)
}

/// The 101 response a server with `options` gives to an upgrade request with these extra
/// header lines, and the server.
fn answer(extra: &str, options: &Options) -> (String, Driver) {
    let head = format!("{KEY_HEADERS}{extra}\r\n");
    let mut server = Driver::make_server(&parse_request(head.as_bytes()), options).unwrap();
    server.start_connection();
    let response = String::from_utf8(take_output(&mut server)).unwrap();
    (response, server)
}

/// The `Sec-WebSocket-Extensions` value of a response, if any.
fn extensions(response: &str) -> Option<String> {
    response
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
        .map(str::to_string)
}

fn on() -> Options {
    Options::default().deflate(true)
}

fn params(snct: bool, cnct: bool, sbits: u8, cbits: u8) -> DeflateParams {
    DeflateParams {
        server_no_context_takeover: snct,
        client_no_context_takeover: cnct,
        server_max_window_bits: sbits,
        client_max_window_bits: cbits,
    }
}

// ----- server negotiation -----

#[test]
fn off_by_default_and_without_an_offer() {
    let offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    let (response, server) = answer(offer, &Options::default());
    assert_eq!(extensions(&response), None);
    assert_eq!(server.deflate_params(), None);
    let (response, server) = answer("", &on());
    assert_eq!(extensions(&response), None);
    assert_eq!(server.deflate_params(), None);
}

#[test]
fn a_plain_offer_gets_no_context_takeover_both_ways_by_default() {
    let (response, server) = answer("Sec-WebSocket-Extensions: permessage-deflate\r\n", &on());
    assert_eq!(
        extensions(&response).as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    assert_eq!(server.deflate_params(), Some(params(true, true, 15, 15)));
}

#[test]
fn every_parameter_of_an_offer() {
    let keep = DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        ..DeflateOptions::default()
    };
    let small = DeflateOptions {
        server_max_window_bits: 10,
        client_max_window_bits: 11,
        ..keep.clone()
    };
    // (offer parameters, server options, response, agreed)
    let cases: &[(&str, &DeflateOptions, &str, DeflateParams)] = &[
        (
            "",
            &keep,
            "permessage-deflate",
            params(false, false, 15, 15),
        ),
        (
            "; server_no_context_takeover",
            &keep,
            "permessage-deflate; server_no_context_takeover",
            params(true, false, 15, 15),
        ),
        (
            "; client_no_context_takeover",
            &keep,
            "permessage-deflate; client_no_context_takeover",
            params(false, true, 15, 15),
        ),
        (
            "; server_max_window_bits=10",
            &keep,
            "permessage-deflate; server_max_window_bits=10",
            params(false, false, 10, 15),
        ),
        // 8 is agreed: a 9-bit zlib window never reaches back more than 250 bytes.
        (
            "; server_max_window_bits=8",
            &keep,
            "permessage-deflate; server_max_window_bits=8",
            params(false, false, 8, 15),
        ),
        (
            "; server_max_window_bits=\"12\"",
            &keep,
            "permessage-deflate; server_max_window_bits=12",
            params(false, false, 12, 15),
        ),
        // Bare client_max_window_bits: supported, nothing to say at 15.
        (
            "; client_max_window_bits",
            &keep,
            "permessage-deflate",
            params(false, false, 15, 15),
        ),
        (
            "; client_max_window_bits=9",
            &keep,
            "permessage-deflate; client_max_window_bits=9",
            params(false, false, 15, 9),
        ),
        // The server's own limits.
        (
            "; client_max_window_bits",
            &small,
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=11",
            params(false, false, 10, 11),
        ),
        (
            "; server_max_window_bits=12; client_max_window_bits=9",
            &small,
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9",
            params(false, false, 10, 9),
        ),
        (
            "; server_max_window_bits=9; client_max_window_bits=13",
            &small,
            "permessage-deflate; server_max_window_bits=9; client_max_window_bits=11",
            params(false, false, 9, 11),
        ),
        (
            "; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15; client_max_window_bits=15",
            &keep,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15",
            params(true, true, 15, 15),
        ),
    ];
    for (offer, options, response, agreed) in cases {
        let header = format!("Sec-WebSocket-Extensions: permessage-deflate{offer}\r\n");
        let options = Options::default().deflate_options((*options).clone());
        let (got, server) = answer(&header, &options);
        assert_eq!(extensions(&got).as_deref(), Some(*response), "{offer}");
        assert_eq!(server.deflate_params(), Some(*agreed), "{offer}");
    }
}

#[test]
fn a_client_that_cannot_be_limited_is_declined_only_when_it_keeps_context() {
    let limited = DeflateOptions {
        client_max_window_bits: 10,
        client_no_context_takeover: false,
        ..DeflateOptions::default()
    };
    assert_eq!(accept_offer(&[], &limited), None);
    // Its hint that it keeps no context makes the window irrelevant between messages.
    let hint = vec![("client_no_context_takeover".to_string(), None)];
    assert!(accept_offer(&hint, &limited).is_some());
    // Or the server asks for no context takeover itself.
    let forced = DeflateOptions {
        client_no_context_takeover: true,
        ..limited
    };
    let (agreed, response) = accept_offer(&[], &forced).unwrap();
    assert_eq!(agreed.client_max_window_bits, 15);
    assert!(!response.contains("client_max_window_bits"));
}

#[test]
fn bad_offers_are_declined() {
    for bad in [
        "; server_max_window_bits",
        "; server_max_window_bits=7",
        "; server_max_window_bits=16",
        "; server_max_window_bits=08",
        "; server_max_window_bits=1.0",
        "; server_max_window_bits=\"\"",
        "; client_max_window_bits=0",
        "; client_max_window_bits=abc",
        "; server_no_context_takeover=1",
        "; client_no_context_takeover=\"x\"",
        "; server_no_context_takeover; server_no_context_takeover",
        "; client_no_context_takeover; client_no_context_takeover",
        "; server_max_window_bits=10; server_max_window_bits=10",
        "; client_max_window_bits; client_max_window_bits=10",
        "; mystery",
        "; Server_No_Context_Takeover",
    ] {
        let header = format!("Sec-WebSocket-Extensions: permessage-deflate{bad}\r\n");
        let (response, server) = answer(&header, &on());
        assert_eq!(extensions(&response), None, "{bad}");
        assert_eq!(server.deflate_params(), None, "{bad}");
        assert!(response.starts_with("HTTP/1.1 101"), "{bad}");
    }
    // A malformed header declines everything, yet the upgrade goes on.
    for malformed in [
        "permessage-deflate; =1",
        "permessage-deflate;",
        "permessage-deflate x",
        "permessage-deflate; a=\"open",
    ] {
        let header = format!("Sec-WebSocket-Extensions: {malformed}\r\n");
        let (response, server) = answer(&header, &on());
        assert_eq!(extensions(&response), None, "{malformed}");
        assert!(server.deflate_params().is_none());
        assert!(response.starts_with("HTTP/1.1 101"), "{malformed}");
    }
}

#[test]
fn the_first_acceptable_offer_wins() {
    let header = "Sec-WebSocket-Extensions: x-webkit-deflate-frame, \
        permessage-deflate; mystery, permessage-deflate; server_max_window_bits=11\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n";
    let (response, server) = answer(header, &on());
    assert_eq!(
        extensions(&response).as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=11"
        )
    );
    assert_eq!(server.deflate_params(), Some(params(true, true, 11, 15)));
    // Only other extensions: none agreed.
    let (response, _) = answer("Sec-WebSocket-Extensions: x-foo; bar=1\r\n", &on());
    assert_eq!(extensions(&response), None);
}

#[test]
fn options_are_validated() {
    for bad in [
        DeflateOptions {
            server_max_window_bits: 7,
            ..DeflateOptions::default()
        },
        DeflateOptions {
            client_max_window_bits: 16,
            ..DeflateOptions::default()
        },
        DeflateOptions {
            level: 10,
            ..DeflateOptions::default()
        },
    ] {
        let options = Options::default().deflate_options(bad);
        assert!(matches!(
            Driver::make_client("ws://x/", &options),
            Err(Error::Usage(UsageError::InvalidOption(_)))
        ));
    }
    // The edges are fine.
    let edges = DeflateOptions {
        server_max_window_bits: 8,
        client_max_window_bits: 15,
        level: 9,
        ..DeflateOptions::default()
    };
    assert!(Driver::make_client("ws://x/", &Options::default().deflate_options(edges)).is_ok());
}

// ----- client negotiation -----

fn client_request_extensions(options: &Options) -> Option<String> {
    let (_, request) = started_client(options);
    extensions(&String::from_utf8(request).unwrap())
}

#[test]
fn the_client_offers_what_its_options_say() {
    assert_eq!(client_request_extensions(&Options::default()), None);
    assert_eq!(
        client_request_extensions(&on()).as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             client_max_window_bits"
        )
    );
    let tuned = DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 10,
        client_max_window_bits: 9,
        ..DeflateOptions::default()
    };
    assert_eq!(
        client_request_extensions(&Options::default().deflate_options(tuned)).as_deref(),
        Some("permessage-deflate; server_max_window_bits=10; client_max_window_bits=9")
    );
}

/// A client with `options` reading a 101 response with these extension lines.
fn client_reads(options: &Options, extension_lines: &str) -> (Driver, Vec<Ev>) {
    let (mut client, request) = started_client(options);
    let events = feed(&mut client, &response_for(&request, extension_lines));
    (client, events)
}

#[test]
fn the_client_accepts_a_response_within_its_offer() {
    let tuned = Options::default().deflate_options(DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 12,
        client_max_window_bits: 12,
        ..DeflateOptions::default()
    });
    for (line, agreed) in [
        ("", None),
        (
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=12\r\n",
            Some(params(false, false, 12, 12)),
        ),
        (
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8; \
             client_max_window_bits=9; server_no_context_takeover; client_no_context_takeover\r\n",
            Some(params(true, true, 8, 9)),
        ),
    ] {
        let (client, events) = client_reads(&tuned, line);
        assert_eq!(events, vec![Ev::Open], "{line}");
        assert_eq!(client.deflate_params(), agreed, "{line}");
    }
    // The default offer: no context takeover asked for and promised.
    let (client, events) = client_reads(
        &on(),
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n",
    );
    assert_eq!(events, vec![Ev::Open]);
    assert_eq!(client.deflate_params(), Some(params(true, true, 15, 15)));
}

#[test]
fn the_client_fails_a_response_it_did_not_offer_or_that_breaks_the_rfc() {
    let tuned = Options::default().deflate_options(DeflateOptions {
        server_max_window_bits: 12,
        client_max_window_bits: 12,
        ..DeflateOptions::default()
    });
    let ok = "permessage-deflate; server_no_context_takeover; server_max_window_bits=12";
    for (options, value) in [
        (&Options::default(), "permessage-deflate"),
        (&tuned, "x-foo"),
        (&tuned, &format!("{ok}, {ok}")),
        (&tuned, &format!("{ok}; mystery")),
        (&tuned, &format!("{ok}; server_no_context_takeover")),
        (&tuned, &format!("{ok}; server_max_window_bits=12")),
        (&tuned, &format!("{ok}; client_max_window_bits")),
        (&tuned, &format!("{ok}; client_max_window_bits=13")),
        (&tuned, &format!("{ok}; client_max_window_bits=7")),
        (&tuned, &format!("{ok}; client_no_context_takeover=1")),
        (
            &tuned,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=13",
        ),
        // Not granted what was asked for.
        (&tuned, "permessage-deflate; server_max_window_bits=12"),
        (&tuned, "permessage-deflate; server_no_context_takeover"),
        (&tuned, "permessage-deflate; ="),
    ] {
        let line = format!("Sec-WebSocket-Extensions: {value}\r\n");
        let (client, events) = client_reads(options, &line);
        assert!(
            matches!(
                events.first(),
                Some(Ev::Error(common::Err::Handshake(
                    HandshakeError::BadResponse(_)
                )))
            ),
            "{value}: {events:?}"
        );
        assert!(matches!(events.last(), Some(Ev::Close(1006, _))), "{value}");
        assert!(client.handshake_error().is_some());
    }
}

// ----- frames -----

/// A client and a server that agreed on deflate (each with these options).
fn deflate_pair(client: &Options, server: &Options) -> (Driver, Driver) {
    let (c, s) = open_pair(client, server);
    assert!(c.deflate_params().is_some() && s.deflate_params().is_some());
    (c, s)
}

#[test]
fn messages_compress_both_ways_with_rsv1_on_the_frame() {
    let (mut client, mut server) = deflate_pair(&on(), &on());
    let text = json(4000);
    client.send_text(&text).unwrap();
    let wire = take_output(&mut client);
    let frames = parse_frames(&wire);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].rsv, 0b100);
    assert!(frames[0].mask.is_some(), "a client masks compressed frames");
    assert!(frames[0].payload.len() < text.len() / 3);
    assert_eq!(inflate(&frames[0].payload), text.as_bytes());
    assert_eq!(feed(&mut server, &wire), vec![Ev::Text(text.clone())]);

    let binary = json(70_000).into_bytes();
    server.send_binary(&binary).unwrap();
    let wire = take_output(&mut server);
    let frames = parse_frames(&wire);
    assert_eq!((frames[0].rsv, frames[0].opcode), (0b100, OpCode::Binary));
    assert!(frames[0].mask.is_none());
    assert_eq!(feed(&mut client, &wire), vec![Ev::Binary(binary)]);
    assert!(!client.holds_deflate_streams() && !server.holds_deflate_streams());
}

#[test]
fn control_frames_are_never_compressed() {
    let (mut client, mut server) = deflate_pair(&on(), &on());
    let payload = [b'a'; 125];
    client.send_ping(&payload).unwrap();
    client.send_pong(&payload).unwrap();
    client.close_connection(1000, &"b".repeat(123)).unwrap();
    let frames = parse_frames(&take_output(&mut client));
    assert_eq!(frames.len(), 3);
    assert!(frames.iter().all(|f| f.rsv == 0));
    let _ = drain(&mut server);
}

#[test]
fn the_threshold_at_limit_and_below() {
    let threshold = DEFAULT_DEFLATE_THRESHOLD;
    let (_, mut server) = deflate_pair(&on(), &on());
    for (len, rsv) in [(threshold - 1, 0), (threshold, 0b100)] {
        server.send_text(&json(len)).unwrap();
        let frames = parse_frames(&take_output(&mut server));
        assert_eq!(frames[0].rsv, rsv, "len {len}");
    }
    // A threshold of its own: 0 compresses whatever shrinks.
    let zero = Options::default().deflate_options(DeflateOptions {
        threshold: 0,
        ..DeflateOptions::default()
    });
    let (mut client, mut server) = deflate_pair(&zero, &zero);
    client.send_text("aaaaaaaaaaaaaaaaaaaa").unwrap();
    let wire = take_output(&mut client);
    assert_eq!(parse_frames(&wire)[0].rsv, 0b100);
    assert_eq!(
        feed(&mut server, &wire),
        vec![Ev::Text("aaaaaaaaaaaaaaaaaaaa".into())]
    );
    // The empty message compresses to one byte (RFC 7692 §7.2.3.6): sent plain, read
    // either way.
    client.send_text("").unwrap();
    assert_eq!(parse_frames(&take_output(&mut client))[0].rsv, 0);
    assert_eq!(
        feed(&mut server, &client_frame(0xc1, &[0x00])),
        vec![Ev::Text(String::new())]
    );
    // Without context takeover, a message that does not shrink goes plain.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..300)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    server.send_binary(&noise).unwrap();
    let wire = take_output(&mut server);
    assert_eq!(parse_frames(&wire)[0].rsv, 0);
    assert_eq!(feed(&mut client, &wire), vec![Ev::Binary(noise)]);
}

#[test]
fn rsv1_without_the_extension_is_a_protocol_error() {
    let (_, mut server) = open_pair(&Options::default(), &on());
    assert!(server.deflate_params().is_none());
    let events = feed(&mut server, &client_frame(0xc1, &deflate(b"hello")));
    assert_failed(&events, ProtocolError::ReservedBits(0b100), 1002);
}

#[test]
fn rsv1_belongs_on_the_first_data_frame_only() {
    // On a continuation frame.
    let (_, mut server) = deflate_pair(&on(), &on());
    let data = deflate(json(500).as_bytes());
    let mut wire = client_frame(0x41, &data[..10]);
    wire.extend(client_frame(0xc0, &data[10..]));
    let events = feed(&mut server, &wire);
    assert_failed(&events, ProtocolError::ReservedBits(0b100), 1002);
    // On a control frame.
    let (_, mut server) = deflate_pair(&on(), &on());
    let events = feed(&mut server, &client_frame(0xc9, b"ping"));
    assert_failed(&events, ProtocolError::ReservedBits(0b100), 1002);
    // RSV2 and RSV3 stay reserved.
    let (_, mut server) = deflate_pair(&on(), &on());
    let events = feed(&mut server, &client_frame(0xa1, b"x"));
    assert_failed(&events, ProtocolError::ReservedBits(0b010), 1002);
}

#[test]
fn fragmented_compressed_messages_with_control_frames_between() {
    let (_, mut server) = deflate_pair(&on(), &on());
    let text = json(10_000);
    let data = deflate(text.as_bytes());
    let third = data.len() / 3;
    let mut wire = client_frame(0x41, &data[..third]);
    wire.extend(client_frame(0x89, b"hi"));
    wire.extend(client_frame(0x00, &data[third..2 * third]));
    wire.extend(client_frame(0x80, &data[2 * third..]));
    // In one read, and byte by byte.
    assert_eq!(
        feed(&mut server, &wire),
        vec![Ev::Ping(b"hi".to_vec()), Ev::Text(text.clone())]
    );
    let (_, mut server) = deflate_pair(&on(), &on());
    let mut events = Vec::new();
    for b in &wire {
        events.extend(feed(&mut server, std::slice::from_ref(b)));
    }
    assert_eq!(events, vec![Ev::Ping(b"hi".to_vec()), Ev::Text(text)]);
}

#[test]
fn corrupt_data_and_bad_utf8_are_1007() {
    let (_, mut server) = deflate_pair(&on(), &on());
    let events = feed(&mut server, &client_frame(0xc2, &[0xff, 0xff, 0xff, 0xff]));
    assert_failed(&events, ProtocolError::InvalidCompressedData, 1007);
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.last().unwrap().close_code(), Some(1007));
    let (_, mut server) = deflate_pair(&on(), &on());
    let events = feed(
        &mut server,
        &client_frame(0xc1, &deflate(&[b'a', 0xff, b'b'])),
    );
    assert_failed(&events, ProtocolError::InvalidUtf8, 1007);
}

/// A compressed message that stops inside a deflate block (cut short: not a sender's
/// flush) fails with 1007, where it was delivered as the part that inflated: stored
/// blocks (data that does not compress) and Huffman blocks (text) alike.
#[test]
fn a_message_cut_inside_a_block_is_1007() {
    for data in [noise(1000), json(1490).into_bytes()] {
        let whole = deflate(&data);
        let cut = &whole[..whole.len() / 2];
        let (_, mut server) = deflate_pair(&on(), &on());
        let events = feed(&mut server, &client_frame(0xc2, cut));
        assert_failed(&events, ProtocolError::InvalidCompressedData, 1007);
        // Whole, it is taken.
        let (_, mut server) = deflate_pair(&on(), &on());
        assert_eq!(
            feed(&mut server, &client_frame(0xc2, &whole)),
            vec![Ev::Binary(data)]
        );
    }
}

/// An empty compressed payload (no sender's flush makes one) is an empty message, and a
/// kept context is left as it was: the peer's next message inflates.
#[test]
fn an_empty_compressed_payload_is_an_empty_message_and_keeps_the_context() {
    let keep = Options::default().deflate_options(DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        ..DeflateOptions::default()
    });
    let (mut client, mut server) = deflate_pair(&keep, &keep);
    for text in [json(300), json(400)] {
        client.send_text(&text).unwrap();
        let wire = take_output(&mut client);
        assert_eq!(parse_frames(&wire)[0].rsv, 0b100, "sent compressed");
        assert_eq!(feed(&mut server, &wire), vec![Ev::Text(text)]);
        assert_eq!(
            feed(&mut server, &client_frame(0xc1, &[])),
            vec![Ev::Text(String::new())]
        );
    }
}

#[test]
fn max_length_bounds_the_inflated_size_at_limit_and_over() {
    let limit = 50_000;
    let options = on().max_length(limit);
    for (len, ok) in [(limit, true), (limit + 1, false)] {
        let (_, mut server) = deflate_pair(&on(), &options);
        let text = json(len);
        let data = deflate(text.as_bytes());
        assert!(data.len() < limit / 4);
        // Unfragmented, and in two fragments.
        let events = feed(&mut server, &client_frame(0xc1, &data));
        let mut split = client_frame(0x41, &data[..100]);
        split.extend(client_frame(0x80, &data[100..]));
        let (_, mut again) = deflate_pair(&on(), &options);
        let events_split = feed(&mut again, &split);
        if ok {
            assert_eq!(events, vec![Ev::Text(text.clone())], "len {len}");
            assert_eq!(events_split, vec![Ev::Text(text)]);
        } else {
            let error = ProtocolError::InflatedTooLarge { max: limit };
            assert_failed(&events, error.clone(), 1009);
            assert_failed(&events_split, error, 1009);
            let frames = parse_frames(&take_output(&mut server));
            assert_eq!(frames.last().unwrap().close_code(), Some(1009));
        }
    }
}

#[test]
fn compressed_size_on_the_wire_at_limit_and_over() {
    let max = 100_000;
    let wire_limit = compressed_limit(max);
    // zlib's bound for any window and level: static Huffman codes (level 1) take up to 9
    // bits a byte.
    assert!(wire_limit > max + max / 8 && wire_limit < max + max / 7);
    for (len, ok) in [(wire_limit, true), (wire_limit + 1, false)] {
        let (_, mut server) = deflate_pair(&on(), &on().max_length(max));
        // Only the header (RSV1, text, masked): judged before any payload is read.
        let mut header = vec![0xc1, 0x80 | 127];
        header.extend_from_slice(&(len as u64).to_be_bytes());
        header.extend_from_slice(&MASK);
        let events = feed(&mut server, &header);
        if ok {
            assert_eq!(events, vec![], "len {len}");
        } else {
            let error = ProtocolError::CompressedTooLarge {
                len: len as u64,
                wire_max: wire_limit,
                max,
            };
            assert_failed(&events, error, 1009);
        }
    }
    // An uncompressed message keeps max_length itself.
    let (_, mut server) = deflate_pair(&on(), &on().max_length(max));
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(max as u64 + 1).to_be_bytes());
    header.extend_from_slice(&MASK);
    let error = ProtocolError::MessageTooLarge {
        len: max as u64 + 1,
        max,
    };
    assert_failed(&feed(&mut server, &header), error, 1009);
}

/// Bytes that do not compress (an LCG's high bytes).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u32 = 12345;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 24) as u8
        })
        .collect()
}

/// A peer may flush each fragment of a compressed message (Python's websockets and Node's
/// ws do): each adds an empty stored block, so a message just under `max_length` that
/// does not compress arrives larger than one frame's worst case. It is taken whole; the
/// inflated size is what `max_length` limits.
#[test]
fn a_message_flushed_per_fragment_is_taken_up_to_max_length() {
    let max = 4000;
    let data = noise(3900);
    let mut compress = Compress::new_with_window_bits(Compression::default(), false, 15);
    let chunks: Vec<&[u8]> = data.chunks(20).collect();
    let mut wire = Vec::new();
    let mut compressed = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let mut payload = deflate_with(&mut compress, chunk);
        let last = i + 1 == chunks.len();
        if !last {
            payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
        }
        compressed += payload.len();
        let first_byte = match (i, last) {
            (0, _) => 0x42,
            (_, false) => 0x00,
            (_, true) => 0x80,
        };
        wire.extend(client_frame(first_byte, &payload));
    }
    assert!(compressed > compressed_limit(max), "{compressed} bytes");
    let (_, mut server) = deflate_pair(&on(), &on().max_length(max));
    assert_eq!(feed(&mut server, &wire), vec![Ev::Binary(data)]);
}

/// The wire limit of a fragmented compressed message: one frame's worst case plus
/// `FRAGMENT_FLUSH_OVERHEAD` per later frame, at most `max_length` more in all. At the
/// limit the next frame's header is taken; one byte over fails with 1009 before its
/// payload is read.
#[test]
fn fragmented_compressed_size_on_the_wire_at_limit_and_over() {
    let max = 1000;
    // (continuations before the last, extra bytes allowed in all)
    for (empty, allowance) in [(2, 3 * FRAGMENT_FLUSH_OVERHEAD), (200, max)] {
        assert_eq!(
            compressed_limit_fragmented(max, empty + 1),
            compressed_limit(max) + allowance
        );
        for (over, ok) in [(0, true), (1, false)] {
            let (_, mut server) = deflate_pair(&on(), &on().max_length(max));
            // A first fragment of 10 bytes (valid deflate data, inflated as it comes: a
            // stored block of 65 535 bytes begins, 5 of them here), empty continuations,
            // then one declaring the rest of the limit.
            let mut wire = client_frame(0x42, &[0x00, 0xff, 0xff, 0x00, 0x00, 1, 2, 3, 4, 5]);
            for _ in 0..empty {
                wire.extend(client_frame(0x00, &[]));
            }
            let len = compressed_limit_fragmented(max, empty + 1) - 10 + over;
            wire.extend_from_slice(&[0x00, 0x80 | 126]);
            wire.extend_from_slice(&(len as u16).to_be_bytes());
            wire.extend_from_slice(&MASK);
            let events = feed(&mut server, &wire);
            if ok {
                assert_eq!(events, vec![], "{empty} empty, {len}");
            } else {
                let error = ProtocolError::CompressedTooLarge {
                    len: len as u64 + 10,
                    wire_max: compressed_limit_fragmented(max, empty + 1),
                    max,
                };
                assert_failed(&events, error, 1009);
            }
        }
    }
}

#[test]
fn context_takeover_keeps_the_window_between_messages() {
    let keep = Options::default().deflate_options(DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        ..DeflateOptions::default()
    });
    let (mut client, mut server) = deflate_pair(&keep, &keep);
    assert_eq!(client.deflate_params(), Some(params(false, false, 15, 15)));
    let text = json(2000);
    let mut sizes = Vec::new();
    for _ in 0..3 {
        client.send_text(&text).unwrap();
        let wire = take_output(&mut client);
        sizes.push(parse_frames(&wire)[0].payload.len());
        assert_eq!(feed(&mut server, &wire), vec![Ev::Text(text.clone())]);
        server.send_text(&text).unwrap();
        assert_eq!(pump(&mut server, &mut client), vec![Ev::Text(text.clone())]);
    }
    // The second message refers back to the first.
    assert!(sizes[1] < sizes[0] / 4, "{sizes:?}");
    assert!(client.holds_deflate_streams() && server.holds_deflate_streams());
    // A peer inflating with its own kept stream reads the server's messages too.
    let (_, mut server) = deflate_pair(&keep, &keep);
    let mut peer = Decompress::new_with_window_bits(false, 15);
    for _ in 0..3 {
        server.send_text(&text).unwrap();
        let frames = parse_frames(&take_output(&mut server));
        assert_eq!(inflate_with(&mut peer, &frames[0].payload), text.as_bytes());
    }
}

#[test]
fn small_windows_and_window_8() {
    for bits in [8u8, 9, 12] {
        let options = Options::default().deflate_options(DeflateOptions {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: bits,
            client_max_window_bits: bits,
            ..DeflateOptions::default()
        });
        let (mut client, mut server) = deflate_pair(&options, &options);
        assert_eq!(
            client.deflate_params(),
            Some(params(false, false, bits, bits))
        );
        for _ in 0..3 {
            let text = json(5000);
            client.send_text(&text).unwrap();
            assert_eq!(pump(&mut client, &mut server), vec![Ev::Text(text.clone())]);
            server.send_text(&text).unwrap();
            assert_eq!(pump(&mut server, &mut client), vec![Ev::Text(text)]);
        }
    }
}

/// Bytes of `len` whose first 16 of every 32 are text (matches close by) and the other
/// 16 pseudo-random (splitmix64) bytes that recur `period` (a multiple of 32) bytes later
/// and nowhere closer.
/// Returns the bytes and how many of them are random.
fn far_repeats(period: usize, len: usize) -> (Vec<u8>, usize) {
    let random = |k: u64| {
        let mut z = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u8
    };
    let bytes: Vec<u8> = (0..len)
        .map(|i| match (i / 16) % 2 {
            0 => b"abcdefgh"[i % 8],
            _ => random((i % period) as u64),
        })
        .collect();
    let random_bytes = (0..len).filter(|i| (i / 16) % 2 == 1).count();
    (bytes, random_bytes)
}

#[test]
fn every_sender_keeps_to_its_agreed_window() {
    // RFC 7692 section 7.1.2: a sender must not use a larger LZ77 window than agreed, since
    // the peer may inflate with exactly that window. The drivers' own decoders use 15 bits
    // and take any stream, so what is checked here is the compressed size: the random half
    // of each message repeats only from further back than the agreed window, where a
    // compressor that keeps to it cannot reach, so that half cannot shrink.
    for bits in 8u8..=15 {
        // An agreed 8 is compressed with zlib's smallest raw window, 9 bits, whose matches
        // reach back at most 250 bytes (zlib keeps 262 bytes of lookahead): within 256.
        let window = 1usize << bits;
        // A whole number of 32-byte blocks, so that the random half recurs in step.
        let period = window + 128;
        let (data, random_bytes) = far_repeats(period, 3 * period);
        for takeover in [false, true] {
            let options = Options::default()
                .max_length(1 << 20)
                .deflate_options(DeflateOptions {
                    server_no_context_takeover: !takeover,
                    client_no_context_takeover: !takeover,
                    server_max_window_bits: bits,
                    client_max_window_bits: bits,
                    ..DeflateOptions::default()
                });
            let (mut client, mut server) = deflate_pair(&options, &options);
            let frame = SharedFrame::new(&data, MessageType::Binary).unwrap();
            // Two rounds: with context takeover the second message could also reach back
            // into the first, which lies a whole message (past the window) back.
            for round in 0..2 {
                let what = format!("{bits}-bit window, takeover {takeover}, round {round}");
                server.send_binary(&data).unwrap();
                server.send_shared(&frame).unwrap();
                client.send_binary(&data).unwrap();
                let (to_client, to_server) = (take_output(&mut server), take_output(&mut client));
                let mut frames = parse_frames(&to_client);
                frames.extend(parse_frames(&to_server));
                assert_eq!(frames.len(), 3, "{what}");
                for (i, f) in frames.iter().enumerate() {
                    assert_eq!(f.rsv, 0b100, "{what}: frame {i} not compressed");
                    assert!(
                        f.payload.len() >= random_bytes,
                        "{what}: frame {i} is {} bytes, under the {random_bytes} random bytes \
                         it carries: it reached past the window",
                        f.payload.len()
                    );
                }
                // And each side reads them.
                let both = vec![Ev::Binary(data.clone()), Ev::Binary(data.clone())];
                assert!(feed(&mut client, &to_client) == both, "{what}: the client");
                let one = vec![Ev::Binary(data.clone())];
                assert!(feed(&mut server, &to_server) == one, "{what}: the server");
            }
        }
    }
    // The check can fail: a 15-bit window finds the far repeats and goes under the bound.
    let (data, random_bytes) = far_repeats(640, 3 * 640);
    let wide = deflate(&data).len();
    assert!(wide < random_bytes * 2 / 3, "{wide} bytes");
}

#[test]
fn a_final_block_from_the_peer_is_read() {
    let keep = Options::default().deflate_options(DeflateOptions {
        client_no_context_takeover: false,
        ..DeflateOptions::default()
    });
    let (_, mut server) = deflate_pair(&keep, &keep);
    for _ in 0..2 {
        // A peer that finishes its stream (BFINAL) for every message.
        let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
        let mut data = Vec::with_capacity(4096);
        c.compress_vec(b"finished", &mut data, FlushCompress::Finish)
            .unwrap();
        assert_eq!(
            feed(&mut server, &client_frame(0xc1, &data)),
            vec![Ev::Text("finished".into())]
        );
    }
}

// ----- shared frames -----

#[test]
fn shared_frames_are_compressed_once_per_window_size() {
    let text = json(3000);
    let frame = SharedFrame::new(text.as_bytes(), MessageType::Text).unwrap();
    let mut servers = Vec::new();
    for bits in [15u8, 15, 10, 15] {
        let options = Options::default().deflate_options(DeflateOptions {
            server_max_window_bits: bits,
            ..DeflateOptions::default()
        });
        servers.push(deflate_pair(&on(), &options));
    }
    let (_, mut plain) = open_pair(&Options::default(), &on());
    for (_, server) in &mut servers {
        server.send_shared(&frame).unwrap();
    }
    plain.send_shared(&frame).unwrap();
    assert!(frame.has_deflated(15) && frame.has_deflated(10) && !frame.has_deflated(12));
    let compressed = frame.prepare_deflate(15, 6).unwrap().to_vec();
    for (client, server) in &mut servers {
        let wire = take_output(server);
        assert_eq!(parse_frames(&wire)[0].rsv, 0b100);
        assert_eq!(feed(client, &wire), vec![Ev::Text(text.clone())]);
    }
    // The same bytes went to every 15-bit connection.
    let (_, s) = &mut servers[0];
    s.send_shared(&frame).unwrap();
    assert_eq!(take_output(s), compressed);
    // A connection without deflate gets the plain frame.
    assert_eq!(take_output(&mut plain), frame.as_bytes());
}

#[test]
fn shared_frames_follow_the_connection_deflate_settings() {
    // Under the threshold: plain.
    let small = SharedFrame::new(b"tiny", MessageType::Text).unwrap();
    let (_, mut server) = deflate_pair(&on(), &on());
    server.send_shared(&small).unwrap();
    assert_eq!(take_output(&mut server), small.as_bytes());
    assert!(!small.has_deflated(15));
    // With context takeover: compressed on the connection's own stream, in order with
    // its own frames.
    let keep = Options::default().deflate_options(DeflateOptions {
        server_no_context_takeover: false,
        ..DeflateOptions::default()
    });
    let (mut client, mut server) = deflate_pair(&keep, &keep);
    let text = json(3000);
    let frame = SharedFrame::new(text.as_bytes(), MessageType::Text).unwrap();
    server.send_text("first").unwrap();
    server.send_shared(&frame).unwrap();
    server.send_shared(&frame).unwrap();
    assert!(
        !frame.has_deflated(15),
        "no shared variant for a kept context"
    );
    let wire = take_output(&mut server);
    let frames = parse_frames(&wire);
    assert_eq!(frames.len(), 3);
    assert!(frames[2].payload.len() < frames[1].payload.len() / 4);
    assert_eq!(
        feed(&mut client, &wire),
        vec![
            Ev::Text("first".into()),
            Ev::Text(text.clone()),
            Ev::Text(text)
        ]
    );
    // A client cannot send shared frames, deflate or not.
    assert!(matches!(
        client.send_shared(&frame),
        Err(Error::Usage(UsageError::NotPublishable))
    ));
}

#[test]
fn roles_of_the_codec_match_the_params() {
    // The client compresses with the client's window, the server with the server's.
    let options = Options::default().deflate_options(DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 9,
        client_max_window_bits: 15,
        ..DeflateOptions::default()
    });
    let (mut client, mut server) = deflate_pair(&options, &options);
    assert_eq!(client.role(), Role::Client);
    // A 9-bit server stream is read by a 9-bit peer decompressor.
    let mut peer = Decompress::new_with_window_bits(false, 9);
    for _ in 0..3 {
        let text = json(20_000);
        server.send_text(&text).unwrap();
        let frames = parse_frames(&take_output(&mut server));
        assert_eq!(inflate_with(&mut peer, &frames[0].payload), text.as_bytes());
        client.send_text(&text).unwrap();
        assert_eq!(pump(&mut client, &mut server), vec![Ev::Text(text)]);
    }
}

// ----- properties -----

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn any_options() -> impl Strategy<Value = DeflateOptions> {
        (
            any::<bool>(),
            any::<bool>(),
            8u8..=15,
            8u8..=15,
            0u32..=9,
            0usize..300,
        )
            .prop_map(
                |(snct, cnct, sbits, cbits, level, threshold)| DeflateOptions {
                    server_no_context_takeover: snct,
                    client_no_context_takeover: cnct,
                    server_max_window_bits: sbits,
                    client_max_window_bits: cbits,
                    level,
                    threshold,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever both sides' options, they agree, and messages of any content cross
        /// both ways intact, several in a row (context takeover included).
        #[test]
        fn any_options_round_trip(
            client in any_options(),
            server in any_options(),
            messages in prop::collection::vec(
                (any::<bool>(), prop::collection::vec(any::<u8>(), 0..3000), 0u8..4), 1..6),
        ) {
            let (mut c, mut s) = open_pair(
                &Options::default().deflate_options(client),
                &Options::default().deflate_options(server),
            );
            prop_assert!(c.deflate_params().is_some());
            prop_assert_eq!(c.deflate_params(), s.deflate_params());
            for (text, bytes, repeat) in messages {
                // Some repetition, so compression has something to find.
                let mut data = bytes.repeat(repeat as usize + 1);
                let expected = if text {
                    data = String::from_utf8_lossy(&data).into_owned().into_bytes();
                    Ev::Text(String::from_utf8(data.clone()).unwrap())
                } else {
                    Ev::Binary(data.clone())
                };
                let kind = if text { MessageType::Text } else { MessageType::Binary };
                c.send(&data, kind).unwrap();
                prop_assert_eq!(pump(&mut c, &mut s), vec![expected.clone()]);
                s.send(&data, kind).unwrap();
                prop_assert_eq!(pump(&mut s, &mut c), vec![expected]);
            }
        }

        /// Arbitrary bytes as a compressed message: a message within max_length, or the
        /// connection fails with 1007 or 1009; never a panic or anything else.
        #[test]
        fn arbitrary_compressed_payloads(
            payload in prop::collection::vec(any::<u8>(), 0..2000),
            text in any::<bool>(),
            split in 0usize..2000,
        ) {
            const MAX: usize = 4096;
            let (_, mut server) = deflate_pair(&on(), &on().max_length(MAX));
            let b0 = if text { 0x41 } else { 0x42 };
            let cut = split.min(payload.len());
            let mut wire = client_frame(b0, &payload[..cut]);
            wire.extend(client_frame(0x80, &payload[cut..]));
            let events = feed(&mut server, &wire);
            match events.as_slice() {
                [Ev::Text(t)] => prop_assert!(text && t.len() <= MAX),
                [Ev::Binary(b)] => prop_assert!(!text && b.len() <= MAX),
                [Ev::Error(common::Err::Protocol(e)), Ev::Close(code, _)] => {
                    prop_assert!(matches!(code, 1007 | 1009), "{e:?} {code}");
                }
                other => prop_assert!(false, "{other:?}"),
            }
        }
    }
}

/// Deflate data is inflated as it arrives: a first fragment that is not deflate data
/// fails with 1007 at once, not when the message's last fragment (which never comes
/// here) would have made it whole.
#[test]
fn bad_deflate_data_fails_before_the_message_ends() {
    let (_, mut server) = deflate_pair(&on(), &on());
    // A stored block whose length and its complement disagree.
    let wire = client_frame(0x42, &[0; 10]);
    assert_failed(
        &feed(&mut server, &wire),
        ProtocolError::InvalidCompressedData,
        1007,
    );
}

// ----- inflating in pieces: a differential stress against whole messages, and its edges -----

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// An event for a failure message: a message as its kind and length, not its bytes.
/// `payload` cut at up to three random places into one message's frames, each built by
/// `frame`: the first with the opcode and RSV bits of `first`, the rest continuations, FIN
/// on the last.
fn random_fragments(
    rng: &mut Rng,
    payload: &[u8],
    first: u8,
    frame: impl Fn(u8, &[u8]) -> Vec<u8>,
) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = (0..rng.below(4))
        .map(|_| rng.below(payload.len() + 1))
        .collect();
    cuts.sort();
    cuts.push(payload.len());
    let mut start = 0;
    let last = cuts.len() - 1;
    cuts.iter()
        .enumerate()
        .map(|(i, &end)| {
            let fin = if i == last { 0x80 } else { 0 };
            let b0 = if i == 0 { fin | first } else { fin };
            let piece = frame(b0, &payload[start..end]);
            start = end;
            piece
        })
        .collect()
}

fn brief(event: &Ev) -> String {
    match event {
        Ev::Binary(b) => format!("bin {}", b.len()),
        Ev::Text(t) => format!("text {}", t.len()),
        other => format!("{other:?}"),
    }
}

/// Feeds `wire` to `driver` in random reads, sometimes through lent buffers; returns the
/// events.
fn feed_randomly(driver: &mut Driver, wire: &[u8], rng: &mut Rng, max_read: usize) -> Vec<Ev> {
    let mut at = 0;
    let mut events = Vec::new();
    while at < wire.len() {
        if rng.below(3) == 0 {
            let min = 1 + rng.below(64);
            if let Some((mut buf, room)) = driver.lend_payload_buffer(min) {
                let n = room.min(1 + rng.below(max_read)).min(wire.len() - at);
                let n = if rng.below(10) == 0 { 0 } else { n };
                buf.extend_from_slice(&wire[at..at + n]);
                driver.payload_received(buf, n);
                at += n;
                events.extend(drain(driver));
                continue;
            }
        }
        let n = (1 + rng.below(max_read)).min(wire.len() - at);
        events.extend(feed(driver, &wire[at..at + n]));
        at += n;
    }
    events.extend(drain(driver));
    events
}

#[test]
fn random_splits_inflate_as_the_whole_message() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for round in 0..6000 {
        let cnct = rng.below(2) == 0;
        let bits = 8 + rng.below(8) as u8;
        let opts = Options::default()
            .max_length(1 << 20)
            .deflate_options(DeflateOptions {
                client_no_context_takeover: cnct,
                server_no_context_takeover: rng.below(2) == 0,
                client_max_window_bits: bits,
                server_max_window_bits: 8 + rng.below(8) as u8,
                threshold: 0,
                ..DeflateOptions::default()
            });
        let (_, mut server) = deflate_pair(&opts, &opts);
        let p = server.deflate_params().unwrap();
        let cbits = p.client_max_window_bits.max(9);
        let mut comp = Compress::new_with_window_bits(Compression::default(), false, cbits);
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..(1 + rng.below(5)) {
            let len = rng.below(20_000);
            let data: Vec<u8> = match rng.below(3) {
                0 => json(len).into_bytes(),
                1 => noise(len),
                _ => vec![b'z'; len],
            };
            let plain = rng.below(5) == 0;
            let payload = if plain {
                data.clone()
            } else {
                if p.client_no_context_takeover {
                    comp = Compress::new_with_window_bits(Compression::default(), false, cbits);
                }
                deflate_with(&mut comp, &data)
            };
            // The first frame: binary, RSV1 when compressed; pings between fragments.
            let first = if plain { 0x02 } else { 0x42 };
            let frames = random_fragments(&mut rng, &payload, first, client_frame);
            let last = frames.len() - 1;
            for (i, frame) in frames.into_iter().enumerate() {
                wire.extend(frame);
                if i < last && rng.below(4) == 0 {
                    wire.extend(client_frame(0x89, b"p"));
                    expected.push(Ev::Ping(b"p".to_vec()));
                }
            }
            expected.push(Ev::Binary(data));
        }
        let max_read = [1, 7, 100, 5000, 100_000][rng.below(5)];
        let events = feed_randomly(&mut server, &wire, &mut rng, max_read);
        assert!(
            events == expected,
            "round {round} {p:?} max_read {max_read}: {} events vs {}: {:?}",
            events.len(),
            expected.len(),
            events
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .map(|i| (&events[i], i))
                .map(|(e, i)| (brief(e), i))
        );
    }
}

#[test]
fn random_splits_on_interleaved_connections_on_one_thread() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..1500 {
        let k = 2 + rng.below(3);
        let mut conns = Vec::new();
        for _ in 0..k {
            let cnct = rng.below(3) != 0;
            let opts = Options::default()
                .max_length(1 << 20)
                .deflate_options(DeflateOptions {
                    client_no_context_takeover: cnct,
                    client_max_window_bits: 8 + rng.below(8) as u8,
                    threshold: 0,
                    ..DeflateOptions::default()
                });
            let (_, server) = deflate_pair(&opts, &opts);
            let p = server.deflate_params().unwrap();
            let cbits = p.client_max_window_bits.max(9);
            let mut comp = Compress::new_with_window_bits(Compression::default(), false, cbits);
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..(1 + rng.below(4)) {
                let len = rng.below(10_000);
                let data: Vec<u8> = match rng.below(2) {
                    0 => json(len).into_bytes(),
                    _ => noise(len),
                };
                if p.client_no_context_takeover {
                    comp = Compress::new_with_window_bits(Compression::default(), false, cbits);
                }
                let payload = deflate_with(&mut comp, &data);
                for frame in random_fragments(&mut rng, &payload, 0x42, client_frame) {
                    wire.extend(frame);
                }
                expected.push(Ev::Binary(data));
            }
            conns.push((server, wire, 0usize, expected, Vec::new()));
        }
        let max_read = [1, 13, 300, 5000][rng.below(4)];
        loop {
            let open: Vec<usize> = (0..k).filter(|&i| conns[i].2 < conns[i].1.len()).collect();
            if open.is_empty() {
                break;
            }
            let i = open[rng.below(open.len())];
            let (server, wire, at, _, events) = &mut conns[i];
            let n = (1 + rng.below(max_read)).min(wire.len() - *at);
            if rng.below(3) == 0
                && let Some((mut buf, room)) = server.lend_payload_buffer(1)
            {
                let n = n.min(room);
                buf.extend_from_slice(&wire[*at..*at + n]);
                server.payload_received(buf, n);
                *at += n;
                events.extend(drain(server));
                continue;
            }
            events.extend(feed(server, &wire[*at..*at + n]));
            *at += n;
        }
        for (i, (server, _, _, expected, events)) in conns.iter_mut().enumerate() {
            events.extend(drain(server));
            assert!(
                events == expected,
                "round {round} conn {i}: {:?}",
                events.iter().map(brief).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn inflating_in_pieces_at_its_edges() {
    let mut rng = Rng(77);
    // (a) max_length exact and over, any split, lent or not.
    let limit = 20_000;
    for data in [noise(limit), json(limit).into_bytes(), vec![b'q'; limit]] {
        for over in [0usize, 1] {
            let mut d = data.clone();
            if over == 1 {
                d.push(b'x');
            }
            let payload = deflate(&d);
            for _ in 0..200 {
                let (_, mut server) = deflate_pair(&on(), &on().max_length(limit));
                let cut = rng.below(payload.len() + 1);
                let mut wire = client_frame(0x42, &payload[..cut]);
                wire.extend(client_frame(0x80, &payload[cut..]));
                let max_read = [1, 5, 64, 3000, 100_000][rng.below(5)];
                let events = feed_randomly(&mut server, &wire, &mut rng, max_read);
                if over == 0 {
                    assert!(
                        events == vec![Ev::Binary(d.clone())],
                        "exact: {:?}",
                        events.len()
                    );
                } else {
                    assert_failed(
                        &events,
                        ProtocolError::InflatedTooLarge { max: limit },
                        1009,
                    );
                }
            }
        }
    }
    // (b) cut inside a block: 1007, whatever the split.
    for data in [noise(3000), json(3000).into_bytes()] {
        let whole = deflate(&data);
        for c in [1, 2, 3, whole.len() / 3, whole.len() / 2, whole.len() - 1] {
            let cut = &whole[..c];
            for _ in 0..30 {
                let (_, mut server) = deflate_pair(&on(), &on());
                let k = rng.below(cut.len() + 1);
                let mut wire = client_frame(0x42, &cut[..k]);
                wire.extend(client_frame(0x80, &cut[k..]));
                let max_read = [1, 5, 64, 3000][rng.below(4)];
                let events = feed_randomly(&mut server, &wire, &mut rng, max_read);
                let (_, mut whole_server) = deflate_pair(&on(), &on());
                let reference = feed(&mut whole_server, &client_frame(0xc2, cut));
                assert_eq!(events, reference, "cut {c} split {k}");
            }
        }
    }
    // (d) text not UTF-8 once inflated, in pieces.
    let mut bad = json(5000).into_bytes();
    bad[4000] = 0xff;
    let payload = deflate(&bad);
    for _ in 0..50 {
        let (_, mut server) = deflate_pair(&on(), &on());
        let k = rng.below(payload.len() + 1);
        let mut wire = client_frame(0x41, &payload[..k]);
        wire.extend(client_frame(0x80, &payload[k..]));
        let events = feed_randomly(&mut server, &wire, &mut rng, 50);
        assert_failed(&events, ProtocolError::InvalidUtf8, 1007);
    }
}

#[test]
fn a_client_inflates_in_pieces_and_reads_final_blocks() {
    let mut rng = Rng(4242);
    for round in 0..2000 {
        let snct = rng.below(2) == 0;
        let opts = Options::default()
            .max_length(1 << 20)
            .deflate_options(DeflateOptions {
                server_no_context_takeover: snct,
                server_max_window_bits: 8 + rng.below(8) as u8,
                threshold: 0,
                ..DeflateOptions::default()
            });
        let (mut client, _) = deflate_pair(&opts, &opts);
        let p = client.deflate_params().unwrap();
        let sbits = p.server_max_window_bits.max(9);
        let mut comp = Compress::new_with_window_bits(Compression::default(), false, sbits);
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..(1 + rng.below(5)) {
            let len = 1 + rng.below(8000);
            let data = json(len).into_bytes();
            let finish = rng.below(4) == 0;
            if p.server_no_context_takeover || finish {
                comp = Compress::new_with_window_bits(Compression::default(), false, sbits);
            }
            let mut payload = if finish {
                let mut out = Vec::with_capacity(len + 100);
                comp.compress_vec(&data, &mut out, FlushCompress::Finish)
                    .unwrap();
                // Garbage after the final block is ignored.
                if rng.below(2) == 0 {
                    out.extend_from_slice(&[0xde, 0xad]);
                }
                comp = Compress::new_with_window_bits(Compression::default(), false, sbits);
                out
            } else {
                deflate_with(&mut comp, &data)
            };
            if payload.is_empty() {
                payload.push(0);
            }
            let unmasked = |b0, payload: &[u8]| common::raw_frame(b0, payload, None);
            for frame in random_fragments(&mut rng, &payload, 0x41, unmasked) {
                wire.extend(frame);
            }
            expected.push(Ev::Text(String::from_utf8(data).unwrap()));
        }
        let max_read = [1, 7, 100, 5000][rng.below(4)];
        let events = feed_randomly(&mut client, &wire, &mut rng, max_read);
        assert!(
            events == expected,
            "round {round} {p:?}: {:?}",
            events.iter().map(brief).collect::<Vec<_>>()
        );
    }
}

/// A message cut inside a final (BFINAL) stored block: the `00 00 ff ff` tail the
/// receiver appends completes the block as its last four bytes, so the stream "ends" and
/// the tail's bytes are delivered as the message's. It must fail 1007 like any other
/// message cut inside a block (RFC 7692 §7.2.2: the tail is not data).
#[test]
fn a_message_cut_inside_a_final_block_is_1007() {
    // A final stored block of 10 bytes, only 6 of them sent.
    let cut = [
        0x01, 0x0a, 0x00, 0xf5, 0xff, b'a', b'b', b'c', b'd', b'e', b'f',
    ];
    // Whole (fast path).
    let (_, mut server) = deflate_pair(&on(), &on());
    let events = feed(&mut server, &client_frame(0xc2, &cut));
    assert_failed(&events, ProtocolError::InvalidCompressedData, 1007);
    // In two fragments (inflated in pieces).
    let (_, mut server) = deflate_pair(&on(), &on());
    let mut wire = client_frame(0x42, &cut[..3]);
    wire.extend(client_frame(0x80, &cut[3..]));
    let events = feed(&mut server, &wire);
    assert_failed(&events, ProtocolError::InvalidCompressedData, 1007);
}

/// A connection keeps its compressor only while it may still send messages: its own close
/// lets it go (the peer's stream stays for the messages it sends before its answer), and
/// a closed connection holds no zlib state, whichever side closed and however.
#[test]
fn the_zlib_streams_go_when_the_connection_can_no_longer_use_them() {
    let keep = Options::default().deflate_options(DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        ..DeflateOptions::default()
    });
    let text = json(2000);
    let warmed = || {
        let (mut client, mut server) = deflate_pair(&keep, &keep);
        client.send_text(&text).unwrap();
        assert_eq!(pump(&mut client, &mut server), vec![Ev::Text(text.clone())]);
        server.send_text(&text).unwrap();
        assert_eq!(pump(&mut server, &mut client), vec![Ev::Text(text.clone())]);
        assert!(client.holds_deflate_streams() && server.holds_deflate_streams());
        (client, server)
    };

    // The server closes; the client sends one more message before it reads the close.
    let (mut client, mut server) = warmed();
    server.close_connection(1000, "").unwrap();
    let close = take_output(&mut server);
    client.send_text(&text).unwrap();
    let wire = take_output(&mut client);
    assert!(server.holds_deflate_streams(), "the peer's stream stays");
    assert_eq!(feed(&mut server, &wire), vec![Ev::Text(text.clone())]);
    assert_eq!(
        feed(&mut client, &close),
        vec![Ev::Close(1000, String::new())]
    );
    assert!(!client.holds_deflate_streams(), "closed after its answer");
    assert_eq!(
        pump(&mut client, &mut server),
        vec![Ev::Close(1000, String::new())]
    );
    assert!(!server.holds_deflate_streams());

    // Ended by an abort, by the transport, by a protocol error.
    for how in 0..3 {
        let (_, mut server) = warmed();
        match how {
            0 => server.abort(1001, "going away"),
            1 => {
                eof(&mut server);
            }
            // A reserved opcode: 1002.
            _ => {
                feed(&mut server, &client_frame(0x83, b"?"));
            }
        }
        assert_eq!(
            server.ready_state(),
            websocket_driver::ReadyState::Closed,
            "{how}"
        );
        assert!(!server.holds_deflate_streams(), "{how}");
    }
}

/// A driver kept in a thread-local and stopped from its destructor (an "abort on drop"
/// guard) while a compressed message is under way in pieces: `stop` gives the message's
/// stream back to the thread's spare slot, which this thread may already have destroyed.
/// That must not panic (a panic in a TLS destructor aborts the process). Run in a child
/// process, since the failure is an abort.
#[test]
fn stopping_in_a_thread_local_destructor_does_not_abort() {
    const CHILD: &str = "REVIEW_TLS_CHILD";
    if std::env::var_os(CHILD).is_some() {
        struct AbortOnDrop(Driver);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort(1001, "going away");
            }
        }
        thread_local! {
            static GUARD: std::cell::RefCell<Option<AbortOnDrop>> =
                const { std::cell::RefCell::new(None) };
        }
        std::thread::spawn(|| {
            // The guard's slot is registered first, so it is destroyed last.
            GUARD.with(|_| ());
            let (_, mut server) = deflate_pair(&on(), &on());
            let data = deflate(json(5000).as_bytes());
            // The first fragment only: the message is inflating through the thread's
            // spare stream (registered now, after the guard).
            assert_eq!(feed(&mut server, &client_frame(0x41, &data[..100])), vec![]);
            assert!(server.holds_deflate_streams());
            GUARD.with(|g| *g.borrow_mut() = Some(AbortOnDrop(server)));
        })
        .join()
        .unwrap();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stopping_in_a_thread_local_destructor_does_not_abort",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failure_mid_message_leaves_the_other_connections_sound() {
    let text = json(30_000);
    let data = deflate(text.as_bytes());
    for how in 0..3 {
        let (_, mut b) = deflate_pair(&on(), &on());
        // B is mid-message, on its own stream.
        assert_eq!(feed(&mut b, &client_frame(0x41, &data[..50])), vec![]);
        let (_, mut a) = deflate_pair(&on(), &on().max_length(1000));
        let first = client_frame(0x41, &data[..200]);
        let events = match how {
            0 => feed(&mut a, &first),
            1 => feed(&mut a, &client_frame(0x42, &[0; 10])),
            _ => {
                let mut e = feed(&mut a, &first);
                e.extend(feed(&mut a, &client_frame(0x89, b"x")));
                e.extend(feed(&mut a, &client_frame(0x88, &[0x03, 0xe8])));
                e
            }
        };
        assert!(!a.holds_deflate_streams(), "{how} {events:?}");
        // B goes on, then C in pieces on the given-back stream.
        let mut rest = client_frame(0x00, &data[50..300]);
        rest.extend(client_frame(0x80, &data[300..]));
        assert_eq!(feed(&mut b, &rest), vec![Ev::Text(text.clone())]);
        let (_, mut c) = deflate_pair(&on(), &on());
        let mut wire = client_frame(0x41, &data[..7]);
        wire.extend(client_frame(0x80, &data[7..]));
        assert_eq!(feed(&mut c, &wire), vec![Ev::Text(text.clone())]);
        assert!(!b.holds_deflate_streams() && !c.holds_deflate_streams());
    }
}

/// `max_length` bounds the inflated size (Options::max_length; RFC 7692 lets a sender use
/// any DEFLATE encoding): an incompressible message of exactly `max_length` bytes must be
/// taken, whatever window or level its sender compressed with. zlib (and zlib-rs, this
/// crate's backend) falls back to stored blocks only while a block's input is still in
/// the window, and not at level 1 (static Huffman, up to 9 bits a byte): a sender with a
/// window under 15 bits, or at level 1, makes more than `compressed_limit` bytes, and the
/// message is refused with 1009 from its header although it fits `max_length`. zlib's
/// (and zlib-rs's) own `deflateBound` allows about 12.5 % more for such settings.
fn taken_at_max_length(server: &mut Driver, wire: &[u8], data: &[u8], what: &str) {
    let events = feed(server, wire);
    let seen: Vec<String> = events.iter().map(brief).collect();
    assert!(
        events.len() == 1 && events[0] == Ev::Binary(data.to_vec()),
        "{what}: {seen:?}"
    );
}

/// A peer compressing with a 12-bit window (level 6, every message compressed, no
/// context takeover: what the server agrees by default).
#[test]
fn a_message_at_max_length_from_a_small_window_peer_is_taken() {
    let max = 200_000;
    let data = noise(max);
    let payload = deflate_with(
        &mut Compress::new_with_window_bits(Compression::default(), false, 12),
        &data,
    );
    assert_eq!(inflate(&payload), data);
    let (_, mut server) = deflate_pair(&on(), &on().max_length(max));
    let what = format!(
        "{} compressed bytes, wire limit {}",
        payload.len(),
        compressed_limit(max)
    );
    taken_at_max_length(&mut server, &client_frame(0xc2, &payload), &data, &what);
}

/// This crate's own client with context takeover (so it sends every message compressed,
/// whatever its size) to this crate's own server: at level 1 with the full window, and at
/// the default level with a 12-bit window.
#[test]
fn a_message_at_max_length_from_an_own_context_keeping_client_is_taken() {
    let max = 200_000;
    let data = noise(max);
    for (level, bits) in [(1, 15), (6, 12)] {
        let client = Options::default().deflate_options(DeflateOptions {
            client_no_context_takeover: false,
            client_max_window_bits: bits,
            level,
            ..DeflateOptions::default()
        });
        let server_options = Options::default()
            .max_length(max)
            .deflate_options(DeflateOptions {
                client_no_context_takeover: false,
                ..DeflateOptions::default()
            });
        let (mut client, mut server) = deflate_pair(&client, &server_options);
        client.send_binary(&data).unwrap();
        let wire = take_output(&mut client);
        let frames = parse_frames(&wire);
        assert_eq!(frames[0].rsv, 0b100);
        let what = format!(
            "level {level}, {bits}-bit window: {} compressed bytes, wire limit {}",
            frames[0].payload.len(),
            compressed_limit(max)
        );
        taken_at_max_length(&mut server, &wire, &data, &what);
    }
}
