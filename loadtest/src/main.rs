//! `wsload`: a WebSocket load generator built on websocket-driver's own reactor-hosted
//! client (`ClientReactor`). Progress goes to stderr, one JSON object to stdout.
//!
//! ```text
//! wsload echo   --url ws://127.0.0.1:9001/ --conns 100 --size 20 --secs 10 [--inflight 1] [--text]
//! wsload idle   --url ws://127.0.0.1:9001/ --conns 10000 --pid PID [--secs 5] [--hosts 4]
//! wsload fanout --url ws://127.0.0.1:9002/ --subs 1000 --secs 10 [--rate 100]
//! ```
//! Common options: `--threads N` (client event loops, default 1), `--backend auto|epoll|io-uring`.
//! Every run is bounded in time and stops by itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use websocket_driver::client::ClientReactor;
use websocket_driver::server::{Handler, Sender, ServerConfig, Ws};
use websocket_driver::{Backend, Error, Message, Options};

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
}

fn parse_args() -> Args {
    let mut argv = std::env::args().skip(1);
    let mode = argv
        .next()
        .unwrap_or_else(|| usage("missing mode (echo, idle, fanout)"));
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

fn echo(args: &Args) {
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
    let opened = wait_until(
        "connections",
        Duration::from_secs(30),
        || {
            shared.opened.load(Ordering::Relaxed) + shared.closed.load(Ordering::Relaxed)
                >= args.conns
        },
        || {
            format!(
                "{} of {} open",
                shared.opened.load(Ordering::Relaxed),
                args.conns
            )
        },
    );
    if !opened || shared.opened.load(Ordering::Relaxed) < args.conns {
        usage(&format!(
            "only {} of {} connections opened",
            shared.opened.load(Ordering::Relaxed),
            args.conns
        ));
    }
    // Warm up for a moment, then measure a fixed window.
    std::thread::sleep(Duration::from_millis(200));
    shared.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let window = Duration::from_secs_f64(args.secs);
    let mut last = 0;
    while start.elapsed() < window {
        std::thread::sleep(Duration::from_secs(1).min(window.saturating_sub(start.elapsed())));
        let now = shared.received.load(Ordering::Relaxed);
        eprintln!(
            "wsload: {:>5.1}s {:>10} msgs/s",
            start.elapsed().as_secs_f64(),
            now - last
        );
        last = now;
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    wait_until(
        "connections to close",
        Duration::from_secs(15),
        || shared.closed.load(Ordering::Relaxed) >= args.conns,
        || {
            format!(
                "{} of {} closed",
                shared.closed.load(Ordering::Relaxed),
                args.conns
            )
        },
    );
    let _ = clients.shutdown(Duration::from_secs(2));
    let mut latencies = std::mem::take(&mut *shared.latencies.lock().unwrap());
    latencies.sort_unstable();
    let messages = shared.received.load(Ordering::Relaxed);
    let bytes = shared.bytes.load(Ordering::Relaxed);
    let errors =
        shared.errors.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) as u64;
    println!(
        "{{\"mode\":\"echo\",\"url\":\"{}\",\"conns\":{},\"size\":{},\"inflight\":{},\"text\":{},\"secs\":{:.3},\
         \"messages\":{},\"msgs_per_sec\":{:.1},\"mb_per_sec\":{:.3},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\
         \"errors\":{},\"client_backend\":\"{}\"}}",
        args.url,
        args.conns,
        args.size,
        args.inflight,
        args.text,
        elapsed,
        messages,
        messages as f64 / elapsed,
        bytes as f64 / elapsed / 1e6,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 99.9),
        errors,
        clients.backend(),
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
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_else(|| usage(&format!("cannot read the RSS of pid {pid}")))
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
    let all = wait_until(
        "connections",
        Duration::from_secs(120),
        || {
            shared.opened.load(Ordering::Relaxed) + shared.closed.load(Ordering::Relaxed)
                >= args.conns
        },
        || {
            format!(
                "{} of {} open",
                shared.opened.load(Ordering::Relaxed),
                args.conns
            )
        },
    );
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
        other => usage(&format!("unknown mode {other}")),
    }
}
