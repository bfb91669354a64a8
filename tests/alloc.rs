//! Memory use under hostile input, measured with a counting global allocator.
//!
//! Only allocations made by a thread while it is measuring are counted, and the tests take
//! a lock, so the measurements stay single-threaded even under the parallel test runner.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;

use common::{MASK, client_frame, open_server};
use websocket_driver::protocol::driver::EAGER_RESERVE;
use websocket_driver::protocol::frame::Status;
use websocket_driver::protocol::handshake::HeadLimits;
use websocket_driver::{Driver, Error, Event, Message, Options, ProtocolError, RequestParser};

struct Counting;

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    allocs: usize,
    allocated: usize,
    live: isize,
    peak: isize,
}

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static STATS: Cell<Stats> = const { Cell::new(Stats { allocs: 0, allocated: 0, live: 0, peak: 0 }) };
}

fn record(grow: usize, shrink: usize, new_block: bool) {
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let _ = STATS.try_with(|s| {
                let mut st = s.get();
                if new_block {
                    st.allocs += 1;
                }
                st.allocated += grow;
                st.live += grow as isize - shrink as isize;
                st.peak = st.peak.max(st.live);
                s.set(st);
            });
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size(), 0, true);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size(), 0, true);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(0, layout.size(), false);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size, layout.size(), true);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

/// One measuring test at a time; a failed test does not stop the others.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` and returns what it allocated on this thread (peak and live relative to the start).
fn measure<T>(f: impl FnOnce() -> T) -> (T, Stats) {
    STATS.with(|s| s.set(Stats::default()));
    MEASURING.with(|m| m.set(true));
    let result = f();
    MEASURING.with(|m| m.set(false));
    (result, STATS.with(Cell::get))
}

/// What an event was, without keeping (or copying) its payload.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Open,
    Message {
        text: bool,
        len: usize,
        capacity: Option<usize>,
    },
    Ping,
    Pong,
    Error(Option<ProtocolError>),
    Close(u16),
}

fn kind(event: Event<'_>) -> Kind {
    match event {
        Event::Open => Kind::Open,
        Event::Message(m) => {
            let text = m.is_text();
            let len = m.as_bytes().len();
            let capacity = match m {
                Message::Text(std::borrow::Cow::Owned(s)) => Some(s.capacity()),
                Message::Binary(std::borrow::Cow::Owned(b)) => Some(b.capacity()),
                _ => None,
            };
            Kind::Message {
                text,
                len,
                capacity,
            }
        }
        Event::Ping(_) => Kind::Ping,
        Event::Pong(_) => Kind::Pong,
        Event::Error(Error::Protocol(e)) => Kind::Error(Some(e)),
        Event::Error(_) => Kind::Error(None),
        Event::Close { code, .. } => Kind::Close(code),
    }
}

/// Feeds one read, allocating nothing itself beyond `out` (which has room reserved).
fn feed_into(driver: &mut Driver, input: &mut [u8], out: &mut Vec<Kind>) {
    let mut at = 0;
    loop {
        let (used, event) = driver.poll_event(&mut input[at..]);
        at += used;
        match event {
            None => return,
            Some(e) => out.push(kind(e)),
        }
    }
}

fn header_2_62() -> Vec<u8> {
    let mut bytes = vec![0x82, 0xff];
    bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
    bytes.extend_from_slice(&MASK);
    bytes
}

#[test]
fn header_declaring_2_pow_62_bytes_costs_no_allocation() {
    let _serial = serial();
    let max_length = Options::default().max_length;
    let mut server = open_server(&Options::default());
    let mut input = header_2_62();
    input.extend_from_slice(&[0u8; 64]); // some payload, too
    let mut events = Vec::with_capacity(8);
    let ((), stats) = measure(|| feed_into(&mut server, &mut input, &mut events));
    println!("2^62 header: {stats:?}");
    assert_eq!(
        events,
        vec![
            Kind::Error(Some(ProtocolError::MessageTooLarge {
                len: 1 << 62,
                max: max_length
            })),
            Kind::Close(1009)
        ]
    );
    assert!(
        stats.allocated < 1024,
        "allocated {} bytes for a header",
        stats.allocated
    );
    assert!(stats.peak < 1024);
}

