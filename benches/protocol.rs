//! Criterion benchmarks for the sans-IO protocol layer.
//!
//! Groups (filter with `cargo bench --bench protocol -- <group>`):
//! - `unmask`: the word-at-a-time `apply_mask` against the scalar reference, at 64 B,
//!   4 KiB and 1 MiB, on an 8-byte-aligned slice and on one that starts a byte later;
//! - `utf8`: `Utf8Validator::feed` (whole, and in 1 KiB pieces) against
//!   `std::str::from_utf8` and `simdutf8::basic::from_utf8`, on ASCII and mixed text;
//! - `frame_parse`: a server `Driver` reading many masked client frames with `poll_event`
//!   (and a client reading a server's unmasked 20-byte frames, `client_1000x20B_binary`);
//!   `parse` times only `poll_event` (the pristine bytes are copied in untimed setup,
//!   because unmasking happens in place), `copy+parse` times the copy too, and `copy`
//!   times the copy alone, so parse cost and memcpy cost can be told apart;
//! - `frame_encode`: `send_text` + `consume_output` on a server and on a client (which masks);
//! - `handshake`: parse + validate + 101 response for the RFC 6455 §1.3 request, and
//!   `accept_key` alone.

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use websocket_driver::protocol::frame::{OpCode, write_frame};
use websocket_driver::protocol::handshake::{
    HeadLimits, RequestParser, accept_key, server_response, validate_request,
};
use websocket_driver::protocol::mask::{apply_mask, apply_mask_scalar, apply_mask_words};
use websocket_driver::protocol::utf8::Utf8Validator;
use websocket_driver::{Driver, Event, Message, Options, ReadyState};

use websocket_driver::protocol::frame::Status;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn size_label(n: usize) -> String {
    if n >= MIB {
        format!("{}MiB", n / MIB)
    } else if n >= KIB {
        format!("{}KiB", n / KIB)
    } else {
        format!("{n}B")
    }
}

/// Deterministic pseudo-random bytes (xorshift64), so runs are comparable.
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Where a copy's source lies relative to its destination, modulo a 4 KiB page.
///
/// Measured on the AMD EPYC (Zen 4) these benches were first run on, with glibc 2.36: a
/// `memcpy` of 4 KiB or more runs about 25 times slower (~4 GB/s instead of ~100) when the
/// destination is 1 to 15 bytes past the source modulo 4096, and at about half speed at 16
/// to 31. Where buffers land depends on the heap and on ASLR, so an unplaced 16 KiB copy
/// can be fast in one run and slow in the next. The benches that copy fix the distance at
/// half a page, away from that window.
const COPY_DISTANCE: usize = 2048;

/// Offset into a source buffer starting at `src_base` that puts the source
/// `COPY_DISTANCE` bytes (modulo 4096) before `dst`.
fn source_offset(src_base: *const u8, dst: *const u8) -> usize {
    (dst as usize)
        .wrapping_sub(src_base as usize)
        .wrapping_sub(COPY_DISTANCE)
        % 4096
}

/// Offset into a destination buffer starting at `dst_base` that puts the destination
/// `COPY_DISTANCE` bytes (modulo 4096) after `src`.
fn destination_offset(src: *const u8, dst_base: *const u8) -> usize {
    (src as usize)
        .wrapping_add(COPY_DISTANCE)
        .wrapping_sub(dst_base as usize)
        % 4096
}

// ----- unmask -----

fn bench_unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    for &len in &[64, 512, 4 * KIB, 16 * KIB, MIB] {
        group.throughput(Throughput::Bytes(len as u64));
        // A u64 backing store makes byte 0 8-byte aligned for sure; byte 1 then is not.
        let mut words = vec![0u64; len / 8 + 2];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        bytes.copy_from_slice(&pseudo_random(bytes.len(), 0x9e37_79b9_7f4a_7c15));
        for (align, start) in [("aligned", 0usize), ("unaligned", 1)] {
            let buf = &mut bytes[start..start + len];
            let label = format!("{}/{align}", size_label(len));
            group.bench_function(BenchmarkId::new("dispatched", &label), |b| {
                b.iter(|| apply_mask(black_box(&mut *buf), black_box(mask), 0))
            });
            group.bench_function(BenchmarkId::new("word", &label), |b| {
                b.iter(|| apply_mask_words(black_box(&mut *buf), black_box(mask), 0))
            });
            group.bench_function(BenchmarkId::new("scalar", &label), |b| {
                b.iter(|| apply_mask_scalar(black_box(&mut *buf), black_box(mask), 0))
            });
        }
    }
    group.finish();
}

