//! `wsload echo` for one second against an in-process echo server: a non-zero rate and
//! zero errors, on each server backend; `wsload slow` likewise, with its flooder;
//! `wsload broadcast` and `wsload fanout` against an in-process pub/sub server (the
//! library's topics, as `examples/pubsub.rs`: every message to every client of the topic,
//! the sender included); `wsload churn`, whose connections the server must see open and
//! close cleanly, one for one.

use std::process::Command;
use std::time::Duration;

use websocket_driver::server::{
    Handler, HttpResponse, Server, ServerConfig, ServerHandle, Stats, Upgrade, UpgradeRequest, Ws,
};
use websocket_driver::{Backend, Message, MessageType};

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

/// As `examples/pubsub.rs`: the request path is the topic, and what a member sends goes to
/// every member of it, itself included, with its opcode.
struct Member {
    topic: String,
}

impl Handler for Member {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.subscribe(&self.topic).unwrap();
    }

    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let kind = if message.is_text() {
            MessageType::Text
        } else {
            MessageType::Binary
        };
        ws.publish_all(&self.topic, message.as_bytes(), kind)
            .unwrap();
    }
}

fn pubsub_app() -> impl Fn(&UpgradeRequest<'_>) -> Upgrade<Member> + Send + Sync + 'static {
    |request| {
        Upgrade::Accept(Member {
            topic: request.path().to_string(),
        })
    }
}

fn field(json: &str, name: &str) -> f64 {
    let at = json
        .find(&format!("\"{name}\":"))
        .unwrap_or_else(|| panic!("no {name} in {json}"));
    let rest = &json[at + name.len() + 3..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end]
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number in {json}"))
}

/// Runs `wsload MODE --url URL ARGS…` against an in-process echo server; its JSON.
fn run_wsload(backend: Backend, mode: &str, args: &[&str]) -> String {
    run_wsload_on(backend, |_| Upgrade::Accept(Echo), mode, args)
}

/// Runs `wsload MODE --url URL ARGS…` against an in-process server of `app`; its JSON.
/// `{url}` in ARGS is replaced by the server's URL.
fn run_wsload_on<H: Handler>(
    backend: Backend,
    app: impl Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    mode: &str,
    args: &[&str],
) -> String {
    let server = start(backend, app);
    let json = wsload(&format!("ws://{}/topic", server.local_addr()), mode, args);
    server.shutdown(Duration::from_secs(1)).unwrap();
    json
}

/// A one-loop server of `app` on a free loopback port.
fn start<H: Handler>(
    backend: Backend,
    app: impl Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend,
            ..ServerConfig::default()
        })
        .start(app)
        .unwrap()
}

