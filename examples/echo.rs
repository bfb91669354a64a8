//! Echo server: every message comes back as it came.
//!
//! `cargo run --release --example echo -- --addr 127.0.0.1:9001 [--backend auto|epoll|io-uring|blocking]
//! [--threads N] [--max-length BYTES] [--max-backpressure BYTES] [--deflate] [--deflate-takeover]`
//!
//! `--threads` is the reactor's number of event loops (default: one per CPU); the blocking
//! backend runs a thread per connection and does not use it.
//!
//! `--deflate` accepts permessage-deflate (`Options::deflate(true)`: no context takeover
//! either way); `--deflate-takeover` accepts it with context takeover both ways (each
//! connection keeps its zlib streams).
//!
//! `--max-length` is the largest message accepted (`Options::max_length`, default 64 MiB);
//! `--max-backpressure` the output a connection may queue (`ServerConfig::max_backpressure`
//! on the reactor, `BlockingServer::max_backpressure` on the blocking backend, where it
//! is the point past which the connection stops reading).
//!
//! SIGINT / SIGTERM shut the reactor down gracefully: every client gets close 1001.

use std::time::Duration;

use websocket_driver::blocking::BlockingServer;
use websocket_driver::protocol::deflate::DeflateOptions;
use websocket_driver::server::{Handler, Server, ServerConfig, Upgrade, Ws};
use websocket_driver::{Backend, Message, Options};

struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message_owned(message);
    }
}

fn main() {
    let mut addr = "127.0.0.1:9001".to_string();
    let mut backend = "auto".to_string();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut max_length = None;
    let mut max_backpressure = None;
    let mut deflate = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--addr" => addr = value("--addr"),
            "--backend" => backend = value("--backend"),
            "--threads" => {
                threads = value("--threads")
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| usage("--threads needs a number of at least 1"))
            }
            "--max-length" => {
                max_length = Some(
                    value("--max-length")
                        .parse()
                        .unwrap_or_else(|_| usage("--max-length needs a number of bytes")),
                )
            }
            "--max-backpressure" => {
                max_backpressure = Some(
                    value("--max-backpressure")
                        .parse()
                        .unwrap_or_else(|_| usage("--max-backpressure needs a number of bytes")),
                )
            }
            "--deflate" => deflate = Some(DeflateOptions::default()),
            "--deflate-takeover" => {
                deflate = Some(DeflateOptions {
                    server_no_context_takeover: false,
                    client_no_context_takeover: false,
                    ..DeflateOptions::default()
                })
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    // One descriptor per connection: lift the soft open-file limit to the hard limit
    // (the library never does it on its own).
    if let Err(e) = websocket_driver::raise_open_file_limit() {
        eprintln!("echo: cannot raise the open-file limit: {e}");
    }
    // Autobahn's 9.x cases send 16 MiB messages; the default max_length (64 MiB) allows them.
    let mut options = Options::default();
    if let Some(bytes) = max_length {
        options = options.max_length(bytes);
    }
    if let Some(deflate) = deflate {
        options = options.deflate_options(deflate);
    }
    if backend == "blocking" {
        let mut server = BlockingServer::bind(&addr)
            .unwrap_or_else(|e| usage(&format!("cannot listen on {addr}: {e}")))
            .options(options);
        if let Some(bytes) = max_backpressure {
            server = server.max_backpressure(bytes);
        }
        eprintln!(
            "echo: listening on ws://{} (backend blocking)",
            server.local_addr().unwrap()
        );
        server
            .serve(|_request, ws| {
                ws.on_message(|ws, message| {
                    let _ = ws.send_message_owned(message);
                });
            })
            .unwrap_or_else(|e| usage(&format!("server failed: {e}")));
        return;
    }
    let backend: Backend = backend.parse().unwrap_or_else(|e: String| usage(&e));
    let mut config = ServerConfig {
        threads,
        backend,
        options,
        ..ServerConfig::default()
    };
    if let Some(bytes) = max_backpressure {
        config.max_backpressure = bytes;
    }
    let server = Server::bind(&addr)
        .unwrap_or_else(|e| usage(&format!("cannot listen on {addr}: {e}")))
        .config(config);
    let local = server.local_addr().unwrap();
    let handle = server
        .start(|_request| Upgrade::Accept(Echo))
        .unwrap_or_else(|e| usage(&format!("server failed: {e}")));
    eprintln!(
        "echo: listening on ws://{local} ({}, {threads} threads)",
        handle.backend()
    );
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .unwrap_or_else(|e| usage(&format!("cannot install signal handlers: {e}")));
    if let Some(signal) = signals.forever().next() {
        eprintln!("echo: signal {signal}, shutting down");
        handle
            .shutdown(Duration::from_secs(5))
            .unwrap_or_else(|e| usage(&format!("shutdown failed: {e}")));
        eprintln!("echo: stopped; {:?}", handle.stats());
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("echo: {problem}");
    }
    eprintln!(
        "usage: echo [--addr HOST:PORT] [--backend auto|epoll|io-uring|blocking] [--threads N] \
         [--max-length BYTES] [--max-backpressure BYTES] [--deflate] [--deflate-takeover]"
    );
    std::process::exit(2)
}
