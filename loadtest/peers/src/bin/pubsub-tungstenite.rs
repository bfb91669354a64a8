//! tokio-tungstenite pub/sub server, the way Rust users build one today: one
//! `tokio::sync::broadcast` channel per topic, a task per connection.
//!
//! `pubsub-tungstenite --addr 127.0.0.1:PORT [--threads N]`
//!
//! Same semantics as websocket-driver's `examples/pubsub.rs`: a client's request path is its
//! topic; every Text/Binary message it sends is published to that topic and delivered to every
//! subscriber of the topic, the sender included, with the same opcode. Each connection's task
//! reads its socket and forwards what its broadcast receiver yields: one tungstenite `Message`
//! per publish, cloned per subscriber (its `Bytes` payload is shared, not copied), written with
//! `feed` and one `flush` for whatever was already queued. A subscriber that falls
//! `TOPIC_CAPACITY` messages behind skips the oldest (`RecvError::Lagged`), counted as
//! dropped and logged once a second. Pings and closes are answered by tungstenite itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::{Receiver, Sender};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error, Message};
use wsd_peers::{DROPPED, MAX_MESSAGE, TOPIC_CAPACITY, Topics, parse_args, runtime};

async fn serve(stream: TcpStream, topics: Arc<Topics<Message>>) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let mut topic = String::new();
    let mut channel = None;
    // Subscribes before the 101 goes out, so a client that has seen its handshake complete
    // gets everything published after. (The error type is tungstenite's `Callback`'s.)
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        topic = request.uri().path().to_string();
        channel = Some(topics.subscribe(&topic));
        Ok(response)
    };
    let accepted =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    if let Some((tx, mut rx)) = channel {
        if let Ok(ws) = accepted {
            let _ = forward(ws, &tx, &mut rx).await;
        }
        drop(rx);
        topics.leave(&topic);
    }
}

async fn forward(
    mut ws: WebSocketStream<TcpStream>,
    tx: &Sender<Message>,
    rx: &mut Receiver<Message>,
) -> Result<(), Error> {
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                None => return Ok(()),
                Some(message) => {
                    if let message @ (Message::Text(_) | Message::Binary(_)) = message? {
                        // Never fails: this connection is itself subscribed.
                        let _ = tx.send(message);
                    }
                }
            },
            outgoing = rx.recv() => match outgoing {
                Ok(message) => {
                    ws.feed(message).await?;
                    // Whatever else is queued already goes out with the same flush.
                    for _ in 0..TOPIC_CAPACITY {
                        match rx.try_recv() {
                            Ok(message) => ws.feed(message).await?,
                            Err(TryRecvError::Lagged(n)) => {
                                DROPPED.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(_) => break,
                        }
                    }
                    ws.flush().await?;
                }
                Err(RecvError::Lagged(n)) => {
                    DROPPED.fetch_add(n, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => return Ok(()),
            },
        }
    }
}

fn main() {
    let args = parse_args("pubsub-tungstenite");
    runtime(args.threads).block_on(async move {
        let listener = wsd_peers::listen("pubsub-tungstenite", &args).await;
        wsd_peers::spawn_drop_reporter("pubsub-tungstenite");
        let topics = Arc::new(Topics::default());
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: keep serving the connections we have.
                    eprintln!("pubsub-tungstenite: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, topics.clone()));
        }
    });
}
