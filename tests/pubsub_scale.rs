//! 19 000 subscribers to one topic in one server process. The server is
//! `examples/pubsub` run as a child process (the open-file limit is 20 000 per process,
//! so server and clients cannot share one); the clients are a `ClientReactor` here. A
//! publisher client sends ten numbered messages to the topic: every subscriber gets all
//! ten, once and in order.
//!
//! When the subscribers do not all open, the failure says why: the first client error,
//! how many connections failed or closed, whether the server is still running, and the
//! last lines the server wrote.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Owned, TestClient, eventually};
use websocket_driver::client::ClientReactor;
use websocket_driver::server::{Handler, ServerConfig, Ws};
use websocket_driver::{Backend, Error, Message};

const SUBSCRIBERS: usize = 19_000;
const MESSAGES: u64 = 10;

/// The child server, killed however the test ends, with the last lines it wrote.
struct Server {
    child: Child,
    stderr_tail: Arc<Mutex<Vec<String>>>,
}

/// How many of the server's last stderr lines a failure shows.
const STDERR_TAIL: usize = 20;

impl Server {
    /// Whether the server still runs, and what it last wrote: for failure messages.
    fn describe(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(None) => "still running".to_string(),
            Ok(Some(status)) => format!("exited: {status}"),
            Err(e) => format!("status unknown: {e}"),
        };
        let tail = self.stderr_tail.lock().unwrap().join("\n  ");
        format!("server {status}; its last stderr lines:\n  {tail}")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `examples/pubsub` on a free port; returns it with its address.
fn start_pubsub(backend: &str) -> (Server, SocketAddr) {
    let example = support::example_binary("pubsub", &[]);
    let mut child = Command::new(&example)
        .args([
            "--addr",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--backend",
            backend,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stderr_tail = Arc::new(Mutex::new(Vec::new()));
    let server = Server {
        child,
        stderr_tail: stderr_tail.clone(),
    };
    let mut lines = BufReader::new(stderr).lines();
    let line = lines.next().expect("the server's first line").unwrap();
    // "pubsub: listening on ws://127.0.0.1:PORT (...)"
    let addr = line
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap();
    // Keep draining its stderr so it never blocks on a full pipe, and keep its tail.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut tail = stderr_tail.lock().unwrap();
            if tail.len() == STDERR_TAIL {
                tail.remove(0);
            }
            tail.push(line);
        }
    });
    (server, addr)
}

#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    errors: AtomicUsize,
    closed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    received: AtomicU64,
    out_of_order: AtomicU64,
}

impl Counts {
    fn describe(&self) -> String {
        format!(
            "{} opened, {} errors (first: {}), {} closed",
            self.opened.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.first_error
                .lock()
                .unwrap()
                .as_deref()
                .unwrap_or("none"),
            self.closed.load(Ordering::Relaxed),
        )
    }
}

struct Subscriber {
    counts: Arc<Counts>,
    next: u64,
}

impl Handler for Subscriber {
    fn on_open(&mut self, _ws: &mut Ws<'_>) {
        self.counts.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
        let n: u64 = message
            .as_text()
            .and_then(|t| t.parse().ok())
            .unwrap_or(u64::MAX);
        if n != self.next {
            self.counts.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        self.next = n + 1;
        self.counts.received.fetch_add(1, Ordering::Relaxed);
    }

    fn on_error(&mut self, _ws: &mut Ws<'_>, error: &Error) {
        self.counts.errors.fetch_add(1, Ordering::Relaxed);
        self.counts
            .first_error
            .lock()
            .unwrap()
            .get_or_insert_with(|| error.to_string());
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        self.counts.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Both tests need nearly all of this process's descriptors: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn nineteen_thousand_subscribers_to_one_topic(backend: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    websocket_driver::raise_open_file_limit().expect("raise the open-file limit");
    let (mut server, addr) = start_pubsub(backend);
    let counts = Arc::new(Counts::default());
    let clients: ClientReactor<Subscriber> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend: Backend::Epoll,
        ..ServerConfig::default()
    })
    .unwrap();
    let url = format!("ws://{addr}/everyone");
    for _ in 0..SUBSCRIBERS {
        clients
            .connect(
                &url,
                Subscriber {
                    counts: counts.clone(),
                    next: 0,
                },
            )
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(120), || counts
            .opened
            .load(Ordering::Relaxed)
            == SUBSCRIBERS),
        "not all {SUBSCRIBERS} subscribers opened: {}; client stats {:?}; {}",
        counts.describe(),
        clients.stats(),
        server.describe()
    );
    // The publisher is a subscriber too: `examples/pubsub` publishes to everyone.
    let mut publisher = TestClient::connect(addr, "/everyone").unwrap();
    for n in 0..MESSAGES {
        publisher.send_text(&n.to_string()).unwrap();
    }
    for n in 0..MESSAGES {
        assert_eq!(
            publisher.next_message().unwrap(),
            Owned::Text(n.to_string())
        );
    }
    let expected = SUBSCRIBERS as u64 * MESSAGES;
    assert!(
        eventually(Duration::from_secs(60), || counts
            .received
            .load(Ordering::Relaxed)
            >= expected),
        "{} of {expected} deliveries; {}; {}",
        counts.received.load(Ordering::Relaxed),
        counts.describe(),
        server.describe()
    );
    // Nothing more arrives (no duplicates), and everything came in order.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counts.received.load(Ordering::Relaxed), expected);
    assert_eq!(counts.out_of_order.load(Ordering::Relaxed), 0);
    clients.shutdown(Duration::from_secs(10)).unwrap();
}

#[test]
fn nineteen_thousand_subscribers_epoll() {
    nineteen_thousand_subscribers_to_one_topic("epoll");
}

#[cfg(target_os = "linux")]
#[test]
fn nineteen_thousand_subscribers_io_uring() {
    nineteen_thousand_subscribers_to_one_topic("io-uring");
}

/// The example's topic is its path: a path of the topic maximum (1024 bytes) subscribes
/// and gets what it publishes; one byte more is refused before the upgrade (414), not
/// upgraded and then closed.
#[test]
fn the_pubsub_example_refuses_a_path_over_the_topic_maximum() {
    let (_server, addr) = start_pubsub("epoll");
    let longest = format!(
        "/{}",
        "t".repeat(websocket_driver::server::MAX_TOPIC_LEN - 1)
    );
    let mut client = TestClient::connect(addr, &longest).unwrap();
    client.send_text("to the longest topic").unwrap();
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Text("to the longest topic".into())
    );
    let err = TestClient::connect(addr, &format!("{longest}t"))
        .err()
        .expect("a path over the maximum is refused");
    assert!(err.to_string().contains("414"), "{err}");
}
