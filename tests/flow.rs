//! Flow control on the reactor's default configuration: a flooding peer, a handler that
//! sends in a loop, and a thread sending through a `Sender` are each held to the output
//! cap (`max_backpressure`, 1 MiB), on both backends.
//!
//! These tests read the process's RSS, so they run one at a time (one lock), in a test
//! binary of their own.

mod support;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Owned, TestClient, eventually};
use websocket_driver::server::{Handler, Sender, Server, ServerConfig, Upgrade, Ws};
use websocket_driver::{Backend, Error, Message, UsageError};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The default cap.
const CAP: usize = 1 << 20;
/// A 64 KiB binary message is a frame of 65 546 bytes (10-byte header).
const FRAME: usize = 65536 + 10;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Samples RSS every 20 ms until stopped; returns the peak.
fn watch_rss(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = rss_kib();
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_kib());
            std::thread::sleep(Duration::from_millis(20));
        }
        peak.max(rss_kib())
    })
}

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        ws.send_message(&message)
            .expect("an echo is never refused: reading pauses before the cap is passed");
    }
}

/// The default configuration on one loop of `backend`.
fn one_loop(backend: Backend) -> ServerConfig {
    ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    }
}

fn default_server(backend: Backend) -> websocket_driver::ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(one_loop(backend))
        .start(|_| Upgrade::Accept(Echo))
        .unwrap()
}

/// A 64 KiB message numbered `i` (the number in the first 8 bytes, a pattern after).
fn numbered(i: u64) -> Vec<u8> {
    let mut payload = vec![0u8; 65536];
    payload[..8].copy_from_slice(&i.to_le_bytes());
    for (j, b) in payload[8..].iter_mut().enumerate() {
        *b = (j as u64 ^ i) as u8;
    }
    payload
}

