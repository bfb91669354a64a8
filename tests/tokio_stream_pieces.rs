//! `WebSocketStream`'s read path against arbitrary arrival: a client's frames (masked with
//! any key, the all-zero key included; messages whole or in fragments, pings between) reach
//! the stream in reads of every size, with a `Pending` read between reads and each
//! `recv`/`next` dropped whenever it is pending (the two mixed from poll to poll, so a frame
//! begun by one is finished by the other), under read buffers from 1 byte to 64 KiB.
//! Whatever the cuts, every message and ping comes out once, whole and in order, and the
//! echoes written back parse, on the client, as the same messages. This covers the paths a
//! cut decides between: a frame parsed by the driver piece by piece, a binary frame read
//! whole into the read buffer, the rest of a larger frame received straight into its
//! message's buffer, a whole text frame parsed by `recv` itself, and queued events.
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

/// What the client sends: a data message (in `fragments` frames) or a ping.
#[derive(Debug, Clone)]
enum Sent {
    Data {
        text: bool,
        payload: Vec<u8>,
        fragments: usize,
    },
    Ping(Vec<u8>),
}

/// A masked client frame, as a client writes it.
fn client_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8], key: [u8; 4]) {
    let mut head = [0u8; MAX_HEADER_LEN];
    let h = encode_header(
        &mut head,
        &FrameHeader {
            fin,
            rsv: 0,
            opcode,
            mask: Some(key),
            payload_len: payload.len() as u64,
        },
    );
    out.extend_from_slice(&head[..h]);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, 0);
}

/// The wire for `sent`, keys taken in turn from `keys`.
fn wire(sent: &[Sent], keys: &[[u8; 4]]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut key = keys.iter().cycle();
    for s in sent {
        match s {
            Sent::Ping(p) => client_frame(&mut out, true, OpCode::Ping, p, *key.next().unwrap()),
            Sent::Data {
                text,
                payload,
                fragments,
            } => {
                let pieces = (*fragments).clamp(1, payload.len().max(1));
                let step = payload.len().div_ceil(pieces).max(1);
                let mut chunks: Vec<&[u8]> = payload.chunks(step).collect();
                if chunks.is_empty() {
                    chunks.push(&[]);
                }
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.iter().enumerate() {
                    let opcode = match (i, text) {
                        (0, true) => OpCode::Text,
                        (0, false) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    client_frame(&mut out, i == last, opcode, chunk, *key.next().unwrap());
                }
            }
        }
    }
    out
}

fn sent_strategy() -> impl Strategy<Value = Sent> {
    let size = prop_oneof![
        12 => 0usize..200,
        6 => 200usize..5_000,
        1 => 5_000usize..70_000,
    ];
    prop_oneof![
        8 => (any::<bool>(), size, 1usize..4, any::<u64>()).prop_map(
            |(text, len, fragments, seed)| {
                // Text cycles through 1-, 2-, 3- and 4-byte characters, so fragments and
                // reads cut characters.
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
                    (0..len).map(|i| (i as u64 ^ seed) as u8).collect()
                };
                Sent::Data {
                    text,
                    payload,
                    fragments,
                }
            }
        ),
        1 => proptest::collection::vec(any::<u8>(), 0..126).prop_map(Sent::Ping),
    ]
}

fn key_strategy() -> impl Strategy<Value = [u8; 4]> {
    prop_oneof![3 => any::<[u8; 4]>(), 1 => Just([0u8; 4])]
}

