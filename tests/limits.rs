//! Size limits: `max_length` across fragments, handshake head size and header count, and
//! incremental head parsing.

mod common;

use common::*;
use websocket_driver::protocol::frame::{OpCode, Status};
use websocket_driver::protocol::handshake::HeadLimits;
use websocket_driver::protocol::options::DEFAULT_MAX_LENGTH;
use websocket_driver::{
    Driver, HandshakeError, Options, ProtocolError, ReadyState, Request, RequestParser,
};

const MAX: usize = 1000;

fn too_large(len: u64, max: usize) -> ProtocolError {
    ProtocolError::MessageTooLarge { len, max }
}

/// Feeds `bytes` to a fresh server with `max_length = MAX`; expects 1009 and no message.
fn rejected_with_1009(bytes: &[u8], len: u64) {
    let mut server = open_server(&Options::default().max_length(MAX));
    let events = feed(&mut server, bytes);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Ev::Text(_) | Ev::Binary(_))),
        "a too-large message must not be delivered, truncated or not: {events:?}"
    );
    assert_failed(&events, too_large(len, MAX), 1009);
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].close_code(), Some(1009));
    assert_eq!(server.ready_state(), ReadyState::Closed);
}

#[test]
fn default_max_length_is_the_seeds() {
    assert_eq!(Options::default().max_length, 0x3ff_ffff);
    assert_eq!(DEFAULT_MAX_LENGTH, 0x3ff_ffff);
}

#[test]
fn default_max_length_is_enforced_at_the_header() {
    // A header declaring exactly the default limit waits for its payload...
    let mut server = open_server(&Options::default());
    let mut header = vec![0x82, 0xff];
    header.extend_from_slice(&(0x3ff_ffffu64).to_be_bytes());
    header.extend_from_slice(&MASK);
    assert_eq!(feed(&mut server, &header), vec![]);
    assert_eq!(server.ready_state(), ReadyState::Open);
    // ...one byte more is refused before any payload arrives.
    let mut server = open_server(&Options::default());
    let mut header = vec![0x82, 0xff];
    header.extend_from_slice(&(0x400_0000u64).to_be_bytes());
    header.extend_from_slice(&MASK);
    assert_failed(
        &feed(&mut server, &header),
        too_large(0x400_0000, 0x3ff_ffff),
        1009,
    );
}

#[test]
fn single_frame_at_limit_is_accepted() {
    let mut server = open_server(&Options::default().max_length(MAX));
    let payload = vec![b'a'; MAX];
    let mut bytes = masked(OpCode::Binary, &payload);
    bytes.extend(masked(OpCode::Text, &payload));
    assert_eq!(
        feed(&mut server, &bytes),
        vec![
            Ev::Binary(payload.clone()),
            Ev::Text(String::from_utf8(payload.clone()).unwrap())
        ]
    );
    // Split across reads as well.
    let frame = masked(OpCode::Binary, &payload);
    let mut events = feed(&mut server, &frame[..500]);
    events.extend(feed(&mut server, &frame[500..]));
    assert_eq!(events, vec![Ev::Binary(payload)]);
    assert!(server.pending_output().is_empty());
}

#[test]
fn single_frame_over_limit_is_rejected() {
    for len in [MAX + 1, MAX + 2] {
        for opcode in [OpCode::Binary, OpCode::Text] {
            let frame = masked(opcode, &vec![b'a'; len]);
            rejected_with_1009(&frame, len as u64);
            // The header alone is enough to refuse it.
            rejected_with_1009(&frame[..8], len as u64);
        }
    }
}

#[test]
fn fragments_summing_to_limit_are_accepted() {
    for sizes in [
        vec![600, 400],
        vec![100; 10],
        vec![0, 1000, 0],
        vec![999, 1],
        vec![1; 1000],
    ] {
        assert_eq!(sizes.iter().sum::<usize>(), MAX);
        let mut server = open_server(&Options::default().max_length(MAX));
        let (bytes, payload) = fragmented(&sizes);
        assert_eq!(
            feed(&mut server, &bytes),
            vec![Ev::Text(payload)],
            "{sizes:?}"
        );
    }
}

#[test]
fn fragments_crossing_limit_are_rejected() {
    for sizes in [
        vec![600, 401],
        vec![600, 402],
        vec![100, 900, 1],
        vec![1000, 1],
        vec![1000, 0, 2],
    ] {
        let total: usize = sizes.iter().sum();
        let (bytes, _) = fragmented(&sizes);
        rejected_with_1009(&bytes, total as u64);
        // Refused at the crossing fragment's header, before its payload: cut right there.
        let before: usize = sizes[..sizes.len() - 1]
            .iter()
            .map(|n| n + header_len(*n))
            .sum();
        let last = *sizes.last().unwrap();
        let cut = before + header_len(last);
        rejected_with_1009(&bytes[..cut], total as u64);
    }
}