// ----- UTF-8 -----

/// ASCII prose, exactly `len` bytes.
fn ascii_text(len: usize) -> Vec<u8> {
    let sample = b"The quick brown fox jumps over the lazy dog; WebSocket frames carry text. ";
    sample.iter().copied().cycle().take(len).collect()
}

/// Mixed text (ASCII, 2-, 3- and 4-byte sequences), exactly `len` bytes, valid UTF-8.
fn mixed_text(len: usize) -> Vec<u8> {
    let sample = "Hello, κόσμε! Привет мир. こんにちは世界 😀🚀 naïve café — ünïcödé ";
    let mut out = String::with_capacity(len);
    'fill: loop {
        for ch in sample.chars() {
            if out.len() + ch.len_utf8() > len {
                break 'fill;
            }
            out.push(ch);
        }
    }
    while out.len() < len {
        out.push('.');
    }
    out.into_bytes()
}

fn bench_utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    for &len in &[4 * KIB, MIB] {
        group.throughput(Throughput::Bytes(len as u64));
        for (kind, text) in [("ascii", ascii_text(len)), ("mixed", mixed_text(len))] {
            assert!(std::str::from_utf8(&text).is_ok());
            let label = format!("{kind}/{}", size_label(len));
            let text = &text[..];
            group.bench_function(BenchmarkId::new("validator_whole", &label), |b| {
                b.iter(|| {
                    let mut v = Utf8Validator::new();
                    v.feed(black_box(text)).unwrap();
                    assert!(v.is_complete());
                })
            });
            group.bench_function(BenchmarkId::new("validator_1KiB_pieces", &label), |b| {
                b.iter(|| {
                    let mut v = Utf8Validator::new();
                    for piece in black_box(text).chunks(KIB) {
                        v.feed(piece).unwrap();
                    }
                    assert!(v.is_complete());
                })
            });
            group.bench_function(BenchmarkId::new("std_from_utf8", &label), |b| {
                b.iter(|| std::str::from_utf8(black_box(text)).is_ok())
            });
            group.bench_function(BenchmarkId::new("simdutf8_basic", &label), |b| {
                b.iter(|| simdutf8::basic::from_utf8(black_box(text)).is_ok())
            });
        }
    }
    group.finish();
}

// ----- drivers -----

fn limits() -> HeadLimits {
    let o = Options::default();
    HeadLimits {
        max_size: o.max_handshake_size,
        max_headers: o.max_headers,
    }
}

/// A client and a server driver that completed a real handshake with each other, with
/// both output buffers drained and no events pending.
fn open_pair() -> (Driver, Driver) {
    open_pair_with(&Options::default())
}

fn open_pair_with(options: &Options) -> (Driver, Driver) {
    let options = options.clone();
    let mut client = Driver::make_client("ws://localhost/", &options).unwrap();
    assert!(client.start_connection());
    let request_bytes = client.pending_output().to_vec();
    client.consume_output(request_bytes.len());

    let mut parser = RequestParser::new(limits());
    let Ok(Status::Complete(request, used)) = parser.parse(&request_bytes) else {
        panic!("client request did not parse");
    };
    assert_eq!(used, request_bytes.len());
    let mut server = Driver::make_server(&request, &options).unwrap();
    assert!(server.start_connection());
    assert!(matches!(server.poll_event(&mut []), (0, Some(Event::Open))));
    assert!(server.poll_event(&mut []).1.is_none());
    let mut response = server.pending_output().to_vec();
    server.consume_output(response.len());

    let (used, event) = client.poll_event(&mut response);
    assert!(matches!(event, Some(Event::Open)));
    assert_eq!(used, response.len());
    assert!(client.poll_event(&mut []).1.is_none());
    assert_eq!(client.ready_state(), ReadyState::Open);
    assert_eq!(server.ready_state(), ReadyState::Open);
    assert!(client.pending_output().is_empty() && server.pending_output().is_empty());
    (client, server)
}

