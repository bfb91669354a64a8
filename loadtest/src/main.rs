//! `wsload`: a WebSocket load generator built on websocket-driver's own reactor-hosted
//! client (`ClientReactor`). Progress goes to stderr, one JSON object to stdout.
//!
//! ```text
//! wsload echo   --url ws://127.0.0.1:9001/ --conns 100 --size 20 --secs 10 [--inflight 1] [--text]
//!               [--json] [--deflate]
//! wsload idle   --url ws://127.0.0.1:9001/ --conns 10000 --pid PID [--secs 5] [--hosts 4]
//! wsload fanout --url ws://127.0.0.1:9002/topic --subs 1000 --secs 10 [--rate 100]
//!               [--sub-url ws://127.0.0.1:9003/topic …] [--drain-secs 10] [--settle-secs 0]
//! wsload broadcast --url ws://127.0.0.1:9002/topic --conns 100 --secs 10 [--size 20]
//! wsload slow   --url ws://127.0.0.1:9001/ --conns 10 --size 1024 --secs 5 --pid PID
//!               [--flood-size 65536] [--max-rss-growth-mib 1024]
//! wsload churn  --url ws://127.0.0.1:9001/ --conns 50 --secs 10 [--size 20] [--hosts 4]
//! ```
//! Common options: `--threads N` (client event loops, default 1), `--backend auto|epoll|io-uring`,
//! `--deflate` (offer permessage-deflate: `Options::deflate(true)`). `--json` makes echo
//! payloads JSON-like text (compressible); `echo` reports the wire bytes per message each way.
//! Every run is bounded in time and stops by itself.
//!
//! `churn` measures the connection lifecycle against an echo server: `--conns` connections
//! at a time, each opened, upgraded, sent one `--size` message, answered, and closed with a
//! close handshake (1000), then replaced by a new one. It reports cycles per second and
//! their latency (connect to close), and counts a cycle whose echo or close code is wrong
//! as an error.
//!
//! `fanout` and `broadcast` load a pub/sub server (`examples/pubsub.rs`: a client's path is
//! its topic; every message is delivered to every client of the topic, the sender included):
//! all their clients use the URL's path, so they share one topic. `fanout --sub-url URL`
//! (repeatable) puts the subscribers on those URLs instead, round-robin (the publisher stays
//! on `--url`): with servers joined by a backplane, that measures cross-node delivery, with
//! the numbers per subscriber URL under `per_url`.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use websocket_driver::client::ClientReactor;
use websocket_driver::protocol::handshake::ClientUrl;
use websocket_driver::server::{Handler, Sender, ServerConfig, Ws};
use websocket_driver::{Backend, Error, Event, Message, Options};

struct Args {
    mode: String,
    url: String,
    /// `fanout`: where the subscribers connect, round-robin (empty: `url`).
    sub_urls: Vec<String>,
    /// `fanout`: how long to wait for deliveries after the last publish.
    drain_secs: f64,
    /// `fanout`: how long to wait after every connection opened, before the first publish.
    settle_secs: f64,
    conns: usize,
    size: usize,
    secs: f64,
    inflight: usize,
    text: bool,
    json: bool,
    deflate: bool,
    pid: Option<u32>,
    hosts: usize,
    rate: f64,
    threads: usize,
    backend: Backend,
    flood_size: usize,
    max_rss_growth_kib: u64,
}