#[test]
fn client_enforces_max_length_too() {
    let (mut client, mut server) = open_client(&Options::default().max_length(MAX));
    server.send_binary(&vec![1; MAX]).unwrap();
    assert_eq!(
        pump(&mut server, &mut client),
        vec![Ev::Binary(vec![1; MAX])]
    );
    server.send_binary(&vec![1; MAX + 1]).unwrap();
    assert_failed(
        &pump(&mut server, &mut client),
        too_large(MAX as u64 + 1, MAX),
        1009,
    );
    let frames = parse_frames(&take_output(&mut client));
    assert_eq!(frames[0].close_code(), Some(1009));
}

#[test]
fn control_frames_do_not_count_against_max_length() {
    let mut server = open_server(&Options::default().max_length(10));
    let mut bytes = client_frame(0x01, b"0123456789");
    bytes.extend(masked(OpCode::Ping, &[7; 125]));
    bytes.extend(client_frame(0x80, b""));
    assert_eq!(
        feed(&mut server, &bytes),
        vec![Ev::Ping(vec![7; 125]), Ev::Text("0123456789".into())]
    );
}

fn header_len(payload: usize) -> usize {
    match payload {
        0..=125 => 6,
        126..=0xffff => 8,
        _ => 14,
    }
}

/// A text message of `sizes.len()` fragments (masked) and its payload.
fn fragmented(sizes: &[usize]) -> (Vec<u8>, String) {
    let mut bytes = Vec::new();
    let mut payload = String::new();
    for (i, &n) in sizes.iter().enumerate() {
        let piece: String = (0..n)
            .map(|j| (b'a' + ((i + j) % 26) as u8) as char)
            .collect();
        let opcode = if i == 0 { 0x01 } else { 0x00 };
        let fin = if i == sizes.len() - 1 { 0x80 } else { 0 };
        bytes.extend(client_frame(fin | opcode, piece.as_bytes()));
        payload.push_str(&piece);
    }
    (bytes, payload)
}

// ----- handshake head limits -----

/// A real upgrade request from a client driver.
fn upgrade_request() -> Vec<u8> {
    started_client(&Options::default()).1
}

/// `head` with a `X-Pad` header line added, so that the whole head is `len` bytes.
fn padded_to(head: &[u8], len: usize) -> Vec<u8> {
    let line_overhead = "X-Pad: \r\n".len();
    assert!(
        len >= head.len() + line_overhead,
        "cannot pad {} to {len}",
        head.len()
    );
    let pad = "p".repeat(len - head.len() - line_overhead);
    let mut out = head[..head.len() - 2].to_vec();
    out.extend_from_slice(format!("X-Pad: {pad}\r\n\r\n").as_bytes());
    assert_eq!(out.len(), len);
    out
}

/// Parses `head` in reads of `chunk` bytes.
fn parse_in_chunks(
    limits: HeadLimits,
    head: &[u8],
    chunk: usize,
) -> Result<(Request, usize), HandshakeError> {
    let mut parser = RequestParser::new(limits);
    let mut at = 0;
    for piece in head.chunks(chunk) {
        match parser.parse(piece)? {
            Status::Complete(request, used) => return Ok((request, at + used)),
            Status::Partial => at += piece.len(),
        }
    }
    panic!("head never completed")
}

#[test]
fn max_handshake_size_boundary() {
    let base = upgrade_request();
    let limit = base.len() + 100;
    let options = Options::default().max_handshake_size(limit);
    assert_eq!(options.max_handshake_size, limit);
    let at_limit = padded_to(&base, limit);
    for chunk in [usize::MAX, 1, 7, limit / 2] {
        let (request, used) = parse_in_chunks(limits(&options), &at_limit, chunk).unwrap();
        assert_eq!(used, limit);
        assert!(Driver::make_server(&request, &options).is_ok());
    }
    for extra in [1, 2] {
        let over = padded_to(&base, limit + extra);
        for chunk in [usize::MAX, 1, 7, limit / 2] {
            let err = parse_in_chunks(limits(&options), &over, chunk).unwrap_err();
            assert_eq!(
                err,
                HandshakeError::HeadTooLarge { limit },
                "extra {extra}, chunk {chunk}"
            );
            assert_eq!(err.status(), 431);
        }
    }
}

