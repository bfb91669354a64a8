//! Property test for pong coalescing (`Driver::answer_ping`): random pings, sends of
//! every kind, partial writes, hand-overs, receive buffers taken back and buffer swaps on a
//! server or a client (with and without permessage-deflate, with the handshake written or
//! still pending); the
//! wire must parse as whole frames, carry every message and user control frame in order,
//! answer pings with pongs in order (the last one always), and tokens must fall due with
//! the last byte of their frame.

use std::borrow::Cow;
use std::io::IoSlice;

use super::{Driver, Event, Message, Outgoing, ReadyState, Role, SendToken};
use crate::protocol::deflate::DeflateOptions;
use crate::protocol::driver::MessageType;
use crate::protocol::frame::{SharedFrame, Status, parse_header};
use crate::protocol::handshake::RequestParser;
use crate::protocol::mask::apply_mask;
use crate::protocol::options::Options;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A connected (client, server) pair; the subject's handshake bytes are left pending when
/// `pending_handshake` (the returned count), the peer's are consumed.
fn pair(options: &Options, subject: Role, pending_handshake: bool) -> (Driver, Driver, usize) {
    let mut client = Driver::make_client("ws://h/", options).unwrap();
    client.start_connection();
    let request = client.pending_output().to_vec();
    let mut parser = RequestParser::new(options.head_limits());
    let Status::Complete(req, _) = parser.parse(&request).unwrap() else {
        panic!("complete")
    };
    let mut server = Driver::make_server(&req, options).unwrap();
    server.start_connection();
    let mut response = server.pending_output().to_vec();
    let mut left = 0;
    if subject == Role::Client && pending_handshake {
        left = request.len();
    } else {
        client.consume_output(request.len());
    }
    if subject == Role::Server && pending_handshake {
        left = response.len();
    } else {
        server.consume_output(response.len());
    }
    // Open both.
    let mut at = 0;
    loop {
        let (used, ev) = client.poll_event(&mut response[at..]);
        at += used;
        match ev {
            Some(Event::Open) => {}
            Some(e) => panic!("client: {e:?}"),
            None => break,
        }
    }
    assert_eq!(client.ready_state(), ReadyState::Open);
    assert!(matches!(server.poll_event(&mut []).1, Some(Event::Open)));
    (client, server, left)
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Data(u8, Vec<u8>),
    UserPing(Vec<u8>),
    UserPong(Vec<u8>),
    AutoPong(Vec<u8>),
    Close,
}

fn gathered(d: &Driver) -> Vec<u8> {
    let mut parts = [IoSlice::new(&[]); 64];
    let n = d.pending_output_vectored(&mut parts);
    assert!(n < 64);
    parts[..n].iter().flat_map(|p| p.iter().copied()).collect()
}

