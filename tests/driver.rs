//! Behaviour of the sans-IO `Driver` (and the closure layer on top of it), driven in memory.

mod common;

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use proptest::prelude::*;
use websocket_driver::protocol::driver::OWNED_MIN;
use websocket_driver::protocol::frame::OpCode;
use websocket_driver::{
    Driver, Error, Event, HandshakeError, Message, MessageType, Options, ProtocolError, ReadyState,
    Role, UsageError, WebSocket,
};

// ----- opening -----

#[test]
fn both_sides_open_and_report_version() {
    let (mut client, request) = started_client(&Options::default());
    assert_eq!(client.role(), Role::Client);
    assert_eq!(client.ready_state(), ReadyState::Connecting);
    assert_eq!(client.version(), "hybi-13");
    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    assert_eq!(server.role(), Role::Server);
    assert_eq!(server.ready_state(), ReadyState::Connecting);
    assert_eq!(server.version(), "hybi-13");
    assert!(server.start_connection());
    assert!(!server.start_connection(), "a second start does nothing");
    assert_eq!(server.ready_state(), ReadyState::Open);
    assert_eq!(drain(&mut server), vec![Ev::Open]);
    let response = take_output(&mut server);
    assert!(response.starts_with(b"HTTP/1.1 101 "));
    assert_eq!(client.ready_state(), ReadyState::Connecting);
    assert_eq!(feed(&mut client, &response), vec![Ev::Open]);
    assert_eq!(client.ready_state(), ReadyState::Open);
    assert_eq!(drain(&mut client), vec![]);
    assert_eq!(drain(&mut server), vec![]);
}

#[test]
fn response_split_byte_by_byte_opens_client_once() {
    let (mut client, request) = started_client(&Options::default());
    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    server.start_connection();
    server.send_text("first").unwrap();
    let mut events = Vec::new();
    for byte in take_output(&mut server) {
        events.extend(feed(&mut client, &[byte]));
    }
    assert_eq!(events, vec![Ev::Open, Ev::Text("first".into())]);
}

#[test]
fn subprotocol_is_first_client_offer_the_server_accepts() {
    let client_opts = Options::default().accept_protocols(["v1.chat", "chat", "superchat"]);
    let server_opts = Options::default().accept_protocols(["superchat", "chat"]);
    let (client, server) = open_pair(&client_opts, &server_opts);
    assert_eq!(server.protocol(), Some("chat"));
    assert_eq!(client.protocol(), Some("chat"));

    let (client, server) = open_pair(
        &client_opts,
        &Options::default().accept_protocols(["other"]),
    );
    assert_eq!(server.protocol(), None);
    assert_eq!(client.protocol(), None);

    let (client, server) = open_pair(&Options::default(), &server_opts);
    assert_eq!(server.protocol(), None);
    assert_eq!(client.protocol(), None);
}

// ----- closing -----

#[test]
fn local_close_goes_through_closing_to_closed() {
    let (mut client, mut server) = open_pair(&Options::default(), &Options::default());
    assert_eq!(server.ready_state(), ReadyState::Open);
    server.close_connection(4000, "server done").unwrap();
    assert_eq!(server.ready_state(), ReadyState::Closing);
    assert!(!server.is_finished());
    assert_eq!(
        drain(&mut server),
        vec![],
        "no close event before the peer answers"
    );

    // The client sees a peer-initiated close: Open → Closed at once, echoing the code.
    let frames = parse_frames(server.pending_output());
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].payload, close_payload(4000, b"server done"));
    assert_eq!(
        pump(&mut server, &mut client),
        vec![Ev::Close(4000, "server done".into())]
    );
    assert_eq!(client.ready_state(), ReadyState::Closed);
    let echo = parse_frames(client.pending_output());
    assert_eq!(echo.len(), 1);
    assert_eq!(echo[0].close_code(), Some(4000));
    assert!(!client.is_finished(), "the echo is still pending");

    assert_eq!(
        pump(&mut client, &mut server),
        vec![Ev::Close(4000, String::new())]
    );
    assert_eq!(server.ready_state(), ReadyState::Closed);
    assert!(server.is_finished());
    assert!(client.is_finished());
    assert!(
        server.pending_output().is_empty(),
        "no answer to the answer"
    );

    // Exactly once: nothing more, even after EOF on either side.
    assert_eq!(drain(&mut server), vec![]);
    assert_eq!(eof(&mut server), vec![]);
    assert_eq!(eof(&mut client), vec![]);
    assert_eq!(server.ready_state(), ReadyState::Closed);
}

#[test]
fn client_initiated_close_reaches_both_sides_once() {
    let (mut client, mut server) = open_pair(&Options::default(), &Options::default());
    client.close_connection(1000, "bye").unwrap();
    assert_eq!(client.ready_state(), ReadyState::Closing);
    assert_eq!(
        pump(&mut client, &mut server),
        vec![Ev::Close(1000, "bye".into())]
    );
    assert_eq!(server.ready_state(), ReadyState::Closed);
    assert_eq!(
        pump(&mut server, &mut client),
        vec![Ev::Close(1000, String::new())]
    );
    assert_eq!(client.ready_state(), ReadyState::Closed);
    assert!(client.is_finished() && server.is_finished());
}

#[test]
fn empty_close_reports_1005_and_echoes_an_empty_close() {
    let mut server = open_server(&Options::default());
    assert_eq!(
        feed(&mut server, &masked(OpCode::Close, b"")),
        vec![Ev::Close(1005, String::new())]
    );
    let out = take_output(&mut server);
    assert_eq!(
        out,
        [0x88, 0x00],
        "the echo of an empty close is empty, never 1005"
    );

    let (mut client, mut server) = open_client(&Options::default());
    server.send(b"", MessageType::Ping).unwrap(); // something before, to check ordering
    let mut bytes = take_output(&mut server);
    bytes.extend_from_slice(&[0x88, 0x00]);
    assert_eq!(
        feed(&mut client, &bytes),
        vec![Ev::Ping(vec![]), Ev::Close(1005, String::new())]
    );
    let frames = parse_frames(&take_output(&mut client));
    assert_eq!(frames.len(), 2);
    assert_eq!(
        (frames[0].opcode, frames[0].payload.len()),
        (OpCode::Pong, 0)
    );
    assert_eq!(
        (frames[1].opcode, frames[1].payload.len()),
        (OpCode::Close, 0)
    );
}

#[test]
fn peer_close_while_closing_is_not_echoed() {
    // Both sides close at the same time: each gets the other's close, neither echoes.
    let (mut client, mut server) = open_pair(&Options::default(), &Options::default());
    client.close_connection(1001, "c").unwrap();
    server.close_connection(1000, "s").unwrap();
    let from_client = take_output(&mut client);
    let from_server = take_output(&mut server);
    assert_eq!(
        feed(&mut server, &from_client),
        vec![Ev::Close(1001, "c".into())]
    );
    assert_eq!(
        feed(&mut client, &from_server),
        vec![Ev::Close(1000, "s".into())]
    );
    assert!(server.pending_output().is_empty());
    assert!(client.pending_output().is_empty());
    assert!(server.is_finished() && client.is_finished());
}

#[test]
fn close_argument_checks() {
    let mut server = open_server(&Options::default());
    for bad in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
        assert!(
            matches!(server.close_connection(bad, ""), Err(Error::Usage(UsageError::InvalidCloseCode(c))) if c == bad),
            "{bad}"
        );
    }
    assert!(matches!(
        server.close_connection(1000, &"x".repeat(124)),
        Err(Error::Usage(UsageError::CloseReasonTooLong))
    ));
    assert!(server.pending_output().is_empty());
    assert_eq!(server.ready_state(), ReadyState::Open);
    server.close_connection(1000, &"x".repeat(123)).unwrap();
    assert_eq!(parse_frames(server.pending_output())[0].payload.len(), 125);
}

/// 200 bytes of 2- and 3-byte characters ("é€" is 5 bytes): no character boundary at 123.
fn long_multibyte_reason() -> String {
    let reason = "é€".repeat(40);
    assert_eq!(reason.len(), 200);
    assert!(!reason.is_char_boundary(123));
    reason
}

/// The reason of the one close frame in `bytes` (server output), as a client parses it.
fn close_reason_seen_by_client(client: &mut Driver, bytes: &[u8]) -> (u16, String) {
    let frames = parse_frames(bytes);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].opcode, OpCode::Close);
    assert!(frames[0].payload.len() <= 125);
    let reason = std::str::from_utf8(&frames[0].payload[2..])
        .expect("the reason on the wire is UTF-8")
        .to_string();
    // The client driver accepts the frame (an invalid UTF-8 reason would fail it with 1007).
    let events = feed(client, bytes);
    assert_eq!(
        events,
        vec![Ev::Close(frames[0].close_code().unwrap(), reason.clone())]
    );
    (frames[0].close_code().unwrap(), reason)
}

#[test]
fn abort_cuts_a_long_reason_on_a_character_boundary() {
    let reason = long_multibyte_reason();
    let (mut client, mut server) = open_client(&Options::default());
    server.abort(4000, &reason);
    let (code, sent) = close_reason_seen_by_client(&mut client, &take_output(&mut server));
    assert_eq!(code, 4000);
    // The longest whole-character prefix within 123 bytes: 24 × "é€" (120 bytes) + "é".
    assert!(sent.len() <= 123);
    assert_eq!(sent.len(), 122);
    assert!(reason.starts_with(&sent));
    // Locally the whole reason is reported.
    assert_eq!(drain(&mut server), vec![Ev::Close(4000, reason)]);
}

#[test]
fn close_connection_refuses_a_long_multibyte_reason_and_sends_a_fitting_one() {
    let reason = long_multibyte_reason();
    let (mut client, mut server) = open_client(&Options::default());
    let err = server.close_connection(4000, &reason).unwrap_err();
    assert!(
        matches!(err, Error::Usage(UsageError::CloseReasonTooLong)),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "close reason longer than 123 bytes");
    assert!(server.pending_output().is_empty(), "nothing sent");
    assert_eq!(server.ready_state(), ReadyState::Open);
    // Up to 123 bytes of whole characters go through as they are.
    let fitting = &reason[..120];
    server.close_connection(4000, fitting).unwrap();
    let (code, sent) = close_reason_seen_by_client(&mut client, &take_output(&mut server));
    assert_eq!((code, sent.as_str()), (4000, fitting));
}

// ----- sending around open and close -----

#[test]
fn sends_before_open_are_queued_in_order() {
    let (mut client, request) = started_client(&Options::default());
    client.send_text("one").unwrap();
    client.send_binary(&[2, 2]).unwrap();
    client.send(b"three", MessageType::Text).unwrap();
    assert!(
        client.pending_output().is_empty(),
        "frames wait for the handshake"
    );

    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    server.send_text("s1").unwrap(); // before start_connection
    assert!(server.pending_output().is_empty());
    server.start_connection();
    server.send_binary(b"s2").unwrap();
    let out = take_output(&mut server);
    assert!(
        out.starts_with(b"HTTP/1.1 101 "),
        "the response goes before queued frames"
    );
    assert_eq!(
        feed(&mut client, &out),
        vec![Ev::Open, Ev::Text("s1".into()), Ev::Binary(b"s2".to_vec())]
    );
    assert_eq!(
        pump(&mut client, &mut server),
        vec![
            Ev::Open,
            Ev::Text("one".into()),
            Ev::Binary(vec![2, 2]),
            Ev::Text("three".into())
        ]
    );
}

