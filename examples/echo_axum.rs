//! Echo server in an axum app, written exactly as axum's own WebSocket example but with
//! `use websocket_driver::hyper::{…}` instead of `use axum::extract::ws::{…}`: the
//! [`WebSocketUpgrade`] extractor, `on_upgrade`, `recv`/`send` of [`Message`]s.
//!
//! `cargo run --release --features hyper --example echo_axum -- --addr 127.0.0.1:9001 [--deflate]`
//!
//! `--deflate` accepts permessage-deflate (`WebSocketUpgrade::deflate`, not in axum's own).
//! `--threads 1` runs a current-thread runtime (the load tests' setting).
//! `autobahn/run-adapter.sh --adapter axum` runs the Autobahn fuzzingclient against it.

use axum::Router;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
// The one line an axum app changes (was: `use axum::extract::ws::{…}`).
use websocket_driver::hyper::{Message, WebSocket, WebSocketUpgrade};

/// `--deflate`: accept permessage-deflate.
static DEFLATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn handler(ws: WebSocketUpgrade) -> Response {
    ws.deflate(DEFLATE.load(std::sync::atomic::Ordering::Relaxed))
        .on_upgrade(handle_socket)
}

async fn handle_socket(mut socket: WebSocket) {
    while let Some(msg) = socket.recv().await {
        let Ok(msg) = msg else {
            // The peer broke the protocol or went away: the driver has already answered.
            return;
        };
        if let Message::Text(_) | Message::Binary(_) = msg
            && socket.send(msg).await.is_err()
        {
            return;
        }
    }
}

fn main() {
    let mut addr = "127.0.0.1:9001".to_string();
    let mut threads = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--deflate" {
            DEFLATE.store(true, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        match (arg.as_str(), args.next()) {
            ("--addr", Some(value)) => addr = value,
            ("--threads", Some(value)) if value.parse::<usize>().is_ok() => {
                threads = value.parse().unwrap()
            }
            _ => {
                eprintln!("usage: echo_axum [--addr HOST:PORT] [--threads N] [--deflate]");
                std::process::exit(2);
            }
        }
    }
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            builder.worker_threads(threads);
        }
        builder
    };
    let runtime = builder.enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(&addr).await.unwrap_or_else(|e| {
            eprintln!("echo_axum: cannot listen on {addr}: {e}");
            std::process::exit(1);
        });
        eprintln!(
            "echo_axum: listening on ws://{}",
            listener.local_addr().unwrap()
        );
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = Router::new().fallback(get(handler));
        axum::serve(listener, app).await.unwrap();
    });
}