fn run(seed: u64, role: Role, deflate: bool, pending_handshake: bool) -> (usize, usize) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut options = Options::default();
    if deflate {
        options = options.deflate_options(DeflateOptions {
            threshold: 16,
            server_no_context_takeover: seed.is_multiple_of(2),
            ..DeflateOptions::default()
        });
    }
    let (client, server, hs_left) = pair(&options, role, pending_handshake);
    let (mut subject, mut peer) = match role {
        Role::Server => (server, client),
        Role::Client => (client, server),
    };
    let mut wire: Vec<u8> = Vec::new();
    let mut expected: Vec<Item> = Vec::new();
    let mut tokens: Vec<(SendToken, usize)> = Vec::new();
    let mut out = Outgoing::default();
    let mut uid = 0u32;
    let mut closed = false;
    let mut stopped = false;
    let mut spare: Option<Vec<u8>> = None;
    let steps = 150 + rng.below(150);
    for _ in 0..steps {
        uid += 1;
        let tag = |len: usize, uid: u32| -> Vec<u8> {
            let mut v = format!("<{uid}>").into_bytes();
            v.resize(len.max(v.len()), b'a' + (uid % 26) as u8);
            v
        };
        let mut token = None;
        match rng.below(22) {
            0..=6 => {
                // A burst of pings from the peer.
                let n = 1 + rng.below(8);
                let mut bytes = Vec::new();
                for _ in 0..n {
                    uid += 1;
                    let p = tag(rng.below(126) as usize, uid);
                    let p = p[..p.len().min(125)].to_vec();
                    peer.send_ping(&p).unwrap();
                    let k = peer.pending_output().len();
                    bytes.extend_from_slice(peer.pending_output());
                    peer.consume_output(k);
                    if !stopped {
                        expected.push(Item::AutoPong(p));
                    }
                }
                // Fed in random pieces.
                let mut at = 0;
                while at < bytes.len() {
                    let piece = (1 + rng.below(bytes.len() as u64) as usize).min(bytes.len() - at);
                    let mut chunk = bytes[at..at + piece].to_vec();
                    let mut c = 0;
                    loop {
                        let (used, ev) = subject.poll_event(&mut chunk[c..]);
                        c += used;
                        match ev {
                            Some(Event::Ping(_)) => {}
                            Some(Event::Close { .. }) if stopped => {}
                            Some(e) => panic!("subject event {e:?}"),
                            None => break,
                        }
                    }
                    at += piece;
                }
            }
            7 if !closed => {
                let p = tag(rng.below(200) as usize, uid);
                token = Some(subject.send_text(std::str::from_utf8(&p).unwrap()).unwrap());
                expected.push(Item::Data(1, p));
            }
            8 if !closed => {
                let len = [10, 200, 5_000, 20_000, 70_000][rng.below(5) as usize];
                let p = tag(len, uid);
                token = Some(subject.send_binary(&p).unwrap());
                expected.push(Item::Data(2, p));
            }
            9 if !closed => {
                let len = [100, 65 * 1024, 90_000][rng.below(3) as usize];
                let p = tag(len, uid);
                let m = if rng.below(2) == 0 {
                    Message::Binary(Cow::Owned(p.clone()))
                } else {
                    Message::Text(Cow::Owned(String::from_utf8(p.clone()).unwrap()))
                };
                let op = if matches!(m, Message::Text(_)) { 1 } else { 2 };
                token = Some(subject.send_message_owned(m).unwrap());
                expected.push(Item::Data(op, p));
            }
            10 if !closed && role == Role::Server => {
                let len = [3, 300, 30_000][rng.below(3) as usize];
                let p = tag(len, uid);
                let f = SharedFrame::new(&p, MessageType::Binary).unwrap();
                subject.send_shared(&f).unwrap();
                expected.push(Item::Data(2, p));
            }
            11 if !closed => {
                let p = tag(rng.below(100) as usize, uid);
                if rng.below(2) == 0 {
                    token = Some(subject.send_ping(&p).unwrap());
                    expected.push(Item::UserPing(p));
                } else {
                    token = Some(subject.send_pong(&p).unwrap());
                    expected.push(Item::UserPong(p));
                }
            }
            12 if !closed && rng.below(8) == 0 => {
                token = Some(subject.close_connection(1000, "bye").unwrap());
                expected.push(Item::Close);
                closed = true;
            }
            13 | 14 => {
                // A partial write through the contiguous view.
                let p = subject.pending_output();
                if !p.is_empty() {
                    let k = 1 + rng.below(p.len() as u64) as usize;
                    wire.extend_from_slice(&p[..k]);
                    subject.consume_output(k);
                }
            }
            15 => {
                // A partial gathered write.
                let g = gathered(&subject);
                assert_eq!(g.len(), subject.buffered_amount());
                if !g.is_empty() {
                    let k = 1 + rng.below(g.len() as u64) as usize;
                    wire.extend_from_slice(&g[..k]);
                    subject.consume_output(k);
                }
            }
            16 => {
                // Handed over whole (io_uring).
                let expect = gathered(&subject);
                out.clear();
                if subject.take_output(&mut out) {
                    let mut slices = Vec::new();
                    out.slices(0, &mut slices);
                    let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
                    assert_eq!(bytes, expect, "take_output matches the gathered view");
                    wire.extend_from_slice(&bytes);
                    let mut back = Vec::new();
                    out.take_received(|b| back.push(b));
                    out.clear();
                }
            }
            18 if !closed && role == Role::Server => {
                // A received payload sent back from its receive buffer, handed over at once
                // (the reactor's in-place echo), or a run of shared frames.
                let len = [5, 300, 20_000][rng.below(3) as usize];
                let p = tag(len, uid);
                if rng.below(2) == 0 {
                    let start = 14;
                    let mut buffer = vec![0u8; start + len + 3];
                    buffer[start..start + len].copy_from_slice(&p);
                    match subject.send_received(crate::protocol::frame::OpCode::Binary, start, len)
                    {
                        Some(t) => {
                            assert!(subject.hand_received(buffer).is_none());
                            token = Some(t);
                            expected.push(Item::Data(2, p));
                        }
                        None => assert!(deflate),
                    }
                } else {
                    let mut pool = crate::protocol::frame::RunPool::default();
                    let q = tag(7, uid + 1_000_000);
                    let run = pool.make([
                        SharedFrame::new(&p, MessageType::Binary).unwrap(),
                        SharedFrame::new(&q, MessageType::Binary).unwrap(),
                    ]);
                    if subject.send_shared_run(&run).unwrap() {
                        expected.push(Item::Data(2, p));
                        expected.push(Item::Data(2, q));
                    }
                }
            }
            19 if !closed && rng.below(10) == 0 => {
                subject.abort(1011, "gone");
                expected.push(Item::Close);
                closed = true;
                stopped = true;
            }
            21 => {
                // A readiness transport takes its receive buffer back after a write (epoll's
                // in-place echo) and reads into it again: the output must not change.
                let before = gathered(&subject);
                if let Some(mut buffer) = subject.reclaim_received() {
                    buffer.fill(0xEE);
                }
                assert_eq!(
                    gathered(&subject),
                    before,
                    "seed {seed}: reclaim changed the output"
                );
            }
            17 => {
                // The pool takes the idle buffer and gives one back.
                if let Some(b) = subject.take_output_buffer() {
                    spare = Some(b);
                } else if let Some(b) = spare.take() {
                    subject.provide_output_buffer(b);
                }
            }
            _ => {}
        }
        if let Some(t) = token {
            tokens.push((t, wire.len() + subject.buffered_amount()));
        }
        assert_eq!(gathered(&subject).len(), subject.buffered_amount());
        for &(t, end) in &tokens {
            assert_eq!(
                subject.is_sent(t),
                wire.len() >= end,
                "seed {seed}: token due at {end}, wire at {}",
                wire.len()
            );
        }
    }
    // Drain.
    let rest = gathered(&subject);
    wire.extend_from_slice(&rest);
    subject.consume_output(rest.len());
    assert_eq!(subject.buffered_amount(), 0);
    for &(t, _) in &tokens {
        assert!(subject.is_sent(t));
    }

    // Parse the raw frames.
    let mut w = &wire[hs_left..];
    if pending_handshake {
        let head = &wire[..hs_left];
        assert!(head.ends_with(b"\r\n\r\n"), "seed {seed}: handshake first");
    }
    let mut frames: Vec<(u8, bool, Vec<u8>)> = Vec::new();
    while !w.is_empty() {
        let Ok(Status::Complete(h, n)) = parse_header(w, 0b100) else {
            panic!("seed {seed}: bad header at {}", wire.len() - w.len())
        };
        assert_eq!(h.mask.is_some(), role == Role::Client, "seed {seed}: mask");
        let len = h.payload_len as usize;
        assert!(w.len() >= n + len, "seed {seed}: cut frame");
        let mut payload = w[n..n + len].to_vec();
        if let Some(k) = h.mask {
            apply_mask(&mut payload, k, 0);
        }
        assert!(h.fin, "seed {seed}: unfragmented sends");
        frames.push((h.opcode as u8, h.rsv != 0, payload));
        w = &w[n + len..];
    }
    // Messages through the peer (inflated), up to its Close.
    let mut pw = wire[hs_left..].to_vec();
    let mut messages = Vec::new();
    let mut at = 0;
    loop {
        let (used, ev) = peer.poll_event(&mut pw[at..]);
        at += used;
        match ev {
            Some(Event::Message(Message::Text(t))) => messages.push((1u8, t.as_bytes().to_vec())),
            Some(Event::Message(Message::Binary(b))) => messages.push((2u8, b.to_vec())),
            Some(Event::Ping(_) | Event::Pong(_)) => {}
            Some(Event::Close { .. }) => break,
            Some(e) => panic!("seed {seed}: peer event {e:?}"),
            None => break,
        }
    }
    // Actual items.
    let mut actual = Vec::new();
    let mut mi = 0;
    for (op, _rsv, p) in frames {
        actual.push(match op {
            1 | 2 => {
                let m = messages[mi].clone();
                mi += 1;
                assert_eq!(m.0, op);
                Item::Data(m.0, m.1)
            }
            8 => Item::Close,
            9 => Item::UserPing(p),
            10 => Item::UserPong(p), // user pong or auto pong: matched below
            other => panic!("seed {seed}: opcode {other}"),
        });
    }
    // Match: every mandatory item in order; auto pongs optional, in place, the last one
    // present.
    let mut ai = 0;
    let mut last_auto_present = None;
    let (mut dropped, mut pongs) = (0, 0);
    for (ei, e) in expected.iter().enumerate() {
        let a = actual.get(ai);
        match e {
            Item::AutoPong(p) => {
                pongs += 1;
                dropped += 1;
                if a == Some(&Item::UserPong(p.clone())) {
                    ai += 1;
                    dropped -= 1;
                    last_auto_present = Some(ei);
                }
            }
            _ => {
                assert_eq!(
                    a,
                    Some(e),
                    "seed {seed}: item {ei} of {expected:?}\nactual {actual:?}"
                );
                ai += 1;
            }
        }
    }
    assert_eq!(ai, actual.len(), "seed {seed}: extra frames");
    // The last ping was answered.
    if let Some(last) = expected
        .iter()
        .rposition(|e| matches!(e, Item::AutoPong(_)))
    {
        assert_eq!(
            last_auto_present,
            Some(last),
            "seed {seed}: the last ping's pong"
        );
    }
    (dropped, pongs)
}

#[test]
fn pong_coalescing_keeps_the_output_a_valid_frame_stream() {
    let (mut dropped, mut pongs) = (0, 0);
    for seed in 0..200u64 {
        for (role, deflate, pending) in [
            (Role::Server, false, false),
            (Role::Server, false, true),
            (Role::Server, true, false),
            (Role::Client, false, false),
            (Role::Client, false, true),
            (Role::Client, true, false),
        ] {
            let (d, p) = run(seed * 7 + 1, role, deflate, pending);
            dropped += d;
            pongs += p;
        }
    }
    eprintln!("{dropped} of {pongs} pongs coalesced away");
    assert!(dropped > 0);
}