#[test]
fn sends_after_close_are_refused() {
    let (mut client, mut server) = open_pair(&Options::default(), &Options::default());
    server.close_connection(1000, "").unwrap();
    let before = server.pending_output().to_vec();
    let not_open = |r: Result<_, Error>| matches!(r, Err(Error::Usage(UsageError::NotOpen)));
    assert!(not_open(server.send_text("x")));
    assert!(not_open(server.send_binary(b"x")));
    assert!(not_open(server.send_ping(b"x")));
    assert!(not_open(server.send_pong(b"x")));
    assert!(not_open(server.close_connection(1000, "")));
    assert_eq!(server.pending_output(), &before[..], "nothing was queued");
    pump(&mut server, &mut client);
    assert_eq!(client.ready_state(), ReadyState::Closed);
    assert!(not_open(client.send_text("x")));
    assert!(not_open(client.send(b"x", MessageType::Binary)));
    pump(&mut client, &mut server);
    assert!(not_open(server.send_text("x")));
}

#[test]
fn bad_sends_are_refused_without_output() {
    let mut server = open_server(&Options::default());
    assert!(matches!(
        server.send(&[0xff], MessageType::Text),
        Err(Error::Usage(UsageError::InvalidUtf8))
    ));
    assert!(matches!(
        server.send_ping(&[0; 126]),
        Err(Error::Usage(UsageError::ControlPayloadTooLong))
    ));
    assert!(matches!(
        server.send_pong(&[0; 126]),
        Err(Error::Usage(UsageError::ControlPayloadTooLong))
    ));
    assert!(server.pending_output().is_empty());
    assert_eq!(server.ready_state(), ReadyState::Open);
}

#[test]
fn close_while_connecting_reports_close_once_and_sends_nothing() {
    // Client, before the request went out.
    let mut client = Driver::make_client("ws://localhost/chat", &Options::default()).unwrap();
    client.send_text("never").unwrap();
    client.close_connection(4001, "changed my mind").unwrap();
    assert_eq!(client.ready_state(), ReadyState::Closed);
    assert_eq!(
        drain(&mut client),
        vec![Ev::Close(4001, "changed my mind".into())]
    );
    assert_eq!(drain(&mut client), vec![]);
    assert!(client.pending_output().is_empty());
    assert!(!client.start_connection());
    assert!(client.pending_output().is_empty());
    assert!(client.is_finished());
    assert!(matches!(
        client.close_connection(1000, ""),
        Err(Error::Usage(UsageError::NotOpen))
    ));
    assert_eq!(eof(&mut client), vec![]);

    // Client, request sent, response not yet in: queued frames never go out, and no close
    // frame is written.
    let (mut client, request) = started_client(&Options::default());
    client.send_text("queued").unwrap();
    client.close_connection(1000, "").unwrap();
    assert_eq!(drain(&mut client), vec![Ev::Close(1000, String::new())]);
    let pending = client.pending_output();
    assert!(
        pending.is_empty() || pending == request.as_slice(),
        "{pending:?}"
    );
    // A late response opens nothing.
    assert_eq!(feed(&mut client, &response_for(&request, "")), vec![]);
    assert_eq!(client.ready_state(), ReadyState::Closed);

    // Server, before start_connection.
    let (_, request) = started_client(&Options::default());
    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    server.send_text("never").unwrap();
    server.close_connection(1001, "").unwrap();
    assert_eq!(drain(&mut server), vec![Ev::Close(1001, String::new())]);
    assert!(!server.start_connection());
    assert!(server.pending_output().is_empty());
    assert!(server.is_finished());
    assert_eq!(drain(&mut server), vec![]);
}

/// A connection that never opened sends none of the frames queued for it: `close_connection`
/// and `abort` while connecting drop them, and so must the end of the transport
/// (`receive_eof`, `receive_error`, which `Timers` uses for the opening handshake's
/// timeout). Otherwise the closed driver offers data frames to write on a connection that
/// never got (or never answered) a 101, and `is_finished` stays false until they are.
#[test]
fn transport_end_before_open_drops_the_frames_queued_for_the_connection() {
    // Server, before start_connection: no 101 was ever queued.
    let (_, request) = started_client(&Options::default());
    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    server.send_text("never").unwrap();
    assert_eq!(eof(&mut server), vec![Ev::Close(1006, String::new())]);
    assert_eq!(server.ready_state(), ReadyState::Closed);
    assert!(
        server.pending_output().is_empty(),
        "a frame without a handshake: {:?}",
        server.pending_output()
    );
    assert!(server.is_finished());

    // Client, request written, the response never came (handshake timeout).
    let (mut client, _) = started_client(&Options::default());
    client.send_text("never").unwrap();
    client.receive_error(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "timed out",
    ));
    assert_eq!(
        drain(&mut client),
        vec![
            Ev::Error(Err::Io(std::io::ErrorKind::TimedOut)),
            Ev::Close(1006, String::new())
        ]
    );
    assert!(
        client.pending_output().is_empty(),
        "a data frame of a connection that never opened: {:?}",
        client.pending_output()
    );
    assert!(client.is_finished());
}

// ----- ping / pong -----

#[test]
fn ping_is_answered_with_same_payload() {
    let mut server = open_server(&Options::default());
    let payload: Vec<u8> = (0..125u8).collect();
    assert_eq!(
        feed(&mut server, &masked(OpCode::Ping, &payload)),
        vec![Ev::Ping(payload.clone())]
    );
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].opcode, OpCode::Pong);
    assert_eq!(frames[0].payload, payload);
    assert_eq!(frames[0].mask, None);

    let (mut client, mut server) = open_client(&Options::default());
    server.send_ping(b"are you there").unwrap();
    assert_eq!(
        pump(&mut server, &mut client),
        vec![Ev::Ping(b"are you there".to_vec())]
    );
    assert_eq!(
        pump(&mut client, &mut server),
        vec![Ev::Pong(b"are you there".to_vec())]
    );
    // A pong is not answered.
    assert!(server.pending_output().is_empty());
}

/// RFC 6455 §5.5.2: a ping is answered "unless [the endpoint] already received a Close
/// frame": after our own Close (a Pong is not a data frame, §5.5.1), not after the peer's.
#[test]
fn ping_after_our_close_gets_a_pong_and_after_the_peers_none() {
    let mut server = open_server(&Options::default());
    server.close_connection(1000, "").unwrap();
    take_output(&mut server);
    assert_eq!(
        feed(&mut server, &masked(OpCode::Ping, b"x")),
        vec![Ev::Ping(b"x".to_vec())]
    );
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].opcode, OpCode::Pong);
    assert_eq!(frames[0].payload, b"x");
    // The peer's Close, then a ping: no pong.
    let mut input = masked(OpCode::Close, &close_payload(1000, b""));
    input.extend_from_slice(&masked(OpCode::Ping, b"y"));
    feed(&mut server, &input);
    assert!(
        parse_frames(&take_output(&mut server))
            .iter()
            .all(|f| f.opcode != OpCode::Pong)
    );
}

/// Each pong answers its own ping (and, below in the next test, the earlier ones); an
/// unsolicited pong answers none; a callback runs once.
#[test]
fn send_ping_callback_fires_on_its_pong_once() {
    let (client, mut server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let fired = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    let pongs = Arc::new(AtomicUsize::new(0));
    let p = pongs.clone();
    ws.on_pong(move |_, _| {
        p.fetch_add(1, Ordering::SeqCst);
    });
    let f = fired.clone();
    ws.send_ping(b"text-like", move |_| f.lock().unwrap().push("text"))
        .unwrap();
    let f = fired.clone();
    ws.send_ping(&[0x00, 0xff, 0x80, 0xfe], move |_| {
        f.lock().unwrap().push("binary")
    })
    .unwrap();

    // An unsolicited pong with another payload fires nothing.
    server.send_pong(b"something else").unwrap();
    let mut bytes = take_output(&mut server);
    ws.receive(&mut bytes);
    assert!(fired.lock().unwrap().is_empty());
    assert_eq!(pongs.load(Ordering::SeqCst), 1);

    // The server answers both pings, in order.
    let out = ws.pending_output().to_vec();
    ws.consume_output(out.len());
    let frames = parse_frames(&out);
    assert_eq!(frames.len(), 2);
    let mut pings = Vec::new();
    for f in &frames {
        assert_eq!(f.opcode, OpCode::Ping);
        pings.push(f.payload.clone());
    }
    assert_eq!(
        feed(&mut server, &out),
        vec![Ev::Ping(pings[0].clone()), Ev::Ping(pings[1].clone())]
    );
    let pong_frames = parse_frames(&take_output(&mut server));
    assert_eq!(pong_frames.len(), 2);
    assert_eq!(pong_frames[0].payload, b"text-like");
    assert_eq!(pong_frames[1].payload, [0x00, 0xff, 0x80, 0xfe]);
    // The first pong answers its own ping only.
    let mut text_pong = raw_frame(0x8a, &pong_frames[0].payload, None);
    ws.receive(&mut text_pong);
    assert_eq!(*fired.lock().unwrap(), vec!["text"]);
    let mut binary_pong = raw_frame(0x8a, &pong_frames[1].payload, None);
    ws.receive(&mut binary_pong);
    assert_eq!(*fired.lock().unwrap(), vec!["text", "binary"]);
    // Callbacks are one-shot.
    let mut again = raw_frame(0x8a, b"text-like", None);
    ws.receive(&mut again);
    assert_eq!(fired.lock().unwrap().len(), 2);
    assert_eq!(pongs.load(Ordering::SeqCst), 4);
}

/// A pong answers its ping and every earlier one (RFC 6455 §5.5.3 lets a peer answer only
/// the latest of several): the pong of the second ping runs both callbacks, in ping order,
/// and a late pong for the first runs nothing.
#[test]
fn a_pong_for_a_later_ping_runs_the_earlier_pings_callbacks_too() {
    let (client, _server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let fired = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    for (payload, name) in [(&b"first"[..], "first"), (b"second", "second")] {
        let f = fired.clone();
        ws.send_ping(payload, move |_| f.lock().unwrap().push(name))
            .unwrap();
    }
    ws.receive(&mut raw_frame(0x8a, b"second", None));
    assert_eq!(*fired.lock().unwrap(), vec!["first", "second"]);
    ws.receive(&mut raw_frame(0x8a, b"first", None));
    assert_eq!(*fired.lock().unwrap(), vec!["first", "second"]);
}

/// A ping callback that panics: the panic goes on to the caller of `receive`, and the
/// callbacks the same pong answered after it run on the next `receive` (they were dropped
/// unrun), before its input is read.
#[test]
fn ping_callbacks_behind_one_that_panics_run_on_the_next_receive() {
    let (client, _server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let fired = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    for name in ["first", "second", "third"] {
        let f = fired.clone();
        ws.send_ping(name.as_bytes(), move |_| {
            if name == "first" {
                panic!("a callback bug");
            }
            f.lock().unwrap().push(name)
        })
        .unwrap();
    }
    let f = fired.clone();
    ws.on_pong(move |_, payload| {
        f.lock().unwrap().push(if payload == b"third" {
            "on_pong third"
        } else {
            "on_pong"
        })
    });
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ws.receive(&mut raw_frame(0x8a, b"third", None))
    }));
    assert!(caught.is_err(), "the callback's panic reaches the caller");
    assert!(fired.lock().unwrap().is_empty());
    ws.receive(&mut raw_frame(0x8a, b"later", None));
    assert_eq!(
        *fired.lock().unwrap(),
        vec!["second", "third", "on_pong"],
        "the answered callbacks run before the next pong is read"
    );
}