fn parse_args() -> Args {
    let mut argv = std::env::args().skip(1);
    let mode = argv
        .next()
        .unwrap_or_else(|| usage("missing mode (echo, idle, fanout, broadcast, slow, churn)"));
    let mut args = Args {
        mode,
        url: "ws://127.0.0.1:9001/".into(),
        sub_urls: Vec::new(),
        drain_secs: 10.0,
        settle_secs: 0.0,
        conns: 100,
        size: 20,
        secs: 5.0,
        inflight: 1,
        text: false,
        json: false,
        deflate: false,
        pid: None,
        hosts: 1,
        rate: 100.0,
        threads: 1,
        backend: Backend::Auto,
        flood_size: 64 * 1024,
        max_rss_growth_kib: 1024 * 1024,
    };
    while let Some(flag) = argv.next() {
        let mut value = |name: &str| {
            argv.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        fn num<T: std::str::FromStr>(name: &str, v: String) -> T {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{name}: not a number: {v}")))
        }
        match flag.as_str() {
            "--url" => args.url = value("--url"),
            "--sub-url" => args.sub_urls.push(value("--sub-url")),
            "--drain-secs" => args.drain_secs = num("--drain-secs", value("--drain-secs")),
            "--settle-secs" => args.settle_secs = num("--settle-secs", value("--settle-secs")),
            "--conns" | "--subs" => args.conns = num(&flag, value(&flag)),
            "--size" => args.size = num("--size", value("--size")),
            "--secs" => args.secs = num("--secs", value("--secs")),
            "--inflight" => args.inflight = num::<usize>("--inflight", value("--inflight")).max(1),
            "--text" => args.text = true,
            "--json" => {
                args.json = true;
                args.text = true;
            }
            "--deflate" => args.deflate = true,
            "--pid" => args.pid = Some(num("--pid", value("--pid"))),
            "--hosts" => args.hosts = num::<usize>("--hosts", value("--hosts")).clamp(1, 250),
            "--rate" => args.rate = num("--rate", value("--rate")),
            "--flood-size" => {
                args.flood_size = num::<usize>("--flood-size", value("--flood-size")).max(1)
            }
            "--max-rss-growth-mib" => {
                args.max_rss_growth_kib =
                    num::<u64>("--max-rss-growth-mib", value("--max-rss-growth-mib")) * 1024
            }
            "--threads" => args.threads = num::<usize>("--threads", value("--threads")).max(1),
            "--backend" => {
                args.backend = value("--backend")
                    .parse()
                    .unwrap_or_else(|e: String| usage(&e))
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown option {other}")),
        }
    }
    for url in std::iter::once(&args.url).chain(&args.sub_urls) {
        if let Err(why) = loopback_only(url) {
            usage(&format!(
                "load is only ever sent to loopback (127.0.0.0/8, [::1], localhost): {why}"
            ));
        }
    }
    // Every wait below is built from these: an unbounded or unrepresentable one would run
    // forever or panic in `Duration::from_secs_f64`.
    if !(args.secs > 0.0 && Duration::try_from_secs_f64(args.secs).is_ok()) {
        usage("--secs must be a finite number of seconds above 0");
    }
    for (name, secs) in [
        ("--drain-secs", args.drain_secs),
        ("--settle-secs", args.settle_secs),
    ] {
        if Duration::try_from_secs_f64(secs).is_err() {
            usage(&format!(
                "{name} must be a finite number of seconds, 0 or more"
            ));
        }
    }
    // At least one publish per window: the sleep between publishes (1/rate) then never
    // outlasts the window, and the measured messages are not none.
    if args.mode == "fanout"
        && !(args.rate.is_finite() && args.rate > 0.0 && args.rate * args.secs >= 1.0)
    {
        usage(
            "--rate must be a finite number of publishes per second above 0, and at least one per --secs",
        );
    }
    if !args.sub_urls.is_empty() && args.mode != "fanout" {
        usage("--sub-url is a fanout option");
    }
    args
}

/// Whether connecting to `url` can only reach this machine: the host that the library's
/// own URL parser finds (userinfo, brackets and port taken off, as the client does before
/// it connects) resolves to loopback addresses only. Why not, if not.
fn loopback_only(url: &str) -> Result<(), String> {
    let parsed = ClientUrl::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let addrs: Vec<SocketAddr> = (parsed.host.as_str(), parsed.port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {}: {e}", parsed.host))?
        .collect();
    match addrs.iter().find(|addr| !addr.ip().is_loopback()) {
        _ if addrs.is_empty() => Err(format!("{url}: {} resolves to no address", parsed.host)),
        Some(addr) => Err(format!("{url}: {} resolves to {}", parsed.host, addr.ip())),
        None => Ok(()),
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("wsload: {problem}");
    }
    eprintln!(
        "usage:\n  wsload echo --url URL --conns N --size B --secs S [--inflight K] [--text] [--json]\n  \
         wsload idle --url URL --conns N --pid PID [--secs S] [--hosts K]\n  \
         wsload fanout --url URL --subs N --secs S [--rate R] [--sub-url URL]... [--drain-secs D] [--settle-secs T]\n  \
         wsload broadcast --url URL --conns N --secs S [--size B]\n  \
         wsload slow --url URL --conns N --size B --secs S --pid PID [--flood-size F] \
         [--max-rss-growth-mib M]\n  \
         wsload churn --url URL --conns N --secs S [--size B] [--hosts K]\n  \
         common: [--threads N] [--backend auto|epoll|io-uring] [--deflate]"
    );
    std::process::exit(2)
}

fn reactor<H: Handler>(args: &Args, idle_ping: Option<Duration>) -> ClientReactor<H> {
    let config = ServerConfig {
        threads: args.threads,
        backend: args.backend,
        options: Options::default().deflate(args.deflate),
        idle_timeout: idle_ping,
        // A server busy accepting thousands of connections answers late.
        handshake_timeout: Duration::from_secs(30),
        // Load generation must not drop its own connections for being busy.
        max_backpressure: usize::MAX / 2,
        ..ServerConfig::default()
    };
    ClientReactor::start(config).unwrap_or_else(|e| usage(&format!("client reactor: {e}")))
}

/// Counters every connection of a run shares.
#[derive(Default)]
struct Shared {
    opened: AtomicUsize,
    /// Every close, of opened connections and of connects that failed (1006) alike.
    closed: AtomicUsize,
    /// Closes of connections that had opened (`idle`'s held ones are `opened` less these).
    dropped: AtomicUsize,
    failed: AtomicUsize,
    measuring: AtomicBool,
    stop: AtomicBool,
    received: AtomicU64,
    /// `echo`: echoes over the whole run, warm-up and closing included (added on close).
    received_total: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latencies: Mutex<Vec<u32>>,
}

/// Most connections `broadcast` and `fanout` leave handshaking at once: thousands of connects
/// in one burst overflow a server's accept queue (tokio's listeners take 1024), and the
/// dropped SYNs' retries can outlast the handshake timeout.
const MAX_CONNECTING: usize = 512;

impl Shared {
    /// Waits (bounded) until fewer than `max` of the `issued` connections are still
    /// connecting.
    fn pace(&self, issued: usize, max: usize) {
        let end = Instant::now() + Duration::from_secs(30);
        while issued.saturating_sub(
            self.opened.load(Ordering::Relaxed) + self.closed.load(Ordering::Relaxed),
        ) >= max
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits (with progress lines) until `conns` connections have opened or failed;
    /// returns whether they all did within `limit`.
    fn wait_open(&self, conns: usize, limit: Duration) -> bool {
        wait_until(
            "connections",
            limit,
            || self.opened.load(Ordering::Relaxed) + self.closed.load(Ordering::Relaxed) >= conns,
            || format!("{} of {conns} open", self.opened.load(Ordering::Relaxed)),
        )
    }
}

fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    progress: impl Fn() -> String,
) -> bool {
    let end = Instant::now() + limit;
    let mut last = Instant::now();
    while Instant::now() < end {
        if done() {
            return true;
        }
        if last.elapsed() >= Duration::from_secs(1) {
            eprintln!("wsload: waiting for {what}: {}", progress());
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Waits out `warmup`, then measures a window of `secs` with `shared.measuring` set: a
/// progress line on stderr every second (`wsload:   1.0s   12345 msgs/s`, counted from
/// `shared.received`, then whatever `extra` adds; compare.sh samples the server's CPU on
/// these lines), and `tick` called every `tick_every` meanwhile. Returns the window's length
/// in seconds.
fn measure(
    shared: &Shared,
    warmup: Duration,
    secs: f64,
    tick_every: Duration,
    mut tick: impl FnMut(),
    extra: impl Fn() -> String,
) -> f64 {
    std::thread::sleep(warmup);
    shared.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let window = Duration::from_secs_f64(secs);
    let mut last = 0;
    let mut last_line = start;
    while start.elapsed() < window {
        let left = window.saturating_sub(start.elapsed());
        let to_line = Duration::from_secs(1).saturating_sub(last_line.elapsed());
        std::thread::sleep(tick_every.min(left).min(to_line));
        tick();
        if last_line.elapsed() >= Duration::from_secs(1) || start.elapsed() >= window {
            let now = shared.received.load(Ordering::Relaxed);
            eprintln!(
                "wsload: {:>5.1}s {:>10} msgs/s{}",
                start.elapsed().as_secs_f64(),
                now - last,
                extra()
            );
            last = now;
            last_line = Instant::now();
        }
    }
    shared.measuring.store(false, Ordering::Relaxed);
    start.elapsed().as_secs_f64()
}

// ----- echo -----

/// The payload of message `seq`: a fixed pattern (made once per connection) with the
/// sequence number in its first 8 bytes, so every echo is checked byte for byte without
/// regenerating megabytes per message.
fn pattern(size: usize, text: bool) -> Vec<u8> {
    (0..size)
        .map(|i| {
            if text {
                b'a' + (i % 26) as u8
            } else {
                (i.wrapping_mul(31) >> 3) as u8
            }
        })
        .collect()
}

/// How many leading bytes of a payload carry its sequence number.
const STAMP_LEN: usize = 8;

/// Writes the low `min(len, 8)` bytes (binary) or hex digits (text) of `seq`: a payload
/// shorter than the stamp still carries the sequence modulo 256^len or 16^len. An empty
/// one carries nothing; only its length is checked.
fn stamp(buf: &mut [u8], seq: u64, text: bool) {
    let n = buf.len().min(STAMP_LEN);
    if text {
        // Hex digits keep text payloads ASCII; the low ones change with every message.
        let hex = format!("{:08x}", seq as u32);
        buf[..n].copy_from_slice(&hex.as_bytes()[STAMP_LEN - n..]);
    } else {
        buf[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    }
}

/// A JSON-like text payload (what permessage-deflate is for) of `size` bytes.
fn json_pattern(size: usize) -> Vec<u8> {
    let mut s = String::with_capacity(size + 96);
    let mut i = 0;
    while s.len() < size {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user{}\",\"price\":{}.25,\"text\":\"hello, world\"}},",
            i % 13,
            (i * 37) % 1000
        ));
        i += 1;
    }
    s.truncate(size);
    s.into_bytes()
}

fn payload(args: &Args) -> Vec<u8> {
    if args.json {
        json_pattern(args.size)
    } else {
        pattern(args.size, args.text)
    }
}

struct EchoLoad {
    shared: Arc<Shared>,
    size: usize,
    text: bool,
    inflight: usize,
    next_seq: u64,
    expect_seq: u64,
    sent_at: VecDeque<Instant>,
    /// The unstamped payload, one copy shared by every connection (see [`SCRATCH`]).
    pattern: Arc<[u8]>,
    latencies: Vec<u32>,
    /// Echoes received over the whole run, added to `Shared::received_total` on close
    /// (one shared add per connection, not per message).
    echoed: u64,
    /// `on_error` was called: the close that follows counts the failure, once.
    errored: bool,
}

thread_local! {
    /// The outgoing payload of this loop thread's connections: the pattern, stamped just
    /// before each send, next to the address of the pattern it was copied from (to notice
    /// a new one). One copy per thread instead of one per connection keeps it in cache, so
    /// at 16 KiB × 500 connections the load generator does not spend its core on cache
    /// misses; the bytes on the wire are the same.
    static SCRATCH: std::cell::RefCell<(usize, Vec<u8>)> =
        const { std::cell::RefCell::new((0, Vec::new())) };
}

impl EchoLoad {
    fn send_next(&mut self, ws: &mut Ws<'_>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent_at.push_back(Instant::now());
        let sent = SCRATCH.with_borrow_mut(|(source, out)| {
            let pattern = self.pattern.as_ptr() as usize;
            if *source != pattern {
                *source = pattern;
                out.clear();
                out.extend_from_slice(&self.pattern);
            }
            stamp(out, seq, self.text);
            if self.text {
                ws.send_text(std::str::from_utf8(out).expect("ASCII payload"))
            } else {
                ws.send_binary(out)
            }
        });
        if sent.is_err() {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `echo` is message `seq` byte for byte: its stamp, then the rest of the
    /// pattern.
    fn is_echo_of(&self, echo: &[u8], seq: u64) -> bool {
        let mut expected = [0u8; STAMP_LEN];
        let n = self.pattern.len().min(STAMP_LEN);
        expected[..n].copy_from_slice(&self.pattern[..n]);
        stamp(&mut expected[..n], seq, self.text);
        echo.len() == self.pattern.len()
            && echo[..n] == expected[..n]
            && echo[n..] == self.pattern[n..]
    }
}

impl Handler for EchoLoad {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        for _ in 0..self.inflight {
            self.send_next(ws);
        }
    }

    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let now = Instant::now();
        let sent = self.sent_at.pop_front();
        let seq = self.expect_seq;
        self.expect_seq += 1;
        self.echoed += 1;
        if !self.is_echo_of(message.as_bytes(), seq)
            || message.is_text() != self.text
            || sent.is_none()
        {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.shared.measuring.load(Ordering::Relaxed) {
            self.shared.received.fetch_add(1, Ordering::Relaxed);
            self.shared
                .bytes
                .fetch_add(self.size as u64, Ordering::Relaxed);
            if let Some(sent) = sent {
                self.latencies
                    .push(now.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
            }
        }
        if !self.shared.stop.load(Ordering::Relaxed) {
            self.send_next(ws);
        } else if self.sent_at.is_empty() {
            let _ = ws.close_connection(1000, "done");
        }
    }

    fn on_error(&mut self, _ws: &mut Ws<'_>, _error: &Error) {
        // A close follows every error, and counts it (a failed connect is one error).
        self.errored = true;
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, _reason: &str) {
        if self.errored
            || !self.shared.stop.load(Ordering::Relaxed)
            || (code != 1000 && code != 1005)
        {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.shared
            .received_total
            .fetch_add(self.echoed, Ordering::Relaxed);
        self.shared
            .latencies
            .lock()
            .unwrap()
            .append(&mut self.latencies);
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `echo` workload's connections: opened by [`EchoRun::open`], measured by
/// [`EchoRun::measure`], closed and summed up by [`EchoRun::finish`]. `slow` runs the same
/// workload next to its flooder.
struct EchoRun {
    shared: Arc<Shared>,
    clients: ClientReactor<EchoLoad>,
    conns: usize,
}

/// What the echo connections measured.
struct EchoStats {
    secs: f64,
    messages: u64,
    /// Echoes over the whole run (`messages` is the window's).
    messages_total: u64,
    bytes: u64,
    errors: u64,
    p50_us: u32,
    p99_us: u32,
    p999_us: u32,
}

impl EchoRun {
    /// Connects `args.conns` echo connections and waits until all are open (exits if not).
    fn open(args: &Args) -> EchoRun {
        let shared = Arc::new(Shared::default());
        let clients: ClientReactor<EchoLoad> = reactor(args, None);
        let pattern: Arc<[u8]> = payload(args).into();
        for _ in 0..args.conns {
            let handler = EchoLoad {
                shared: shared.clone(),
                size: args.size,
                text: args.text,
                inflight: args.inflight,
                next_seq: 0,
                expect_seq: 0,
                sent_at: VecDeque::new(),
                pattern: pattern.clone(),
                latencies: Vec::new(),
                echoed: 0,
                errored: false,
            };
            clients
                .connect(&args.url, handler)
                .unwrap_or_else(|e| usage(&format!("{}: {e}", args.url)));
        }
        let opened = shared.wait_open(args.conns, Duration::from_secs(30));
        if !opened || shared.opened.load(Ordering::Relaxed) < args.conns {
            usage(&format!(
                "only {} of {} connections opened",
                shared.opened.load(Ordering::Relaxed),
                args.conns
            ));
        }
        EchoRun {
            shared,
            clients,
            conns: args.conns,
        }
    }

    /// Warms up for a moment, then measures a window of `secs` (see [`measure`]).
    fn measure(
        &self,
        secs: f64,
        tick_every: Duration,
        tick: impl FnMut(),
        extra: impl Fn() -> String,
    ) -> f64 {
        measure(
            &self.shared,
            Duration::from_millis(200),
            secs,
            tick_every,
            tick,
            extra,
        )
    }

    /// Stops sending, waits (bounded) for every connection to close, shuts the client
    /// reactor down and sums up.
    fn finish(self, secs: f64) -> EchoStats {
        let shared = &self.shared;
        shared.stop.store(true, Ordering::Relaxed);
        wait_until(
            "connections to close",
            Duration::from_secs(15),
            || shared.closed.load(Ordering::Relaxed) >= self.conns,
            || {
                format!(
                    "{} of {} closed",
                    shared.closed.load(Ordering::Relaxed),
                    self.conns
                )
            },
        );
        let _ = self.clients.shutdown(Duration::from_secs(2));
        let mut latencies = std::mem::take(&mut *shared.latencies.lock().unwrap());
        latencies.sort_unstable();
        EchoStats {
            secs,
            messages: shared.received.load(Ordering::Relaxed),
            messages_total: shared.received_total.load(Ordering::Relaxed),
            bytes: shared.bytes.load(Ordering::Relaxed),
            errors: shared.errors.load(Ordering::Relaxed)
                + shared.failed.load(Ordering::Relaxed) as u64,
            p50_us: percentile(&latencies, 50.0),
            p99_us: percentile(&latencies, 99.0),
            p999_us: percentile(&latencies, 99.9),
        }
    }
}

impl EchoStats {
    /// The JSON fields both `echo` and `slow` report, without braces.
    fn json_fields(&self) -> String {
        format!(
            "\"secs\":{:.3},\"messages\":{},\"messages_total\":{},\"msgs_per_sec\":{:.1},\
             \"mb_per_sec\":{:.3},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}",
            self.secs,
            self.messages,
            self.messages_total,
            self.messages as f64 / self.secs,
            self.bytes as f64 / self.secs / 1e6,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.errors,
        )
    }
}

fn echo(args: &Args) {
    let run = EchoRun::open(args);
    let secs = run.measure(args.secs, Duration::from_secs(1), || {}, String::new);
    let backend = run.clients.backend();
    // Wire bytes (frames as sent and read, the handshake included) per message, each way.
    let wire = run.clients.stats();
    let per = |bytes: u64, messages: u64| bytes as f64 / messages.max(1) as f64;
    let stats = run.finish(secs);
    println!(
        "{{\"mode\":\"echo\",\"url\":{},\"conns\":{},\"size\":{},\"inflight\":{},\"text\":{},\
         \"json\":{},\"deflate\":{},\"wire_out_per_msg\":{:.1},\"wire_in_per_msg\":{:.1},{},\
         \"client_backend\":\"{}\"}}",
        json_str(Some(&args.url)),
        args.conns,
        args.size,
        args.inflight,
        args.text,
        args.json,
        args.deflate,
        per(wire.bytes_out, wire.messages_out),
        per(wire.bytes_in, wire.messages_in),
        stats.json_fields(),
        backend,
    );
}

// ----- idle -----

struct Idle {
    shared: Arc<Shared>,
    open: bool,
}

impl Handler for Idle {
    fn on_open(&mut self, _ws: &mut Ws<'_>) {
        self.open = true;
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        // A connect that failed (1006 before opening) never was held.
        if self.open {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

fn rss_kib(pid: u32) -> u64 {
    try_rss_kib(pid).unwrap_or_else(|| usage(&format!("cannot read the RSS of pid {pid}")))
}

/// VmRSS of `pid` in KiB, or `None` once the process is gone.
fn try_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
}

/// The URL with its host replaced by 127.0.0.(1 + i % hosts), so more than one
/// destination address spreads connections over several ephemeral-port spaces.
fn spread(url: &str, i: usize, hosts: usize) -> String {
    if hosts <= 1 || !url.starts_with("ws://127.0.0.1:") {
        return url.to_string();
    }
    url.replacen("127.0.0.1", &format!("127.0.0.{}", 1 + i % hosts), 1)
}

fn idle(args: &Args) {
    let pid = args
        .pid
        .unwrap_or_else(|| usage("idle needs --pid of the server"));
    let before = rss_kib(pid);
    let shared = Arc::new(Shared::default());
    // The reactor pings connections that stay quiet, as a real idle client would.
    let clients: ClientReactor<Idle> = reactor(args, Some(Duration::from_secs(5)));
    for i in 0..args.conns {
        clients
            .connect(
                &spread(&args.url, i, args.hosts),
                Idle {
                    shared: shared.clone(),
                    open: false,
                },
            )
            .unwrap_or_else(|e| usage(&format!("{}: {e}", args.url)));
    }
    let all = shared.wait_open(args.conns, Duration::from_secs(120));
    let opened = shared.opened.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(args.secs.max(1.0)));
    let after = rss_kib(pid);
    let still_open = opened - shared.dropped.load(Ordering::Relaxed).min(opened);
    eprintln!("wsload: {opened} opened, {still_open} held; server RSS {before} KiB -> {after} KiB");
    let _ = clients.shutdown(Duration::from_secs(5));
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / still_open.max(1) as f64;
    println!(
        "{{\"mode\":\"idle\",\"url\":{},\"conns\":{},\"opened\":{},\"held\":{},\"all_opened\":{},\
         \"rss_before_kib\":{},\"rss_after_kib\":{},\"bytes_per_conn\":{:.0},\"errors\":{}}}",
        json_str(Some(&args.url)),
        args.conns,
        opened,
        still_open,
        all && opened == args.conns,
        before,
        after,
        per_conn,
        args.conns - still_open,
    );
}

// ----- churn -----

/// One connection of a `churn` run: sends its message when open, closes (1000) when the
/// echo is back, and counts the cycle when the close handshake completes.
struct Churn {
    shared: Arc<Shared>,
    started: Instant,
    payload: Arc<[u8]>,
    /// Whether the echo came back (`Some`), and right (`Some(true)`).
    echoed: Option<bool>,
    /// `on_error` was called: the close that follows counts the failure, once.
    errored: bool,
}

impl Handler for Churn {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        if ws.send_binary(&self.payload).is_err() {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let right =
            self.echoed.is_none() && !message.is_text() && message.as_bytes() == &self.payload[..];
        if !right {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.echoed = Some(right);
        let _ = ws.close_connection(1000, "");
    }

    fn on_error(&mut self, _ws: &mut Ws<'_>, _error: &Error) {
        // A close follows every error, and counts it (a failed connect is one error).
        self.errored = true;
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, _reason: &str) {
        if self.errored || code != 1000 || self.echoed.is_none() {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        } else if self.echoed == Some(true) && self.shared.measuring.load(Ordering::Relaxed) {
            self.shared.received.fetch_add(1, Ordering::Relaxed);
            let micros = self.started.elapsed().as_micros().min(u32::MAX as u128) as u32;
            self.shared.latencies.lock().unwrap().push(micros);
        }
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

fn churn(args: &Args) {
    let shared = Arc::new(Shared::default());
    let clients: ClientReactor<Churn> = reactor(args, None);
    let payload: Arc<[u8]> = pattern(args.size, false).into();
    let issued = Cell::new(0usize);
    // Keeps `--conns` cycles under way: a new connection for each one that closed.
    let top_up = || {
        while issued.get() - shared.closed.load(Ordering::Relaxed) < args.conns {
            let handler = Churn {
                shared: shared.clone(),
                started: Instant::now(),
                payload: payload.clone(),
                echoed: None,
                errored: false,
            };
            let url = spread(&args.url, issued.get(), args.hosts);
            clients
                .connect(&url, handler)
                .unwrap_or_else(|e| usage(&format!("{url}: {e}")));
            issued.set(issued.get() + 1);
        }
    };
    // Warm-up: half a second of cycles before the window.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(500) {
        top_up();
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = measure(
        &shared,
        Duration::ZERO,
        args.secs,
        Duration::from_millis(1),
        top_up,
        String::new,
    );
    let cycles = shared.received.load(Ordering::Relaxed);
    let all_closed = wait_until(
        "connections to close",
        Duration::from_secs(15),
        || shared.closed.load(Ordering::Relaxed) >= issued.get(),
        || {
            format!(
                "{} of {} closed",
                shared.closed.load(Ordering::Relaxed),
                issued.get()
            )
        },
    );
    let _ = clients.shutdown(Duration::from_secs(2));
    let mut latencies = std::mem::take(&mut *shared.latencies.lock().unwrap());
    latencies.sort_unstable();
    let errors = shared.errors.load(Ordering::Relaxed)
        + shared.failed.load(Ordering::Relaxed) as u64
        + (issued.get() - shared.closed.load(Ordering::Relaxed).min(issued.get())) as u64;
    println!(
        "{{\"mode\":\"churn\",\"url\":{},\"conns\":{},\"size\":{},\"secs\":{:.3},\
         \"cycles\":{},\"cycles_per_sec\":{:.1},\"connections\":{},\"all_closed\":{},\
         \"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}}}",
        json_str(Some(&args.url)),
        args.conns,
        args.size,
        secs,
        cycles,
        cycles as f64 / secs,
        issued.get(),
        all_closed,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 99.9),
        errors,
    );
}

// ----- broadcast -----

/// `a == b` for the few bytes of a broadcast body, without a call: `==` on slices calls
/// `memcmp`, which cost 8 % of `wsload`'s samples at 500 clients of 8-byte bodies.
fn same_short(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || a.len() > 64 {
        return a == b;
    }
    // Eight bytes at a time: one compare for the 8-byte body of a 20-byte message, where
    // a byte-wise fold took a sixth of `wsload`'s own samples at 500 clients.
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("8 bytes"));
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = wa.remainder().iter().zip(wb.remainder());
    let diff = wa
        .zip(wb)
        .fold(0, |diff, (x, y)| diff | (word(x) ^ word(y)));
    tail.fold(diff, |diff, (x, y)| diff | u64::from(x ^ y)) == 0
}

/// Bytes of a `broadcast` message's header: the sender's id (u32) and the round (u64),
/// little-endian; the rest of the message is [`pattern`].
const BROADCAST_HEADER: usize = 12;

/// The round barrier every client of a `broadcast` run shares.
struct Rounds {
    conns: usize,
    epoch: Instant,
    /// The message body (`pattern`), its first [`BROADCAST_HEADER`] bytes overwritten.
    pattern: Vec<u8>,
    /// Every client's sender, by id: whichever loop completes a round starts the next one
    /// through them. Its lock also orders `Shared::stop` against starting a round.
    senders: Mutex<Vec<Option<Sender>>>,
    /// Clients that have received every message of the current round.
    done: AtomicUsize,
    /// Rounds started and completed since the first.
    started: AtomicU64,
    completed: AtomicU64,
    /// When the current round started (nanoseconds since `epoch`).
    started_ns: AtomicU64,
    /// Deliveries that passed the checks, over the whole run (warm-up included).
    delivered: AtomicU64,
    /// Round times (first send → last delivery), µs, of rounds completed while measuring.
    round_us: Mutex<Vec<u32>>,
}

impl Rounds {
    fn message(&self, id: usize, round: u64) -> Vec<u8> {
        let mut out = self.pattern.clone();
        out[..4].copy_from_slice(&(id as u32).to_le_bytes());
        out[4..BROADCAST_HEADER].copy_from_slice(&round.to_le_bytes());
        out
    }

    /// Starts round `round`: every client sends its one message (unless the run is stopping).
    fn start(&self, shared: &Shared, round: u64) {
        let senders = self.senders.lock().unwrap();
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        self.started.store(round + 1, Ordering::Release);
        self.started_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        for (id, sender) in senders.iter().enumerate() {
            let sent = sender
                .as_ref()
                .is_some_and(|sender| sender.send_binary(self.message(id, round)).is_ok());
            if !sent {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A client has received every message of the current round; the last one to get
    /// there ends the round and starts the next.
    fn client_done(&self, shared: &Shared) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 < self.conns {
            return;
        }
        // No client can finish the next round before it starts, below.
        self.done.store(0, Ordering::Release);
        let round = self.completed.fetch_add(1, Ordering::AcqRel);
        if shared.measuring.load(Ordering::Relaxed) {
            let took = (self.epoch.elapsed().as_nanos() as u64)
                .saturating_sub(self.started_ns.load(Ordering::Relaxed));
            self.round_us
                .lock()
                .unwrap()
                .push((took / 1000).min(u32::MAX as u64) as u32);
        }
        self.start(shared, round + 1);
    }
}

/// One `broadcast` client: checks every message of the round it is in (sender id, round
/// number, body, opcode; each sender once) and reports when it has all of them.
struct BroadcastClient {
    id: usize,
    shared: Arc<Shared>,
    rounds: Arc<Rounds>,
    round: u64,
    got: usize,
    /// Senders heard from in this round, one bit each.
    seen: Vec<u64>,
    /// `on_error` was called: the close that follows counts the failure, once.
    errored: bool,
}

impl Handler for BroadcastClient {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        self.rounds.senders.lock().unwrap()[self.id] = Some(ws.sender());
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
        let bytes = message.as_bytes();
        let ok = !message.is_text()
            && bytes.len() == self.rounds.pattern.len()
            && same_short(
                &bytes[BROADCAST_HEADER..],
                &self.rounds.pattern[BROADCAST_HEADER..],
            );
        let (from, round) = if ok {
            (
                u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize,
                u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes")),
            )
        } else {
            (usize::MAX, u64::MAX)
        };
        if !ok
            || round != self.round
            || from >= self.rounds.conns
            || self.seen[from / 64] & (1 << (from % 64)) != 0
        {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.seen[from / 64] |= 1 << (from % 64);
        self.got += 1;
        if self.got == self.rounds.conns {
            // Counted once a round, not per message: three shared atomic adds per
            // delivery were the costliest lines of wsload's own profile. A round that
            // straddles the start or the end of the measuring window counts wholly in or
            // out of it (at most one round per client, against thousands measured).
            let n = self.got as u64;
            self.rounds.delivered.fetch_add(n, Ordering::Relaxed);
            if self.shared.measuring.load(Ordering::Relaxed) {
                self.shared.received.fetch_add(n, Ordering::Relaxed);
                self.shared
                    .bytes
                    .fetch_add(n * bytes.len() as u64, Ordering::Relaxed);
            }
            self.round += 1;
            self.got = 0;
            self.seen.fill(0);
            self.rounds.client_done(&self.shared);
        }
    }

    fn on_error(&mut self, _ws: &mut Ws<'_>, _error: &Error) {
        // A close follows every error, and counts it (a failed connect is one error).
        self.errored = true;
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        // The deliveries of an unfinished round, for the count of missing ones.
        self.rounds
            .delivered
            .fetch_add(std::mem::take(&mut self.got) as u64, Ordering::Relaxed);
        if self.errored || !self.shared.stop.load(Ordering::Relaxed) {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// `broadcast`: uWebSockets' `broadcast_test` against a pub/sub server. `--conns` clients on
/// one topic (the URL's path); each round every client sends one `--size`-byte message, and
/// the round ends when every client has received all `conns` messages of it (the server
/// delivers each to every subscriber, its sender included), whereupon the next starts. Over
/// `--secs` after a one-second warm-up: deliveries/s, rounds/s (deliveries/s ÷ conns²), and
/// the round time's percentiles.
fn broadcast(args: &Args) {
    if args.size < BROADCAST_HEADER {
        usage(&format!(
            "broadcast needs --size {BROADCAST_HEADER} or more"
        ));
    }
    let conns = args.conns.max(1);
    let mut pattern = pattern(args.size, false);
    pattern[..BROADCAST_HEADER].fill(0);
    let shared = Arc::new(Shared::default());
    let rounds = Arc::new(Rounds {
        conns,
        epoch: Instant::now(),
        pattern,
        senders: Mutex::new(vec![None; conns]),
        done: AtomicUsize::new(0),
        started: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        started_ns: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        round_us: Mutex::new(Vec::new()),
    });
    let clients: ClientReactor<BroadcastClient> = reactor(args, None);
    for id in 0..conns {
        shared.pace(id, MAX_CONNECTING);
        let handler = BroadcastClient {
            id,
            shared: shared.clone(),
            rounds: rounds.clone(),
            round: 0,
            got: 0,
            seen: vec![0; conns.div_ceil(64)],
            errored: false,
        };
        clients
            .connect(&args.url, handler)
            .unwrap_or_else(|e| usage(&format!("{}: {e}", args.url)));
    }
    let opened = shared.wait_open(conns, Duration::from_secs(60));
    if !opened || shared.opened.load(Ordering::Relaxed) < conns {
        usage(&format!(
            "only {} of {conns} connections opened",
            shared.opened.load(Ordering::Relaxed)
        ));
    }
    rounds.start(&shared, 0);
    let last_rounds = Cell::new(0);
    let secs = measure(
        &shared,
        Duration::from_secs(1),
        args.secs,
        Duration::from_secs(1),
        || {},
        || {
            let done = rounds.round_us.lock().unwrap().len();
            format!(", {:>6} rounds", done - last_rounds.replace(done))
        },
    );
    // No round starts after this; the one in flight gets 5 s to complete.
    {
        let _gate = rounds.senders.lock().unwrap();
        shared.stop.store(true, Ordering::Relaxed);
    }
    let drained = wait_until(
        "the last round",
        Duration::from_secs(5),
        || rounds.completed.load(Ordering::Acquire) >= rounds.started.load(Ordering::Acquire),
        || {
            format!(
                "{} of {conns} clients have every message of the round",
                rounds.done.load(Ordering::Relaxed)
            )
        },
    );
    let backend = clients.backend();
    // Closing adds each client's deliveries of an unfinished round.
    let _ = clients.shutdown(Duration::from_secs(2));
    let expected = rounds.started.load(Ordering::Acquire) * (conns * conns) as u64;
    let missing = expected.saturating_sub(rounds.delivered.load(Ordering::Relaxed));
    if !drained {
        eprintln!(
            "wsload: round {} never completed: {missing} deliveries missing (does the server \
             deliver every message to every client of the topic, the sender included?)",
            rounds.completed.load(Ordering::Relaxed)
        );
    }
    let mut round_us = std::mem::take(&mut *rounds.round_us.lock().unwrap());
    round_us.sort_unstable();
    let deliveries = shared.received.load(Ordering::Relaxed);
    let per_sec = deliveries as f64 / secs;
    println!(
        "{{\"mode\":\"broadcast\",\"url\":{},\"conns\":{},\"size\":{},\"secs\":{:.3},\
         \"deliveries\":{},\"deliveries_per_sec\":{:.1},\"msgs_per_sec\":{:.1},\"rounds\":{},\
         \"rounds_per_sec\":{:.3},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"rounds_total\":{},\
         \"missing\":{},\"stalled\":{},\"errors\":{},\"client_backend\":\"{}\"}}",
        json_str(Some(&args.url)),
        conns,
        args.size,
        secs,
        deliveries,
        per_sec,
        per_sec,
        round_us.len(),
        per_sec / (conns * conns) as f64,
        percentile(&round_us, 50.0),
        percentile(&round_us, 99.0),
        percentile(&round_us, 99.9),
        rounds.completed.load(Ordering::Relaxed),
        missing,
        !drained,
        shared.errors.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) as u64,
        backend,
    );
}

// ----- fanout -----

/// Bytes of a `fanout` message: the send time (nanoseconds since the run's epoch) and a
/// sequence number, both u64 little-endian.
const FANOUT_SIZE: usize = 16;

/// What the publisher and the subscribers of a `fanout` run share.
struct Fanout {
    epoch: Instant,
    /// Messages with a lower sequence number are the warm-up's: delivered and checked, but
    /// not measured. `u64::MAX` until the warm-up ends (set before the first measured
    /// publish), since a warm-up cut short by its one second sends fewer than planned.
    warmup_msgs: AtomicU64,
    publisher: Mutex<Option<Sender>>,
    /// Subscriber deliveries that passed the checks, warm-up included.
    delivered: AtomicU64,
    /// The publisher's own messages, delivered back to it (pub/sub servers include the sender).
    self_delivered: AtomicU64,
    /// The latest measured delivery (nanoseconds since `epoch`).
    last_ns: AtomicU64,
    /// The subscribers of each subscriber URL (`--sub-url`, or just `--url`).
    groups: Vec<FanoutGroup>,
}

/// The subscribers of one URL in a `fanout` run, counted apart.
struct FanoutGroup {
    url: String,
    subs: usize,
    /// Deliveries that passed the checks, warm-up included.
    delivered: AtomicU64,
    /// Measured deliveries (the window's messages).
    received: AtomicU64,
    /// The latest measured delivery (nanoseconds since `epoch`).
    last_ns: AtomicU64,
    /// Publish → delivery of the measured deliveries, in µs (each subscriber's, on close).
    latencies: Mutex<Vec<u32>>,
}

/// One `fanout` client: a subscriber, or the publisher (which also receives its own
/// messages; those are counted apart and left out of the latencies).
struct FanoutClient {
    shared: Arc<Shared>,
    fanout: Arc<Fanout>,
    publisher: bool,
    /// The subscriber's URL, an index into `Fanout::groups`.
    group: usize,
    next_seq: u64,
    latencies: Vec<u32>,
    /// `on_error` was called: the close that follows counts the failure, once.
    errored: bool,
}

impl Handler for FanoutClient {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        if self.publisher {
            *self.fanout.publisher.lock().unwrap() = Some(ws.sender());
        }
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
        let bytes = message.as_bytes();
        if bytes.len() != FANOUT_SIZE || message.is_text() {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sent = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let seq = u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes"));
        if self.publisher {
            self.fanout.self_delivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if seq < self.next_seq {
            // A duplicate or out of order; gaps show in the missing count.
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.next_seq = seq + 1;
        let group = &self.fanout.groups[self.group];
        self.fanout.delivered.fetch_add(1, Ordering::Relaxed);
        group.delivered.fetch_add(1, Ordering::Relaxed);
        if seq >= self.fanout.warmup_msgs.load(Ordering::Acquire) {
            let now = self.fanout.epoch.elapsed().as_nanos() as u64;
            self.shared.received.fetch_add(1, Ordering::Relaxed);
            group.received.fetch_add(1, Ordering::Relaxed);
            self.fanout.last_ns.fetch_max(now, Ordering::Relaxed);
            group.last_ns.fetch_max(now, Ordering::Relaxed);
            self.latencies
                .push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
        }
    }

    fn on_error(&mut self, _ws: &mut Ws<'_>, _error: &Error) {
        // A close follows every error, and counts it (a failed connect is one error).
        self.errored = true;
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        if self.errored || !self.shared.stop.load(Ordering::Relaxed) {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        if !self.publisher {
            self.fanout.groups[self.group]
                .latencies
                .lock()
                .unwrap()
                .append(&mut self.latencies);
        }
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// `fanout`: one publisher and `--subs` subscribers, all on one topic (the URL's path). The
/// publisher sends a 16-byte binary message (send time, sequence number) at `--rate` per
/// second: one second's worth as warm-up, then for `--secs`; every subscriber should get
/// each one, in order. Reports deliveries/s (the measured messages' deliveries over the
/// time from their first publish to the later of the last publish and the last delivery),
/// publish → delivery latency percentiles, and missing deliveries (after waiting up to
/// `--drain-secs` (10 s) for stragglers). With `--sub-url`, subscriber `i` connects to the
/// `i % n`-th of those URLs and the publisher to `--url`; `per_url` has the same numbers
/// for each subscriber URL.
fn fanout(args: &Args) {
    let subs = args.conns;
    let sub_urls = if args.sub_urls.is_empty() {
        std::slice::from_ref(&args.url)
    } else {
        &args.sub_urls[..]
    };
    let groups = sub_urls
        .iter()
        .enumerate()
        .map(|(g, url)| FanoutGroup {
            url: url.clone(),
            // Round-robin: the first `subs % n` URLs get one more.
            subs: subs / sub_urls.len() + usize::from(g < subs % sub_urls.len()),
            delivered: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
        })
        .collect();
    // parse_args checked it: finite, and 1 / rate is at most `--secs`.
    let rate = args.rate;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let shared = Arc::new(Shared::default());
    let fanout = Arc::new(Fanout {
        epoch: Instant::now(),
        warmup_msgs: AtomicU64::new(u64::MAX),
        publisher: Mutex::new(None),
        delivered: AtomicU64::new(0),
        self_delivered: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
        groups,
    });
    let clients: ClientReactor<FanoutClient> = reactor(args, None);
    for i in 0..=subs {
        shared.pace(i, MAX_CONNECTING);
        let handler = FanoutClient {
            shared: shared.clone(),
            fanout: fanout.clone(),
            publisher: i == subs,
            group: i % sub_urls.len(),
            next_seq: 0,
            latencies: Vec::new(),
            errored: false,
        };
        let url = if i == subs {
            &args.url
        } else {
            &sub_urls[i % sub_urls.len()]
        };
        clients
            .connect(url, handler)
            .unwrap_or_else(|e| usage(&format!("{url}: {e}")));
    }
    let opened = shared.wait_open(subs + 1, Duration::from_secs(120));
    if !opened || shared.opened.load(Ordering::Relaxed) <= subs {
        usage(&format!(
            "only {} of {} connections opened",
            shared.opened.load(Ordering::Relaxed),
            subs + 1
        ));
    }
    let Some(sender) = fanout.publisher.lock().unwrap().clone() else {
        usage("the publisher did not connect")
    };
    // Servers joined by a backplane subscribe to it asynchronously: a first publish right
    // after the last connection opened could beat the other server's subscription.
    std::thread::sleep(Duration::from_secs_f64(args.settle_secs.max(0.0)));
    let publish = |seq: u64| {
        let mut payload = (fanout.epoch.elapsed().as_nanos() as u64)
            .to_le_bytes()
            .to_vec();
        payload.extend_from_slice(&seq.to_le_bytes());
        sender.send_binary(payload).is_ok()
    };
    // Warm-up: one second's worth of messages, checked but not measured. It stops at one
    // second whatever the rate (one the publisher cannot keep up with, or below 1/s).
    let mut seq = 0u64;
    let warm_start = Instant::now();
    let warm_end = warm_start + Duration::from_secs(1);
    let planned = rate.ceil() as u64;
    let mut next = warm_start;
    while seq < planned && Instant::now() < warm_end && publish(seq) {
        seq += 1;
        next += interval;
        std::thread::sleep(next.min(warm_end).saturating_duration_since(Instant::now()));
    }
    let warmup_msgs = seq;
    fanout.warmup_msgs.store(warmup_msgs, Ordering::Release);
    shared.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let start_ns = fanout.epoch.elapsed().as_nanos() as u64;
    let window = Duration::from_secs_f64(args.secs);
    let end = start + window;
    next = start;
    let (mut last_line, mut last_count) = (start, 0);
    while start.elapsed() < window {
        if !publish(seq) {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        seq += 1;
        next += interval;
        // Never past the window's end: the run stays within `--secs` at any rate.
        std::thread::sleep(next.min(end).saturating_duration_since(Instant::now()));
        if last_line.elapsed() >= Duration::from_secs(1) {
            let now = shared.received.load(Ordering::Relaxed);
            eprintln!(
                "wsload: {:>5.1}s {:>10} msgs/s",
                start.elapsed().as_secs_f64(),
                now - last_count
            );
            (last_line, last_count) = (Instant::now(), now);
        }
    }
    // The window's last (partial) second, counted like the others (compare.sh sums them).
    eprintln!(
        "wsload: {:>5.1}s {:>10} msgs/s",
        start.elapsed().as_secs_f64(),
        shared.received.load(Ordering::Relaxed) - last_count
    );
    let published_ns = fanout.epoch.elapsed().as_nanos() as u64;
    let published = seq;
    let expected = published * subs as u64;
    wait_until(
        "deliveries",
        Duration::from_secs_f64(args.drain_secs.max(0.0)),
        || fanout.delivered.load(Ordering::Relaxed) >= expected,
        || format!("{} of {expected}", fanout.delivered.load(Ordering::Relaxed)),
    );
    shared.measuring.store(false, Ordering::Relaxed);
    shared.stop.store(true, Ordering::Relaxed);
    let backend = clients.backend();
    let _ = clients.shutdown(Duration::from_secs(5));
    let measured = published - warmup_msgs.min(published);
    let mut latencies = Vec::new();
    let mut per_url = Vec::new();
    for group in &fanout.groups {
        let mut mine = std::mem::take(&mut *group.latencies.lock().unwrap());
        mine.sort_unstable();
        let deliveries = group.received.load(Ordering::Relaxed);
        let end_ns = published_ns.max(group.last_ns.load(Ordering::Relaxed));
        let secs = (end_ns - start_ns) as f64 / 1e9;
        per_url.push(format!(
            "{{\"url\":{},\"subs\":{},\"deliveries\":{},\"expected\":{},\"secs\":{:.3},\
             \"deliveries_per_sec\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\
             \"missing\":{}}}",
            json_str(Some(&group.url)),
            group.subs,
            deliveries,
            measured * group.subs as u64,
            secs,
            deliveries as f64 / secs,
            percentile(&mine, 50.0),
            percentile(&mine, 99.0),
            percentile(&mine, 99.9),
            (published * group.subs as u64).saturating_sub(group.delivered.load(Ordering::Relaxed)),
        ));
        latencies.append(&mut mine);
    }
    latencies.sort_unstable();
    let deliveries = shared.received.load(Ordering::Relaxed);
    let end_ns = published_ns.max(fanout.last_ns.load(Ordering::Relaxed));
    let secs = (end_ns - start_ns) as f64 / 1e9;
    println!(
        "{{\"mode\":\"fanout\",\"url\":{},\"subs\":{},\"rate\":{},\"published\":{},\
         \"measured_published\":{},\"deliveries\":{},\"expected\":{},\"secs\":{:.3},\
         \"offered_per_sec\":{:.1},\"deliveries_per_sec\":{:.1},\"msgs_per_sec\":{:.1},\
         \"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"missing\":{},\"self_delivered\":{},\
         \"errors\":{},\"client_backend\":\"{}\",\"per_url\":[{}]}}",
        json_str(Some(&args.url)),
        subs,
        args.rate,
        published,
        measured,
        deliveries,
        measured * subs as u64,
        secs,
        rate * subs as f64,
        deliveries as f64 / secs,
        deliveries as f64 / secs,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 99.9),
        expected.saturating_sub(fanout.delivered.load(Ordering::Relaxed)),
        fanout.self_delivered.load(Ordering::Relaxed),
        shared.errors.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) as u64,
        backend,
        per_url.join(","),
    );
}

// ----- slow -----

/// The flooder's phases, in `FloodState::phase`.
const FLOOD_CONNECTING: usize = 0;
const FLOOD_OPEN: usize = 1;
const FLOOD_FAILED: usize = 2;

/// What the flooder thread and the main thread share while it runs.
#[derive(Default)]
struct FloodState {
    phase: AtomicUsize,
    stop: AtomicBool,
    /// Frame bytes the socket took (the handshake not counted).
    bytes: AtomicU64,
}

/// How the flood went. Times are seconds since the flooder's handshake completed.
struct FloodResult {
    /// Why the connection or the handshake failed, if it did.
    connect_error: Option<String>,
    frames: u64,
    secs: f64,
    /// The last write that moved bytes: long before `secs` means the server stopped
    /// reading the flooder (its receive window filled up).
    last_progress_s: f64,
    /// When a write failed (reset or broken pipe: the server dropped the connection) and why.
    disconnected: Option<(f64, String)>,
}

/// Connects a plain blocking socket and completes the opening handshake with a client
/// [`Driver`](websocket_driver::Driver) (which only encodes and parses; no reactor).
fn flooder_connect(url: &str) -> Result<(TcpStream, websocket_driver::Driver), String> {
    // The host the client driver and the loopback check see (userinfo and brackets off).
    let parsed = ClientUrl::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let addr = (parsed.host.as_str(), parsed.port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|_| stream.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let mut driver = websocket_driver::make_client(url, &Options::default())
        .map_err(|e| format!("client driver: {e}"))?;
    driver.start_connection();
    let request = driver.pending_output().to_vec();
    stream.write_all(&request).map_err(|e| e.to_string())?;
    driver.consume_output(request.len());
    let mut buf = vec![0u8; 4096];
    loop {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed during the handshake".into());
        }
        let mut at = 0;
        loop {
            let (used, event) = driver.poll_event(&mut buf[at..n]);
            at += used;
            match event {
                None => break,
                Some(Event::Open) => return Ok((stream, driver)),
                Some(Event::Error(e)) => return Err(format!("handshake: {e}")),
                Some(Event::Close { code, .. }) => {
                    return Err(format!("closed during the handshake ({code})"));
                }
                Some(_) => {}
            }
        }
    }
}

/// The flooder: one connection that sends `size`-byte binary messages as fast as the
/// socket takes them and never reads, on a plain blocking socket in its own thread, so
/// nothing on this side (no reactor, no flow control of ours) holds it back. Stops when
/// `state.stop` is set or a write fails; the socket is closed on return.
fn flood(url: &str, size: usize, state: &FloodState) -> FloodResult {
    let (mut stream, mut driver) = match flooder_connect(url) {
        Ok(open) => open,
        Err(e) => {
            state.phase.store(FLOOD_FAILED, Ordering::Release);
            return FloodResult {
                connect_error: Some(e),
                frames: 0,
                secs: 0.0,
                last_progress_s: 0.0,
                disconnected: None,
            };
        }
    };
    // One masked frame, encoded once by the driver and written again and again: the server
    // cannot tell a reused mask from a fresh one, and the flooder stays cheap on the client CPU.
    driver
        .send_binary(&pattern(size, false))
        .expect("an open client driver sends");
    let frame = driver.pending_output().to_vec();
    driver.consume_output(frame.len());
    // Short write timeouts so a flooder the server no longer reads still sees `stop`.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    state.phase.store(FLOOD_OPEN, Ordering::Release);
    let start = Instant::now();
    let mut last_progress = start;
    let (mut pos, mut frames) = (0, 0u64);
    let mut disconnected = None;
    while !state.stop.load(Ordering::Relaxed) {
        match stream.write(&frame[pos..]) {
            Ok(0) => {
                disconnected = Some((start.elapsed().as_secs_f64(), "write returned 0".into()));
                break;
            }
            Ok(n) => {
                state.bytes.fetch_add(n as u64, Ordering::Relaxed);
                last_progress = Instant::now();
                pos += n;
                if pos == frame.len() {
                    pos = 0;
                    frames += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                disconnected = Some((start.elapsed().as_secs_f64(), e.to_string()));
                break;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    FloodResult {
        connect_error: None,
        frames,
        secs: start.elapsed().as_secs_f64(),
        last_progress_s: last_progress.duration_since(start).as_secs_f64(),
        disconnected,
    }
}

/// A JSON string (or `null`).
fn json_str(s: Option<&str>) -> String {
    match s {
        None => "null".into(),
        Some(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
    }
}

/// `slow`: the `echo` workload on `--conns` connections next to one flooder that never
/// reads, while the server's VmRSS is sampled every 100 ms. Shows whether the server
/// bounds the memory a non-reading client costs it, and whether the other clients still
/// get served.
fn slow(args: &Args) {
    let pid = args
        .pid
        .unwrap_or_else(|| usage("slow needs --pid of the server"));
    let rss_start = rss_kib(pid);
    let run = EchoRun::open(args);
    let state = Arc::new(FloodState::default());
    let flooder = {
        let (state, url, size) = (state.clone(), args.url.clone(), args.flood_size);
        std::thread::Builder::new()
            .name("flooder".into())
            .spawn(move || flood(&url, size, &state))
            .unwrap_or_else(|e| usage(&format!("cannot start the flooder thread: {e}")))
    };
    wait_until(
        "the flooder's handshake",
        Duration::from_secs(20),
        || state.phase.load(Ordering::Acquire) != FLOOD_CONNECTING,
        || "connecting".into(),
    );
    let rss_max = Cell::new(rss_start);
    let rss_last = Cell::new(rss_start);
    let samples = Cell::new(1u64);
    let gone = Cell::new(false);
    let capped = Cell::new(false);
    let sample = || match try_rss_kib(pid) {
        Some(kib) => {
            rss_last.set(kib);
            rss_max.set(rss_max.get().max(kib));
            samples.set(samples.get() + 1);
            if kib.saturating_sub(rss_start) > args.max_rss_growth_kib && !capped.get() {
                // A server without flow control could take the machine's memory: stop here.
                eprintln!(
                    "wsload: server RSS grew by {} MiB (over --max-rss-growth-mib): stopping the flooder",
                    kib.saturating_sub(rss_start) / 1024
                );
                capped.set(true);
                state.stop.store(true, Ordering::Relaxed);
            }
        }
        None => gone.set(true),
    };
    let secs = run.measure(args.secs, Duration::from_millis(100), sample, || {
        format!(
            ", server RSS {} MiB, flooder sent {} MiB",
            rss_last.get() / 1024,
            state.bytes.load(Ordering::Relaxed) >> 20
        )
    });
    sample();
    state.stop.store(true, Ordering::Relaxed);
    let flood = flooder
        .join()
        .unwrap_or_else(|_| usage("the flooder thread panicked"));
    let backend = run.clients.backend();
    let stats = run.finish(secs);
    if let Some(e) = &flood.connect_error {
        eprintln!("wsload: the flooder did not connect: {e}");
    }
    let growth = rss_max.get().saturating_sub(rss_start);
    eprintln!(
        "wsload: server RSS {rss_start} KiB at start, +{growth} KiB at most; flooder sent {} MiB{}",
        state.bytes.load(Ordering::Relaxed) >> 20,
        match &flood.disconnected {
            Some((at, why)) => format!(", disconnected after {at:.2} s ({why})"),
            None => String::new(),
        }
    );
    println!(
        "{{\"mode\":\"slow\",\"url\":{},\"conns\":{},\"size\":{},\"flood_size\":{},{},\
         \"server_rss_start_kib\":{},\"server_rss_max_kib\":{},\"server_rss_end_kib\":{},\
         \"server_rss_growth_max_kib\":{},\"rss_samples\":{},\"server_gone\":{},\"rss_cap_hit\":{},\
         \"flooder_connected\":{},\"flooder_error\":{},\"flooder_bytes_sent\":{},\"flooder_frames_sent\":{},\
         \"flooder_secs\":{:.3},\"flooder_last_progress_s\":{:.3},\"flooder_disconnected\":{},\
         \"flooder_disconnected_at_s\":{},\"flooder_disconnect_reason\":{},\"client_backend\":\"{}\"}}",
        json_str(Some(&args.url)),
        args.conns,
        args.size,
        args.flood_size,
        stats.json_fields(),
        rss_start,
        rss_max.get(),
        rss_last.get(),
        growth,
        samples.get(),
        gone.get(),
        capped.get(),
        flood.connect_error.is_none(),
        json_str(flood.connect_error.as_deref()),
        state.bytes.load(Ordering::Relaxed),
        flood.frames,
        flood.secs,
        flood.last_progress_s,
        flood.disconnected.is_some(),
        flood
            .disconnected
            .as_ref()
            .map_or("null".into(), |(at, _)| format!("{at:.3}")),
        json_str(flood.disconnected.as_ref().map(|(_, why)| why.as_str())),
        backend,
    );
}

fn main() {
    // The library prints nothing (its backend line goes to the `log` facade, with no
    // logger installed here); the JSON reports the client backend.
    let args = parse_args();
    // Every mode holds many connections: one descriptor each.
    if let Err(e) = websocket_driver::raise_open_file_limit() {
        eprintln!("wsload: cannot raise the open-file limit: {e}");
    }
    match args.mode.as_str() {
        "echo" => echo(&args),
        "idle" => idle(&args),
        "fanout" => fanout(&args),
        "broadcast" => broadcast(&args),
        "slow" => slow(&args),
        "churn" => churn(&args),
        other => usage(&format!("unknown mode {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::{loopback_only, same_short, stamp};

    #[test]
    fn loopback_only_looks_at_the_host_connected_to() {
        for url in [
            "ws://127.0.0.1:9001/",
            "ws://127.0.0.5:9001/topic",
            "ws://127.1.2.3/",
            "ws://[::1]:9001/",
            "ws://[::1]/",
            "ws://localhost:9001/",
            "ws://user:pw@127.0.0.1:9001/",
            "ws://10.0.0.5@127.0.0.1:9001/",
        ] {
            assert_eq!(loopback_only(url), Ok(()), "{url}");
        }
        for url in [
            // The part after the last `@` is the host the client connects to.
            "ws://localhost@10.0.0.5:9001/",
            "ws://127.0.0.1@10.0.0.5:9001/",
            "ws://127.0.0.1:9001@10.0.0.5/",
            "ws://10.0.0.5:9001/",
            "ws://0.0.0.0:9001/",
            "ws://[::]:9001/",
            "ws://[::ffff:10.0.0.5]:9001/",
            "ws://[2001:db8::1]:9001/",
            // Names that are not loopback (or do not resolve at all).
            "ws://localhost.example.com/",
            "ws://127.evil.example/",
            "ws://localhost.invalid:9001/",
            // Not a URL the client would connect with.
            "http://127.0.0.1:9001/",
            "ws://127.0.0.1:99999/",
            "ws://[::1/",
            "ws:///",
        ] {
            assert!(loopback_only(url).is_err(), "{url}");
        }
    }

    /// Every size of stamp changes from one message to the next, text or binary.
    #[test]
    fn short_stamps_differ_from_message_to_message() {
        for text in [false, true] {
            for len in 1..=10 {
                let (mut a, mut b) = (vec![b'x'; len], vec![b'x'; len]);
                stamp(&mut a, 6, text);
                stamp(&mut b, 7, text);
                assert_ne!(a, b, "len {len}, text {text}");
                if text {
                    assert!(a.is_ascii(), "len {len}");
                }
            }
        }
    }

    #[test]
    fn same_short_is_slice_equality() {
        for len in [0, 1, 8, 63, 64, 65, 200] {
            let a: Vec<u8> = (0..len).map(|i| i as u8).collect();
            assert!(same_short(&a, &a.clone()), "len {len}");
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x80;
                assert!(!same_short(&a, &b), "len {len}, byte {at}");
            }
            if len > 0 {
                assert!(!same_short(&a, &a[..len - 1]), "len {len}, one byte short");
            }
        }
    }
}
