//! tokio-tungstenite echo server: every Text/Binary message comes back as it came.
//!
//! `tungstenite-echo --addr 127.0.0.1:PORT [--threads N]`
//!
//! Pings and closes are answered by tungstenite itself; the stream ends after the close.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use wsd_peers::{MAX_MESSAGE, parse_args, runtime};

async fn serve(stream: TcpStream) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    while let Some(message) = ws.next().await {
        // Anything else (a close included) is left alone: tungstenite queues the close reply
        // itself and sends it on the next poll, which then ends the stream; breaking here
        // would drop it unsent.
        if let message @ (Message::Text(_) | Message::Binary(_)) = message? {
            ws.send(message).await?;
        }
    }
    Ok(())
}

fn main() {
    let args = parse_args("tungstenite-echo");
    runtime(args.threads).block_on(async move {
        let listener = wsd_peers::listen("tungstenite-echo", &args).await;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: keep serving the connections we have.
                    eprintln!("tungstenite-echo: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = serve(stream).await;
            });
        }
    });
}