/// A client floods 256 MiB of 64 KiB messages at the echo server (default settings)
/// without reading for two seconds, then reads while it keeps sending: the server's
/// memory stays bounded (RSS growth under 64 MiB, sampled throughout), the flooder is
/// slowed (its writes stall while it does not read), not disconnected, and it gets every
/// echo intact and in order.
fn flooding_client_is_slowed_not_dropped(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const MESSAGES: u64 = 4096;
    let server = default_server(backend);
    let addr = server.local_addr();
    let client = TestClient::connect(addr, "/").unwrap();
    let TestClient {
        stream, mut driver, ..
    } = client;
    let before = rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_rss(stop.clone());

    let sent = Arc::new(AtomicU64::new(0));
    let mut writer_stream = stream.try_clone().unwrap();
    let writer = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            for i in 0..MESSAGES {
                let frame = encode(&numbered(i));
                writer_stream.write_all(&frame).unwrap();
                sent.store(i + 1, Ordering::Relaxed);
            }
        })
    };

    // Two seconds of not reading: the writer must stall well short of the whole flood.
    std::thread::sleep(Duration::from_secs(2));
    let stalled_at = sent.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sent.load(Ordering::Relaxed),
        stalled_at,
        "the flooder was not slowed"
    );
    assert!(
        stalled_at < MESSAGES / 4,
        "sent {stalled_at} without reading"
    );
    assert_eq!(
        server.stats().connections_open,
        1,
        "the flooder was dropped"
    );

    // Now read everything back.
    let mut stream = stream;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut next = 0u64;
    while next < MESSAGES {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed the flooder after {next} echoes");
        let mut at = 0;
        while at < n {
            let (used, event) = driver.poll_event(&mut buf[at..n]);
            at += used;
            match event.map(support::own) {
                Some(Owned::Binary(data)) => {
                    assert_eq!(data, numbered(next), "echo {next} differs");
                    next += 1;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => break,
            }
        }
    }
    writer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    eprintln!("{backend}: stalled after {stalled_at} messages; RSS growth {growth_mib:.1} MiB");
    assert!(growth_mib < 64.0, "RSS grew by {growth_mib:.1} MiB");
    drop(stream);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Masks `payload` into one client frame (binary, FIN).
fn encode(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x82];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x5a, 0xa5, 0x3c, 0xc3];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// On "flood N": sends N 64 KiB messages in one go, counting the refused ones.
struct Flooder {
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}
impl Handler for Flooder {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let count: usize = message
            .as_text()
            .and_then(|t| t.strip_prefix("flood "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let chunk = vec![7u8; 65536];
        for _ in 0..count {
            match ws.send_binary(&chunk) {
                Ok(_) => self.accepted.fetch_add(1, Ordering::Relaxed),
                Err(Error::Usage(UsageError::BufferFull { limit, .. })) => {
                    assert_eq!(limit, CAP);
                    self.refused.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) => panic!("{e}"),
            };
        }
    }
}

/// A handler sending 64 messages of 64 KiB in one call on the default settings: sends
/// are taken while the queue is at or under 1 MiB and refused once it is over — the 16th
/// frame takes it from 983 190 to 1 048 736 bytes, so 16 are queued and 48 refused — and
/// the client gets exactly those 16.
fn handler_sends_are_refused_past_the_cap(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (accepted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counters = (accepted.clone(), refused.clone());
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(one_loop(backend))
        .start(move |_| {
            Upgrade::Accept(Flooder {
                accepted: counters.0.clone(),
                refused: counters.1.clone(),
            })
        })
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    client.send_text("flood 64").unwrap();
    assert!(eventually(Duration::from_secs(10), || accepted
        .load(Ordering::Relaxed)
        + refused.load(Ordering::Relaxed)
        == 64));
    let queued = CAP.div_ceil(FRAME);
    assert_eq!(queued, 16);
    assert_eq!(accepted.load(Ordering::Relaxed), queued);
    assert_eq!(refused.load(Ordering::Relaxed), 64 - queued);
    for i in 0..queued {
        let message = client
            .next_message()
            .unwrap_or_else(|e| panic!("reading message {i} of {queued}: {e}"));
        assert!(matches!(message, Owned::Binary(d) if d.len() == 65536));
    }
    // Nothing more comes: the refused ones were never queued.
    client
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(client.next_message().is_err());
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Hands its connection's `Sender` to the test.
struct Register(Arc<Mutex<Option<Sender>>>);
impl Handler for Register {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        *self.0.lock().unwrap() = Some(ws.sender());
    }
}

/// A thread sending 64 KiB messages through a `Sender` to a connection that never reads:
/// it is refused (`WouldBlock` wrapping `BufferFull`) once the connection's queue plus
/// what waits in the loop's inbox passes the cap, having queued no more than the cap plus
/// what the kernel's socket buffers took; once the client reads, sends go through again.
fn sender_is_refused_past_the_cap(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let slot = Arc::new(Mutex::new(None));
    let registry = slot.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(one_loop(backend))
        .start(move |_| Upgrade::Accept(Register(registry.clone())))
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    // Small socket buffers on the client's side keep what the kernel absorbs small.
    let socket = socket2::SockRef::from(&client.stream);
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    assert!(eventually(Duration::from_secs(5), || slot
        .lock()
        .unwrap()
        .is_some()));
    let sender = slot.lock().unwrap().clone().unwrap();
    let chunk = vec![9u8; 65536];
    let start = Instant::now();
    let mut queued = 0usize;
    let err = loop {
        match sender.send_binary(chunk.clone()) {
            Ok(()) => queued += 1,
            Err(e) => break e,
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never refused");
        if queued.is_multiple_of(16) {
            // Let the loop catch up, so the refusal comes from its queue, not a race.
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<Error>())
        .unwrap_or_else(|| panic!("{err:?}"));
    assert!(
        matches!(inner, Error::Usage(UsageError::BufferFull { limit, .. }) if *limit == CAP),
        "{inner:?}"
    );
    // The cap, plus the socket buffers on both sides (a few MiB on loopback at most).
    assert!(queued * 65536 < CAP + 16 * CAP, "queued {queued} messages");
    // Reading drains it; the sender is taken again.
    for i in 0..queued {
        let message = client
            .next_message()
            .unwrap_or_else(|e| panic!("reading message {i} of {queued}: {e}"));
        assert!(matches!(message, Owned::Binary(d) if d.len() == 65536));
    }
    assert!(eventually(Duration::from_secs(5), || sender
        .send_text("again")
        .is_ok()));
    assert_eq!(client.next_message().unwrap(), Owned::Text("again".into()));
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Subscribes to `hold-topic`, hands out its `Sender`, and on the text `hold` blocks its
/// loop until the test releases it, so that commands pile up in the loop's inbox.
struct Holder {
    registry: Arc<Mutex<Option<Sender>>>,
    held: std::sync::mpsc::Sender<()>,
    release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}
impl Handler for Holder {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.subscribe("hold-topic").unwrap();
        *self.registry.lock().unwrap() = Some(ws.sender());
    }
    fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
        if matches!(&message, Message::Text(t) if t == "hold") {
            self.held.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
    }
}

/// [`Echo`], subscribed to "echo-topic".
struct SubscribedEcho;
impl Handler for SubscribedEcho {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.subscribe("echo-topic").unwrap();
    }
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        Echo.on_message(ws, message);
    }
}

/// Waits until the server receives a large message straight into its buffer: more
/// payload receives than `before`.
fn receiving_payload(server: &websocket_driver::server::ServerHandle, before: u64) -> bool {
    eventually(Duration::from_secs(10), || {
        server.stats().payload_receives > before
    })
}

/// Waits until the peer's kernel has acknowledged everything written to `stream`: its
/// send queue is empty (the bytes wait in the server's receive buffer, or were read).
fn acknowledged(stream: &std::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    eventually(Duration::from_secs(10), || {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the valid pointer; the descriptor is
        // the open socket `stream` borrows.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        rc == 0 && queued == 0
    })
}

/// A large message whose last bytes arrive while the connection's output is over the cap
/// (a 48 MiB publication, more than the socket's buffers take, came after its first
/// bytes) waits, like any input, until the output drains, instead of reaching a handler
/// whose reply would be refused: its payload is received straight into its buffer (on
/// io_uring by a receive in the kernel's hands), and finishing it does not deliver it
/// while the output is over the cap.
fn a_large_message_finished_over_the_cap_waits_for_the_drain(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(one_loop(backend))
        .start(|_| Upgrade::Accept(SubscribedEcho))
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    let message: Vec<u8> = (0..4 * CAP).map(|i| (i % 251) as u8).collect();
    let frame = encode(&message);
    // The header and 1 MiB: the loop starts receiving the rest into the message's buffer.
    let split = 14 + CAP;
    let lent = server.stats().payload_receives;
    client.stream.write_all(&frame[..split]).unwrap();
    assert!(receiving_payload(&server, lent));
    let big = vec![7u8; 48 * CAP];
    server
        .publish("echo-topic", &big, websocket_driver::MessageType::Binary)
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || server
        .stats()
        .delivered
        == 1));
    client.stream.write_all(&frame[split..]).unwrap();
    // Time for the loop to take what it still takes of it over the cap (it pauses at some
    // point; how much it took first does not change what must arrive below).
    std::thread::sleep(Duration::from_millis(100));
    // The publication first (queued first), then the echo, once the output drained.
    let first = client.next_message().unwrap();
    assert!(
        matches!(&first, Owned::Binary(d) if *d == big),
        "expected the publication"
    );
    assert_eq!(client.next_message().unwrap(), Owned::Binary(message));
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A `Sender` message accepted with Ok is delivered even when, by the time its loop takes
/// it, the connection's output is over the cap (here: a 4 MiB publication the client has
/// not read, queued in the same loop turn just before it). The `Sender` checks the cap when
/// it accepts; the loop must not check again and drop what was accepted.
fn accepted_sends_are_delivered_past_the_cap(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let slot = Arc::new(Mutex::new(None));
    let (held_tx, held) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let registry = slot.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(one_loop(backend))
        .start(move |_| {
            Upgrade::Accept(Holder {
                registry: registry.clone(),
                held: held_tx.clone(),
                release: release_rx.clone(),
            })
        })
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    assert!(eventually(Duration::from_secs(5), || slot
        .lock()
        .unwrap()
        .is_some()));
    let sender = slot.lock().unwrap().clone().unwrap();
    // Block the loop, then queue a publication far over the cap and a small send behind it.
    client.send_text("hold").unwrap();
    held.recv_timeout(Duration::from_secs(5))
        .expect("the loop is held");
    let big = vec![7u8; 4 * CAP];
    server
        .publish("hold-topic", &big, websocket_driver::MessageType::Binary)
        .unwrap();
    sender
        .send_text("behind")
        .expect("accepted: nothing was queued when it was sent");
    release.send(()).unwrap();
    // Both arrive, in order.
    let first = client.next_message().unwrap();
    assert!(
        matches!(&first, Owned::Binary(d) if d.len() == big.len()),
        "{first:?}"
    );
    assert_eq!(client.next_message().unwrap(), Owned::Text("behind".into()));
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Streams `stream N` numbered 64 KiB messages and then "done" the way the cap asks:
/// sends until one is refused, then goes on from `on_drain`.
#[derive(Default)]
struct Streamer {
    next: u64,
    total: u64,
    drains: Arc<AtomicUsize>,
}

impl Streamer {
    /// Messages `next..total`, then "done" (number `total`).
    fn send_more(&mut self, ws: &mut Ws<'_>) {
        while self.next <= self.total {
            let sent = match self.next == self.total {
                true => ws.send_text("done"),
                false => ws.send_binary(&numbered(self.next)),
            };
            match sent {
                Ok(_) => self.next += 1,
                Err(Error::Usage(UsageError::BufferFull { .. })) => return,
                Err(e) => panic!("{e}"),
            }
        }
    }
}

impl Handler for Streamer {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let n = message.as_text().and_then(|t| t.strip_prefix("stream "));
        (self.next, self.total) = (0, n.expect("stream N").parse().unwrap());
        self.send_more(ws);
    }

    fn on_drain(&mut self, ws: &mut Ws<'_>) {
        self.drains.fetch_add(1, Ordering::Relaxed);
        self.send_more(ws);
    }
}

/// A handler refused by the cap is told when its output is written (`on_drain`) and goes
/// on: 64 messages of 64 KiB (4 MiB through a 1 MiB cap) reach a client that reads at once
/// and one that starts reading only after 300 ms, all in order, then "done". Whether the
/// socket took the queue in one write or in many, whether one send or several were in the
/// kernel's hands: every refusal is followed by a drain.
fn a_refused_handler_is_told_when_its_output_drains(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let drains = Arc::new(AtomicUsize::new(0));
    let counter = drains.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(one_loop(backend))
        .start(move |_| {
            Upgrade::Accept(Streamer {
                drains: counter.clone(),
                ..Streamer::default()
            })
        })
        .unwrap();
    for wait in [Duration::ZERO, Duration::from_millis(300)] {
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        client
            .stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let drains_before = drains.load(Ordering::Relaxed);
        client.send_text("stream 64").unwrap();
        std::thread::sleep(wait);
        for i in 0..64 {
            let message = client
                .next_message()
                .unwrap_or_else(|e| panic!("message {i} (waited {wait:?}): {e}"));
            assert_eq!(message, Owned::Binary(numbered(i)), "waited {wait:?}");
        }
        assert_eq!(client.next_message().unwrap(), Owned::Text("done".into()));
        assert!(drains.load(Ordering::Relaxed) > drains_before);
    }
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// The cap of the test below.
const LATE_CAP: usize = 16 << 20;

/// Subscribed to "late-topic". On "prefill": 48 MiB in one send (over the cap: reading
/// pauses). On "go" (delivered once that drained to half the cap): a small "marker" with
/// a write callback. Any binary message is echoed, and every echo refused is counted.
struct LateCallback {
    go: std::sync::mpsc::Sender<()>,
    callbacks: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    echoed: Arc<AtomicUsize>,
    /// On "hold": blocks the loop until the test sends on `release`.
    held: std::sync::mpsc::Sender<()>,
    release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}
impl Handler for LateCallback {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.subscribe("late-topic").unwrap();
    }
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        match message.as_text() {
            Some("prefill") => {
                ws.send_binary(&vec![1u8; 3 * LATE_CAP]).unwrap();
            }
            Some("hold") => {
                self.held.send(()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
            }
            Some("go") => {
                let callbacks = self.callbacks.clone();
                ws.send_with(
                    b"marker",
                    websocket_driver::MessageType::Text,
                    move |_: &mut Ws<'_>| {
                        callbacks.fetch_add(1, Ordering::Relaxed);
                    },
                )
                .unwrap();
                let _ = self.go.send(());
            }
            _ => match ws.send_message(&message) {
                Ok(_) => {
                    self.echoed.fetch_add(1, Ordering::Relaxed);
                }
                Err(Error::Usage(UsageError::BufferFull { .. })) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("{e}"),
            },
        }
    }
}

