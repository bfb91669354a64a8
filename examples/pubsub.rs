//! Pub/sub server: a client's request path is its topic (`/` included), and every message
//! a client sends is published to that topic — delivered to every subscriber, the sender
//! included, with the same opcode, on every event loop, encoded once. uWebSockets'
//! `broadcast_test` runs against it unchanged (everyone on `/`).
//!
//! `cargo run --release --example pubsub -- --addr 127.0.0.1:9002 [--backend auto|epoll|io-uring] [--threads N]`
//!
//! With `--redis redis://HOST:PORT/` (build with `--features redis`) topics span every
//! process started with the same Redis: run two on two ports and a message sent to one
//! reaches the subscribers of both.
//!
//! `GET /stats` (plain HTTP) answers the server's counters as JSON. On SIGINT/SIGTERM it
//! shuts down (1001 to everyone) and prints them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use websocket_driver::server::{
    Handler, HttpResponse, MAX_TOPIC_LEN, Server, ServerHandle, Stats, Upgrade, Ws,
};
use websocket_driver::{Backend, Message, MessageType};

struct Member {
    topic: String,
}

impl Handler for Member {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        // The path was checked against the topic maximum before the upgrade.
        if let Err(e) = ws.subscribe(&self.topic) {
            let _ = ws.close_connection(1008, &e.to_string());
        }
    }

    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let kind = match message {
            Message::Text(_) => MessageType::Text,
            Message::Binary(_) => MessageType::Binary,
        };
        // Cannot fail: the topic's length was checked and the text is already validated.
        let _ = ws.publish_all(&self.topic, message.as_bytes(), kind);
    }
}

fn main() {
    let mut addr = "127.0.0.1:9002".to_string();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut backend = Backend::Auto;
    let mut redis: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--addr" => addr = value("--addr"),
            "--threads" => {
                threads = value("--threads")
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .unwrap_or_else(|| usage("--threads needs a number of at least 1"))
            }
            "--backend" => {
                backend = value("--backend")
                    .parse()
                    .unwrap_or_else(|e: String| usage(&e))
            }
            "--redis" => redis = Some(value("--redis")),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    // One descriptor per connection: lift the soft open-file limit to the hard limit
    // (the library never does it on its own).
    if let Err(e) = websocket_driver::raise_open_file_limit() {
        eprintln!("pubsub: cannot raise the open-file limit: {e}");
    }
    let mut server = Server::bind(&addr)
        .unwrap_or_else(|e| usage(&format!("cannot listen on {addr}: {e}")))
        .threads(threads)
        .backend(backend);
    if let Some(url) = redis {
        server = with_redis(server, &url);
    }
    let local = server.local_addr().unwrap();
    let running: Arc<OnceLock<ServerHandle>> = Arc::default();
    let stats_of = running.clone();
    let handle = server
        .start(move |request| {
            if !request.is_websocket() && request.path() == "/stats" {
                let stats = stats_of.get().map(ServerHandle::stats).unwrap_or_default();
                return Upgrade::Reject(HttpResponse {
                    status: 200,
                    headers: vec![("Content-Type".into(), "application/json".into())],
                    body: stats_json(&stats),
                });
            }
            // A topic is at most MAX_TOPIC_LEN bytes; the head limit (16 KiB) allows
            // longer paths, so they are refused here, before the upgrade.
            if request.path().len() > MAX_TOPIC_LEN {
                return Upgrade::Reject(HttpResponse::new(414, "the path (topic) is too long"));
            }
            Upgrade::Accept(Member {
                topic: request.path().to_string(),
            })
        })
        .unwrap_or_else(|e| usage(&format!("server failed: {e}")));
    let _ = running.set(handle.clone());
    eprintln!(
        "pubsub: listening on ws://{local} ({}, {threads} threads)",
        handle.backend()
    );
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .unwrap_or_else(|e| usage(&format!("cannot install signal handlers: {e}")));
    if signals.forever().next().is_some() {
        eprintln!("pubsub: {}", stats_json(&handle.stats()));
        handle
            .shutdown(Duration::from_secs(5))
            .unwrap_or_else(|e| usage(&format!("shutdown failed: {e}")));
    }
}

/// The counters a test or an operator reads from `GET /stats`.
fn stats_json(stats: &Stats) -> String {
    format!(
        "{{\"connections_open\":{},\"published\":{},\"delivered\":{},\"dropped\":{},\
         \"backplane_sent\":{},\"backplane_received\":{},\"backplane_dropped\":{},\
         \"backplane_reconnects\":{}}}",
        stats.connections_open,
        stats.published,
        stats.delivered,
        stats.dropped,
        stats.backplane.sent,
        stats.backplane.received,
        stats.backplane.dropped,
        stats.backplane.reconnects
    )
}

#[cfg(feature = "redis")]
fn with_redis(server: Server, url: &str) -> Server {
    let backplane = websocket_driver::server::RedisBackplane::connect(url)
        .unwrap_or_else(|e| usage(&format!("cannot reach Redis at {url}: {e}")));
    server.backplane(backplane)
}

#[cfg(not(feature = "redis"))]
fn with_redis(_server: Server, _url: &str) -> Server {
    usage("--redis needs the `redis` feature (cargo run --features redis --example pubsub …)")
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("pubsub: {problem}");
    }
    eprintln!(
        "usage: pubsub [--addr HOST:PORT] [--threads N] [--backend auto|epoll|io-uring] \
         [--redis redis://HOST:PORT/]"
    );
    std::process::exit(2)
}
