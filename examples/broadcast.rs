//! Broadcast server: every message received is sent to every connected client (the load
//! of uWebSockets' `broadcast_test`).
//!
//! `cargo run --release --example broadcast -- --addr 127.0.0.1:9002 [--threads N]`
//!
//! Connections register a [`Sender`] on open; a message fans out through the senders,
//! so clients on every event loop receive it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use websocket_driver::server::{Handler, Sender, Server, Upgrade, Ws};
use websocket_driver::{Backend, Message, MessageType};

type Registry = Arc<RwLock<HashMap<u64, Sender>>>;

struct Member {
    id: u64,
    registry: Registry,
}

impl Handler for Member {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        self.registry.write().unwrap().insert(self.id, ws.sender());
    }

    fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
        let kind = if message.is_text() {
            MessageType::Text
        } else {
            MessageType::Binary
        };
        let payload = message.as_bytes();
        for sender in self.registry.read().unwrap().values() {
            // A member that just left is skipped by its loop; nothing to do here.
            let _ = sender.send(payload.to_vec(), kind);
        }
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        self.registry.write().unwrap().remove(&self.id);
    }
}

fn main() {
    let mut addr = "127.0.0.1:9002".to_string();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut backend = Backend::Auto;
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
                    .unwrap_or_else(|_| usage("--threads needs a number"))
            }
            "--backend" => {
                backend = value("--backend")
                    .parse()
                    .unwrap_or_else(|e: String| usage(&e))
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    // One descriptor per connection: lift the soft open-file limit to the hard limit
    // (the library never does it on its own).
    if let Err(e) = websocket_driver::raise_open_file_limit() {
        eprintln!("broadcast: cannot raise the open-file limit: {e}");
    }
    let registry: Registry = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let server = Server::bind(&addr)
        .unwrap_or_else(|e| usage(&format!("cannot listen on {addr}: {e}")))
        .threads(threads)
        .backend(backend);
    let local = server.local_addr().unwrap();
    let handle = server
        .start(move |_request| {
            Upgrade::Accept(Member {
                id: next_id.fetch_add(1, Ordering::Relaxed),
                registry: registry.clone(),
            })
        })
        .unwrap_or_else(|e| usage(&format!("server failed: {e}")));
    eprintln!(
        "broadcast: listening on ws://{local} ({}, {threads} threads)",
        handle.backend()
    );
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .unwrap_or_else(|e| usage(&format!("cannot install signal handlers: {e}")));
    if signals.forever().next().is_some() {
        handle
            .shutdown(Duration::from_secs(5))
            .unwrap_or_else(|e| usage(&format!("shutdown failed: {e}")));
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("broadcast: {problem}");
    }
    eprintln!("usage: broadcast [--addr HOST:PORT] [--threads N] [--backend auto|epoll|io-uring]");
    std::process::exit(2)
}
