//! Echo server on the tokio adapter: every message comes back as it came.
//!
//! `cargo run --release --features tokio --example echo_tokio -- --addr 127.0.0.1:9001 [--deflate]`
//!
//! `--deflate` accepts permessage-deflate (`Options::deflate(true)`).
//!
//! `autobahn/run-adapter.sh --adapter tokio` runs the Autobahn fuzzingclient against it.

use tokio::net::TcpListener;
use websocket_driver::tokio::accept;
use websocket_driver::{Event, Options};

/// `--deflate`: accept permessage-deflate.
static DEFLATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn options() -> Options {
    Options::default().deflate(DEFLATE.load(std::sync::atomic::Ordering::Relaxed))
}

#[tokio::main]
async fn main() {
    let mut addr = "127.0.0.1:9001".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--deflate" {
            DEFLATE.store(true, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        match (arg.as_str(), args.next()) {
            ("--addr", Some(value)) => addr = value,
            _ => {
                eprintln!("usage: echo_tokio [--addr HOST:PORT] [--deflate]");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&addr).await.unwrap_or_else(|e| {
        eprintln!("echo_tokio: cannot listen on {addr}: {e}");
        std::process::exit(1);
    });
    eprintln!(
        "echo_tokio: listening on ws://{}",
        listener.local_addr().unwrap()
    );
    // Autobahn's 9.x cases send 16 MiB messages; the default max_length (64 MiB) allows them.
    let options = options();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let options = options.clone();
        tokio::spawn(async move {
            let Ok((tx, mut rx)) = accept(stream, &options).await else {
                return;
            };
            while let Some(event) = rx.next().await {
                if let Event::Message(message) = event {
                    let _ = tx.send_message(message).await;
                }
            }
        });
    }
}
