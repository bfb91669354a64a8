//! fastwebsockets pub/sub server, the way Rust users build one today: hyper 1 serves the
//! upgrade (as fastwebsockets' examples do), one `tokio::sync::broadcast` channel per topic.
//!
//! `pubsub-fastwebsockets --addr 127.0.0.1:PORT [--threads N]`
//!
//! Same semantics as websocket-driver's `examples/pubsub.rs`: a client's request path is its
//! topic; every Text/Binary message it sends is published to that topic and delivered to every
//! subscriber of the topic, the sender included, with the same opcode.
//!
//! Each connection is split (`unstable-split`, as upstream's `echo_server_split.rs`): a reader
//! task publishes whole messages (`FragmentCollectorRead`) as shared `Bytes`, and a writer
//! task forwards what its broadcast receiver yields, each frame written into a `BufWriter`
//! and flushed once whatever was already queued is written. The reader hands the frames the
//! protocol obliges it to send (pong, the close reply) to the writer over a channel. A
//! subscriber that falls `TOPIC_CAPACITY` messages behind skips the oldest
//! (`RecvError::Lagged`), counted as dropped and logged once a second. Neither task runs
//! `unconstrained` (unlike the echo peer): a writer that always has messages waiting must
//! still yield to the other connections.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, WebSocketWrite, upgrade,
};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::io::{AsyncWrite, BufWriter};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::{Receiver, Sender};
use tokio::sync::mpsc;
use wsd_peers::{DROPPED, MAX_MESSAGE, TOPIC_CAPACITY, Topics, parse_args, runtime};

/// One published message, shared by every subscriber's writer.
#[derive(Clone)]
struct Published {
    opcode: OpCode,
    payload: Bytes,
}

async fn handle_client(
    fut: upgrade::UpgradeFut,
    tx: Sender<Published>,
    rx: Receiver<Published>,
) -> Result<(), WebSocketError> {
    let mut ws = fut.await?;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    ws.set_max_message_size(MAX_MESSAGE);
    let (read, write) = ws.split(|stream| {
        let (r, w) = tokio::io::split(stream);
        (r, BufWriter::new(w))
    });
    let mut read = FragmentCollectorRead::new(read);
    let (obliged_tx, obliged_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(write, rx, obliged_rx));
    let mut send_obliged = |frame: Frame<'_>| {
        let sent = obliged_tx
            .send((frame.opcode, Vec::from(frame.payload)))
            .map_err(|_| WebSocketError::ConnectionClosed);
        async move { sent }
    };
    let result = loop {
        let frame = match read.read_frame(&mut send_obliged).await {
            Ok(frame) => frame,
            Err(e) => break Err(e),
        };
        match frame.opcode {
            OpCode::Close => break Ok(()),
            opcode @ (OpCode::Text | OpCode::Binary) => {
                let payload = match frame.payload {
                    Payload::Bytes(bytes) => bytes.freeze(),
                    other => Bytes::from(Vec::from(other)),
                };
                // Never fails: this connection is itself subscribed.
                let _ = tx.send(Published { opcode, payload });
            }
            _ => {}
        }
    };
    // The writer ends once it has written the close reply, or when this end of the
    // channel goes away.
    drop(obliged_tx);
    let _ = writer.await;
    result
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut ws: WebSocketWrite<BufWriter<W>>,
    mut rx: Receiver<Published>,
    mut obliged: mpsc::UnboundedReceiver<(OpCode, Vec<u8>)>,
) -> Result<(), WebSocketError> {
    loop {
        tokio::select! {
            biased;
            frame = obliged.recv() => {
                let Some((opcode, payload)) = frame else { return Ok(()) };
                ws.write_frame(Frame::new(true, opcode, None, Payload::Owned(payload))).await?;
                ws.flush().await?;
                if opcode == OpCode::Close {
                    return Ok(());
                }
            }
            published = rx.recv() => match published {
                Ok(message) => {
                    write(&mut ws, &message).await?;
                    // Whatever else is queued already goes out with the same flush.
                    for _ in 0..TOPIC_CAPACITY {
                        match rx.try_recv() {
                            Ok(message) => write(&mut ws, &message).await?,
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

async fn write<W: AsyncWrite + Unpin>(
    ws: &mut WebSocketWrite<W>,
    message: &Published,
) -> Result<(), WebSocketError> {
    let frame = Frame::new(
        true,
        message.opcode,
        None,
        Payload::Borrowed(&message.payload),
    );
    ws.write_frame(frame).await
}

async fn server_upgrade(
    mut req: Request<Incoming>,
    topics: Arc<Topics<Published>>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let topic = req.uri().path().to_string();
    let (response, fut) = upgrade::upgrade(&mut req)?;
    // Subscribed before the 101 goes out, so a client that has seen its handshake complete
    // gets everything published after.
    let (tx, rx) = topics.subscribe(&topic);
    tokio::spawn(async move {
        let _ = handle_client(fut, tx, rx).await;
        topics.leave(&topic);
    });
    Ok(response)
}

fn main() {
    let args = parse_args("pubsub-fastwebsockets");
    runtime(args.threads).block_on(async move {
        let listener = wsd_peers::listen("pubsub-fastwebsockets", &args).await;
        wsd_peers::spawn_drop_reporter("pubsub-fastwebsockets");
        let topics: Arc<Topics<Published>> = Arc::new(Topics::default());
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("pubsub-fastwebsockets: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let topics = topics.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = service_fn(move |req| server_upgrade(req, topics.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(io, service)
                    .with_upgrades()
                    .await;
            });
        }
    });
}