/// A frame within `max_length` that declares a large payload but sends one byte must not
/// make the driver reserve the declared size: 15 bytes from the peer would pin 64 MiB per
/// connection, and with a `max_length` above what the allocator can give (e.g.
/// `usize::MAX` for "no limit") the reservation aborts the process.
#[test]
fn declared_length_is_not_preallocated() {
    let _serial = serial();
    let mut server = open_server(&Options::default());
    let mut input = vec![0x82, 0xff];
    input.extend_from_slice(&(Options::default().max_length as u64).to_be_bytes());
    input.extend_from_slice(&MASK);
    input.push(0);
    let mut events = Vec::with_capacity(8);
    let ((), stats) = measure(|| feed_into(&mut server, &mut input, &mut events));
    println!("64 MiB declared, 1 byte sent: {stats:?}");
    assert_eq!(events, vec![]);
    assert!(
        stats.peak < 1 << 20,
        "one payload byte made the driver hold {} bytes",
        stats.peak
    );
}

/// A frame that ends within `EAGER_RESERVE` bytes gets its whole buffer when its first
/// bytes arrive (a 1 MiB message is assembled without a copy as it grows); one byte more
/// and the buffer grows from what arrived, so a peer that declares and sends little makes
/// a connection reserve at most `EAGER_RESERVE`.
#[test]
fn a_frame_within_the_eager_reserve_is_reserved_at_once_and_one_byte_more_is_not() {
    let _serial = serial();
    let peak_after_one_byte = |declared: u64| {
        let mut server = open_server(&Options::default());
        let mut input = vec![0x82, 0xff];
        input.extend_from_slice(&declared.to_be_bytes());
        input.extend_from_slice(&MASK);
        input.push(0);
        let mut events = Vec::with_capacity(8);
        let ((), stats) = measure(|| feed_into(&mut server, &mut input, &mut events));
        assert_eq!(events, vec![]);
        stats.peak
    };
    let at = peak_after_one_byte(EAGER_RESERVE as u64);
    assert!(
        at >= EAGER_RESERVE as isize,
        "declared {EAGER_RESERVE}: held {at}"
    );
    assert!(
        at < EAGER_RESERVE as isize + 4096,
        "declared {EAGER_RESERVE}: held {at}"
    );
    let over = peak_after_one_byte(EAGER_RESERVE as u64 + 1);
    assert!(
        over < 4096,
        "declared {} bytes: held {over}",
        EAGER_RESERVE + 1
    );
}

/// A message of exactly `EAGER_RESERVE` bytes arriving in 64 KiB reads is assembled in
/// one allocation, never reallocated.
#[test]
fn a_message_within_the_eager_reserve_is_assembled_without_reallocation() {
    let _serial = serial();
    let mut server = open_server(&Options::default());
    let payload = vec![7u8; EAGER_RESERVE];
    let mut frame = common::masked(websocket_driver::protocol::frame::OpCode::Binary, &payload);
    let mut events = Vec::with_capacity(8);
    let ((), stats) = measure(|| {
        for chunk in frame.chunks_mut(64 * 1024) {
            feed_into(&mut server, chunk, &mut events);
        }
    });
    assert_eq!(
        events,
        vec![Kind::Message {
            text: false,
            len: EAGER_RESERVE,
            capacity: Some(EAGER_RESERVE)
        }]
    );
    // One buffer of the message's size (plus the small reassembly state), not a chain of
    // doublings (64 KiB + 128 KiB + … + 1 MiB: about twice the message).
    assert!(
        stats.allocated < EAGER_RESERVE + 4096,
        "allocated {} bytes: {stats:?}",
        stats.allocated
    );
}

#[test]
fn continuation_flood_does_not_grow_memory() {
    let _serial = serial();
    const FRAMES: usize = 100_000;
    let max_length = 1000;
    let mut server = open_server(&Options::default().max_length(max_length));
    let mut events = Vec::with_capacity(16);

    let mut start = client_frame(0x01, b"open message");
    feed_into(&mut server, &mut start, &mut events);
    assert_eq!(events, vec![]);

    let empty_continuation = client_frame(0x00, b"");
    let mut flood: Vec<u8> = empty_continuation.repeat(FRAMES);
    // In one read.
    let ((), one_read) = measure(|| feed_into(&mut server, &mut flood, &mut events));
    // And one frame per read.
    let mut frame = empty_continuation.clone();
    let ((), per_frame) = measure(|| {
        for _ in 0..FRAMES {
            frame.copy_from_slice(&empty_continuation);
            feed_into(&mut server, &mut frame, &mut events);
        }
    });
    println!("one read: {one_read:?}; one frame per read: {per_frame:?}");
    assert_eq!(events, vec![]);
    for stats in [one_read, per_frame] {
        assert!(
            stats.allocs <= 4,
            "{} allocations for empty frames",
            stats.allocs
        );
        assert!(stats.live <= 0, "memory grew by {} bytes", stats.live);
        assert!(
            stats.peak <= max_length as isize,
            "held {} bytes",
            stats.peak
        );
    }

    let mut end = client_frame(0x80, b"!");
    feed_into(&mut server, &mut end, &mut events);
    assert!(matches!(
        events[..],
        [Kind::Message {
            text: true,
            len: 13,
            ..
        }]
    ));
}

