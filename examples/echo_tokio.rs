//! Echo server on the tokio adapter: every message comes back as it came.
//!
//! `cargo run --release --features tokio --example echo_tokio -- --addr 127.0.0.1:9001 [--deflate]`
//!
//! `--deflate` accepts permessage-deflate (`Options::deflate(true)`).
//!
//! `--api recv` (the default) polls a [`WebSocketStream`] inline in the connection's task
//! and echoes each message from the read buffer (`recv` lends the event, its `Reply`
//! queues the answer); `--api next` takes owned events from `next` and answers with
//! `send_message`; `--api split` goes through the cloneable-sender API (`accept`: a
//! connection task and channels between it and the app). `--threads 1` runs a current-thread runtime (the
//! load tests' setting), `--threads N` N workers, the default one per core.
//!
//! `autobahn/run-adapter.sh --adapter stream` (`--api recv`), `--adapter stream-next`
//! (`--api next`) and `--adapter tokio` (`--api split`) run the Autobahn fuzzingclient
//! against it.

use tokio::net::{TcpListener, TcpStream};
use websocket_driver::tokio::{WebSocketStream, accept};
use websocket_driver::{Event, Options};

#[derive(Clone, Copy)]
enum Api {
    Recv,
    Next,
    Split,
}

/// `--deflate`: accept permessage-deflate.
static DEFLATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn options() -> Options {
    Options::default().deflate(DEFLATE.load(std::sync::atomic::Ordering::Relaxed))
}

fn main() {
    let mut addr = "127.0.0.1:9001".to_string();
    let mut threads = 0;
    let mut api = Api::Recv;
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
            ("--api", Some(value)) if value == "recv" => api = Api::Recv,
            ("--api", Some(value)) if value == "next" => api = Api::Next,
            ("--api", Some(value)) if value == "split" => api = Api::Split,
            _ => {
                eprintln!(
                    "usage: echo_tokio [--addr HOST:PORT] [--threads N] [--deflate] [--api recv|next|split]"
                );
                std::process::exit(2);
            }
        }
    }
    runtime(threads).block_on(serve_on(addr, api));
}

/// `--threads 1`: a current-thread runtime (the load tests' setting: one pinned core);
/// more: that many workers; 0 (the default): one worker per core.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            builder.worker_threads(threads);
        }
        builder
    };
    builder.enable_all().build().expect("tokio runtime")
}

/// The inline stream, borrowed receive: each message is echoed from the read buffer
/// straight into the driver's output (no copy out, no allocation).
async fn echo_recv(tcp: TcpStream, options: Options) {
    let Ok(ws) = WebSocketStream::accept(tcp, &options).await else {
        return;
    };
    // Woken once per 128 KiB of a large frame, not once per TCP segment.
    let mut ws = ws.with_recv_low_water();
    while let Some((event, mut reply)) = ws.recv().await {
        if let Event::Message(message) = event {
            let _ = reply.send_message(&message);
        }
    }
}

/// The inline stream, owned events: one task per connection, nothing in between.
async fn echo_next(tcp: TcpStream, options: Options) {
    let Ok(ws) = WebSocketStream::accept(tcp, &options).await else {
        return;
    };
    let mut ws = ws.with_recv_low_water();
    while let Some(event) = ws.next().await {
        if let Event::Message(message) = event {
            let _ = ws.send_message(message).await;
        }
    }
}

/// The split API: the app's task talks to a connection task through channels.
async fn echo_split(tcp: TcpStream, options: Options) {
    let Ok((tx, mut rx)) = accept(tcp, &options).await else {
        return;
    };
    while let Some(event) = rx.next().await {
        if let Event::Message(message) = event {
            let _ = tx.send_message(message).await;
        }
    }
}

async fn serve_on(addr: String, api: Api) {
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
        match api {
            Api::Recv => tokio::spawn(echo_recv(stream, options)),
            Api::Next => tokio::spawn(echo_next(stream, options)),
            Api::Split => tokio::spawn(echo_split(stream, options)),
        };
    }
}
