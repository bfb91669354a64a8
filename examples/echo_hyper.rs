//! Echo server on hyper 1.x: plain HTTP requests get a short text answer, WebSocket
//! upgrades are accepted with `websocket_driver::hyper` and echoed.
//!
//! `cargo run --release --features hyper --example echo_hyper -- --addr 127.0.0.1:9001 [--deflate]`
//!
//! `--deflate` accepts permessage-deflate (`Options::deflate(true)`).
//!
//! `--api recv` (the default): [`serve_stream`], the inline `WebSocketStream` polled by
//! the connection's task, echoing each message from the read buffer (`recv` + `Reply`).
//! `--api next`: the same with owned events (`next` + `send_message`). `--api upgrade`: [`WebSocketUpgrade::from_request`] and the
//! axum-shaped `WebSocket` (`recv`/`send` of `Message`s). `--api split`: [`serve`] with a
//! seed-style [`Handler`] on the cloneable-sender API (a connection task and channels).
//! `--threads 1` runs a current-thread runtime (the load tests' setting).
//!
//! `autobahn/run-adapter.sh --adapter hyper` (`--api split`) and `--adapter hyper-stream`
//! (`--api recv`) run the Autobahn fuzzingclient against it.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use websocket_driver::hyper::{
    Message as AxumMessage, WebSocketUpgrade, is_websocket, serve, serve_stream,
};
use websocket_driver::tokio::{Handler, WsSender, run};
use websocket_driver::{Event, Message, Options};

#[derive(Clone, Copy)]
enum Api {
    Recv,
    Next,
    Upgrade,
    Split,
}

struct Echo;

impl Handler for Echo {
    async fn on_message(&mut self, ws: &WsSender, message: Message<'static>) {
        let _ = ws.send_message(message).await;
    }
}

type Body = http_body_util::Either<Full<Bytes>, axum::body::Body>;

async fn route(api: Api, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    use http_body_util::Either::{Left, Right};
    if !is_websocket(&req) {
        let mut response = Response::new(Full::new(Bytes::from("a WebSocket echo server\n")));
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        return Ok(response.map(Left));
    }
    let options = options();
    Ok(match api {
        Api::Recv => serve_stream(&mut req, &options, |mut ws| async move {
            while let Some((event, mut reply)) = ws.recv().await {
                if let Event::Message(message) = event {
                    let _ = reply.send_message(&message);
                }
            }
        })
        .map(Left),
        Api::Next => serve_stream(&mut req, &options, |mut ws| async move {
            while let Some(event) = ws.next().await {
                if let Event::Message(message) = event {
                    let _ = ws.send_message(message).await;
                }
            }
        })
        .map(Left),
        Api::Upgrade => match WebSocketUpgrade::from_request(&mut req) {
            Ok(upgrade) => upgrade
                .on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if let AxumMessage::Text(_) | AxumMessage::Binary(_) = msg
                            && socket.send(msg).await.is_err()
                        {
                            return;
                        }
                    }
                })
                .map(Right),
            Err(rejection) => axum::response::IntoResponse::into_response(rejection).map(Right),
        },
        Api::Split => serve(&mut req, &options, |tx, rx| async move {
            run((tx, rx), Echo).await;
        })
        .map(Left),
    })
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
            ("--api", Some(value)) if value == "upgrade" => api = Api::Upgrade,
            ("--api", Some(value)) if value == "split" => api = Api::Split,
            _ => {
                eprintln!(
                    "usage: echo_hyper [--addr HOST:PORT] [--threads N] [--deflate] [--api recv|next|upgrade|split]"
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

async fn serve_on(addr: String, api: Api) {
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
                .serve_connection(TokioIo::new(stream), service_fn(move |req| route(api, req)))
                .with_upgrades()
                .await;
        });
    }
}