#[test]
fn head_without_end_is_refused_once_over_limit() {
    let limit = 300;
    let options = Options::default().max_handshake_size(limit);
    let mut parser = RequestParser::new(limits(&options));
    let line = b"GET / HTTP/1.1\r\nX: ";
    assert_eq!(parser.parse(line), Ok(Status::Partial));
    let mut fed = line.len();
    let mut result = Ok(Status::Partial);
    while fed <= limit + 1 {
        result = parser.parse(b"a");
        fed += 1;
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(HandshakeError::HeadTooLarge { limit }));
    assert_eq!(
        fed,
        limit + 1,
        "refused as soon as the head passed the limit"
    );
}

#[test]
fn max_headers_boundary() {
    let base = upgrade_request();
    let lines = String::from_utf8(base.clone())
        .unwrap()
        .matches("\r\n")
        .count()
        - 2;
    let options = Options::default().max_headers(lines);
    let request = match RequestParser::new(limits(&options)).parse(&base) {
        Ok(Status::Complete(r, _)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(request.headers.len(), lines);
    for extra in [1, 2] {
        let mut head = base[..base.len() - 2].to_vec();
        for i in 0..extra {
            head.extend_from_slice(format!("X-Extra-{i}: x\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let err = RequestParser::new(limits(&options))
            .parse(&head)
            .unwrap_err();
        assert_eq!(
            err,
            HandshakeError::TooManyHeaders { limit: lines },
            "extra {extra}"
        );
        assert_eq!(err.status(), 431);
        // One more allowed header line makes room again.
        let roomy = Options::default().max_headers(lines + extra);
        assert!(matches!(
            RequestParser::new(limits(&roomy)).parse(&head),
            Ok(Status::Complete(_, n)) if n == head.len()
        ));
    }
}

#[test]
fn client_applies_handshake_limits_to_the_response() {
    let (client, request) = started_client(&Options::default());
    drop(client);
    let response = response_for(&request, "X-Pad: ppp\r\n");
    let limit = response.len() + 50;
    let options = Options::default().max_handshake_size(limit);

    let (mut client, request) = started_client(&options);
    let at_limit = padded_to(&response_for(&request, ""), limit);
    assert_eq!(feed(&mut client, &at_limit), vec![Ev::Open]);

    let (mut client, request) = started_client(&options);
    let over = padded_to(&response_for(&request, ""), limit + 1);
    let events = feed(&mut client, &over);
    assert_eq!(
        events[0],
        Ev::Error(Err::Handshake(HandshakeError::HeadTooLarge { limit }))
    );
    assert_eq!(client.ready_state(), ReadyState::Closed);

    // Header lines: the 101's three and `X-1` make four, at the limit; `X-2` is one over.
    let options = Options::default().max_headers(4);
    let (mut client, request) = started_client(&options);
    let at_limit = response_for(&request, "X-1: 1\r\n");
    assert_eq!(feed(&mut client, &at_limit), vec![Ev::Open]);
    let (mut client, request) = started_client(&options);
    let over = response_for(&request, "X-1: 1\r\nX-2: 2\r\n");
    assert_eq!(
        feed(&mut client, &over)[0],
        Ev::Error(Err::Handshake(HandshakeError::TooManyHeaders { limit: 4 }))
    );
    assert_eq!(client.ready_state(), ReadyState::Closed);
}

#[test]
fn large_head_dripped_byte_by_byte_parses_like_one_read() {
    const HEAD: usize = 64 * 1024;
    let limits = HeadLimits {
        max_size: 128 * 1024,
        max_headers: 64,
    };
    let head = padded_to(&upgrade_request(), HEAD);
    let mut with_frame = head.clone();
    with_frame.extend(masked(OpCode::Text, b"right after the head"));

    let one_read = match RequestParser::new(limits).parse(&with_frame) {
        Ok(Status::Complete(r, used)) => {
            assert_eq!(used, HEAD);
            r
        }
        other => panic!("{other:?}"),
    };

    let started = std::time::Instant::now();
    let mut parser = RequestParser::new(limits);
    let mut partials = 0;
    for &byte in &head[..HEAD - 1] {
        assert_eq!(parser.parse(&[byte]), Ok(Status::Partial));
        partials += 1;
    }
    // The last byte of the head arrives together with a frame: only the head is taken.
    let dripped = match parser.parse(&with_frame[HEAD - 1..]) {
        Ok(Status::Complete(r, used)) => {
            assert_eq!(used, 1, "the frame bytes belong to the WebSocket stream");
            r
        }
        other => panic!("{other:?}"),
    };
    println!(
        "dripped a {HEAD}-byte head in {:?} ({partials} partial reads)",
        started.elapsed()
    );
    assert_eq!(partials, HEAD - 1);
    assert_eq!(dripped, one_read);
    assert_eq!(
        dripped.header("X-Pad").map(str::len),
        Some(HEAD - upgrade_request().len() - 9)
    );
    assert!(Driver::make_server(&dripped, &Options::default()).is_ok());
}