/// A fragmented binary message with fragments of these sizes, one frame per read.
/// Returns the peak bytes held while it was received, and the events.
fn peak_while_receiving(max_length: usize, sizes: &[usize]) -> (isize, Vec<Kind>) {
    let mut server = open_server(&Options::default().max_length(max_length));
    let mut frames: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let opcode = if i == 0 { 0x02 } else { 0x00 };
            let fin = if i == sizes.len() - 1 { 0x80 } else { 0 };
            client_frame(fin | opcode, &vec![0x5a; size])
        })
        .collect();
    let mut events = Vec::with_capacity(8);
    let ((), stats) = measure(|| {
        for frame in &mut frames {
            feed_into(&mut server, frame, &mut events);
        }
    });
    (stats.peak, events)
}

#[test]
fn bytes_held_for_a_fragmented_message_never_exceed_max_length() {
    let _serial = serial();
    const MAX: usize = 100_000;
    let cases: Vec<Vec<usize>> = vec![
        vec![100_000],
        vec![50_000, 50_000],
        vec![25_000; 4],
        vec![60_000, 40_000],
        vec![99_999, 1],
        vec![1000; 100],
        vec![10; 10_000],
    ];
    let mut failures = Vec::new();
    for sizes in &cases {
        let (peak, events) = peak_while_receiving(MAX, sizes);
        let total: usize = sizes.iter().sum();
        let label = format!(
            "{} fragments ({}, ..., {})",
            sizes.len(),
            sizes[0],
            sizes[sizes.len() - 1]
        );
        println!("{label}: peak {peak} bytes, {events:?}");
        assert!(
            matches!(events[..], [Kind::Message { text: false, len, .. }] if len == total),
            "{label}: {events:?}"
        );
        // The message itself, plus a little bookkeeping.
        if peak > (MAX + 512) as isize {
            failures.push(format!("{label} held {peak} bytes"));
        }
    }
    assert!(
        failures.is_empty(),
        "max_length is {MAX}, but: {failures:#?}"
    );
}

#[test]
fn dripped_head_allocates_linearly() {
    let _serial = serial();
    const HEAD: usize = 64 * 1024;
    let limits = HeadLimits {
        max_size: 128 * 1024,
        max_headers: 64,
    };
    let (_client, request) = common::started_client(&Options::default());
    let pad = "p".repeat(HEAD - request.len() - "X-Pad: \r\n".len());
    let mut head = request[..request.len() - 2].to_vec();
    head.extend_from_slice(format!("X-Pad: {pad}\r\n\r\n").as_bytes());
    assert_eq!(head.len(), HEAD);

    let mut parser = RequestParser::new(limits);
    let (result, stats) = measure(|| {
        for &byte in &head[..HEAD - 1] {
            if parser.parse(&[byte]) != Ok(Status::Partial) {
                return None;
            }
        }
        match parser.parse(&head[HEAD - 1..]) {
            Ok(Status::Complete(request, 1)) => Some(request),
            _ => None,
        }
    });
    let request = result.expect("dripped head parses");
    println!("dripping {HEAD} bytes: {stats:?}");
    assert_eq!(request.header("X-Pad"), Some(pad.as_str()));
    // Buffer growth by doubling plus the parsed request: a small multiple of the head,
    // in a logarithmic number of allocations, not one per byte.
    assert!(
        stats.allocated <= 8 * HEAD,
        "allocated {} bytes",
        stats.allocated
    );
    assert!(stats.allocs <= 200, "{} allocations", stats.allocs);
}

// ----- permessage-deflate -----

