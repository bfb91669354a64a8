//! The driver inside an axum app: an echo route and a broadcast chat room.
//!
//! `cargo run --features hyper --example axum -- --addr 127.0.0.1:3000`, then connect
//! WebSocket clients to `ws://127.0.0.1:3000/echo` or `ws://127.0.0.1:3000/chat`
//! (e.g. `websocat ws://127.0.0.1:3000/chat` in two terminals).

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use websocket_driver::hyper::serve;
use websocket_driver::{Event, Message, Options};

/// Every message comes back as it came.
async fn echo(mut req: Request) -> Response {
    serve(&mut req, &Options::default(), |tx, mut rx| async move {
        while let Some(event) = rx.next().await {
            if let Event::Message(message) = event {
                let _ = tx.send_message(message).await;
            }
        }
    })
    .into_response()
}

/// Every text message goes to everyone in the room (the sender included).
async fn chat(State(room): State<broadcast::Sender<String>>, mut req: Request) -> Response {
    serve(&mut req, &Options::default(), |tx, mut rx| async move {
        let mut feed = room.subscribe();
        loop {
            tokio::select! {
                event = rx.next() => match event {
                    Some(Event::Message(Message::Text(text))) => {
                        let _ = room.send(text.into_owned());
                    }
                    Some(_) => {}
                    None => break,
                },
                line = feed.recv() => match line {
                    Ok(line) => {
                        if tx.send_text(line).await.is_err() {
                            break;
                        }
                    }
                    // A client too slow for the room skips what it missed.
                    Err(RecvError::Lagged(n)) => {
                        let _ = tx.send_text(format!("[{n} messages skipped]")).await;
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
    })
    .into_response()
}

#[tokio::main]
async fn main() {
    let addr = match std::env::args().nth(1).as_deref() {
        Some("--addr") => std::env::args().nth(2).expect("--addr needs HOST:PORT"),
        _ => "127.0.0.1:3000".to_string(),
    };
    let (room, _) = broadcast::channel(256);
    let app = Router::new()
        .route("/echo", get(echo))
        .route("/chat", get(chat))
        .with_state(room);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    eprintln!("axum: ws://{addr}/echo and ws://{addr}/chat");
    axum::serve(listener, app).await.unwrap();
}
