//! Echo server on hyper 1.x: plain HTTP requests get a short text answer, WebSocket
//! upgrades are accepted with `websocket_driver::hyper` and echoed by a seed-style
//! [`Handler`] on the tokio adapter.
//!
//! `cargo run --release --features hyper --example echo_hyper -- --addr 127.0.0.1:9001`
//!
//! `autobahn/run-adapter.sh --adapter hyper` runs the Autobahn fuzzingclient against it.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use websocket_driver::hyper::{is_websocket, serve};
use websocket_driver::tokio::{Handler, WsSender, run};
use websocket_driver::{Message, Options};

struct Echo;

impl Handler for Echo {
    async fn on_message(&mut self, ws: &WsSender, message: Message<'static>) {
        let _ = ws.send_message(message).await;
    }
}

async fn route(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if !is_websocket(&req) {
        let mut response = Response::new(Full::new(Bytes::from("a WebSocket echo server\n")));
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        return Ok(response);
    }
    Ok(serve(&mut req, &Options::default(), |tx, rx| async move {
        run((tx, rx), Echo).await;
    }))
}

fn main() {
    let mut addr = "127.0.0.1:9001".to_string();
    let mut threads = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--addr", Some(value)) => addr = value,
            ("--threads", Some(value)) if value.parse::<usize>().is_ok() => {
                threads = value.parse().unwrap()
            }
            _ => {
                eprintln!("usage: echo_hyper [--addr HOST:PORT] [--threads N]");
                std::process::exit(2);
            }
        }
    }
    runtime(threads).block_on(serve_on(addr));
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

async fn serve_on(addr: String) {
    let listener = TcpListener::bind(&addr).await.unwrap_or_else(|e| {
        eprintln!("echo_hyper: cannot listen on {addr}: {e}");
        std::process::exit(1);
    });
    eprintln!(
        "echo_hyper: listening on ws://{}",
        listener.local_addr().unwrap()
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(route))
                .with_upgrades()
                .await;
        });
    }
}
