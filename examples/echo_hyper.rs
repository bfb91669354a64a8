//! Echo server on hyper 1.x: plain HTTP requests get a short text answer, WebSocket
//! upgrades are accepted with `websocket_driver::hyper` and echoed by a seed-style
//! [`Handler`] on the tokio adapter.
//!
//! `cargo run --release --features hyper --example echo_hyper -- --addr 127.0.0.1:9001 [--deflate]`
//!
//! `--deflate` accepts permessage-deflate (`Options::deflate(true)`).
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
    Ok(serve(&mut req, &options(), |tx, rx| async move {
        run((tx, rx), Echo).await;
    }))
}

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
                eprintln!("usage: echo_hyper [--addr HOST:PORT] [--deflate]");
                std::process::exit(2);
            }
        }
    }
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