/// Runs `wsload MODE --url URL ARGS…` (`{url}` in ARGS stands for URL); its JSON.
fn wsload(url: &str, mode: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_wsload"))
        .args([mode, "--url", url])
        .args(args.iter().map(|a| a.replace("{url}", url)))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn smoke(backend: Backend, extra: &[&str]) {
    let args = [&["--conns", "10", "--size", "100", "--secs", "1"], extra].concat();
    let json = run_wsload(backend, "echo", &args);
    assert!(field(&json, "msgs_per_sec") > 0.0, "{json}");
    assert!(
        field(&json, "messages_total") >= field(&json, "messages"),
        "{json}"
    );
    assert_eq!(field(&json, "errors"), 0.0, "{json}");
    assert!(field(&json, "p50_us") <= field(&json, "p99_us"), "{json}");
}

#[test]
fn echo_smoke_on_epoll() {
    smoke(Backend::Epoll, &["--backend", "epoll"]);
}

#[test]
fn echo_smoke_on_io_uring_with_text_and_inflight() {
    smoke(
        Backend::IoUring,
        &["--backend", "io-uring", "--text", "--inflight", "4"],
    );
}

/// `wsload slow` against this process's own server: the flooder connects and gets bytes
/// in, the echo clients still get echoes, the RSS is read. Its flood is capped at 64 MiB
/// of growth so the test process stays small whatever the server's flow control does.
#[test]
fn slow_smoke_on_epoll() {
    let pid = std::process::id().to_string();
    let json = run_wsload(
        Backend::Epoll,
        "slow",
        &[
            "--conns",
            "4",
            "--size",
            "100",
            "--secs",
            "1",
            "--pid",
            &pid,
            "--flood-size",
            "16384",
            "--max-rss-growth-mib",
            "64",
            "--backend",
            "epoll",
        ],
    );
    assert!(json.contains("\"mode\":\"slow\""), "{json}");
    assert!(json.contains("\"flooder_connected\":true"), "{json}");
    assert!(field(&json, "flooder_bytes_sent") > 0.0, "{json}");
    assert!(field(&json, "server_rss_start_kib") > 0.0, "{json}");
    assert!(field(&json, "messages") > 0.0, "{json}");
    assert_eq!(field(&json, "errors"), 0.0, "{json}");
}

#[test]
fn broadcast_smoke_on_epoll() {
    let args = ["--conns", "20", "--secs", "1", "--backend", "epoll"];
    let json = run_wsload_on(Backend::Epoll, pubsub_app(), "broadcast", &args);
    assert!(json.contains("\"mode\":\"broadcast\""), "{json}");
    assert!(field(&json, "rounds") > 0.0, "{json}");
    assert!(field(&json, "deliveries_per_sec") > 0.0, "{json}");
    let per_round = field(&json, "deliveries_per_sec") / field(&json, "rounds_per_sec");
    assert!((per_round - 400.0).abs() < 1.0, "{json}");
    assert_eq!(field(&json, "missing"), 0.0, "{json}");
    assert_eq!(field(&json, "errors"), 0.0, "{json}");
    assert!(json.contains("\"stalled\":false"), "{json}");
}

/// Against an echo server a client only hears itself: the first round never completes,
/// which shows as missing deliveries and a stall, not as a hang.
#[test]
fn broadcast_against_echo_stalls() {
    let args = ["--conns", "3", "--secs", "1"];
    let json = run_wsload(Backend::Epoll, "broadcast", &args);
    assert_eq!(field(&json, "missing"), 6.0, "{json}");
    assert!(json.contains("\"stalled\":true"), "{json}");
}

#[test]
fn fanout_smoke_on_io_uring() {
    let args = [
        "--subs",
        "50",
        "--rate",
        "20",
        "--secs",
        "1",
        "--backend",
        "io-uring",
    ];
    let json = run_wsload_on(Backend::IoUring, pubsub_app(), "fanout", &args);
    assert!(json.contains("\"mode\":\"fanout\""), "{json}");
    assert_eq!(field(&json, "missing"), 0.0, "{json}");
    assert_eq!(field(&json, "errors"), 0.0, "{json}");
    assert!(field(&json, "published") >= 30.0, "{json}");
    assert_eq!(
        field(&json, "deliveries"),
        field(&json, "measured_published") * 50.0,
        "{json}"
    );
    // The publisher hears its own messages too, and they are left out of the deliveries.
    assert_eq!(
        field(&json, "self_delivered"),
        field(&json, "published"),
        "{json}"
    );
    assert!(field(&json, "p50_us") <= field(&json, "p99_us"), "{json}");
}

/// `--sub-url`: the subscribers go round-robin to the listed URLs (here the same server
/// twice, the only pub/sub server in this process), the publisher to `--url`; `per_url`
/// splits the counts.
#[test]
fn fanout_sub_urls_split_per_url() {
    let args = [
        "--subs",
        "21",
        "--rate",
        "20",
        "--secs",
        "1",
        "--backend",
        "epoll",
        "--sub-url",
        "{url}",
        "--sub-url",
        "{url}",
        "--drain-secs",
        "5",
    ];
    let json = run_wsload_on(Backend::Epoll, pubsub_app(), "fanout", &args);
    assert_eq!(field(&json, "missing"), 0.0, "{json}");
    assert_eq!(field(&json, "errors"), 0.0, "{json}");
    let per_url = &json[json.find("\"per_url\":[").expect("per_url")..];
    let groups: Vec<&str> = per_url.split("{\"url\":").skip(1).collect();
    assert_eq!(groups.len(), 2, "{json}");
    let measured = field(&json, "measured_published");
    for (group, subs) in groups.iter().zip([11.0, 10.0]) {
        assert_eq!(field(group, "subs"), subs, "{json}");
        assert_eq!(field(group, "deliveries"), measured * subs, "{json}");
        assert_eq!(field(group, "missing"), 0.0, "{json}");
        assert!(field(group, "p50_us") <= field(group, "p99_us"), "{json}");
    }
}

/// Answers every message with the wrong payload: what `churn` must count as errors.
struct WrongEcho;
impl Handler for WrongEcho {
    fn on_message(&mut self, ws: &mut Ws<'_>, _message: Message<'_>) {
        let _ = ws.send_binary(b"not the payload");
    }
}

/// `wsload churn` for one second; its JSON and the server's stats once it has seen every
/// connection go.
fn churn<H: Handler>(backend: Backend, handler: fn() -> H) -> (String, Stats) {
    let server = start(backend, move |_| Upgrade::Accept(handler()));
    let url = format!("ws://{}/", server.local_addr());
    let json = wsload(&url, "churn", &["--conns", "8", "--secs", "1"]);
    let connections = field(&json, "connections") as u64;
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while server.stats().connections_open > 0 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = server.stats();
    assert_eq!(stats.connections_total, connections, "{json} {stats:?}");
    server.shutdown(Duration::from_secs(1)).unwrap();
    (json, stats)
}

/// Every cycle wsload counts is a connection the server opened, echoed on and closed with
/// 1000, on both backends.
#[test]
fn churn_cycles_are_whole_connections() {
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (json, stats) = churn(backend, || Echo);
        assert_eq!(field(&json, "errors"), 0.0, "{json}");
        assert!(field(&json, "cycles") > 0.0, "{json}");
        assert!(
            field(&json, "cycles") <= field(&json, "connections"),
            "{json}"
        );
        assert_eq!(stats.connections_open, 0, "{stats:?}");
        assert_eq!(
            stats.closes.get(&1000).copied(),
            Some(stats.connections_total),
            "{stats:?}"
        );
        assert_eq!(stats.messages_in, stats.connections_total, "{stats:?}");
    }
}