// ----- fragmentation -----

#[test]
fn fragments_with_interleaved_ping_reassemble() {
    let mut server = open_server(&Options::default());
    let mut bytes = client_frame(0x01, b"Hel");
    bytes.extend(client_frame(0x89, b"p1"));
    bytes.extend(client_frame(0x00, b"lo "));
    bytes.extend(client_frame(0x8a, b"unsolicited"));
    bytes.extend(client_frame(0x00, b""));
    bytes.extend(client_frame(0x80, b"world"));
    assert_eq!(
        feed(&mut server, &bytes),
        vec![
            Ev::Ping(b"p1".to_vec()),
            Ev::Pong(b"unsolicited".to_vec()),
            Ev::Text("Hello world".into())
        ]
    );
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (frames[0].opcode, frames[0].payload.as_slice()),
        (OpCode::Pong, &b"p1"[..])
    );

    // Binary, a code point split between text fragments.
    let mut bytes = client_frame(0x02, &[1, 2]);
    bytes.extend(client_frame(0x80, &[3]));
    let snow = "☃".as_bytes();
    bytes.extend(client_frame(0x01, &snow[..1]));
    bytes.extend(client_frame(0x00, &snow[1..2]));
    bytes.extend(client_frame(0x80, &snow[2..]));
    assert_eq!(
        feed(&mut server, &bytes),
        vec![Ev::Binary(vec![1, 2, 3]), Ev::Text("☃".into())]
    );
}

/// Every header length form (7-bit, 16-bit and 64-bit lengths, masked), whole messages,
/// control frames and fragments, read one byte at a time: each header then arrives in
/// pieces across reads, and the events are those of one read.
#[test]
fn frames_read_one_byte_at_a_time_give_the_events_of_one_read() {
    let mut bytes = client_frame(0x82, &[7; 20]);
    bytes.extend(raw_frame(0x81, &b"x".repeat(300), Some([1, 2, 3, 4])));
    bytes.extend(raw_frame(0x82, &[9; 70_000], Some([5, 6, 7, 8])));
    bytes.extend(client_frame(0x89, b"ping"));
    bytes.extend(client_frame(0x01, b"frag"));
    bytes.extend(client_frame(0x8a, b""));
    bytes.extend(client_frame(0x80, b"mented"));
    bytes.extend(client_frame(0x82, &[]));
    let mut whole = open_server(&Options::default());
    let one_read = feed(&mut whole, &bytes);
    assert_eq!(
        one_read,
        vec![
            Ev::Binary(vec![7; 20]),
            Ev::Text("x".repeat(300)),
            Ev::Binary(vec![9; 70_000]),
            Ev::Ping(b"ping".to_vec()),
            Ev::Pong(Vec::new()),
            Ev::Text("fragmented".into()),
            Ev::Binary(Vec::new()),
        ]
    );
    let mut bytewise = open_server(&Options::default());
    let mut events = Vec::new();
    for byte in &bytes {
        events.extend(feed(&mut bytewise, std::slice::from_ref(byte)));
    }
    assert_eq!(events, one_read);
    assert_eq!(take_output(&mut bytewise), take_output(&mut whole));
}

#[test]
fn continuation_without_start_fails_with_1002() {
    let mut server = open_server(&Options::default());
    let events = feed(&mut server, &client_frame(0x80, b"orphan"));
    assert_failed(&events, ProtocolError::UnexpectedContinuation, 1002);
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].close_code(), Some(1002));
}

#[test]
fn new_data_frame_inside_fragmented_message_fails_with_1002() {
    for second in [0x81u8, 0x01, 0x82] {
        let mut server = open_server(&Options::default());
        let mut bytes = client_frame(0x01, b"start");
        bytes.extend(client_frame(second, b"again"));
        assert_failed(
            &feed(&mut server, &bytes),
            ProtocolError::UnfinishedMessage,
            1002,
        );
        assert_eq!(
            parse_frames(&take_output(&mut server))[0].close_code(),
            Some(1002)
        );
    }
}

// ----- protocol violations -----

/// Feeds `bytes` to an open server; expects Error(error), then Close(code), a single close
/// frame with `code` on the wire, and nothing at all afterwards.
fn server_rejects(bytes: &[u8], error: ProtocolError, code: u16) {
    let mut server = open_server(&Options::default());
    let events = feed(&mut server, bytes);
    assert_failed(&events, error.clone(), code);
    assert_eq!(server.ready_state(), ReadyState::Closed);
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.len(), 1, "{error:?}: {frames:?}");
    assert_eq!(frames[0].opcode, OpCode::Close);
    assert_eq!(frames[0].close_code(), Some(code), "{error:?}");
    assert!(std::str::from_utf8(&frames[0].payload[2..]).is_ok());
    // Later input is ignored: no events, no pong, no second close.
    let mut later = masked(OpCode::Ping, b"late");
    later.extend(masked(OpCode::Text, b"late"));
    later.extend(masked(OpCode::Close, &close_payload(1000, b"")));
    assert_eq!(feed(&mut server, &later), vec![]);
    assert!(server.pending_output().is_empty());
    assert_eq!(eof(&mut server), vec![]);
    assert!(server.is_finished());
}

#[test]
fn reserved_bits_are_rejected() {
    server_rejects(
        &client_frame(0xc1, b"x"),
        ProtocolError::ReservedBits(4),
        1002,
    );
    server_rejects(
        &client_frame(0xa1, b"x"),
        ProtocolError::ReservedBits(2),
        1002,
    );
    server_rejects(
        &client_frame(0x91, b"x"),
        ProtocolError::ReservedBits(1),
        1002,
    );
    server_rejects(
        &client_frame(0xf9, b""),
        ProtocolError::ReservedBits(7),
        1002,
    );
}

#[test]
fn reserved_opcodes_are_rejected() {
    for op in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
        server_rejects(
            &client_frame(0x80 | op, b"x"),
            ProtocolError::ReservedOpcode(op),
            1002,
        );
    }
}

#[test]
fn control_frame_over_125_is_rejected() {
    for op in [0x88u8, 0x89, 0x8a] {
        server_rejects(
            &client_frame(op, &[b'a'; 126]),
            ProtocolError::ControlFrameTooLong,
            1002,
        );
    }
}

#[test]
fn fragmented_control_frame_is_rejected() {
    for op in [0x08u8, 0x09, 0x0a] {
        server_rejects(
            &client_frame(op, b"x"),
            ProtocolError::FragmentedControlFrame,
            1002,
        );
    }
}

#[test]
fn length_with_top_bit_set_is_rejected() {
    let mut bytes = vec![0x82, 0xff];
    bytes.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    bytes.extend_from_slice(&MASK);
    server_rejects(&bytes, ProtocolError::LengthTopBitSet, 1002);
}

#[test]
fn server_rejects_unmasked_frames() {
    server_rejects(
        &raw_frame(0x81, b"hi", None),
        ProtocolError::UnmaskedFrame,
        1002,
    );
    server_rejects(
        &raw_frame(0x89, b"", None),
        ProtocolError::UnmaskedFrame,
        1002,
    );
}

#[test]
fn client_rejects_masked_frames() {
    let (mut client, _server) = open_client(&Options::default());
    let events = feed(&mut client, &client_frame(0x81, b"hi"));
    assert_failed(&events, ProtocolError::MaskedFrame, 1002);
    let frames = parse_frames(&take_output(&mut client));
    assert_eq!(frames.len(), 1);
    assert!(frames[0].mask.is_some(), "client frames are always masked");
    assert_eq!(frames[0].close_code(), Some(1002));
    assert_eq!(feed(&mut client, &raw_frame(0x81, b"late", None)), vec![]);
}

#[test]
fn invalid_utf8_text_is_rejected_with_1007() {
    server_rejects(
        &masked(OpCode::Text, &[b'a', 0xff, b'b']),
        ProtocolError::InvalidUtf8,
        1007,
    );
    // Truncated code point at the end of a single frame.
    server_rejects(
        &masked(OpCode::Text, &[b'a', 0xe2, 0x98]),
        ProtocolError::InvalidUtf8,
        1007,
    );
    // Truncated code point at the end of a fragmented message.
    let mut bytes = client_frame(0x01, b"ok");
    bytes.extend(client_frame(0x80, &[0xe2, 0x98]));
    server_rejects(&bytes, ProtocolError::InvalidUtf8, 1007);
    // Surrogate encoded in UTF-8.
    server_rejects(
        &masked(OpCode::Text, &[0xed, 0xa0, 0x80]),
        ProtocolError::InvalidUtf8,
        1007,
    );
}

#[test]
fn invalid_close_codes_are_rejected_with_1002() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        server_rejects(
            &masked(OpCode::Close, &close_payload(code, b"")),
            ProtocolError::InvalidCloseCode(code),
            1002,
        );
    }
}

#[test]
fn valid_close_codes_are_accepted() {
    // 1012–1014: registered with IANA after RFC 6455 (service restart, try again later,
    // bad gateway); servers behind load balancers send them.
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
    ] {
        let mut server = open_server(&Options::default());
        assert_eq!(
            feed(
                &mut server,
                &masked(OpCode::Close, &close_payload(code, b"r"))
            ),
            vec![Ev::Close(code, "r".into())]
        );
        assert_eq!(
            parse_frames(&take_output(&mut server))[0].close_code(),
            Some(code)
        );
    }
}

#[test]
fn close_reason_must_be_utf8() {
    server_rejects(
        &masked(OpCode::Close, &close_payload(1000, &[0xce, 0xba, 0xff])),
        ProtocolError::InvalidUtf8,
        1007,
    );
}

#[test]
fn one_byte_close_payload_is_rejected() {
    server_rejects(
        &masked(OpCode::Close, &[0x03]),
        ProtocolError::CloseFrameTooShort,
        1002,
    );
}

#[test]
fn error_after_local_close_sends_no_second_close() {
    let mut server = open_server(&Options::default());
    server.close_connection(1000, "").unwrap();
    take_output(&mut server);
    assert_failed(
        &feed(&mut server, &raw_frame(0x81, b"x", None)),
        ProtocolError::UnmaskedFrame,
        1002,
    );
    assert!(server.pending_output().is_empty());
    assert!(server.is_finished());
}

#[test]
fn events_before_an_error_in_the_same_read_are_kept() {
    let mut server = open_server(&Options::default());
    let mut bytes = masked(OpCode::Text, b"fine");
    bytes.extend(masked(OpCode::Ping, b"p"));
    bytes.extend(client_frame(0xc2, b"bad"));
    bytes.extend(masked(OpCode::Text, b"never"));
    let events = feed(&mut server, &bytes);
    assert_eq!(
        events[..2],
        [Ev::Text("fine".into()), Ev::Ping(b"p".to_vec())]
    );
    assert_failed(&events[2..], ProtocolError::ReservedBits(4), 1002);
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(
        frames.iter().map(|f| f.opcode).collect::<Vec<_>>(),
        [OpCode::Pong, OpCode::Close]
    );
}