// ----- frame parsing -----

/// `count` masked client frames of `payload_len` bytes each, with a different key per frame.
fn client_frames(opcode: OpCode, count: usize, payload_len: usize) -> Vec<u8> {
    let payload = match opcode {
        OpCode::Text => ascii_text(payload_len),
        _ => pseudo_random(payload_len, 0x2545_f491_4f6c_dd1d),
    };
    let keys = pseudo_random(4 * count, 0xdead_beef_cafe_f00d);
    let mut buf = Vec::with_capacity(count * (payload_len + 14));
    for key in keys.chunks_exact(4) {
        write_frame(
            &mut buf,
            opcode,
            &payload,
            Some([key[0], key[1], key[2], key[3]]),
        );
    }
    buf
}

/// Feeds `input` to `server` and returns how many messages came out; panics on any other
/// event. The driver ends between frames, so it can read the next copy of the input.
fn read_all(server: &mut Driver, input: &mut [u8]) -> usize {
    let mut pos = 0;
    let mut messages = 0;
    loop {
        let (used, event) = server.poll_event(&mut input[pos..]);
        pos += used;
        match event {
            Some(Event::Message(m)) => {
                black_box(m.as_bytes());
                messages += 1;
            }
            None => break,
            Some(other) => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(pos, input.len());
    messages
}

fn bench_frame_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_parse");
    let cases = [
        ("1000x20B_text", OpCode::Text, 1000, 20),
        ("1000x1KiB_binary", OpCode::Binary, 1000, KIB),
        ("16x64KiB_binary", OpCode::Binary, 16, 64 * KIB),
    ];
    for (name, opcode, count, payload_len) in cases {
        let pristine = client_frames(opcode, count, payload_len);
        let (_client, mut server) = open_pair();

        // Sanity: the frames parse into `count` messages of the right kind.
        {
            let mut work = pristine.clone();
            let mut pos = 0;
            let mut seen = 0;
            while let (used, Some(event)) = server.poll_event(&mut work[pos..]) {
                pos += used;
                match event {
                    Event::Message(Message::Text(t)) if opcode == OpCode::Text => {
                        assert_eq!(t.len(), payload_len)
                    }
                    Event::Message(Message::Binary(b)) if opcode == OpCode::Binary => {
                        assert_eq!(b.len(), payload_len)
                    }
                    other => panic!("unexpected event {other:?}"),
                }
                seen += 1;
            }
            assert_eq!(seen, count);
        }

        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(BenchmarkId::new("parse", name), |b| {
            b.iter_batched_ref(
                || pristine.clone(),
                |work| assert_eq!(read_all(&mut server, work), count),
                BatchSize::LargeInput,
            )
        });
        // The working copy, placed so the timed memcpy is not the slow case (see
        // `COPY_DISTANCE`).
        let mut store = vec![0u8; pristine.len() + 4096];
        let at = destination_offset(pristine.as_ptr(), store.as_ptr());
        let work = &mut store[at..at + pristine.len()];
        assert_eq!(
            (work.as_ptr() as usize).wrapping_sub(pristine.as_ptr() as usize) % 4096,
            COPY_DISTANCE
        );
        group.bench_function(BenchmarkId::new("copy+parse", name), |b| {
            b.iter(|| {
                work.copy_from_slice(black_box(&pristine));
                assert_eq!(read_all(&mut server, work), count);
            })
        });
        group.bench_function(BenchmarkId::new("copy", name), |b| {
            b.iter(|| {
                work.copy_from_slice(black_box(&pristine));
                black_box(&mut *work);
            })
        });
    }
    // A client reading a server's unmasked frames: a pub/sub subscriber's load, many small
    // frames per read.
    let count = 1000;
    let mut pristine = Vec::with_capacity(count * 22);
    let payload = pseudo_random(20, 0x2545_f491_4f6c_dd1d);
    for _ in 0..count {
        write_frame(&mut pristine, OpCode::Binary, &payload, None);
    }
    let (mut client, _server) = open_pair();
    group.throughput(Throughput::Elements(count as u64));
    group.bench_function(BenchmarkId::new("parse", "client_1000x20B_binary"), |b| {
        b.iter_batched_ref(
            || pristine.clone(),
            |work| assert_eq!(read_all(&mut client, work), count),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

// ----- frame encoding -----

fn bench_frame_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode");
    group.throughput(Throughput::Elements(1));
    for &len in &[20, 16 * KIB] {
        let sample = String::from_utf8(mixed_text(len)).unwrap();
        let (mut client, mut server) = open_pair();
        for (role, driver) in [("server", &mut server), ("client", &mut client)] {
            // One send sizes the output buffer; it is then reused, so the payload's
            // destination stays put and the source can be placed against it.
            driver.send_text(&sample).unwrap();
            let out = driver.pending_output();
            let dst = out[out.len() - len..].as_ptr();
            driver.consume_output(out.len());
            let mut store = String::with_capacity(len + 4096);
            let at = source_offset(store.as_ptr(), dst);
            store.extend(std::iter::repeat_n(' ', at));
            store.push_str(&sample);
            let text = &store[at..];
            assert_eq!(
                (dst as usize).wrapping_sub(text.as_ptr() as usize) % 4096,
                COPY_DISTANCE
            );
            driver.send_text(text).unwrap();
            let out = driver.pending_output();
            assert_eq!(
                out[out.len() - len..].as_ptr(),
                dst,
                "the output buffer moved"
            );
            driver.consume_output(out.len());
            group.bench_function(BenchmarkId::new(role, size_label(len)), |b| {
                b.iter(|| {
                    driver.send_text(black_box(text)).unwrap();
                    let n = black_box(driver.pending_output()).len();
                    driver.consume_output(n);
                })
            });
        }
    }
    group.finish();
}

// ----- handshake -----

/// The opening handshake request of RFC 6455 §1.3.
const RFC_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\n\
Host: server.example.com\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Origin: http://example.com\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\n\
Sec-WebSocket-Version: 13\r\n\
\r\n";

fn server_handshake(request: &[u8]) -> Vec<u8> {
    let mut parser = RequestParser::new(limits());
    let Ok(Status::Complete(request, _)) = parser.parse(request) else {
        panic!("request did not parse");
    };
    let accept = validate_request(&request).unwrap();
    server_response(&accept, None, None, &[])
}

fn bench_handshake(c: &mut Criterion) {
    let response = String::from_utf8(server_handshake(RFC_REQUEST)).unwrap();
    assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse+validate+response", |b| {
        b.iter(|| server_handshake(black_box(RFC_REQUEST)))
    });
    group.bench_function("accept_key", |b| {
        b.iter(|| accept_key(black_box("dGhlIHNhbXBsZSBub25jZQ==")))
    });
    group.finish();
}

// ----- permessage-deflate -----

/// A JSON-like text of `len` bytes (what deflate is for).
fn json_text(len: usize) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < len {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user{}\",\"text\":\"hello, world\",\"ok\":true}},",
            i % 13
        ));
        i += 1;
    }
    s.truncate(len);
    s
}