/// A wrong echo is an error for every cycle, not a cycle.
#[test]
fn churn_counts_a_wrong_echo_as_an_error() {
    let (json, _) = churn(Backend::Epoll, || WrongEcho);
    assert_eq!(field(&json, "cycles"), 0.0, "{json}");
    assert!(
        field(&json, "errors") >= field(&json, "connections"),
        "{json}"
    );
}

/// Echoes every message with one byte changed at `at` (from the end when negative).
struct AlteredEcho {
    at: isize,
}
impl Handler for AlteredEcho {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let mut payload = message.as_bytes().to_vec();
        let at = if self.at < 0 {
            payload.len() - self.at.unsigned_abs()
        } else {
            self.at as usize
        };
        payload[at] ^= 1;
        let _ = ws.send_binary(&payload);
    }
}

/// `wsload echo` checks every echo byte for byte: a byte changed in the sequence stamp
/// or at the end of the payload is an error for every message it answered.
#[test]
fn echo_counts_an_altered_byte_as_an_error() {
    for at in [0, 7, 8, -1] {
        let json = run_wsload_on(
            Backend::Epoll,
            move |_| Upgrade::Accept(AlteredEcho { at }),
            "echo",
            &["--conns", "2", "--size", "16384", "--secs", "1"],
        );
        assert!(field(&json, "errors") > 0.0, "byte {at}: {json}");
        assert!(
            field(&json, "errors") >= field(&json, "messages"),
            "byte {at}: {json}"
        );
    }
}

/// `wsload MODE ARGS…` (the URL among ARGS) expected to fail: its exit status and the
/// first line of its stderr (the problem; the usage text follows).
fn wsload_fails(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_wsload"))
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    )
}

/// Every echo of the whole run (handshakes and warm-up included, as a server-side count
/// over the run sees them) is reported next to the window's.
#[test]
fn echo_reports_the_messages_of_the_whole_run() {
    let json = run_wsload(
        Backend::Epoll,
        "echo",
        &["--conns", "4", "--size", "20", "--secs", "1"],
    );
    assert!(field(&json, "messages") > 0.0, "{json}");
    assert!(
        field(&json, "messages_total") >= field(&json, "messages"),
        "{json}"
    );
}

/// Answers every message with the first one it got: stale echoes, right but for the stamp.
struct StaleEcho {
    first: Option<Vec<u8>>,
}
impl Handler for StaleEcho {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let first = self
            .first
            .get_or_insert_with(|| message.as_bytes().to_vec());
        let _ = ws.send_text(std::str::from_utf8(first).unwrap());
    }
}