// ----- fail-fast UTF-8 -----

#[test]
fn invalid_utf8_fails_on_the_read_with_the_impossible_byte() {
    let payload = [
        0xce, 0xba, 0xed, 0xa0, 0x80, b'a', b'b', b'c', b'd', b'e', b'f', b'g',
    ];
    let frame = masked(OpCode::Text, &payload);
    let header = frame.len() - payload.len();
    let mut server = open_server(&Options::default());
    // Header plus "κ" and 0xed: still a valid prefix.
    assert_eq!(feed(&mut server, &frame[..header + 3]), vec![]);
    assert_eq!(server.ready_state(), ReadyState::Open);
    // 0xa0 after 0xed would be a surrogate: fail now, 8 payload bytes still unsent.
    assert_failed(
        &feed(&mut server, &frame[header + 3..header + 4]),
        ProtocolError::InvalidUtf8,
        1007,
    );
    assert_eq!(
        parse_frames(&take_output(&mut server))[0].close_code(),
        Some(1007)
    );
    assert_eq!(feed(&mut server, &frame[header + 4..]), vec![]);

    // The same inside a fragmented message: the first fragment is valid, the second fails
    // at its first impossible byte, before its remaining payload arrives.
    let mut server = open_server(&Options::default());
    let mut bytes = client_frame(0x01, "κ".as_bytes());
    let second = client_frame(0x80, &[0xf4, 0x90, 0x80, 0x80, b'x', b'y']);
    assert_eq!(feed(&mut server, &bytes), vec![]);
    bytes = second;
    // Header (6 bytes) + 0xf4: fine so far.
    assert_eq!(feed(&mut server, &bytes[..7]), vec![]);
    assert_failed(
        &feed(&mut server, &bytes[7..8]),
        ProtocolError::InvalidUtf8,
        1007,
    );
}

// ----- borrowed vs owned -----

