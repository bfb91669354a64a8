//! The driver inside an axum app: an echo route and a broadcast chat room, written with
//! axum's WebSocket idiom (`WebSocketUpgrade`, `on_upgrade`, `recv`/`send`) over
//! `websocket_driver::hyper`.
//!
//! `cargo run --features hyper --example axum -- --addr 127.0.0.1:3000`, then connect
//! WebSocket clients to `ws://127.0.0.1:3000/echo` or `ws://127.0.0.1:3000/chat`
//! (e.g. `websocat ws://127.0.0.1:3000/chat` in two terminals).

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use websocket_driver::hyper::{Message, WebSocket, WebSocketUpgrade};

/// Every message comes back as it came.
async fn echo(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if let Message::Text(_) | Message::Binary(_) = msg
                && socket.send(msg).await.is_err()
            {
                return;
            }
        }
    })
}

/// Every text message goes to everyone in the room (the sender included). The socket is
/// polled inline by this task; `recv` and `send` are cancel-safe, so `select!` may drop
/// either at any point.
async fn chat(State(room): State<broadcast::Sender<String>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |mut socket: WebSocket| async move {
        let mut feed = room.subscribe();
        loop {
            tokio::select! {
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let _ = room.send(text.to_string());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                line = feed.recv() => match line {
                    Ok(line) => {
                        if socket.send(Message::text(line)).await.is_err() {
                            break;
                        }
                    }
                    // A client too slow for the room skips what it missed.
                    Err(RecvError::Lagged(n)) => {
                        let notice = format!("[{n} messages skipped]");
                        let _ = socket.send(Message::text(notice)).await;
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
    })
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