/// A raw deflate stream (tail stripped) that inflates to `mib` MiB of zeros: one
/// sync-flushed block of 1 MiB of zeros repeated, each copy a literal and distance-1
/// matches, so its size grows by about a kilobyte per inflated mebibyte.
fn zero_bomb(mib: usize) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new_with_window_bits(Compression::best(), false, 15);
    let mut block = Vec::with_capacity(64 * 1024);
    c.compress_vec(&vec![0u8; 1 << 20], &mut block, FlushCompress::Sync)
        .unwrap();
    assert!(c.total_in() == 1 << 20 && block.ends_with(&[0, 0, 0xff, 0xff]));
    let mut stream = block.repeat(mib);
    stream.truncate(stream.len() - 4);
    stream
}

/// A deflate server and the masked frames of `payload` (RSV1, text) cut in `parts`.
fn deflate_bomb_setup(max_length: usize, payload: &[u8], parts: usize) -> (Driver, Vec<u8>) {
    let options = Options::default().max_length(max_length).deflate(true);
    let (_client, mut server) = common::open_pair(&Options::default().deflate(true), &options);
    assert!(server.deflate_params().is_some());
    // Warm this thread's shared decompressor up, so the measurement shows the message.
    let mut warm = client_frame(0xc1, &[0x4b, 0x04, 0x00]); // "a"
    let mut events = Vec::new();
    feed_into(&mut server, &mut warm, &mut events);
    assert_eq!(
        events,
        vec![Kind::Message {
            text: true,
            len: 1,
            capacity: Some(4096)
        }]
    );
    // And the thread's spare stream for a message that arrives in pieces ("a" in two
    // fragments), so the measurement shows no stream made and none left behind.
    let mut warm = client_frame(0x41, &[0x4b]);
    warm.extend(client_frame(0x80, &[0x04, 0x00]));
    events.clear();
    feed_into(&mut server, &mut warm, &mut events);
    assert!(
        matches!(
            events[..],
            [Kind::Message {
                text: true,
                len: 1,
                ..
            }]
        ),
        "{events:?}"
    );
    let step = payload.len().div_ceil(parts);
    let mut wire = Vec::new();
    for (i, chunk) in payload.chunks(step).enumerate() {
        let first = if i == 0 { 0x41 } else { 0x00 };
        let fin = if (i + 1) * step >= payload.len() {
            0x80
        } else {
            0
        };
        wire.extend(client_frame(first | fin, chunk));
    }
    (server, wire)
}

#[test]
fn deflate_bomb_closes_1009_with_memory_bounded_by_max_length() {
    let _serial = serial();
    const MAX: usize = 4 << 20;
    // About 1 MiB on the wire, 1 GiB inflated.
    let bomb = zero_bomb(1024);
    println!("bomb: {} bytes inflating to 1 GiB", bomb.len());
    assert!(bomb.len() < (1 << 20) + (64 << 10));
    for parts in [1, 4] {
        let (mut server, mut wire) = deflate_bomb_setup(MAX, &bomb, parts);
        let mut events = Vec::with_capacity(8);
        let ((), stats) = measure(|| feed_into(&mut server, &mut wire, &mut events));
        println!("1 GiB bomb in {parts} frame(s), max_length 4 MiB: {stats:?}");
        // The failed connection holds no inflate state (the message's stream went back
        // to the thread).
        assert!(stats.live <= 0, "{stats:?}");
        assert_eq!(
            events,
            vec![
                Kind::Error(Some(ProtocolError::InflatedTooLarge { max: MAX })),
                Kind::Close(1009)
            ]
        );
        // Inflated output never past max_length + 1, plus the close frame (fragmented, it
        // inflates as the fragments come, through the thread's spare stream).
        let bound = MAX + 1 + 4096;
        assert!(
            (stats.peak as usize) <= bound,
            "peak {} over {bound}",
            stats.peak
        );
        let frames = common::parse_frames(&common::take_output(&mut server));
        assert_eq!(frames.last().unwrap().close_code(), Some(1009));
    }
}