/// Feeds one read and returns whether each message event was borrowed.
fn message_borrowing(driver: &mut Driver, input: &[u8]) -> Vec<(bool, Vec<u8>)> {
    let mut buf = input.to_vec();
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        let (used, event) = driver.poll_event(&mut buf[at..]);
        at += used;
        match event {
            None => return out,
            Some(Event::Message(Message::Text(Cow::Borrowed(t)))) => {
                out.push((true, t.as_bytes().to_vec()))
            }
            Some(Event::Message(Message::Binary(Cow::Borrowed(b)))) => out.push((true, b.to_vec())),
            Some(Event::Message(Message::Text(Cow::Owned(t)))) => out.push((false, t.into_bytes())),
            Some(Event::Message(Message::Binary(Cow::Owned(b)))) => out.push((false, b)),
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn whole_frame_in_one_read_is_borrowed() {
    let mut server = open_server(&Options::default());
    let text = "zero-copy ☃".repeat(20);
    let mut bytes = masked(OpCode::Text, text.as_bytes());
    bytes.extend(masked(OpCode::Binary, &[9; 300]));
    assert_eq!(
        message_borrowing(&mut server, &bytes),
        vec![(true, text.as_bytes().to_vec()), (true, vec![9; 300])]
    );

    // Client side too.
    let (mut client, mut server) = open_client(&Options::default());
    server.send_text(&text).unwrap();
    let out = take_output(&mut server);
    assert_eq!(
        message_borrowing(&mut client, &out),
        vec![(true, text.as_bytes().to_vec())]
    );
}

#[test]
fn split_or_fragmented_messages_are_owned_and_identical() {
    let text = "split ☃ message".repeat(10);
    let frame = masked(OpCode::Text, text.as_bytes());
    for cut in 1..frame.len() {
        let mut server = open_server(&Options::default());
        let mut got = message_borrowing(&mut server, &frame[..cut]);
        got.extend(message_borrowing(&mut server, &frame[cut..]));
        if cut <= frame.len() - text.len() {
            // Only the header was split: the payload still arrives in one read.
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1, text.as_bytes());
        } else {
            assert_eq!(got, vec![(false, text.as_bytes().to_vec())], "cut {cut}");
        }
    }
    let mut server = open_server(&Options::default());
    let mut bytes = client_frame(0x02, &[1, 2, 3]);
    bytes.extend(client_frame(0x80, &[4]));
    assert_eq!(
        message_borrowing(&mut server, &bytes),
        vec![(false, vec![1, 2, 3, 4])]
    );
}

// ----- end of transport -----

#[test]
fn eof_mid_message_reports_io_error_then_1006_once() {
    let cases: Vec<Vec<u8>> = vec![
        masked(OpCode::Text, b"hello")[..8].to_vec(), // in a payload
        masked(OpCode::Text, b"hello")[..3].to_vec(), // in a header
        client_frame(0x01, b"first fragment"),        // between fragments
        masked(OpCode::Ping, b"ping payload")[..9].to_vec(), // in a control frame
    ];
    for bytes in cases {
        let mut server = open_server(&Options::default());
        assert_eq!(feed(&mut server, &bytes), vec![]);
        let events = eof(&mut server);
        assert_eq!(
            events,
            vec![
                Ev::Error(Err::Io(std::io::ErrorKind::UnexpectedEof)),
                Ev::Close(1006, String::new())
            ],
            "{bytes:?}"
        );
        assert_eq!(server.ready_state(), ReadyState::Closed);
        assert!(
            server.pending_output().is_empty(),
            "nothing is sent after EOF"
        );
        assert_eq!(eof(&mut server), vec![]);
        assert_eq!(feed(&mut server, &masked(OpCode::Text, b"late")), vec![]);
    }
}

#[test]
fn eof_between_messages_reports_1006_without_error() {
    let mut server = open_server(&Options::default());
    assert_eq!(
        feed(&mut server, &masked(OpCode::Text, b"done")),
        vec![Ev::Text("done".into())]
    );
    assert_eq!(eof(&mut server), vec![Ev::Close(1006, String::new())]);
    assert_eq!(eof(&mut server), vec![]);
    assert!(server.is_finished());
}

#[test]
fn eof_after_completed_close_reports_nothing_more() {
    let (mut client, mut server) = open_pair(&Options::default(), &Options::default());
    client.close_connection(1000, "").unwrap();
    assert_eq!(
        pump(&mut client, &mut server),
        vec![Ev::Close(1000, String::new())]
    );
    assert_eq!(
        pump(&mut server, &mut client),
        vec![Ev::Close(1000, String::new())]
    );
    assert_eq!(eof(&mut server), vec![]);
    assert_eq!(eof(&mut client), vec![]);
}

#[test]
fn eof_while_closing_reports_1006() {
    let mut server = open_server(&Options::default());
    server.close_connection(1000, "").unwrap();
    take_output(&mut server);
    assert_eq!(eof(&mut server), vec![Ev::Close(1006, String::new())]);
    assert!(server.is_finished());
}

// ----- client handshake -----

/// Feeds a response to a fresh client and returns its events.
fn client_with_response(
    options: &Options,
    response: impl Fn(&[u8]) -> Vec<u8>,
) -> (Driver, Vec<Ev>) {
    let (mut client, request) = started_client(options);
    client.send_text("queued").unwrap();
    let events = feed(&mut client, &response(&request));
    (client, events)
}

fn assert_handshake_failed_with(
    client: &mut Driver,
    events: &[Ev],
    expected: impl Fn(&HandshakeError) -> bool,
) {
    assert_eq!(events.len(), 2, "expected Error then Close, got {events:?}");
    assert!(
        matches!(&events[0], Ev::Error(Err::Handshake(e)) if expected(e)),
        "{events:?}"
    );
    assert!(events[1].is_close(), "{events:?}");
    assert_eq!(client.ready_state(), ReadyState::Closed);
    assert!(
        client.pending_output().is_empty(),
        "queued frames must not go out"
    );
    assert_eq!(eof(client), vec![], "the close was already reported");
    assert!(client.is_finished());
}

fn assert_handshake_failed(client: &mut Driver, events: &[Ev], expected: HandshakeError) {
    assert_handshake_failed_with(client, events, |e| *e == expected);
}

#[test]
fn client_rejects_wrong_accept() {
    let (mut client, events) = client_with_response(&Options::default(), |_| {
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            .to_vec()
    });
    assert_handshake_failed(&mut client, &events, HandshakeError::AcceptMismatch);
}

#[test]
fn client_rejects_status_403() {
    let (mut client, events) = client_with_response(&Options::default(), |_| {
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec()
    });
    assert_handshake_failed(
        &mut client,
        &events,
        HandshakeError::UnexpectedStatus {
            status: 403,
            body: String::new(),
        },
    );
}

/// A refusing response's body, fed to a started client in `reads`: the events of each.
fn refused_in_reads(reads: &[&[u8]]) -> (Driver, Vec<Vec<Ev>>) {
    let (mut client, _) = started_client(&Options::default());
    client.send_text("queued").unwrap();
    let events = reads.iter().map(|r| feed(&mut client, r)).collect();
    (client, events)
}

fn refused_with(status: u16, body: &str) -> HandshakeError {
    HandshakeError::UnexpectedStatus {
        status,
        body: body.into(),
    }
}

#[test]
fn a_refusal_waits_for_its_declared_body_however_the_reads_fall() {
    let head: &[u8] = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\n\r\n";
    // The head alone, then the body in two reads, then bytes past it.
    let (mut client, events) =
        refused_in_reads(&[head, b"not ", b"allowed\n", b"!more after the body"]);
    assert_eq!(
        events[..2],
        [vec![], vec![]],
        "reported before the body came"
    );
    assert_handshake_failed(&mut client, &events[2], refused_with(403, "not allowed\n"));
    assert_eq!(events[3], vec![]);
    // Byte by byte gives the same error.
    let mut whole = head.to_vec();
    whole.extend_from_slice(b"not allowed\n");
    let bytes: Vec<&[u8]> = whole.chunks(1).collect();
    let (mut client, events) = refused_in_reads(&bytes);
    assert!(events[..bytes.len() - 1].iter().all(Vec::is_empty));
    assert_handshake_failed(
        &mut client,
        &events[bytes.len() - 1],
        refused_with(403, "not allowed\n"),
    );
}

#[test]
fn a_refusal_without_content_length_reads_its_body_to_the_close() {
    let (mut client, events) = refused_in_reads(&[
        b"HTTP/1.1 503 Service Unavailable\r\n\r\ntry ",
        b"again later",
    ]);
    assert_eq!(events, [vec![], vec![]]);
    let at_eof = eof(&mut client);
    assert_handshake_failed(&mut client, &at_eof, refused_with(503, "try again later"));
    // A transport error ends it the same way: the refusal is what failed.
    let (mut client, _) = refused_in_reads(&[b"HTTP/1.1 503 Busy\r\n\r\nbusy"]);
    client.receive_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let events = drain(&mut client);
    assert_handshake_failed(&mut client, &events, refused_with(503, "busy"));
}

#[test]
fn a_refusal_keeps_at_most_1_kib_of_its_body() {
    for (declared, sent) in [(1024, 1024), (1025, 1025), (4096, 1100)] {
        let head = format!("HTTP/1.1 400 Bad Request\r\nContent-Length: {declared}\r\n\r\n");
        let body = "b".repeat(sent);
        let (mut client, events) = refused_in_reads(&[head.as_bytes(), body.as_bytes()]);
        assert_eq!(events[0], vec![]);
        assert_handshake_failed(&mut client, &events[1], refused_with(400, &body[..1024]));
    }
    // Without Content-Length, 1 KiB ends the wait: no close needed.
    let (mut client, events) =
        refused_in_reads(&[b"HTTP/1.1 400 Bad Request\r\n\r\n", &[b'x'; 1023], b"yz"]);
    assert_eq!(events[..2], [vec![], vec![]]);
    let expected = format!("{}y", "x".repeat(1023));
    assert_handshake_failed(&mut client, &events[2], refused_with(400, &expected));
}

#[test]
fn a_refusal_without_a_body_or_with_an_unreadable_length_is_reported_at_once() {
    for (response, status) in [
        (&b"HTTP/1.1 204 No Content\r\n\r\nnot a body"[..], 204),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", 304),
        (b"HTTP/1.1 400 Bad\r\nContent-Length: ] 5\r\n\r\nabcde", 400),
    ] {
        let (mut client, events) = refused_in_reads(&[response]);
        assert_handshake_failed(&mut client, &events[0], refused_with(status, ""));
    }
}

#[test]
fn a_chunked_refusal_is_decoded_however_the_reads_fall() {
    let response: &[u8] = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;ext=1\r\nsorry\r\n7\r\n, later\r\n0\r\n\r\nafter the body";
    // The last chunk's size line ends it (trailers are not waited for).
    let end = response.len() - b"\r\nafter the body".len();
    for step in [response.len(), 1, 3, 17] {
        let reads: Vec<&[u8]> = response.chunks(step).collect();
        let (mut client, events) = refused_in_reads(&reads);
        // Reported on the read that brought the last chunk, and not before.
        let last = (end - 1) / step;
        assert!(events[..last].iter().all(Vec::is_empty), "step {step}");
        assert_handshake_failed(
            &mut client,
            &events[last],
            refused_with(500, "sorry, later"),
        );
    }
    // Bytes that are not the chunked coding end the body where they start.
    let (mut client, events) =
        refused_in_reads(&[b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY"]);
    assert_handshake_failed(&mut client, &events[0], refused_with(500, "abc"));
    // A long chunked body keeps its first 1 KiB, reported once that came.
    let mut long = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        long.extend_from_slice(b"200\r\n");
        long.extend_from_slice(&[b'z'; 512]);
        long.extend_from_slice(b"\r\n");
    }
    let (mut client, events) = refused_in_reads(&[&long]);
    assert_handshake_failed(
        &mut client,
        &events[0],
        refused_with(500, &"z".repeat(1024)),
    );
}

/// A chunked body is read for at most its first 4 KiB on the wire (the limit bounds the
/// coding's overhead, not only what it decodes to): with one byte per chunk (6 bytes on the
/// wire each) the refusal waits through 4 095 bytes and is reported at the 4 096th, with
/// what decoded by then.
#[test]
fn a_chunked_refusal_is_read_for_at_most_4_kib_on_the_wire() {
    let head: &[u8] = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n";
    let body: Vec<u8> = b"1\r\nz\r\n".repeat(1000);
    let (_, events) = refused_in_reads(&[head, &body[..4095]]);
    assert_eq!(events, [vec![], vec![]], "4 095 bytes: still waiting");
    // 682 whole chunks (4 092 bytes), then `1\r\nz` of the next: 683 bytes decoded.
    let (mut client, events) = refused_in_reads(&[head, &body[..4095], &body[4095..4097]]);
    assert_eq!(events[..2], [vec![], vec![]]);
    assert_handshake_failed(&mut client, &events[2], refused_with(500, &"z".repeat(683)));
    let (mut client, events) = refused_in_reads(&[head, &body[..4096]]);
    assert_handshake_failed(&mut client, &events[1], refused_with(500, &"z".repeat(683)));
}

#[test]
fn client_rejects_unexpected_subprotocol() {
    let bad_response = |e: &HandshakeError| matches!(e, HandshakeError::BadResponse(_));
    let opts = Options::default().accept_protocols(["chat"]);
    let (mut client, events) = client_with_response(&opts, |req| {
        response_for(req, "Sec-WebSocket-Protocol: superchat\r\n")
    });
    assert_handshake_failed_with(&mut client, &events, bad_response);
    assert_eq!(client.protocol(), None);

    // Without any offer, any subprotocol is unexpected.
    let (mut client, events) = client_with_response(&Options::default(), |req| {
        response_for(req, "Sec-WebSocket-Protocol: chat\r\n")
    });
    assert_handshake_failed_with(&mut client, &events, bad_response);
}

/// RFC 6455 §4.1: the client fails the connection unless the response holds exactly one
/// `Sec-WebSocket-Accept` and at most one subprotocol, one it offered: a second header
/// line is not overlooked because the first one is right.
#[test]
fn client_rejects_a_second_accept_or_subprotocol_line() {
    let opts = Options::default().accept_protocols(["chat"]);
    let (mut client, events) = client_with_response(&opts, |req| {
        response_for(
            req,
            "Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: other\r\n",
        )
    });
    assert_handshake_failed(
        &mut client,
        &events,
        HandshakeError::BadResponse("server selected more than one subprotocol"),
    );
    let (mut client, events) = client_with_response(&opts, |req| {
        let r = response_for(req, "");
        let text = String::from_utf8(r).unwrap();
        let accept = text
            .lines()
            .find(|l| l.starts_with("Sec-WebSocket-Accept"))
            .unwrap()
            .to_string();
        text.replacen(&accept, &format!("{accept}\r\nSec-WebSocket-Accept: x"), 1)
            .into_bytes()
    });
    assert_handshake_failed(&mut client, &events, HandshakeError::AcceptMismatch);
}

#[test]
fn client_rejects_extension_not_offered() {
    let (mut client, events) = client_with_response(&Options::default(), |req| {
        response_for(req, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    });
    assert_handshake_failed_with(&mut client, &events, |e| {
        matches!(e, HandshakeError::BadResponse(_))
    });
}

#[test]
fn client_rejects_garbage_response() {
    let (mut client, events) =
        client_with_response(&Options::default(), |_| b"SSH-2.0-OpenSSH\r\n\r\n".to_vec());
    assert_handshake_failed_with(&mut client, &events, |e| {
        matches!(e, HandshakeError::MalformedHttp(_))
    });
}

#[test]
fn client_eof_during_handshake_is_incomplete_then_1006() {
    let (mut client, request) = started_client(&Options::default());
    let response = response_for(&request, "");
    assert_eq!(feed(&mut client, &response[..10]), vec![]);
    assert_eq!(
        eof(&mut client),
        vec![
            Ev::Error(Err::Handshake(HandshakeError::Incomplete)),
            Ev::Close(1006, String::new())
        ]
    );
    assert_eq!(eof(&mut client), vec![]);
}

/// A transport error (a refused connect) is reported as itself, in place of the generic
/// "incomplete handshake", then 1006; once the close is reported nothing more comes.
#[test]
fn transport_error_is_reported_as_itself_then_1006() {
    let (mut client, _request) = started_client(&Options::default());
    client.receive_error(std::io::ErrorKind::ConnectionRefused.into());
    assert_eq!(
        drain(&mut client),
        vec![
            Ev::Error(Err::Io(std::io::ErrorKind::ConnectionRefused)),
            Ev::Close(1006, String::new())
        ]
    );
    client.receive_error(std::io::ErrorKind::ConnectionReset.into());
    assert_eq!(drain(&mut client), vec![]);
    assert_eq!(eof(&mut client), vec![]);
    // On an open connection a reset mid-message is reported the same way.
    let (_client, mut server) = open_pair(&Options::default(), &Options::default());
    assert_eq!(feed(&mut server, &[0x01, 0x85, 1, 2, 3, 4]), vec![]);
    server.receive_error(std::io::ErrorKind::ConnectionReset.into());
    assert_eq!(
        drain(&mut server),
        vec![
            Ev::Error(Err::Io(std::io::ErrorKind::ConnectionReset)),
            Ev::Close(1006, String::new())
        ]
    );
}

/// The seed-style wrapper passes a transport error to `on_error` as itself, then 1006.
#[test]
fn websocket_receive_error_runs_on_error_then_on_close() {
    let (client, _server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    ws.on_error(move |_, e| {
        let kind = match e {
            Error::Io(io) => format!("{:?}", io.kind()),
            other => format!("not io: {other}"),
        };
        l.lock().unwrap().push(format!("error {kind}"));
    });
    let l = log.clone();
    ws.on_close(move |_, code, _| l.lock().unwrap().push(format!("close {code}")));
    ws.receive_error(std::io::ErrorKind::ConnectionReset.into());
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "error ConnectionReset".to_string(),
            "close 1006".to_string()
        ]
    );
}

/// Builds a server response for a client's request.
type ResponseFor = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// Frames after a bad response are never parsed, and the client never opens.
#[test]
fn client_handshake_failures_ignore_frames_after_the_response() {
    let responses: Vec<(ResponseFor, HandshakeError)> = vec![
        (
            Box::new(|req| {
                let mut r = response_for(req, "");
                let at = r.windows(6).position(|w| w == b"Accept").unwrap() + 8;
                r[at] ^= 1; // corrupt the accept key
                r
            }),
            HandshakeError::AcceptMismatch,
        ),
        (
            Box::new(|_| b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec()),
            HandshakeError::UnexpectedStatus {
                status: 403,
                body: String::new(),
            },
        ),
        (
            Box::new(|req| response_for(req, "Sec-WebSocket-Protocol: chat\r\n")),
            HandshakeError::BadResponse("server selected a subprotocol the client did not offer"),
        ),
        (
            Box::new(|req| response_for(req, "Sec-WebSocket-Extensions: x-ext\r\n")),
            HandshakeError::BadResponse("server selected an extension the client did not offer"),
        ),
    ];
    for (response, expected) in responses {
        let (mut client, request) = started_client(&Options::default());
        client.send_text("queued").unwrap();
        let mut bytes = response(&request);
        bytes.extend(raw_frame(0x81, b"frame after a bad response", None));
        let events = feed(&mut client, &bytes);
        assert_handshake_failed(&mut client, &events, expected);
        assert!(matches!(
            client.send_text("x"),
            Err(Error::Usage(UsageError::NotOpen))
        ));
    }
}

#[test]
fn client_accepts_frames_in_the_same_read_as_the_response() {
    let (mut client, request) = started_client(&Options::default());
    let mut bytes = response_for(&request, "");
    bytes.extend(raw_frame(0x81, b"hello", None));
    bytes.extend(raw_frame(0x89, b"p", None));
    assert_eq!(
        feed(&mut client, &bytes),
        vec![Ev::Open, Ev::Text("hello".into()), Ev::Ping(b"p".to_vec())]
    );
}

#[test]
fn client_masks_every_frame_with_fresh_keys() {
    let (mut client, _server) = open_client(&Options::default());
    for i in 0..20u8 {
        client.send_binary(&[i; 40]).unwrap();
        client.send_text("t").unwrap();
    }
    client.send_ping(b"p").unwrap();
    client.send_pong(b"").unwrap();
    client.close_connection(1000, "").unwrap();
    let out = take_output(&mut client);
    let frames = parse_frames(&out);
    assert_eq!(frames.len(), 43);
    // Every frame has the mask bit, and the payload on the wire is masked.
    let mut at = 0;
    for f in &frames {
        assert_ne!(out[at + 1] & 0x80, 0, "mask bit");
        assert!(f.mask.is_some());
        at += 2 + 4 + f.payload.len();
    }
    assert_eq!(at, out.len());
    let masks: Vec<[u8; 4]> = frames.iter().map(|f| f.mask.unwrap()).collect();
    assert!(
        masks.windows(2).all(|w| w[0] != w[1]),
        "consecutive frames share a mask"
    );
    let mut distinct = masks.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= masks.len() - 1, "masks repeat: {masks:?}");
    assert_eq!(frames[0].payload, vec![0; 40]);
    assert_ne!(&out[6..46], &[0u8; 40][..], "payload is masked on the wire");
}

#[test]
fn server_never_masks() {
    let (_client, mut server) = open_client(&Options::default());
    server.send_text("a").unwrap();
    server.send_binary(&[1; 200]).unwrap();
    server.send_ping(b"").unwrap();
    server.close_connection(1000, "").unwrap();
    let frames = parse_frames(&take_output(&mut server));
    assert_eq!(frames.len(), 4);
    assert!(
        frames
            .iter()
            .all(|f| f.mask.is_none() && f.fin && f.rsv == 0)
    );
}

// ----- send tokens and write callbacks -----

#[test]
fn send_token_is_sent_only_once_consumed() {
    let mut server = open_server(&Options::default());
    let a = server.send_text("aaaa").unwrap(); // 6 bytes on the wire
    let b = server.send_binary(&[0; 200]).unwrap(); // 204 bytes
    assert!(a < b);
    assert!(!server.is_sent(a) && !server.is_sent(b));
    server.consume_output(5);
    assert!(!server.is_sent(a));
    server.consume_output(1);
    assert!(server.is_sent(a));
    assert!(!server.is_sent(b));
    let mut buf = [0u8; 203];
    assert_eq!(server.poll_output(&mut buf), 203);
    assert!(!server.is_sent(b));
    assert_eq!(server.poll_output(&mut buf), 1);
    assert!(server.is_sent(b));
    assert_eq!(server.poll_output(&mut buf), 0);
}

#[test]
fn send_tokens_ignore_handshake_bytes() {
    let (mut client, request) = started_client(&Options::default());
    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    let early = server.send_text("early").unwrap();
    server.start_connection();
    let response_len = server.pending_output().len() - 7;
    server.consume_output(response_len);
    assert!(!server.is_sent(early), "only the 101 response was written");
    server.consume_output(6);
    assert!(!server.is_sent(early));
    server.consume_output(1);
    assert!(server.is_sent(early));
    let _ = drain(&mut client);

    // Client: frames queued while connecting count only once written after open.
    let (mut client, request) = started_client(&Options::default());
    let token = client.send_text("x").unwrap();
    assert!(!client.is_sent(token));
    feed(&mut client, &response_for(&request, ""));
    assert!(!client.is_sent(token));
    take_output(&mut client);
    assert!(client.is_sent(token));
}

#[test]
fn send_with_callback_runs_after_consume_output_passes_the_frame() {
    let (client, mut server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let written = Arc::new(Mutex::new(Vec::new()));
    let w = written.clone();
    ws.send_with(b"first", MessageType::Text, move |_| {
        w.lock().unwrap().push(1)
    })
    .unwrap();
    let w = written.clone();
    ws.send_with(&[7; 10], MessageType::Binary, move |_| {
        w.lock().unwrap().push(2)
    })
    .unwrap();
    let first_len = 2 + 4 + 5;
    let total = ws.pending_output().len();
    assert_eq!(total, first_len + 2 + 4 + 10);
    let bytes = ws.pending_output().to_vec();
    assert!(written.lock().unwrap().is_empty(), "nothing written yet");
    ws.consume_output(first_len - 1);
    assert!(written.lock().unwrap().is_empty());
    ws.consume_output(1);
    assert_eq!(*written.lock().unwrap(), vec![1]);
    ws.consume_output(total - first_len - 1);
    assert_eq!(*written.lock().unwrap(), vec![1]);
    ws.consume_output(1);
    assert_eq!(*written.lock().unwrap(), vec![1, 2]);
    assert_eq!(
        feed(&mut server, &bytes),
        vec![Ev::Text("first".into()), Ev::Binary(vec![7; 10])]
    );
}

#[test]
fn websocket_handlers_see_every_event() {
    let (client, mut server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    ws.on_message(move |d, m| {
        l.lock()
            .unwrap()
            .push(format!("message {:?}", m.as_bytes()));
        d.send_message(&m).unwrap();
    });
    let l = log.clone();
    ws.on_ping(move |_, p| l.lock().unwrap().push(format!("ping {p:?}")));
    let l = log.clone();
    ws.on_error(move |_, e| {
        l.lock()
            .unwrap()
            .push(format!("error {}", matches!(e, Error::Protocol(_))))
    });
    let l = log.clone();
    ws.on_close(move |_, code, reason| l.lock().unwrap().push(format!("close {code} {reason}")));
    server.send_text("hi").unwrap();
    server.send_ping(&[1]).unwrap();
    let mut bytes = take_output(&mut server);
    bytes.extend(client_frame(0x81, b"masked from server"));
    ws.receive(&mut bytes);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "message [104, 105]".to_string(),
            "ping [1]".to_string(),
            "error true".to_string(),
            "close 1002 masked frame from a server".to_string(),
        ]
    );
    let out = ws.pending_output().to_vec();
    let frames = parse_frames(&out);
    assert_eq!(
        frames.iter().map(|f| f.opcode).collect::<Vec<_>>(),
        [OpCode::Text, OpCode::Pong, OpCode::Close]
    );
}

// ----- property tests -----

#[derive(Debug, Clone)]
enum Item {
    /// A data message, cut into fragments at `cuts`, with a ping after some fragments.
    Message {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
        pings: Vec<Option<Vec<u8>>>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn payload_strategy() -> impl Strategy<Value = (bool, Vec<u8>)> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..3000).prop_map(|b| (false, b)),
        "[ -~]{0,3000}".prop_map(|s| (true, s.into_bytes())),
        proptest::collection::vec(any::<char>(), 0..750)
            .prop_map(|c| (true, c.into_iter().collect::<String>().into_bytes())),
    ]
}

