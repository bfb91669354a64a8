//! `wsload`: a WebSocket load generator built on websocket-driver's own reactor-hosted
//! client (`ClientReactor`). Progress goes to stderr, one JSON object to stdout.
//!
//! ```text
//! wsload echo   --url ws://127.0.0.1:9001/ --conns 100 --size 20 --secs 10 [--inflight 1] [--text]
//! wsload idle   --url ws://127.0.0.1:9001/ --conns 10000 --pid PID [--secs 5] [--hosts 4]
//! wsload fanout --url ws://127.0.0.1:9002/ --subs 1000 --secs 10 [--rate 100]
//! wsload slow   --url ws://127.0.0.1:9001/ --conns 10 --size 1024 --secs 5 --pid PID
//!               [--flood-size 65536] [--max-rss-growth-mib 1024]
//! ```
//! Common options: `--threads N` (client event loops, default 1), `--backend auto|epoll|io-uring`.
//! Every run is bounded in time and stops by itself.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use websocket_driver::client::ClientReactor;
use websocket_driver::server::{Handler, Sender, ServerConfig, Ws};
use websocket_driver::{Backend, Error, Event, Message, Options};

struct Args {
    mode: String,
    url: String,
    conns: usize,
    size: usize,
    secs: f64,
    inflight: usize,
    text: bool,
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
        .unwrap_or_else(|| usage("missing mode (echo, idle, fanout, slow)"));
    let mut args = Args {
        mode,
        url: "ws://127.0.0.1:9001/".into(),
        conns: 100,
        size: 20,
        secs: 5.0,
        inflight: 1,
        text: false,
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
            "--conns" | "--subs" => args.conns = num(&flag, value(&flag)),
            "--size" => args.size = num("--size", value("--size")),
            "--secs" => args.secs = num("--secs", value("--secs")),
            "--inflight" => args.inflight = num::<usize>("--inflight", value("--inflight")).max(1),
            "--text" => args.text = true,
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
    if !args.url.starts_with("ws://127.")
        && !args.url.starts_with("ws://[::1]")
        && !args.url.starts_with("ws://localhost")
    {
        usage("load is only ever sent to loopback (127.0.0.0/8, [::1], localhost)");
    }
    args
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("wsload: {problem}");
    }
    eprintln!(
        "usage:\n  wsload echo --url URL --conns N --size B --secs S [--inflight K] [--text]\n  \
         wsload idle --url URL --conns N --pid PID [--secs S] [--hosts K]\n  \
         wsload fanout --url URL --subs N --secs S [--rate R]\n  \
         wsload slow --url URL --conns N --size B --secs S --pid PID [--flood-size F] \
         [--max-rss-growth-mib M]\n  \
         common: [--threads N] [--backend auto|epoll|io-uring]"
    );
    std::process::exit(2)
}

