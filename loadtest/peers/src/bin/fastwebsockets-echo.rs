//! fastwebsockets echo server, as fastwebsockets' own `examples/echo_server.rs` does it:
//! hyper 1 serves the HTTP/1.1 upgrade, `fastwebsockets::upgrade` completes it, and a
//! `FragmentCollector` hands whole messages to the echo loop.
//!
//! `fastwebsockets-echo --addr 127.0.0.1:PORT [--threads N]`
//!
//! Auto-pong and auto-close are on (answered inside `read_frame`); a close ends the task.

use fastwebsockets::{FragmentCollector, OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use wsd_peers::{MAX_MESSAGE, parse_args, runtime};

async fn handle_client(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = fut.await?;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    ws.set_max_message_size(MAX_MESSAGE);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}

async fn server_upgrade(
    mut req: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        // As upstream's example: the echo loop runs unconstrained by tokio's coop budget.
        let _ = tokio::task::unconstrained(handle_client(fut)).await;
    });
    Ok(response)
}

fn main() {
    let args = parse_args("fastwebsockets-echo");
    runtime(args.threads).block_on(async move {
        let listener = wsd_peers::listen("fastwebsockets-echo", &args).await;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("fastwebsockets-echo: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = http1::Builder::new()
                    .serve_connection(io, service_fn(server_upgrade))
                    .with_upgrades()
                    .await;
            });
        }
    });
}