fn control_payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=125)
}

fn item_strategy() -> impl Strategy<Value = Item> {
    prop_oneof![
        4 => (
            payload_strategy(),
            proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
            proptest::collection::vec(proptest::option::of(control_payload()), 0..4)
        )
            .prop_map(|((text, payload), cuts, pings)| {
                let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
                cuts.sort_unstable();
                Item::Message { text, payload, cuts, pings }
            }),
        1 => control_payload().prop_map(Item::Ping),
        1 => control_payload().prop_map(Item::Pong),
    ]
}

/// Client bytes for the items, and the events a server should report for them.
fn encode_items(items: &[Item], masks: &mut impl Iterator<Item = [u8; 4]>) -> (Vec<u8>, Vec<Ev>) {
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for item in items {
        match item {
            Item::Ping(p) => {
                bytes.extend(raw_frame(0x89, p, masks.next()));
                expected.push(Ev::Ping(p.clone()));
            }
            Item::Pong(p) => {
                bytes.extend(raw_frame(0x8a, p, masks.next()));
                expected.push(Ev::Pong(p.clone()));
            }
            Item::Message {
                text,
                payload,
                cuts,
                pings,
            } => {
                let mut bounds = vec![0];
                bounds.extend(cuts);
                bounds.push(payload.len());
                let pieces = bounds.len() - 1;
                for i in 0..pieces {
                    let opcode = if i == 0 { if *text { 1 } else { 2 } } else { 0 };
                    let fin = if i == pieces - 1 { 0x80 } else { 0 };
                    bytes.extend(raw_frame(
                        fin | opcode,
                        &payload[bounds[i]..bounds[i + 1]],
                        masks.next(),
                    ));
                    if i < pieces - 1
                        && let Some(Some(p)) = pings.get(i)
                    {
                        bytes.extend(raw_frame(0x89, p, masks.next()));
                        expected.push(Ev::Ping(p.clone()));
                    }
                }
                expected.push(if *text {
                    Ev::Text(String::from_utf8(payload.clone()).unwrap())
                } else {
                    Ev::Binary(payload.clone())
                });
            }
        }
    }
    (bytes, expected)
}