/// Server CPU per 1 KiB JSON message: sending plain, compressed without context (the
/// thread's shared compressor, reset per message) and with context takeover; receiving a
/// client's compressed message (the shared decompressor).
fn bench_deflate(c: &mut Criterion) {
    use websocket_driver::protocol::deflate::DeflateOptions;
    let mut group = c.benchmark_group("deflate");
    let text = json_text(1024);
    group.throughput(Throughput::Bytes(text.len() as u64));
    let takeover = DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        ..DeflateOptions::default()
    };
    for (name, options) in [
        ("plain", Options::default()),
        ("no_context", Options::default().deflate(true)),
        (
            "context_takeover",
            Options::default().deflate_options(takeover),
        ),
        (
            "no_context_level1",
            Options::default().deflate_options(DeflateOptions {
                level: 1,
                ..DeflateOptions::default()
            }),
        ),
    ] {
        let (mut client, mut server) = open_pair_with(&options);
        server.send_text(&text).unwrap();
        let wire = server.pending_output().len();
        server.consume_output(wire);
        println!("deflate/{name}: 1 KiB JSON goes out as {wire} bytes");
        group.bench_function(BenchmarkId::new("send_1KiB_json", name), |b| {
            b.iter(|| {
                server.send_text(black_box(&text)).unwrap();
                let n = server.pending_output().len();
                server.consume_output(n);
            })
        });
        client.send_text(&text).unwrap();
        let frame = client.pending_output().to_vec();
        client.consume_output(frame.len());
        if name == "context_takeover" {
            continue; // each message depends on the last: not replayable
        }
        group.bench_function(BenchmarkId::new("receive_1KiB_json", name), |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |input| assert_eq!(read_all(&mut server, input), 1),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    // A 256 KiB JSON text compressed (no context takeover) and fed in 16 KiB reads: it is
    // inflated read by read, through the thread's spare inflate stream.
    let mut group = c.benchmark_group("deflate_pieces");
    let text = json_text(256 * 1024);
    group.throughput(Throughput::Bytes(text.len() as u64));
    let (mut client, mut server) = open_pair_with(&Options::default().deflate(true));
    client.send_text(&text).unwrap();
    let frame = client.pending_output().to_vec();
    client.consume_output(frame.len());
    group.bench_function("receive_256KiB_json_in_16KiB_reads", |b| {
        b.iter_batched_ref(
            || frame.clone(),
            |input| {
                let mut messages = 0;
                for piece in input.chunks_mut(16 * 1024) {
                    messages += read_all(&mut server, piece);
                }
                assert_eq!(messages, 1);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

// ----- echoing a large message -----

/// A 1 MiB message arrives in 64 KiB reads (each copied into a reused read buffer, as a
/// reactor's receive would leave it), is reassembled by the server driver and echoed, and
/// the reply is taken as a gathered write would take it. `copy` echoes with
/// `send_message(&message)` (the payload is copied into the output), `by_value` with
/// `send_message_owned(message)` (the reassembled buffer itself is written).
fn bench_echo_large(c: &mut Criterion) {
    const READ: usize = 64 * 1024;
    let mut group = c.benchmark_group("echo_large");
    for len in [256 * 1024, 1 << 20] {
        let frame = client_frames(OpCode::Binary, 1, len);
        group.throughput(Throughput::Bytes(len as u64));
        for by_value in [false, true] {
            let (_client, mut server) = open_pair();
            let mut read_buf = vec![0u8; READ];
            let name = if by_value { "by_value" } else { "copy" };
            group.bench_function(BenchmarkId::new(name, size_label(len)), |b| {
                b.iter(|| {
                    let mut echoed = 0;
                    for chunk in frame.chunks(READ) {
                        let input = &mut read_buf[..chunk.len()];
                        input.copy_from_slice(chunk);
                        let mut pos = 0;
                        loop {
                            let (used, event) = server.poll_event(&mut input[pos..]);
                            pos += used;
                            match event {
                                Some(Event::Message(m)) => {
                                    if by_value {
                                        server.send_message_owned(m).unwrap();
                                    } else {
                                        server.send_message(&m).unwrap();
                                    }
                                    echoed += 1;
                                }
                                None => break,
                                Some(other) => panic!("unexpected event {other:?}"),
                            }
                        }
                    }
                    let mut parts = [std::io::IoSlice::new(&[]); 4];
                    let n = server.pending_output_vectored(&mut parts);
                    let total: usize = parts[..n].iter().map(|p| black_box(p.len())).sum();
                    server.consume_output(total);
                    assert_eq!((echoed, server.buffered_amount()), (1, 0));
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_echo_large,
    bench_unmask,
    bench_utf8,
    bench_frame_parse,
    bench_frame_encode,
    bench_handshake,
    bench_deflate
);
criterion_main!(benches);