fn reactor<H: Handler>(args: &Args, idle_ping: Option<Duration>) -> ClientReactor<H> {
    let config = ServerConfig {
        threads: args.threads,
        backend: args.backend,
        options: Options::default(),
        idle_timeout: idle_ping,
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
    closed: AtomicUsize,
    failed: AtomicUsize,
    measuring: AtomicBool,
    stop: AtomicBool,
    received: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latencies: Mutex<Vec<u32>>,
}

impl Shared {
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

fn stamp(buf: &mut [u8], seq: u64, text: bool) {
    let n = buf.len().min(8);
    if text {
        // Hex digits keep text payloads ASCII.
        let hex = format!("{:08x}", seq as u32);
        buf[..n].copy_from_slice(&hex.as_bytes()[..n]);
    } else {
        buf[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
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
    /// The pattern, stamped with the next sequence number before each send.
    out: Vec<u8>,
    /// The pattern, stamped with the expected sequence number for each echo.
    expected: Vec<u8>,
    latencies: Vec<u32>,
}

impl EchoLoad {
    fn send_next(&mut self, ws: &mut Ws<'_>) {
        stamp(&mut self.out, self.next_seq, self.text);
        self.next_seq += 1;
        self.sent_at.push_back(Instant::now());
        let sent = if self.text {
            ws.send_text(std::str::from_utf8(&self.out).expect("ASCII payload"))
        } else {
            ws.send_binary(&self.out)
        };
        if sent.is_err() {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
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
        stamp(&mut self.expected, self.expect_seq, self.text);
        self.expect_seq += 1;
        if message.as_bytes() != self.expected.as_slice()
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
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, _reason: &str) {
        if !self.shared.stop.load(Ordering::Relaxed) || (code != 1000 && code != 1005) {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
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
        for _ in 0..args.conns {
            let handler = EchoLoad {
                shared: shared.clone(),
                size: args.size,
                text: args.text,
                inflight: args.inflight,
                next_seq: 0,
                expect_seq: 0,
                sent_at: VecDeque::new(),
                out: pattern(args.size, args.text),
                expected: pattern(args.size, args.text),
                latencies: Vec::new(),
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

    /// Warms up for a moment, then measures a window of `secs`: a progress line on stderr
    /// every second (`wsload:   1.0s   12345 msgs/s`, then whatever `extra` adds), and
    /// `tick` called every `tick_every` meanwhile. Returns the window's length in seconds.
    fn measure(
        &self,
        secs: f64,
        tick_every: Duration,
        mut tick: impl FnMut(),
        extra: impl Fn() -> String,
    ) -> f64 {
        std::thread::sleep(Duration::from_millis(200));
        self.shared.measuring.store(true, Ordering::Relaxed);
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
                let now = self.shared.received.load(Ordering::Relaxed);
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
        self.shared.measuring.store(false, Ordering::Relaxed);
        start.elapsed().as_secs_f64()
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
            "\"secs\":{:.3},\"messages\":{},\"msgs_per_sec\":{:.1},\"mb_per_sec\":{:.3},\
             \"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}",
            self.secs,
            self.messages,
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
    let stats = run.finish(secs);
    println!(
        "{{\"mode\":\"echo\",\"url\":\"{}\",\"conns\":{},\"size\":{},\"inflight\":{},\"text\":{},{},\
         \"client_backend\":\"{}\"}}",
        args.url,
        args.conns,
        args.size,
        args.inflight,
        args.text,
        stats.json_fields(),
        backend,
    );
}

// ----- idle -----

struct Idle {
    shared: Arc<Shared>,
}

impl Handler for Idle {
    fn on_open(&mut self, _ws: &mut Ws<'_>) {
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
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
                },
            )
            .unwrap_or_else(|e| usage(&format!("{}: {e}", args.url)));
    }
    let all = shared.wait_open(args.conns, Duration::from_secs(120));
    let opened = shared.opened.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(args.secs.max(1.0)));
    let after = rss_kib(pid);
    let still_open = opened - shared.closed.load(Ordering::Relaxed).min(opened);
    eprintln!("wsload: {opened} opened, {still_open} held; server RSS {before} KiB -> {after} KiB");
    let _ = clients.shutdown(Duration::from_secs(5));
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / still_open.max(1) as f64;
    println!(
        "{{\"mode\":\"idle\",\"url\":\"{}\",\"conns\":{},\"opened\":{},\"held\":{},\"all_opened\":{},\
         \"rss_before_kib\":{},\"rss_after_kib\":{},\"bytes_per_conn\":{:.0},\"errors\":{}}}",
        args.url,
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

// ----- fanout -----

/// Messages carry the send time (nanoseconds since the run's epoch) and a sequence number.
struct Subscriber {
    shared: Arc<Shared>,
    epoch: Instant,
    publisher: Option<Arc<Mutex<Option<Sender>>>>,
    latencies: Vec<u32>,
}

impl Handler for Subscriber {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = &self.publisher {
            *slot.lock().unwrap() = Some(ws.sender());
        }
    }

    fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
        let bytes = message.as_bytes();
        if bytes.len() != 16 {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sent = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let now = self.epoch.elapsed().as_nanos() as u64;
        if self.shared.measuring.load(Ordering::Relaxed) && self.publisher.is_none() {
            self.shared.received.fetch_add(1, Ordering::Relaxed);
            self.latencies
                .push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
        }
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        self.shared
            .latencies
            .lock()
            .unwrap()
            .append(&mut self.latencies);
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

fn fanout(args: &Args) {
    let shared = Arc::new(Shared::default());
    let epoch = Instant::now();
    let clients: ClientReactor<Subscriber> = reactor(args, None);
    let publisher = Arc::new(Mutex::new(None));
    for i in 0..=args.conns {
        let handler = Subscriber {
            shared: shared.clone(),
            epoch,
            publisher: (i == args.conns).then(|| publisher.clone()),
            latencies: Vec::new(),
        };
        clients
            .connect(&args.url, handler)
            .unwrap_or_else(|e| usage(&format!("{}: {e}", args.url)));
    }
    wait_until(
        "subscribers",
        Duration::from_secs(60),
        || shared.opened.load(Ordering::Relaxed) > args.conns,
        || {
            format!(
                "{} of {} open",
                shared.opened.load(Ordering::Relaxed),
                args.conns + 1
            )
        },
    );
    let Some(sender) = publisher.lock().unwrap().clone() else {
        usage("the publisher did not connect")
    };
    std::thread::sleep(Duration::from_millis(200));
    shared.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut seq = 0u64;
    let mut next = start;
    while start.elapsed() < Duration::from_secs_f64(args.secs) {
        let mut payload = (epoch.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
        payload.extend_from_slice(&seq.to_le_bytes());
        if sender.send_binary(payload).is_err() {
            break;
        }
        seq += 1;
        next += interval;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    // Let the last messages arrive before counting.
    std::thread::sleep(Duration::from_millis(500));
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let _ = clients.shutdown(Duration::from_secs(2));
    let mut latencies = std::mem::take(&mut *shared.latencies.lock().unwrap());
    latencies.sort_unstable();
    let deliveries = shared.received.load(Ordering::Relaxed);
    println!(
        "{{\"mode\":\"fanout\",\"url\":\"{}\",\"subs\":{},\"published\":{},\"deliveries\":{},\"expected\":{},\
         \"secs\":{:.3},\"deliveries_per_sec\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{}}}",
        args.url,
        args.conns,
        seq,
        deliveries,
        seq * args.conns as u64,
        elapsed,
        deliveries as f64 / elapsed,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 99.9),
        shared.errors.load(Ordering::Relaxed),
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

/// `host:port` of a `ws://host:port/...` URL.
fn host_port(url: &str) -> String {
    let rest = url.strip_prefix("ws://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.contains("]:") || (!authority.starts_with('[') && authority.contains(':')) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    }
}

/// Connects a plain blocking socket and completes the opening handshake with a client
/// [`Driver`](websocket_driver::Driver) (which only encodes and parses; no reactor).
fn flooder_connect(url: &str) -> Result<(TcpStream, websocket_driver::Driver), String> {
    let addr = host_port(url)
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
        "{{\"mode\":\"slow\",\"url\":\"{}\",\"conns\":{},\"size\":{},\"flood_size\":{},{},\
         \"server_rss_start_kib\":{},\"server_rss_max_kib\":{},\"server_rss_end_kib\":{},\
         \"server_rss_growth_max_kib\":{},\"rss_samples\":{},\"server_gone\":{},\"rss_cap_hit\":{},\
         \"flooder_connected\":{},\"flooder_error\":{},\"flooder_bytes_sent\":{},\"flooder_frames_sent\":{},\
         \"flooder_secs\":{:.3},\"flooder_last_progress_s\":{:.3},\"flooder_disconnected\":{},\
         \"flooder_disconnected_at_s\":{},\"flooder_disconnect_reason\":{},\"client_backend\":\"{}\"}}",
        args.url,
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
        "slow" => slow(&args),
        other => usage(&format!("unknown mode {other}")),
    }
}