#[test]
fn deflated_message_at_max_length_costs_its_size() {
    let _serial = serial();
    const MAX: usize = 1 << 20;
    let exact = zero_bomb(1);
    let (mut server, mut wire) = deflate_bomb_setup(MAX, &exact, 1);
    let mut events = Vec::with_capacity(8);
    let ((), stats) = measure(|| feed_into(&mut server, &mut wire, &mut events));
    println!("1 MiB inflated at max_length 1 MiB: {stats:?}");
    assert!(matches!(
        events[..],
        [Kind::Message { text: true, len: MAX, capacity: Some(c) }] if c <= MAX + 1
    ));
    assert!((stats.peak as usize) <= MAX + 1 + 4096);
    // One byte over the limit: 1009, before the extra byte is kept.
    let (mut server, mut wire) = deflate_bomb_setup(MAX - 1, &exact, 1);
    events.clear();
    feed_into(&mut server, &mut wire, &mut events);
    assert_eq!(
        events,
        vec![
            Kind::Error(Some(ProtocolError::InflatedTooLarge { max: MAX - 1 })),
            Kind::Close(1009)
        ]
    );
}

/// What a connection keeps between messages: a deflate connection without context
/// takeover holds what a plain one does, plus one small boxed record; with context
/// takeover, its own zlib streams.
#[test]
fn idle_deflate_connection_cost() {
    let _serial = serial();
    let text = "{\"id\":1,\"user\":\"someone\",\"text\":\"hello, world\"}".repeat(40);
    let keep = websocket_driver::protocol::deflate::DeflateOptions {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        ..Default::default()
    };
    let small = websocket_driver::protocol::deflate::DeflateOptions {
        server_max_window_bits: 9,
        client_max_window_bits: 9,
        ..keep.clone()
    };
    let mut retained = Vec::new();
    for options in [
        Options::default(),
        Options::default().deflate(true),
        Options::default().deflate_options(keep),
        Options::default().deflate_options(small),
    ] {
        // Warm the thread's shared codecs (made once per thread, not per connection).
        let (mut client, mut server) = common::open_pair(&options, &options);
        client.send_text(&text).unwrap();
        common::pump(&mut client, &mut server);
        server.send_text(&text).unwrap();
        common::pump(&mut server, &mut client);
        // A connection made, used once both ways, and left idle with its output written.
        let ((), stats) = measure(|| {
            let (mut client, mut server) = common::open_pair(&options, &options);
            client.send_text(&text).unwrap();
            assert_eq!(common::pump(&mut client, &mut server).len(), 1);
            server.send_text(&text).unwrap();
            assert_eq!(common::pump(&mut server, &mut client).len(), 1);
            drop(client);
            // As a reactor does with an idle connection's buffer.
            drop(server.take_output_buffer());
            // Kept alive past the measurement: what it holds stays counted.
            std::mem::forget(server);
        });
        retained.push(stats.live);
    }
    println!(
        "an idle server driver after one message each way holds: plain {} B, deflate {} B, \
         context takeover {} B (15-bit windows), {} B (9-bit windows)",
        retained[0], retained[1], retained[2], retained[3]
    );
    // Without context takeover the difference to plain is the small agreed record.
    assert!(retained[1] - retained[0] <= 128, "{retained:?}");
    // With context takeover the streams stay, bounded by the window options.
    assert!(
        retained[2] > 64 * 1024 && retained[2] < 1024 * 1024,
        "{retained:?}"
    );
    assert!(retained[3] < retained[2], "{retained:?}");
}

/// A message built from many small fragments grows its buffer geometrically, not by one
/// fragment at a time: 10 000 fragments of 10 bytes cost a few dozen (re)allocations, not
/// one per fragment, so a peer cannot make the receiver copy the message over and over
/// (RFC 6455 §10.4: a long stream of small frames of one fragmented message).
#[test]
fn many_small_fragments_grow_the_message_geometrically() {
    const FRAGMENTS: usize = 10_000;
    let _serial = serial();
    let mut driver = open_server(&Options::default());
    let mut input = Vec::new();
    for i in 0..FRAGMENTS {
        let opcode = if i == 0 { 0x2 } else { 0x0 };
        let fin = if i == FRAGMENTS - 1 { 0x80 } else { 0 };
        input.extend_from_slice(&client_frame(fin | opcode, &[i as u8; 10]));
    }
    let mut out = Vec::with_capacity(4);
    let ((), stats) = measure(|| {
        // One fragment per read, as a peer trickling them would make it.
        let mut at = 0;
        let frame = input.len() / FRAGMENTS;
        while at < input.len() {
            feed_into(&mut driver, &mut input[at..at + frame], &mut out);
            at += frame;
        }
    });
    assert_eq!(
        out,
        [Kind::Message {
            text: false,
            len: FRAGMENTS * 10,
            capacity: out.first().and_then(|k| match k {
                Kind::Message { capacity, .. } => *capacity,
                _ => None,
            }),
        }]
    );
    assert!(stats.allocs <= 40, "{} allocations", stats.allocs);
}