/// A large message finished while the output is over the cap waits in the driver for the
/// drain (see above), and must not reach the handler while the output is still over the
/// cap, whatever runs the session meanwhile: here a write callback (`Ws::send_with`) whose
/// frame is handed on while a 48 MiB publication queued behind it still waits. The echo
/// of that message must not be refused (README: "an echo handler's replies are never
/// refused, because delivery pauses before the cap is passed").
fn a_write_callback_over_the_cap_does_not_deliver_the_waiting_message(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let go_tx = Arc::new(Mutex::new(go_tx));
    let callbacks = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let echoed = Arc::new(AtomicUsize::new(0));
    let (c, r, e) = (callbacks.clone(), refused.clone(), echoed.clone());
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let held_tx = Arc::new(Mutex::new(held_tx));
    let (release, release_rx) = std::sync::mpsc::channel();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            // A cap larger than the socket buffers take, so that the marker queued at
            // half of it still waits in the loop when the client stops reading.
            max_backpressure: LATE_CAP,
            ..one_loop(backend)
        })
        .start(move |_| {
            Upgrade::Accept(LateCallback {
                go: go_tx.lock().unwrap().clone(),
                callbacks: c.clone(),
                refused: r.clone(),
                echoed: e.clone(),
                held: held_tx.lock().unwrap().clone(),
                release: release_rx.clone(),
            })
        })
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.send_text("prefill").unwrap();
    client.send_text("go").unwrap();
    // Read slowly until "go" is delivered (the server's queue is down to half the cap),
    // then stop: the socket buffers stay full, and the marker waits behind them.
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let start = Instant::now();
    while go_rx.try_recv().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "go never delivered"
        );
        let n = client.stream.read(&mut chunk).unwrap();
        assert!(n > 0);
        raw.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        callbacks.load(Ordering::Relaxed),
        0,
        "the marker went out already"
    );
    // A 4 MiB message, all but its last 100 KiB: the loop receives the rest into its
    // buffer.
    let message: Vec<u8> = (0..4 * CAP).map(|i| (i % 251) as u8).collect();
    let frame = encode(&message);
    let split = frame.len() - 100 * 1024;
    let lent = server.stats().payload_receives;
    client.stream.write_all(&frame[..split]).unwrap();
    assert!(receiving_payload(&server, lent));
    assert!(acknowledged(&client.stream));
    // Over the cap (a publication does not pause reading).
    let big = vec![7u8; 3 * LATE_CAP];
    let handled = |s: websocket_driver::server::Stats| s.delivered + s.dropped;
    let before = handled(server.stats());
    server
        .publish("late-topic", &big, websocket_driver::MessageType::Binary)
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || handled(
        server.stats()
    ) > before));
    // The message's last bytes arrive whole while another connection blocks the loop, so
    // one receive finishes the message (in its own buffer, over the cap: it waits there).
    let mut other = TestClient::connect(server.local_addr(), "/").unwrap();
    other.send_text("hold").unwrap();
    held_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the loop is held");
    client.stream.write_all(&frame[split..]).unwrap();
    // All in the server's receive buffer before the loop goes on.
    assert!(acknowledged(&client.stream));
    release.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(echoed.load(Ordering::Relaxed), 0, "delivered over the cap");
    // Now read everything.
    let mut events = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut pending = raw;
    loop {
        let mut at = 0;
        while at < pending.len() {
            let (used, event) = client.driver.poll_event(&mut pending[at..]);
            at += used;
            match event.map(support::own) {
                Some(event) => events.push(event),
                None => break,
            }
        }
        // A frame's first bytes that the driver did not take wait for the rest.
        pending.drain(..at);
        if events.len() >= 4 {
            break;
        }
        match client.stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
    let summary: Vec<String> = events
        .iter()
        .map(|e| match e {
            Owned::Binary(d) => format!("binary {}", d.len()),
            other => format!("{other:?}"),
        })
        .collect();
    let seen = format!(
        "{backend}: events {summary:?}; callbacks {} echoed {} refused {}",
        callbacks.load(Ordering::Relaxed),
        echoed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "the echo was refused: {seen}"
    );
    assert_eq!(
        summary,
        [
            format!("binary {}", 3 * LATE_CAP),
            "Text(\"marker\")".to_string(),
            format!("binary {}", 3 * LATE_CAP),
            format!("binary {}", 4 * CAP),
        ],
        "{seen}"
    );
    drop((client, other));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $(#[test] fn $name() { super::$name(websocket_driver::Backend::Epoll) })*
        }
        mod io_uring {
            $(#[test] fn $name() { super::$name(websocket_driver::Backend::IoUring) })*
        }
    };
}

on_every_backend!(
    flooding_client_is_slowed_not_dropped,
    handler_sends_are_refused_past_the_cap,
    sender_is_refused_past_the_cap,
    accepted_sends_are_delivered_past_the_cap,
    a_refused_handler_is_told_when_its_output_drains,
    a_large_message_finished_over_the_cap_waits_for_the_drain,
    a_write_callback_over_the_cap_does_not_deliver_the_waiting_message,
);