/// Text payloads shorter than the 8-byte stamp still carry (the low digits of) the
/// sequence number: a stale echo is an error whatever the size.
#[test]
fn echo_checks_the_sequence_of_short_text_payloads() {
    for size in ["1", "4", "7"] {
        let json = run_wsload_on(
            Backend::Epoll,
            |_| Upgrade::Accept(StaleEcho { first: None }),
            "echo",
            &["--conns", "1", "--size", size, "--text", "--secs", "1"],
        );
        assert!(field(&json, "messages") > 0.0, "size {size}: {json}");
        assert!(field(&json, "errors") > 0.0, "size {size}: {json}");
    }
}

/// The URL goes into the JSON as a JSON string: a `"` in its path is escaped.
#[test]
fn echo_escapes_the_url_in_its_json() {
    let server = start(Backend::Epoll, |_| Upgrade::Accept(Echo));
    let url = format!("ws://{}/a\"b", server.local_addr());
    let json = wsload(&url, "echo", &["--conns", "1", "--secs", "1"]);
    server.shutdown(Duration::from_secs(1)).unwrap();
    let escaped = format!("\"url\":\"ws://{}/a\\\"b\"", server.local_addr());
    assert!(json.contains(&escaped), "{json}");
}

/// Accepts every other upgrade and refuses the rest (403).
fn every_other() -> impl Fn(&UpgradeRequest<'_>) -> Upgrade<Echo> + Send + Sync + 'static {
    let n = std::sync::atomic::AtomicUsize::new(0);
    move |_| {
        if n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(2)
        {
            Upgrade::Accept(Echo)
        } else {
            Upgrade::Reject(HttpResponse::new(403, "no"))
        }
    }
}

/// A connection refused at the upgrade never opened, so its close does not come off the
/// connections held.
#[test]
fn idle_holds_what_opened_when_some_are_refused() {
    let pid = std::process::id().to_string();
    let json = run_wsload_on(
        Backend::Epoll,
        every_other(),
        "idle",
        &["--conns", "10", "--pid", &pid, "--secs", "1"],
    );
    assert_eq!(field(&json, "opened"), 5.0, "{json}");
    assert_eq!(field(&json, "held"), 5.0, "{json}");
    assert_eq!(field(&json, "errors"), 5.0, "{json}");
    assert!(json.contains("\"all_opened\":false"), "{json}");
}

/// A connection that fails (here: every upgrade refused) is one error, not one for its
/// `on_error` and another for its 1006 close.
#[test]
fn churn_counts_a_failed_connection_once() {
    let server = start(Backend::Epoll, |_| {
        Upgrade::<Echo>::Reject(HttpResponse::new(403, "no"))
    });
    let url = format!("ws://{}/", server.local_addr());
    let json = wsload(&url, "churn", &["--conns", "2", "--secs", "1"]);
    server.shutdown(Duration::from_secs(1)).unwrap();
    assert_eq!(field(&json, "cycles"), 0.0, "{json}");
    assert!(field(&json, "connections") > 0.0, "{json}");
    assert_eq!(
        field(&json, "errors"),
        field(&json, "connections"),
        "{json}"
    );
}

/// Rates and durations that would never end, or panic, are refused before any connection
/// is made (nothing listens on port 1 anyway).
#[test]
fn fanout_refuses_unbounded_rates_and_durations() {
    let url = "ws://127.0.0.1:1/topic";
    for (flag, value) in [
        ("--rate", "0"),
        ("--rate", "-5"),
        ("--rate", "inf"),
        ("--rate", "NaN"),
        // Less than one publish in the window.
        ("--rate", "0.5"),
        ("--secs", "0"),
        ("--secs", "inf"),
        ("--secs", "1e300"),
        ("--drain-secs", "inf"),
    ] {
        let (code, stderr) = wsload_fails(&["fanout", "--url", url, "--secs", "1", flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

/// The loopback guard looks at the host the client would connect to, not at how the URL
/// starts. 192.0.2.1 is a documentation address (RFC 5737): should the guard ever let one
/// through, the connect goes nowhere.
#[test]
fn urls_off_loopback_are_refused() {
    for url in [
        "ws://localhost@192.0.2.1:9001/",
        "ws://127.0.0.1@192.0.2.1:9001/",
        "ws://192.0.2.1:9001/",
    ] {
        let (code, stderr) = wsload_fails(&["echo", "--url", url, "--conns", "1", "--secs", "1"]);
        assert_eq!(code, Some(2), "{url}: {stderr}");
        assert!(stderr.contains("loopback"), "{url}: {stderr}");
    }
}