/// Feeds `reads` to `server` one at a time and returns the binary message they make (any
/// other event fails the test).
fn binary_message<'a>(
    server: &mut Driver,
    reads: impl IntoIterator<Item = &'a mut [u8]>,
) -> Option<Vec<u8>> {
    let mut got = None;
    for read in reads {
        let mut at = 0;
        loop {
            let (used, event) = server.poll_event(&mut read[at..]);
            at += used;
            match event {
                Some(Event::Message(Message::Binary(b))) => got = Some(b.into_owned()),
                Some(other) => panic!("{other:?}"),
                None => break,
            }
        }
    }
    got
}

/// The README's bound for a compressed message in many fragments (Flow control): its
/// deflate data is inflated as it arrives, so only the inflated message is held (with the
/// message's own inflate stream), not its compressed bytes too: here `max_length` - 1 KiB
/// of stored data, then empty stored blocks of 15 bytes a continuation, up to `max_length`
/// more, as the per-fragment flush allowance lets through. (Kept until the last fragment
/// and inflated then, the compressed bytes and the message made about 3 × `max_length`.)
#[test]
fn a_compressed_message_in_many_fragments_holds_about_max_length() {
    use flate2::{Compress, Compression, FlushCompress};
    let _serial = serial();
    const MAX: usize = 4 << 20;
    let data = vec![7u8; MAX - 1024];
    let mut c = Compress::new_with_window_bits(Compression::none(), false, 15);
    let mut first = Vec::with_capacity(MAX + 4096);
    c.compress_vec(&data, &mut first, FlushCompress::Sync)
        .unwrap();
    assert!(first.ends_with(&[0, 0, 0xff, 0xff]));
    drop(data);
    let options = Options::default().max_length(MAX).deflate(true);
    let (_client, mut server) = common::open_pair(&Options::default().deflate(true), &options);
    let mut frames = vec![client_frame(0x42, &first)];
    let pad = [0u8, 0, 0, 0xff, 0xff].repeat(3);
    let continuations = MAX / 16 - 64;
    for _ in 0..continuations {
        frames.push(client_frame(0x00, &pad));
    }
    frames.push(client_frame(0x80, &[0]));
    let (got, stats) = measure(|| {
        binary_message(&mut server, frames.iter_mut().map(|f| &mut f[..])).map(|m| m.len())
    });
    assert_eq!(got, Some(MAX - 1024));
    let peak = stats.peak as usize;
    eprintln!(
        "{} fragments: peak {peak} bytes, {:.2} x max_length",
        frames.len(),
        peak as f64 / MAX as f64
    );
    assert!(peak <= MAX + 128 * 1024, "peak {peak} for max_length {MAX}");
}

/// One compressed frame of about `max_length` on the wire (incompressible data), fed in
/// 16 KiB reads: it is inflated read by read, so the driver holds the message, not its
/// compressed bytes beside it (which made about 2 × `max_length`).
#[test]
fn a_compressed_frame_fed_in_pieces_holds_about_its_inflated_size() {
    use flate2::{Compress, Compression, FlushCompress};
    let _serial = serial();
    const MAX: usize = 4 << 20;
    // Incompressible bytes (xorshift), stored about as large once "compressed".
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..MAX - 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
    let mut deflated = Vec::with_capacity(MAX + 4096);
    c.compress_vec(&data, &mut deflated, FlushCompress::Sync)
        .unwrap();
    assert!(deflated.ends_with(&[0, 0, 0xff, 0xff]));
    deflated.truncate(deflated.len() - 4);
    assert!(deflated.len() > MAX - 4096, "{}", deflated.len());
    let options = Options::default().max_length(MAX).deflate(true);
    let (_client, mut server) = common::open_pair(&Options::default().deflate(true), &options);
    let mut frame = client_frame(0xc2, &deflated);
    drop(deflated);
    let (got, stats) = measure(|| binary_message(&mut server, frame.chunks_mut(16 * 1024)));
    assert!(
        got.as_deref() == Some(&data[..]),
        "the message came out whole"
    );
    let peak = stats.peak as usize;
    assert!(
        peak <= MAX + 2 * 128 * 1024,
        "peak {peak} for a {} byte message",
        data.len()
    );
}
