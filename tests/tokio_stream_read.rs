//! The read path of `WebSocketStream` with permessage-deflate, a client stream
//! (unmasked frames), control frames between fragments and `max_length` at its limit,
//! under arbitrary cuts and `recv`/`next` mixed.
#![cfg(feature = "tokio")]

mod arrival;
mod common;

use arrival::Arrival;

use futures_util::FutureExt;
use proptest::prelude::*;
use websocket_driver::protocol::frame::{FrameHeader, MAX_HEADER_LEN, OpCode, encode_header};
use websocket_driver::protocol::mask::apply_mask;
use websocket_driver::tokio::{Config, WebSocketStream};
use websocket_driver::{Event, Message, Options};

#[derive(Debug, Clone, PartialEq)]
enum Got {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Other(String),
}

#[derive(Debug, Clone)]
struct Sent {
    text: bool,
    payload: Vec<u8>,
    fragments: usize,
    compressed: bool,
    /// A control frame between the first and second fragment (true: ping, false: pong).
    between: Option<(bool, Vec<u8>)>,
}

fn frame(
    out: &mut Vec<u8>,
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    payload: &[u8],
    key: Option<[u8; 4]>,
) {
    let mut head = [0u8; MAX_HEADER_LEN];
    let h = encode_header(
        &mut head,
        &FrameHeader {
            fin,
            rsv: if rsv1 { 0b100 } else { 0 },
            opcode,
            mask: key,
            payload_len: payload.len() as u64,
        },
    );
    out.extend_from_slice(&head[..h]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = key {
        apply_mask(&mut out[start..], key, 0);
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    loop {
        let before_in = c.total_in() as usize;
        out.reserve(1024);
        c.compress_vec(&data[before_in..], &mut out, FlushCompress::Sync)
            .unwrap();
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn wire(sent: &[Sent], keys: &[[u8; 4]], masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut key = keys.iter().cycle();
    let mut k = || {
        if masked {
            Some(*key.next().unwrap())
        } else {
            None
        }
    };
    for s in sent {
        let body = if s.compressed {
            deflate(&s.payload)
        } else {
            s.payload.clone()
        };
        let pieces = s.fragments.clamp(1, body.len().max(1));
        let step = body.len().div_ceil(pieces).max(1);
        let mut chunks: Vec<&[u8]> = body.chunks(step).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = match (i, s.text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            frame(
                &mut out,
                i == last,
                i == 0 && s.compressed,
                opcode,
                chunk,
                k(),
            );
            if i == 0
                && let Some((ping, p)) = &s.between
            {
                let op = if *ping { OpCode::Ping } else { OpCode::Pong };
                frame(&mut out, true, false, op, p, k());
            }
        }
    }
    out
}

fn expected(sent: &[Sent]) -> Vec<Got> {
    let mut out = Vec::new();
    for s in sent {
        let body_len = if s.compressed {
            deflate(&s.payload).len()
        } else {
            s.payload.len()
        };
        let pieces = s.fragments.clamp(1, body_len.max(1));
        if pieces > 1
            && let Some((ping, p)) = &s.between
        {
            out.push(if *ping {
                Got::Ping(p.clone())
            } else {
                Got::Pong(p.clone())
            });
        }
        out.push(if s.text {
            Got::Text(s.payload.clone())
        } else {
            Got::Binary(s.payload.clone())
        });
        if pieces <= 1
            && let Some((ping, p)) = &s.between
        {
            out.push(if *ping {
                Got::Ping(p.clone())
            } else {
                Got::Pong(p.clone())
            });
        }
    }
    out
}

fn got(event: &Event<'_>) -> Option<Got> {
    Some(match event {
        Event::Open => return None,
        Event::Message(Message::Text(t)) => Got::Text(t.as_bytes().to_vec()),
        Event::Message(Message::Binary(b)) => Got::Binary(b.to_vec()),
        Event::Ping(p) => Got::Ping(p.to_vec()),
        Event::Pong(p) => Got::Pong(p.to_vec()),
        other => Got::Other(format!("{other:?}")),
    })
}

struct Setup {
    client_stream: bool,
    deflate: bool,
    max_length: Option<usize>,
    read_buffer: usize,
    eof: bool,
}

fn run(sent: &[Sent], keys: &[[u8; 4]], cuts: &[usize], setup: &Setup, apis: &[bool]) -> Vec<Got> {
    run_input(wire(sent, keys, !setup.client_stream), cuts, setup, apis)
}

fn run_input(input: Vec<u8>, cuts: &[usize], setup: &Setup, apis: &[bool]) -> Vec<Got> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut local = Options::default().deflate(setup.deflate);
    if let Some(m) = setup.max_length {
        local = local.max_length(m);
    }
    let peer = Options::default().deflate(setup.deflate);
    let driver = if setup.client_stream {
        common::open_pair(&local, &peer).0
    } else {
        common::open_pair(&peer, &local).1
    };
    let transport = Arrival {
        eof: setup.eof,
        fail: FAIL.with(|f| f.get()),
        ..Arrival::new(input, cuts.to_vec())
    };
    let config = Config::default().read_buffer_size(setup.read_buffer);
    let mut ws = WebSocketStream::from_driver(transport, driver, &[], &config);
    let mut api = apis.iter().cycle();
    arrival::drive(
        &mut ws,
        |ws| {
            if *api.next().unwrap() {
                match ws.recv().now_or_never() {
                    Some(Some((event, _reply))) => Some(Some(got(&event))),
                    Some(None) => Some(None),
                    None => None,
                }
            } else {
                match ws.next().now_or_never() {
                    Some(Some(event)) => Some(Some(got(&event))),
                    Some(None) => Some(None),
                    None => None,
                }
            }
        },
        |_| false,
    )
}

fn sent_strategy(deflate: bool) -> impl Strategy<Value = Sent> {
    let size = prop_oneof![6 => 0usize..200, 4 => 200usize..5_000, 1 => 5_000usize..70_000];
    (
        any::<bool>(),
        size,
        1usize..4,
        any::<u64>(),
        any::<bool>(),
        proptest::option::of((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..20))),
    )
        .prop_map(move |(text, len, fragments, seed, compressed, between)| {
            let payload = if text {
                let chars = ['a', 'é', '€', '𝄞'];
                let mut s = String::new();
                let mut k = seed as usize;
                while s.len() < len {
                    s.push(chars[k % 4]);
                    k = k.wrapping_mul(31).wrapping_add(7);
                }
                s.into_bytes()
            } else {
                (0..len)
                    .map(|i| ((i as u64).wrapping_mul(seed | 1) >> 3) as u8)
                    .collect()
            };
            Sent {
                text,
                payload,
                fragments,
                compressed: deflate && compressed,
                between,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_once_whole_in_order(
        deflate in any::<bool>(),
        client_stream in any::<bool>(),
        sent_seed in proptest::collection::vec(sent_strategy(true), 1..8),
        keys in proptest::collection::vec(any::<[u8; 4]>(), 1..6),
        cuts in proptest::collection::vec(
            prop_oneof![1 => 1usize..16, 2 => 16usize..3_000, 2 => 3_000usize..80_000],
            1..8,
        ),
        read_buffer in prop_oneof![1 => 1usize..20, 4 => prop_oneof![Just(64usize), Just(1_000), Just(4_096), Just(65_536)]],
        apis in prop_oneof![
            1 => Just(vec![true]),
            1 => Just(vec![false]),
            2 => proptest::collection::vec(any::<bool>(), 2..6),
        ],
        exact_max in any::<bool>(),
    ) {
        let sent: Vec<Sent> = sent_seed.into_iter().map(|mut s| { s.compressed &= deflate; s }).collect();
        let max_length = exact_max.then(|| sent.iter().map(|s| s.payload.len()).max().unwrap().max(1));
        let setup = Setup { client_stream, deflate, max_length, read_buffer, eof: false };
        let out = run(&sent, &keys, &cuts, &setup, &apis);
        let want = expected(&sent);
        prop_assert_eq!(out.len(), want.len(), "events out: {:?}", out.iter().map(|g| match g { Got::Other(s) => s.clone(), _ => String::from("ok") }).collect::<Vec<_>>());
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            prop_assert!(g == w, "event {} differs", i);
        }
    }
}

/// `max_length` at its limit and one past, through every path (whole frame, driver
/// pieces, payload loan), compressed or not, fragmented or not, text or binary.
#[test]
fn max_length_at_limit_and_one_past() {
    let max = 3_000usize;
    for deflate in [false, true] {
        for client_stream in [false, true] {
            for text in [false, true] {
                for fragments in [1usize, 2, 3] {
                    for len in [max, max + 1] {
                        for read_buffer in [7usize, 64, 1_000, 2_999, 3_000, 3_001, 4_096, 65_536] {
                            for cut in [1usize, 13, 500, 3_008, 100_000] {
                                for apis in [vec![true], vec![false], vec![true, false]] {
                                    let payload = if text {
                                        "a".repeat(len).into_bytes()
                                    } else {
                                        vec![7u8; len]
                                    };
                                    let sent = [Sent {
                                        text,
                                        payload,
                                        fragments,
                                        compressed: deflate,
                                        between: None,
                                    }];
                                    let setup = Setup {
                                        client_stream,
                                        deflate,
                                        max_length: Some(max),
                                        read_buffer,
                                        eof: false,
                                    };
                                    let out = run(&sent, &[[1, 2, 3, 4]], &[cut], &setup, &apis);
                                    let ctx = format!(
                                        "deflate {deflate} client {client_stream} text {text} fragments {fragments} len {len} rb {read_buffer} cut {cut} apis {apis:?}: {out:?}"
                                    );
                                    let ctx = &ctx[..ctx.len().min(600)];
                                    if len == max {
                                        assert_eq!(out.len(), 1, "{ctx}");
                                        assert_eq!(out, expected(&sent), "{ctx}");
                                    } else {
                                        assert_eq!(out.len(), 2, "{ctx}");
                                        let Got::Other(e) = &out[0] else {
                                            panic!("{ctx}")
                                        };
                                        assert!(e.contains("Error"), "{ctx}");
                                        let Got::Other(c) = &out[1] else {
                                            panic!("{ctx}")
                                        };
                                        assert!(c.contains("1009"), "{ctx}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The transport ends at every point of a message: no message, an error, then 1006.
#[test]
fn eof_in_mid_frame() {
    struct P;
    impl Drop for P {
        fn drop(&mut self) {
            eprintln!("runs {}", RUNS.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    let _p = P;
    for deflate in [false, true] {
        for client_stream in [false, true] {
            for text in [false, true] {
                for (len, fail) in [
                    (10usize, false),
                    (200, false),
                    (70_000, false),
                    (10, true),
                    (200, true),
                    (70_000, true),
                ] {
                    let payload = if text {
                        "é".repeat(len / 2).into_bytes()
                    } else {
                        vec![7u8; len]
                    };
                    let sent = [Sent {
                        text,
                        payload,
                        fragments: 2,
                        compressed: deflate,
                        between: Some((true, vec![1, 2])),
                    }];
                    let full = wire(&sent, &[[9, 8, 7, 6]], !client_stream);
                    let step = (full.len() / 40).max(1);
                    for read_buffer in [5usize, 64, 4_096, 65_536] {
                        for apis in [vec![true], vec![false], vec![true, false]] {
                            let mut at = 1;
                            while at < full.len() {
                                let setup = Setup {
                                    client_stream,
                                    deflate,
                                    max_length: None,
                                    read_buffer,
                                    eof: true,
                                };
                                FAIL.with(|f| f.set(fail));
                                let out = run_input(
                                    full[..at].to_vec(),
                                    &[1_000, 3, 50_000],
                                    &setup,
                                    &apis,
                                );
                                let ctx = format!(
                                    "deflate {deflate} client {client_stream} text {text} len {len} rb {read_buffer} at {at}/{} apis {apis:?}: {out:?}",
                                    full.len()
                                );
                                let ctx = &ctx[..ctx.len().min(600)];
                                let n = out.len();
                                assert!(n >= 2, "{ctx}");
                                assert!(
                                    matches!(&out[n - 2], Got::Other(e) if e.contains("Error") && (!fail || e.contains("transport reset"))),
                                    "{ctx}"
                                );
                                assert!(
                                    matches!(&out[n - 1], Got::Other(c) if c.contains("1006")),
                                    "{ctx}"
                                );
                                assert!(
                                    out[..n - 2].iter().all(|g| matches!(g, Got::Ping(_))),
                                    "{ctx}"
                                );
                                at += step;
                                RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }
    }
}
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Binary frames of a read buffer's size and twice it, and one either side, followed by
/// more messages, cut at every size, with `recv`, `next` and both.
#[test]
fn frames_at_the_read_buffer_limits() {
    for client_stream in [false, true] {
        let head = if client_stream { 2 } else { 6 };
        for b in [16usize, 64, 130, 200] {
            for total in [b - 1, b, b + 1, 2 * b - 1, 2 * b, 2 * b + 1, 3 * b] {
                let len = total - head - if total - head >= 126 { 2 } else { 0 };
                for fragments in [1usize, 2] {
                    let sent = [
                        Sent {
                            text: false,
                            payload: (0..len).map(|i| i as u8).collect(),
                            fragments,
                            compressed: false,
                            between: Some((true, vec![5])),
                        },
                        Sent {
                            text: true,
                            payload: "€".repeat(len / 3 + 1).into_bytes(),
                            fragments: 1,
                            compressed: false,
                            between: None,
                        },
                        Sent {
                            text: false,
                            payload: (0..len).map(|i| (i * 7) as u8).collect(),
                            fragments: 1,
                            compressed: false,
                            between: None,
                        },
                    ];
                    for cut in 1..(2 * b + 3) {
                        for apis in [
                            vec![true],
                            vec![false],
                            vec![true, false],
                            vec![false, true, true],
                        ] {
                            let setup = Setup {
                                client_stream,
                                deflate: false,
                                max_length: None,
                                read_buffer: b,
                                eof: false,
                            };
                            let out = run(
                                &sent,
                                &[[1, 2, 3, 4], [0xff, 0, 0x80, 1]],
                                &[cut, cut + 1, 1],
                                &setup,
                                &apis,
                            );
                            assert_eq!(
                                out,
                                expected(&sent),
                                "client {client_stream} b {b} total {total} frag {fragments} cut {cut} apis {apis:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
thread_local! { static FAIL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