fn feed_in_pieces(driver: &mut Driver, bytes: &[u8], cuts: &[proptest::sample::Index]) -> Vec<Ev> {
    let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let mut events = Vec::new();
    let mut at = 0;
    for cut in cuts {
        events.extend(feed(driver, &bytes[at..cut]));
        at = cut;
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// However the bytes are cut into reads, the server reports the same events and
    /// writes the same bytes as when they come in one read.
    #[test]
    fn chop_invariance(
        items in proptest::collection::vec(item_strategy(), 1..8),
        masks in proptest::collection::vec(any::<[u8; 4]>(), 64),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..40),
    ) {
        let mut masks = masks.into_iter().cycle();
        let (bytes, expected) = encode_items(&items, &mut masks);

        let mut whole = open_server(&Options::default());
        let one_read = feed(&mut whole, &bytes);
        prop_assert_eq!(&one_read, &expected);
        let whole_out = take_output(&mut whole);

        let mut chopped = open_server(&Options::default());
        let events = feed_in_pieces(&mut chopped, &bytes, &cuts);
        prop_assert_eq!(&events, &one_read);
        prop_assert_eq!(take_output(&mut chopped), whole_out);
        prop_assert_eq!(chopped.ready_state(), ReadyState::Open);
    }

    /// Server → client: what the server sends, the client reports, whatever the reads.
    #[test]
    fn server_to_client_round_trip(
        items in proptest::collection::vec(item_strategy(), 1..8),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..20),
    ) {
        let (mut client, mut server) = open_client(&Options::default());
        let mut expected = Vec::new();
        for item in &items {
            match item {
                Item::Message { text: true, payload, .. } => {
                    let s = String::from_utf8(payload.clone()).unwrap();
                    server.send_text(&s).unwrap();
                    expected.push(Ev::Text(s));
                }
                Item::Message { text: false, payload, .. } => {
                    server.send_binary(payload).unwrap();
                    expected.push(Ev::Binary(payload.clone()));
                }
                Item::Ping(p) => {
                    server.send_ping(p).unwrap();
                    expected.push(Ev::Ping(p.clone()));
                }
                Item::Pong(p) => {
                    server.send_pong(p).unwrap();
                    expected.push(Ev::Pong(p.clone()));
                }
            }
        }
        server.close_connection(1000, "end").unwrap();
        expected.push(Ev::Close(1000, "end".into()));
        let bytes = take_output(&mut server);
        prop_assert_eq!(feed_in_pieces(&mut client, &bytes, &cuts), expected);
        // And back: the client's pongs and close echo are what the server expects.
        let back = feed(&mut server, &take_output(&mut client));
        let pongs: Vec<Ev> = items.iter().filter_map(|i| match i {
            Item::Ping(p) => Some(Ev::Pong(p.clone())),
            _ => None,
        }).collect();
        prop_assert_eq!(&back[..pongs.len()], &pongs[..]);
        prop_assert_eq!(&back[pongs.len()..], &[Ev::Close(1000, String::new())][..]);
        prop_assert!(server.is_finished() && client.is_finished());
    }

    /// Client → server through the client's own masking.
    #[test]
    fn client_to_server_round_trip(items in proptest::collection::vec(item_strategy(), 1..6)) {
        let (mut client, mut server) = open_pair(&Options::default(), &Options::default());
        let mut expected = Vec::new();
        for item in &items {
            match item {
                Item::Message { text, payload, .. } => {
                    let kind = if *text { MessageType::Text } else { MessageType::Binary };
                    client.send(payload, kind).unwrap();
                    expected.push(if *text {
                        Ev::Text(String::from_utf8(payload.clone()).unwrap())
                    } else {
                        Ev::Binary(payload.clone())
                    });
                }
                Item::Ping(p) => {
                    client.send(p, MessageType::Ping).unwrap();
                    expected.push(Ev::Ping(p.clone()));
                }
                Item::Pong(p) => {
                    client.send(p, MessageType::Pong).unwrap();
                    expected.push(Ev::Pong(p.clone()));
                }
            }
        }
        prop_assert_eq!(pump(&mut client, &mut server), expected);
    }

    /// Random bytes never panic a server, and what it reports stays well-formed: an error
    /// is followed by exactly one close, and nothing follows the close.
    #[test]
    fn random_bytes_never_panic(
        prefix in proptest::collection::vec(item_strategy(), 0..3),
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..10),
        end_with_eof in any::<bool>(),
    ) {
        let mut server = open_server(&Options::default().max_length(5000));
        let (bytes, _) = encode_items(&prefix, &mut std::iter::repeat(MASK));
        let mut events = feed(&mut server, &bytes);
        for chunk in &chunks {
            events.extend(feed(&mut server, chunk));
            let _ = take_output(&mut server);
        }
        if end_with_eof {
            events.extend(eof(&mut server));
        }
        let closes = events.iter().filter(|e| e.is_close()).count();
        prop_assert!(closes <= 1);
        if let Some(at) = events.iter().position(Ev::is_close) {
            prop_assert_eq!(at, events.len() - 1, "events after close: {:?}", events);
        }
        if let Some(at) = events.iter().position(|e| matches!(e, Ev::Error(_))) {
            prop_assert!(events.get(at + 1).is_some_and(Ev::is_close), "{:?}", events);
        }
        if end_with_eof {
            prop_assert_eq!(closes, 1);
            prop_assert_eq!(server.ready_state(), ReadyState::Closed);
        }
    }

    /// Whatever came before, the end of the transport leaves exactly one Close reported.
    #[test]
    fn eof_always_leaves_exactly_one_close(
        prefix in proptest::collection::vec(item_strategy(), 0..3),
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..10),
    ) {
        let mut server = open_server(&Options::default().max_length(5000));
        let (bytes, _) = encode_items(&prefix, &mut std::iter::repeat(MASK));
        let mut events = feed(&mut server, &bytes);
        for chunk in &chunks {
            events.extend(feed(&mut server, chunk));
        }
        events.extend(eof(&mut server));
        prop_assert_eq!(events.iter().filter(|e| e.is_close()).count(), 1, "{:?}", events);
        prop_assert!(events.last().is_some_and(Ev::is_close));
    }

    /// Random bytes as the server's response never panic a connecting client.
    #[test]
    fn random_response_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5)) {
        let (mut client, _) = started_client(&Options::default());
        let mut events = Vec::new();
        for chunk in &chunks {
            events.extend(feed(&mut client, chunk));
        }
        events.extend(eof(&mut client));
        prop_assert_eq!(events.iter().filter(|e| e.is_close()).count(), 1, "{:?}", events);
        prop_assert!(!events.contains(&Ev::Open) || events[0] == Ev::Open);
    }
}

/// Found by the `stream` fuzzer: a read that ends right after a frame header must not
/// leave a half-made message behind for the next frame.
#[test]
fn read_ending_right_after_a_header_leaves_no_partial_message() {
    let mut client = websocket_driver::Driver::make_client(
        "ws://localhost/",
        &websocket_driver::Options::default(),
    )
    .unwrap();
    client.start_connection();
    let request = client.pending_output().to_vec();
    client.consume_output(request.len());
    let key = String::from_utf8_lossy(&request)
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").map(str::to_string))
        .unwrap();
    let accept = websocket_driver::protocol::handshake::accept_key(&key);
    let mut response = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
    let mut events = Vec::new();
    let feed =
        |client: &mut websocket_driver::Driver, bytes: &mut [u8], events: &mut Vec<String>| {
            let mut at = 0;
            loop {
                let (used, event) = client.poll_event(&mut bytes[at..]);
                at += used;
                match event {
                    Some(e) => events.push(format!("{e:?}")),
                    None => break,
                }
            }
        };
    feed(&mut client, &mut response, &mut events);
    feed(&mut client, &mut [0x82, 0x01], &mut events);
    feed(&mut client, &mut [0x41, 0x82, 0x01, 0x42], &mut events);
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[0].starts_with("Open"));
    assert!(events[1].contains("[65]"), "{events:?}");
    assert!(events[2].contains("[66]"), "{events:?}");
}

// ----- sending by value -----

/// Every part of a driver's pending output as a gathered write sees it: each part's
/// address and bytes.
fn output_parts(driver: &Driver) -> Vec<(usize, Vec<u8>)> {
    let mut slices = [std::io::IoSlice::new(&[]); 8];
    let n = driver.pending_output_vectored(&mut slices);
    slices[..n]
        .iter()
        .map(|s| (s.as_ptr() as usize, s.to_vec()))
        .collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn an_owned_message_is_written_from_its_own_allocation() {
    let mut server = open_server(&Options::default());
    let payload = pattern(70_000);
    let (at, expected) = (payload.as_ptr() as usize, payload.clone());
    let token = server
        .send_message_owned(Message::Binary(Cow::Owned(payload)))
        .unwrap();
    let after = server.send_text("next").unwrap();
    let parts = output_parts(&server);
    // Header (8-byte length), the payload in place, then the next frame.
    assert_eq!(parts.len(), 3);
    assert_eq!(
        parts[0].1,
        [&[0x82, 127][..], &70_000u64.to_be_bytes()].concat()
    );
    assert_eq!(parts[1].0, at, "the payload is not copied");
    assert_eq!(parts[1].1, expected);
    assert_eq!(parts[2].1, [0x81, 4, b'n', b'e', b'x', b't']);
    assert_eq!(server.buffered_amount(), 10 + 70_000 + 6);
    // The token waits for the payload, not just the header before it.
    server.consume_output(10);
    assert!(!server.is_sent(token));
    server.consume_output(69_999);
    assert!(!server.is_sent(token));
    server.consume_output(1);
    assert!(server.is_sent(token));
    assert!(!server.is_sent(after));
    server.consume_output(6);
    assert!(server.is_sent(after));
    assert_eq!(server.buffered_amount(), 0);
}

#[test]
fn an_owned_message_is_handed_to_a_completion_transport_without_a_copy() {
    let mut server = open_server(&Options::default());
    let text: String = pattern(OWNED_MIN)
        .iter()
        .map(|b| (b'a' + b % 26) as char)
        .collect();
    let at = text.as_ptr() as usize;
    let token = server
        .send_message_owned(Message::Text(Cow::Owned(text)))
        .unwrap();
    let mut out = websocket_driver::protocol::driver::Outgoing::default();
    assert!(server.take_output(&mut out));
    assert!(out.has_frames());
    assert_eq!(out.len(), 10 + OWNED_MIN);
    assert!(server.is_sent(token), "handed over counts as written");
    let mut slices = Vec::new();
    out.slices(0, &mut slices);
    assert_eq!(slices.len(), 2);
    let header = [&[0x81, 127][..], &(OWNED_MIN as u64).to_be_bytes()].concat();
    assert_eq!(&slices[0][..], header);
    assert_eq!(slices[1].as_ptr() as usize, at, "the payload is not copied");
    assert_eq!(slices[1].len(), OWNED_MIN);
}

#[test]
fn a_client_masks_an_owned_message_in_place() {
    let (mut client, mut server) = open_pair(&Options::default(), &Options::default());
    let payload = pattern(100_000);
    let at = payload.as_ptr() as usize;
    client
        .send_message_owned(Message::Binary(Cow::Owned(payload)))
        .unwrap();
    let parts = output_parts(&client);
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].1.len(), 14, "64-bit length and a mask key");
    assert_eq!(parts[1].0, at);
    assert_ne!(parts[1].1, pattern(100_000), "masked on the wire");
    assert_eq!(
        pump(&mut client, &mut server),
        vec![Ev::Binary(pattern(100_000))]
    );
}

#[test]
fn borrowed_short_and_compressed_messages_are_copied() {
    // At the threshold an owned payload goes by reference; one byte under, it is copied.
    let mut server = open_server(&Options::default());
    server
        .send_message_owned(Message::Binary(Cow::Owned(pattern(OWNED_MIN))))
        .unwrap();
    assert_eq!(output_parts(&server).len(), 2);
    let mut server = open_server(&Options::default());
    server
        .send_message_owned(Message::Binary(Cow::Owned(pattern(OWNED_MIN - 1))))
        .unwrap();
    assert_eq!(output_parts(&server).len(), 1);
    let borrowed = pattern(OWNED_MIN);
    server
        .send_message_owned(Message::Binary(Cow::Borrowed(&borrowed)))
        .unwrap();
    assert_eq!(output_parts(&server).len(), 1);
    // With permessage-deflate the payload is compressed into the output instead.
    let deflate = Options::default().deflate(true);
    let (mut client, mut server) = open_pair(&deflate, &deflate);
    let text = "abc".repeat(OWNED_MIN);
    server
        .send_message_owned(Message::Text(Cow::Owned(text.clone())))
        .unwrap();
    let parts = output_parts(&server);
    assert_eq!(parts.len(), 1);
    assert!(parts[0].1.len() < text.len() / 10, "compressed");
    assert_eq!(pump(&mut server, &mut client), vec![Ev::Text(text)]);
}

#[test]
fn owned_sends_follow_the_same_state_rules() {
    // While connecting, a client's message waits behind the handshake (copied).
    let (mut client, request) = started_client(&Options::default());
    client
        .send_message_owned(Message::Binary(Cow::Owned(pattern(OWNED_MIN))))
        .unwrap();
    assert!(client.pending_output().is_empty());
    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    assert!(server.start_connection());
    assert_eq!(drain(&mut server), vec![Ev::Open]);
    assert_eq!(pump(&mut server, &mut client), vec![Ev::Open]);
    assert!(pump(&mut client, &mut server) == vec![Ev::Binary(pattern(OWNED_MIN))]);
    // Once closing, nothing more is taken.
    let mut server = open_server(&Options::default());
    server.close_connection(1000, "").unwrap();
    assert!(matches!(
        server.send_message_owned(Message::Binary(Cow::Owned(pattern(OWNED_MIN)))),
        Err(Error::Usage(UsageError::NotOpen))
    ));
}