/// Runs the stream over `sent` cut by `cuts`, each poll with `recv` (echoing each message
/// through its `Reply`) or `next` (echoing through `send_message`) as `apis` says in turn
/// (`true`: `recv`), so a frame may be begun by one and finished by the other; returns
/// what came out and what the client parsed from the stream's writes.
fn run(
    sent: &[Sent],
    keys: &[[u8; 4]],
    cuts: &[usize],
    config: &Config,
    apis: &[bool],
) -> (Vec<Sent>, Vec<Message<'static>>) {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    let transport = Arrival::new(wire(sent, keys), cuts.to_vec());
    let mut ws = WebSocketStream::from_driver(transport, server, &[], config);
    let mut api = apis.iter().cycle();
    let got = arrival::drive(
        &mut ws,
        |ws| {
            if *api.next().unwrap() {
                match ws.recv().now_or_never() {
                    Some(Some((event, mut reply))) => {
                        if let Event::Message(m) = &event {
                            reply.send_message(m).expect("open");
                        }
                        Some(Some(to_sent(&event)))
                    }
                    Some(None) => Some(None),
                    None => None,
                }
            } else {
                match ws.next().now_or_never() {
                    Some(Some(event)) => {
                        let out = to_sent(&event);
                        if let Event::Message(m) = event {
                            ws.send_message(m)
                                .now_or_never()
                                .expect("a send under the limit does not wait")
                                .expect("open");
                        }
                        Some(Some(out))
                    }
                    Some(None) => Some(None),
                    None => None,
                }
            }
        },
        |got| got.len() >= sent.len(),
    );
    // Everything arrived: the next poll writes what the last answers queued.
    let _ = ws.next().now_or_never();
    let mut written = std::mem::take(&mut ws.get_mut().written);
    let mut echoed = Vec::new();
    let mut at = 0;
    loop {
        let (used, event) = client.poll_event(&mut written[at..]);
        at += used;
        match event {
            Some(Event::Message(m)) => echoed.push(m.into_owned()),
            Some(Event::Pong(_)) => {}
            Some(other) => panic!("the client got {other:?}"),
            None => break,
        }
    }
    (got, echoed)
}

/// An event as what the client sent (`None` for `Open`, which may come first).
fn to_sent(event: &Event<'_>) -> Option<Sent> {
    match event {
        Event::Open => None,
        Event::Message(Message::Text(t)) => Some(Sent::Data {
            text: true,
            payload: t.as_bytes().to_vec(),
            fragments: 0,
        }),
        Event::Message(Message::Binary(b)) => Some(Sent::Data {
            text: false,
            payload: b.to_vec(),
            fragments: 0,
        }),
        Event::Ping(p) => Some(Sent::Ping(p.to_vec())),
        other => panic!("the stream gave {other:?}"),
    }
}

fn same(a: &Sent, b: &Sent) -> bool {
    match (a, b) {
        (
            Sent::Data {
                text: ta,
                payload: pa,
                ..
            },
            Sent::Data {
                text: tb,
                payload: pb,
                ..
            },
        ) => ta == tb && pa == pb,
        (Sent::Ping(a), Sent::Ping(b)) => a == b,
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_comes_out_once_whole_and_in_order_however_it_arrives(
        sent in proptest::collection::vec(sent_strategy(), 1..12),
        keys in proptest::collection::vec(key_strategy(), 1..6),
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
    ) {
        let config = Config::default().read_buffer_size(read_buffer);
        let (got, echoed) = run(&sent, &keys, &cuts, &config, &apis);
        prop_assert_eq!(got.len(), sent.len(), "events out");
        for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
            prop_assert!(same(g, s), "event {} differs", i);
        }
        let messages: Vec<&Sent> = sent.iter().filter(|s| matches!(s, Sent::Data { .. })).collect();
        prop_assert_eq!(echoed.len(), messages.len(), "echoes");
        for (i, (m, s)) in echoed.iter().zip(messages).enumerate() {
            let m = to_sent(&Event::Message(m.clone())).unwrap();
            prop_assert!(same(&m, s), "echo {} differs", i);
        }
    }
}

/// The case the property found (when the stream unmasked frames it read whole ahead of
/// the driver): a binary frame too large to read whole whose header arrives cut. The
/// stream reads the rest of the header itself, and the driver must then unmask the whole
/// payload; the rest had come out masked.
#[test]
fn a_frame_too_large_to_read_whole_with_a_cut_header_is_unmasked_whole() {
    let payload: Vec<u8> = (0..100u8).collect();
    let sent = [Sent::Data {
        text: false,
        payload,
        fragments: 1,
    }];
    let config = Config::default().read_buffer_size(64);
    for borrow in [false, true] {
        let (got, echoed) = run(&sent, &[[1, 2, 3, 4]], &[1], &config, &[borrow]);
        assert_eq!(got.len(), 1);
        assert!(same(&got[0], &sent[0]), "borrow {borrow}: {:?}", got[0]);
        assert_eq!(echoed.len(), 1);
    }
}
