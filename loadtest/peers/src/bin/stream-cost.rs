//! The user-space cost of one echoed message in two tokio WebSocket streams, with no kernel
//! in the way: websocket-driver's `WebSocketStream` (`recv` + `Reply::send_message`, as
//! `examples/echo_tokio.rs` and `echo_hyper.rs` echo) and fastwebsockets' `WebSocket` in a
//! `FragmentCollector` (`read_frame` + `write_frame`, as its own echo example and
//! `fastwebsockets-echo` do), each over the same in-memory transport on a current-thread
//! runtime.
//!
//! The transport hands out one masked client frame per read and swallows every write.
//! Between two frames a read returns `Pending` once, after waking its task, as a socket
//! that has no more input does: so each message pays one task reschedule, as on a real
//! connection with one message in flight (without the I/O driver or the system calls).
//!
//! `stream-cost [--size BYTES] [--messages N] [--rounds R] [--next] [--text]` prints ns per
//! message for each, round by round (the two alternate), then the medians. `--next` echoes
//! through websocket-driver's owned API instead (`next` + `send_message(..).await`);
//! `--text` sends text frames (ASCII) instead of binary ones.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use fastwebsockets::{FragmentCollector, OpCode, Role, WebSocket};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use websocket_driver::protocol::frame::{OpCode as WsOpCode, write_frame};
use websocket_driver::tokio::{Config, WebSocketStream};
use websocket_driver::{Driver, Event, Options, Request};

/// One masked frame per read (in pieces if the reader's buffer is smaller), a `Pending`
/// (after a wake) between two frames, EOF after `left`.
struct Feed {
    frame: Vec<u8>,
    left: u64,
    /// How much of the current frame has been handed out.
    at: usize,
    fresh: bool,
    written: u64,
}

impl Feed {
    fn new(size: usize, messages: u64, text: bool) -> Feed {
        // ASCII, so the same payload serves as text.
        let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let opcode = if text {
            WsOpCode::Text
        } else {
            WsOpCode::Binary
        };
        let mut frame = Vec::new();
        write_frame(&mut frame, opcode, &payload, Some([0x12, 0x34, 0x56, 0x78]));
        Feed {
            frame,
            left: messages,
            at: 0,
            fresh: true,
            written: 0,
        }
    }
}

impl AsyncRead for Feed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.left == 0 {
            return Poll::Ready(Ok(()));
        }
        if !self.fresh {
            self.fresh = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // A frame larger than the reader's buffer goes in pieces, back to back.
        let at = self.at;
        let n = buf.remaining().min(self.frame.len() - at);
        buf.put_slice(&self.frame[at..at + n]);
        self.at += n;
        if self.at == self.frame.len() {
            self.at = 0;
            self.left -= 1;
            self.fresh = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Feed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written += b.len() as u64;
        Poll::Ready(Ok(b.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An open server driver, as the hyper adapter makes one (the 101 marked written).
fn open_driver() -> Driver {
    let request = Request {
        method: "GET".into(),
        path: "/".into(),
        version: 1,
        headers: vec![
            ("Host".into(), "x".into()),
            ("Upgrade".into(), "websocket".into()),
            ("Connection".into(), "Upgrade".into()),
            (
                "Sec-WebSocket-Key".into(),
                "dGhlIHNhbXBsZSBub25jZQ==".into(),
            ),
            ("Sec-WebSocket-Version".into(), "13".into()),
        ],
    };
    let mut driver = Driver::make_server(&request, &Options::default()).expect("a valid upgrade");
    driver.start_connection();
    let head = driver.pending_output().len();
    driver.consume_output(head);
    driver
}

async fn wsd(size: usize, messages: u64, text: bool, owned: bool) -> u64 {
    let mut ws = WebSocketStream::from_driver(
        Feed::new(size, messages, text),
        open_driver(),
        &[],
        &Config::default(),
    );
    let mut echoed = 0;
    if owned {
        // `next` + `send_message(..).await`: owned events, each send awaited.
        while let Some(event) = ws.next().await {
            if let Event::Message(message) = event {
                let _ = ws.send_message(message).await;
                echoed += 1;
            }
        }
    } else {
        while let Some((event, mut reply)) = ws.recv().await {
            if let Event::Message(message) = event {
                let _ = reply.send_message(&message);
                echoed += 1;
            }
        }
    }
    assert!(ws.get_ref().written > 0);
    echoed
}

async fn fws(size: usize, messages: u64, text: bool) -> u64 {
    let mut ws = WebSocket::after_handshake(Feed::new(size, messages, text), Role::Server);
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    ws.set_max_message_size(64 << 20);
    let mut ws = FragmentCollector::new(ws);
    let mut echoed = 0;
    while let Ok(frame) = ws.read_frame().await {
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => {
                if ws.write_frame(frame).await.is_err() {
                    break;
                }
                echoed += 1;
            }
            _ => {}
        }
    }
    echoed
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let size = arg("--size", 20) as usize;
    let messages = arg("--messages", 2_000_000);
    let rounds = arg("--rounds", 5);
    let owned = std::env::args().any(|a| a == "--next");
    let text = std::env::args().any(|a| a == "--text");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for (name, times) in [("websocket-driver", &mut a), ("fastwebsockets", &mut b)] {
            let started = Instant::now();
            let echoed = rt.block_on(async move {
                let task = match name {
                    "websocket-driver" => tokio::spawn(wsd(size, messages, text, owned)),
                    _ => tokio::spawn(fws(size, messages, text)),
                };
                task.await.unwrap()
            });
            let ns = started.elapsed().as_nanos() as f64 / messages as f64;
            assert_eq!(echoed, messages, "{name} echoed every message");
            println!("{round} {name} {size} B: {ns:.1} ns/msg");
            times.push(ns);
        }
    }
    for (name, mut times) in [("websocket-driver", a), ("fastwebsockets", b)] {
        times.sort_by(f64::total_cmp);
        println!(
            "median {name} {size} B: {:.1} ns/msg",
            times[times.len() / 2]
        );
    }
}