/// A lent payload buffer handed back with nothing received (the read would block) leaves
/// no message under way: the frame then arriving whole is delivered as usual, a
/// continuation after it has nothing to continue (1002), and the next message is fine.
#[test]
fn a_payload_buffer_returned_empty_leaves_no_message_under_way() {
    let mut server = open_server(&Options::default());
    let payload = vec![0x33; 100_000];
    let frame = masked(OpCode::Binary, &payload);
    let header = 2 + 8 + 4;
    assert!(feed(&mut server, &frame[..header]).is_empty());
    let (buffer, room) = server
        .lend_payload_buffer(1)
        .expect("a frame's payload to come");
    assert!(room >= 1);
    server.payload_received(buffer, 0);
    assert_eq!(
        feed(&mut server, &frame[header..]),
        vec![Ev::Binary(payload)]
    );
    let events = feed(&mut server, &client_frame(0x80, b"more"));
    assert_failed(&events, ProtocolError::UnexpectedContinuation, 1002);
}

/// Nothing is read before `start_connection`: a server that has not answered the upgrade
/// does not take (or answer) a frame, a client that has not sent its request does not
/// take a response. The input stays with the caller, and is read once started: a Close
/// sent right behind the request is answered after the 101, never before it.
#[test]
fn nothing_is_read_before_start_connection() {
    let (_, request) = started_client(&Options::default());
    let mut server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    let close = client_frame(0x88, &close_payload(1000, b""));
    let mut input = close.clone();
    assert_eq!(server.poll_event(&mut input).0, 0);
    assert!(matches!(server.poll_event(&mut input), (0, None)));
    assert!(server.pending_output().is_empty());
    assert_eq!(server.ready_state(), ReadyState::Connecting);
    assert!(server.start_connection());
    assert_eq!(
        feed(&mut server, &close),
        vec![Ev::Open, Ev::Close(1000, String::new())]
    );
    let output = take_output(&mut server);
    assert!(output.starts_with(b"HTTP/1.1 101 "), "{output:?}");
    let head_end = output.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        parse_frames(&output[head_end..])[0].close_code(),
        Some(1000)
    );

    let mut client = Driver::make_client("ws://localhost/chat", &Options::default()).unwrap();
    let mut response = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
    assert!(matches!(client.poll_event(&mut response), (0, None)));
    assert_eq!(client.ready_state(), ReadyState::Connecting);
}

/// The seed-style wrapper keeps what it receives before `start_connection` and reads it
/// once started (a frame behind the request head, say); a close while connecting drops
/// the sends queued until then, and their write callbacks with them.
#[test]
fn websocket_reads_early_input_once_started_and_drops_unsent_callbacks() {
    let (_, request) = started_client(&Options::default());
    let server = Driver::make_server(&parse_request(&request), &Options::default()).unwrap();
    let mut ws = WebSocket::new(server);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    ws.on_open(move |_| l.lock().unwrap().push("open".into()));
    let l = log.clone();
    ws.on_message(move |_, m| {
        l.lock()
            .unwrap()
            .push(format!("message {}", m.as_text().unwrap()))
    });
    ws.receive(&mut client_frame(0x81, b"early"));
    assert!(log.lock().unwrap().is_empty());
    assert!(ws.start_connection());
    assert_eq!(*log.lock().unwrap(), ["open", "message early"]);

    let client = Driver::make_client("ws://localhost/chat", &Options::default()).unwrap();
    let mut ws = WebSocket::new(client);
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    ws.send_with(b"queued", MessageType::Text, move |_| {
        w.fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    assert!(ws.start_connection());
    ws.close_connection(1000, "").unwrap();
    let output = ws.pending_output().len();
    ws.consume_output(output);
    assert_eq!(
        written.load(Ordering::Relaxed),
        0,
        "nothing of it was written"
    );
    assert_eq!(Arc::strong_count(&written), 1, "its callback is dropped");
}

/// A close sent as a message (`send` or `send_with` with `MessageType::Close`) is the
/// wrapper's `close_connection`: while connecting it runs `on_close` at once and drops the
/// queued sends' callbacks, its own with them; once open its callback runs when the close
/// frame is written.
#[test]
fn websocket_close_sent_as_a_message_closes_like_close_connection() {
    for with_callback in [false, true] {
        let client = Driver::make_client("ws://localhost/chat", &Options::default()).unwrap();
        let mut ws = WebSocket::new(client);
        let closed = Arc::new(Mutex::new(Vec::new()));
        let c = closed.clone();
        ws.on_close(move |_, code, reason| c.lock().unwrap().push((code, reason.to_string())));
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        ws.send_with(b"queued", MessageType::Text, move |_| {
            w.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(ws.start_connection());
        let bye = MessageType::Close(4000);
        if with_callback {
            let w = written.clone();
            ws.send_with(b"bye", bye, move |_| {
                w.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        } else {
            ws.send(b"bye", bye).unwrap();
        }
        assert_eq!(ws.ready_state(), ReadyState::Closed);
        assert_eq!(*closed.lock().unwrap(), [(4000, "bye".to_string())]);
        let output = ws.pending_output().len();
        ws.consume_output(output);
        assert_eq!(written.load(Ordering::Relaxed), 0);
        assert_eq!(Arc::strong_count(&written), 1, "the callbacks are dropped");
    }

    let (client, mut server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    ws.send_with(b"bye", MessageType::Close(1000), move |_| {
        w.fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(ws.ready_state(), ReadyState::Closing);
    assert!(matches!(
        ws.send(&[0xff], MessageType::Close(1000)),
        Err(Error::Usage(UsageError::InvalidUtf8))
    ));
    let mut buf = [0u8; 64];
    let n = ws.poll_output(&mut buf);
    assert_eq!(written.load(Ordering::Relaxed), 1);
    assert_eq!(
        feed(&mut server, &buf[..n]),
        vec![Ev::Close(1000, "bye".into())]
    );
}

/// A listener that panics leaves the `WebSocket` usable: the panic reaches the caller of
/// `receive`, the driver stays in place (it was taken out while listeners ran, and every
/// later call panicked with "a WebSocket always holds a driver"), and the input behind the
/// event is read by the next `receive`, before what that one brings.
#[test]
fn websocket_survives_a_listener_panic_and_keeps_the_input_behind_it() {
    let (client, mut server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    ws.on_message(move |_, m| {
        let text = m.as_text().unwrap().to_string();
        if text == "boom" {
            panic!("a listener bug");
        }
        s.lock().unwrap().push(text);
    });
    for text in ["boom", "behind"] {
        server.send_text(text).unwrap();
    }
    let mut bytes = take_output(&mut server);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ws.receive(&mut bytes)));
    assert!(caught.is_err(), "the listener's panic reaches the caller");
    assert_eq!(ws.ready_state(), ReadyState::Open);
    assert!(seen.lock().unwrap().is_empty());
    server.send_text("next").unwrap();
    let mut bytes = take_output(&mut server);
    ws.receive(&mut bytes);
    assert_eq!(*seen.lock().unwrap(), ["behind", "next"]);
    ws.send_text("still works").unwrap();
    assert_eq!(
        feed(&mut server, &take_output(&mut ws)),
        vec![Ev::Text("still works".into())]
    );
}

/// The output-taking and ending methods reached through `Deref` have their own versions
/// on `WebSocket`: `poll_output` runs `send_with`'s callback (it never ran for bytes taken
/// that way) and `abort` runs `on_close` (it waited for a `receive` that a transport
/// shutting down never makes).
#[test]
fn websocket_poll_output_runs_write_callbacks_and_abort_runs_on_close() {
    let (client, mut server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let token = ws
        .send_with(b"hello", MessageType::Text, move |_| {
            w.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = ws.poll_output(&mut buf);
    assert!(ws.is_sent(token));
    assert_eq!(written.load(Ordering::SeqCst), 1);
    assert_eq!(feed(&mut server, &buf[..n]), vec![Ev::Text("hello".into())]);
    let closed = Arc::new(Mutex::new(Vec::new()));
    let c = closed.clone();
    ws.on_close(move |_, code, _| c.lock().unwrap().push(code));
    ws.abort(1001, "going away");
    assert_eq!(ws.ready_state(), ReadyState::Closed);
    assert_eq!(*closed.lock().unwrap(), [1001]);
}

/// Each `on_*` adds a listener, and an event runs its listeners in the order they were
/// added (the seed's `on`): a second `on_message` replaced the first.
#[test]
fn websocket_listeners_add_up_and_run_in_order() {
    let (client, mut server) = open_client(&Options::default());
    let mut ws = WebSocket::new(client);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    for name in ["logger", "app"] {
        let l = log.clone();
        ws.on_message(move |_, m| {
            l.lock()
                .unwrap()
                .push(format!("{name} {}", m.as_text().unwrap()));
        });
        let l = log.clone();
        ws.on_close(move |_, code, _| l.lock().unwrap().push(format!("{name} {code}")));
    }
    server.send_text("hi").unwrap();
    server.close_connection(1000, "").unwrap();
    let mut bytes = take_output(&mut server);
    ws.receive(&mut bytes);
    assert_eq!(
        *log.lock().unwrap(),
        ["logger hi", "app hi", "logger 1000", "app 1000"]
    );
}

/// A client's handshake refused in a `receive`: the sends queued behind it were dropped
/// unwritten, and `WebSocket` drops their write callbacks with them (they were kept for
/// the life of the `WebSocket`, never run and never dropped).
#[test]
fn a_refused_handshake_drops_the_write_callbacks_of_queued_sends() {
    let client = Driver::make_client("ws://localhost/chat", &Options::default()).unwrap();
    let mut ws = WebSocket::new(client);
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let token = ws
        .send_with(b"queued", MessageType::Text, move |_| {
            w.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let c = closes.clone();
    ws.on_close(move |_, code, _| c.lock().unwrap().push(code));
    assert!(ws.start_connection());
    let n = ws.pending_output().len();
    ws.consume_output(n);
    let mut refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec();
    ws.receive(&mut refusal);
    assert_eq!(*closes.lock().unwrap(), [1006]);
    assert!(ws.is_finished());
    assert!(!ws.is_sent(token));
    assert_eq!(written.load(Ordering::Relaxed), 0);
    assert_eq!(Arc::strong_count(&written), 1, "the callback is still held");
}

/// `Driver::url` as documented: the client's URL until its handshake ends, `None` once
/// open; and a close while connecting: its token reports sent at once (it writes
/// nothing), the sends it dropped never do.
#[test]
fn a_clients_url_and_a_close_while_connecting_are_as_documented() {
    let mut client = Driver::make_client("ws://localhost/chat", &Options::default()).unwrap();
    assert_eq!(client.url().map(|u| u.host.as_str()), Some("localhost"));
    client.start_connection();
    let text = client.send_text("queued").unwrap();
    let close = client.close_connection(1000, "").unwrap();
    assert!(client.is_sent(close));
    assert!(!client.is_sent(text));
    let (open, _server) = open_client(&Options::default());
    assert!(open.url().is_none());
}
