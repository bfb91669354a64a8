//! `push N SIZE`: one connection accepted with `websocket_driver::tokio::accept`; one task
//! sends N binary messages of SIZE bytes through its `WsSender` as fast as `send` returns;
//! a plain thread reads the raw bytes until all N frames are in and reports the rate.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use websocket_driver::{MessageType, Options};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

/// Reads the 101 response, then every byte of `n` unmasked frames of `size`; returns how
/// long the frames took from the end of the response.
fn read_frames(addr: std::net::SocketAddr, n: usize, size: usize) -> Duration {
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.write_all(REQUEST).unwrap();
    let header = match size {
        0..126 => 2,
        126..65536 => 4,
        _ => 10,
    };
    let mut want = n * (size + header);
    let mut buf = vec![0u8; 1 << 16];
    let mut head = Vec::new();
    let after_head = loop {
        let k = socket.read(&mut buf).unwrap();
        assert!(k > 0, "closed before the response");
        head.extend_from_slice(&buf[..k]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break head.len() - at - 4;
        }
    };
    want -= after_head;
    let start = Instant::now();
    while want > 0 {
        let k = socket.read(&mut buf).unwrap();
        assert!(k > 0, "closed with {want} bytes still to come");
        want -= k.min(want);
    }
    start.elapsed()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: push N SIZE");
    let size: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: push N SIZE");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || read_frames(addr, n, size));
    let (tcp, _) = listener.accept().await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (tx, _rx) = websocket_driver::tokio::accept(tcp, &Options::default())
        .await
        .unwrap();
    let payload = vec![b'x'; size];
    for _ in 0..n {
        tx.send(payload.clone(), MessageType::Binary).await.unwrap();
    }
    // The connection task runs on this thread: wait for the reader off it.
    let took = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    println!(
        "{n} x {size} B in {:.1} ms: {:.0} msgs/s",
        took.as_secs_f64() * 1e3,
        n as f64 / took.as_secs_f64()
    );
}
