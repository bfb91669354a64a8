//! The thread-per-connection `BlockingServer`, over real TCP on localhost, with a client
//! `Driver` on the other end. Every socket has read and write timeouts, so a broken server
//! fails a test instead of hanging it.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::{Ev, feed, masked, parse_frames};
use websocket_driver::blocking::{BlockingServer, Timeouts};
use websocket_driver::protocol::frame::OpCode;
use websocket_driver::{Driver, Options, ReadyState};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A server on a free port (tune it with the builder's methods before `serve`).
fn bound() -> BlockingServer {
    BlockingServer::bind("127.0.0.1:0").unwrap()
}

/// Serves `app` with `server` on a thread of its own; returns its address.
fn serve(
    server: BlockingServer,
    app: impl Fn(&websocket_driver::Request, &mut websocket_driver::WebSocket) + Send + Sync + 'static,
) -> SocketAddr {
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let _ = server.serve(app);
    });
    addr
}

/// Starts a server on a free port with `configure` attached to every connection.
fn start_server(
    options: Options,
    configure: impl Fn(&websocket_driver::Request, &mut websocket_driver::WebSocket)
    + Send
    + Sync
    + 'static,
) -> SocketAddr {
    serve(bound().options(options), configure)
}

fn echo_server() -> SocketAddr {
    start_server(Options::default(), |_, ws| {
        ws.on_message(|ws, message| {
            let _ = ws.send_message(&message);
        });
    })
}

fn connect_tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// A client `Driver` over a blocking `TcpStream`.
struct Client {
    stream: TcpStream,
    driver: Driver,
    events: VecDeque<Ev>,
    eof: bool,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let mut driver =
            Driver::make_client(&format!("ws://{addr}/echo"), &Options::default()).unwrap();
        assert!(driver.start_connection());
        let mut client = Client {
            stream: connect_tcp(addr),
            driver,
            events: VecDeque::new(),
            eof: false,
        };
        client.flush();
        assert_eq!(client.next_event(), Ev::Open);
        assert_eq!(client.driver.ready_state(), ReadyState::Open);
        client
    }

    fn flush(&mut self) {
        while !self.driver.pending_output().is_empty() {
            let n = self
                .stream
                .write(self.driver.pending_output())
                .expect("write to server");
            assert!(n > 0);
            self.driver.consume_output(n);
        }
    }

    /// The next event, reading from the socket as needed (panics on timeout).
    fn next_event(&mut self) -> Ev {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(event) = self.events.pop_front() {
                return event;
            }
            assert!(!self.eof, "connection ended without another event");
            let n = self
                .stream
                .read(&mut buf)
                .expect("read from server (timed out?)");
            if n == 0 {
                self.eof = true;
                self.driver.receive_eof();
                self.events.extend(feed(&mut self.driver, &[]));
            } else {
                self.events.extend(feed(&mut self.driver, &buf[..n]));
            }
            // Pongs and close echoes go out at once.
            self.flush();
        }
    }

    /// Reads until the server closes TCP; returns the bytes that came before.
    fn read_to_eof(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        self.stream
            .read_to_end(&mut rest)
            .expect("server closes TCP (timed out?)");
        rest
    }
}

/// Sends raw bytes and returns everything the server writes until it closes TCP.
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect_tcp(addr);
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("server closes TCP (timed out?)");
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn echoes_text() {
    let mut client = Client::connect(echo_server());
    for text in ["hello", "", "☃ snowman ☃", &"long ".repeat(30_000)] {
        client.driver.send_text(text).unwrap();
        client.flush();
        assert_eq!(client.next_event(), Ev::Text(text.to_string()));
    }
}

#[test]
fn echoes_one_mib_binary() {
    let mut client = Client::connect(echo_server());
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + i / 251) as u8).collect();
    client.driver.send_binary(&payload).unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Binary(payload));
}

#[test]
fn answers_ping_with_pong() {
    let mut client = Client::connect(echo_server());
    client.driver.send_ping(b"ping payload").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Pong(b"ping payload".to_vec()));
    // Messages still flow afterwards.
    client.driver.send_text("after").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Text("after".into()));
}

#[test]
fn client_close_gets_reply_then_tcp_close() {
    let mut client = Client::connect(echo_server());
    client.driver.send_text("last").unwrap();
    client.driver.close_connection(1000, "bye").unwrap();
    client.flush();
    assert_eq!(client.driver.ready_state(), ReadyState::Closing);
    assert_eq!(client.next_event(), Ev::Text("last".into()));
    assert_eq!(client.next_event(), Ev::Close(1000, String::new()));
    assert_eq!(client.driver.ready_state(), ReadyState::Closed);
    assert!(client.driver.is_finished());
    // The server closes TCP after its close frame: the next read returns 0.
    assert_eq!(client.read_to_eof(), Vec::<u8>::new());
}

/// Once the client's Close has arrived and the server's is written, the connection ends
/// at once: `serve_connection` returns without waiting for the client's FIN (the 2 s
/// linger it keeps for peers that did not close).
#[test]
fn serve_connection_returns_after_the_close_handshake_without_the_peers_fin() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let result = websocket_driver::blocking::serve_connection(
            stream,
            &Options::default(),
            websocket_driver::blocking::Timeouts::default(),
            &|_, _| {},
        );
        done_tx.send(result.is_ok()).unwrap();
    });
    let mut client = Client::connect(addr);
    client.driver.close_connection(1000, "bye").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Close(1000, String::new()));
    assert_eq!(client.read_to_eof(), Vec::<u8>::new());
    // Our socket stays open (no FIN from us), yet the server is done well before 2 s.
    assert_eq!(done_rx.recv_timeout(Duration::from_secs(1)), Ok(true));
    drop(client);
}

#[test]
fn server_close_from_handler_is_completed() {
    let addr = start_server(Options::default(), |_, ws| {
        ws.on_message(|ws, message| {
            if message.as_text() == Some("quit") {
                ws.close_connection(4000, "as you wish").unwrap();
            }
        });
    });
    let mut client = Client::connect(addr);
    client.driver.send_text("quit").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Close(4000, "as you wish".into()));
    // Our echo went out in next_event; the server then ends the connection.
    assert_eq!(client.read_to_eof(), Vec::<u8>::new());
}

#[test]
fn protocol_error_gets_close_1002_then_tcp_close() {
    let addr = echo_server();
    let mut client = Client::connect(addr);
    // An unmasked frame from a client.
    client.stream.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(
        client.next_event(),
        Ev::Close(1002, "unmasked frame from a client".into())
    );
    assert_eq!(client.read_to_eof(), Vec::<u8>::new());
}

#[test]
fn version_8_gets_426_with_supported_version() {
    let addr = echo_server();
    let response = raw_exchange(
        addr,
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 426"), "{response}");
    assert!(
        response.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{response}"
    );
}

#[test]
fn non_upgrade_get_gets_400() {
    let addr = echo_server();
    let response = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(!response.contains("101"), "{response}");
}

#[test]
fn oversized_head_gets_431() {
    let addr = start_server(Options::default().max_handshake_size(512), |_, _| {});
    let request = format!(
        "GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(1024)
    );
    let response = raw_exchange(addr, request.as_bytes());
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
}

#[test]
fn frame_in_the_same_write_as_the_request_is_handled() {
    let addr = echo_server();
    let mut bytes =
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .to_vec();
    bytes.extend(masked(OpCode::Text, b"eager"));
    bytes.extend(masked(OpCode::Close, &[0x03, 0xe8]));
    let mut stream = connect_tcp(addr);
    stream.write_all(&bytes).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("server closes TCP (timed out?)");
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&response[..head_end]);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    let frames = parse_frames(&response[head_end..]);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(
        (frames[0].opcode, frames[0].payload.as_slice()),
        (OpCode::Text, &b"eager"[..])
    );
    assert_eq!(frames[1].opcode, OpCode::Close);
    assert_eq!(frames[1].close_code(), Some(1000));
    assert!(frames.iter().all(|f| f.mask.is_none()));
}

#[test]
fn app_sees_the_request_and_subprotocol() {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let options = Options::default().accept_protocols(["chat"]);
    let addr = start_server(options, move |request, ws| {
        let _ = tx
            .lock()
            .unwrap()
            .send((request.path.clone(), ws.protocol().map(str::to_string)));
    });
    let mut driver = Driver::make_client(
        &format!("ws://{addr}/room/7?x=1"),
        &Options::default().accept_protocols(["superchat", "chat"]),
    )
    .unwrap();
    driver.start_connection();
    let mut stream = connect_tcp(addr);
    stream.write_all(driver.pending_output()).unwrap();
    let n = driver.pending_output().len();
    driver.consume_output(n);
    let mut buf = vec![0u8; 4096];
    let mut events = Vec::new();
    while events.is_empty() {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "server closed before answering");
        events = feed(&mut driver, &buf[..n]);
    }
    assert_eq!(events, vec![Ev::Open]);
    assert_eq!(driver.protocol(), Some("chat"));
    let (path, protocol) = rx.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(path, "/room/7?x=1");
    assert_eq!(protocol.as_deref(), Some("chat"));
}

#[test]
fn on_close_runs_when_the_client_drops_tcp() {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let addr = start_server(Options::default(), move |_, ws| {
        let tx = tx.lock().unwrap().clone();
        ws.on_close(move |_, code, _| {
            let _ = tx.send(code);
        });
    });
    let client = Client::connect(addr);
    drop(client);
    assert_eq!(rx.recv_timeout(TIMEOUT), Ok(1006));
}

#[test]
fn many_clients_at_once() {
    let addr = echo_server();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                for j in 0..20 {
                    let text = format!("client {i} message {j}");
                    client.driver.send_text(&text).unwrap();
                    client.flush();
                    assert_eq!(client.next_event(), Ev::Text(text));
                }
                client.driver.close_connection(1000, "").unwrap();
                client.flush();
                assert_eq!(client.next_event(), Ev::Close(1000, String::new()));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The idle keepalive: a peer that answers pings stays open over several idle periods; a
/// peer that completed the handshake and then only reads gets a ping after one idle
/// period, a close 1001 "idle timeout" after the second, then the end of TCP.
#[test]
fn idle_timeout_pings_then_closes_a_silent_peer() {
    let idle = Duration::from_millis(250);
    let server = bound().timeouts(Timeouts {
        idle: Some(idle),
        ..Timeouts::default()
    });
    let (closes_tx, closes) = mpsc::channel();
    let addr = serve(server, move |_, ws| {
        let closes = closes_tx.clone();
        ws.on_message(|ws, message| {
            let _ = ws.send_message(&message);
        });
        ws.on_close(move |_, code, reason| {
            let _ = closes.send((code, reason.to_string()));
        });
    });

    // The test client's driver answers each ping with a pong at once.
    let mut client = Client::connect(addr);
    for _ in 0..4 {
        assert_eq!(client.next_event(), Ev::Ping(vec![]));
    }
    client.driver.send_text("still here").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Text("still here".into()));
    client.driver.close_connection(1000, "").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Close(1000, String::new()));
    assert_eq!(closes.recv_timeout(TIMEOUT).unwrap().0, 1000);

    // A raw socket that upgrades, then reads and never writes. The clock starts before
    // the request: the server's idle clock starts later, so this is a true lower bound.
    let mut raw = connect_tcp(addr);
    let requested = std::time::Instant::now();
    raw.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        raw.read_exact(&mut byte).unwrap();
        seen.push(byte[0]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 101 "));
    let mut frames = Vec::new();
    raw.read_to_end(&mut frames)
        .expect("the server closes TCP (timed out?)");
    let closed_after = requested.elapsed();
    let parsed = parse_frames(&frames);
    assert_eq!(parsed.len(), 2, "{parsed:?}");
    assert_eq!(parsed[0].opcode, OpCode::Ping);
    assert!(parsed[0].payload.is_empty());
    assert_eq!(parsed[1].close_code(), Some(1001));
    assert_eq!(&parsed[1].payload[2..], b"idle timeout");
    // After two idle periods, not one (the read timeout bounds the wait from above).
    assert!(closed_after >= 2 * idle, "{closed_after:?}");
    assert_eq!(
        closes.recv_timeout(TIMEOUT).unwrap(),
        (1001, "idle timeout".to_string())
    );
}

/// `Duration::MAX` is "never" for every timeout, not an overflow that panics the
/// connection's thread.
#[test]
fn a_timeout_of_duration_max_means_never() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = bound().timeouts(Timeouts {
        handshake: Duration::MAX,
        close: Duration::MAX,
        idle: Some(Duration::MAX),
        write: Duration::MAX,
        ..Timeouts::default()
    });
    let addr = serve(server, |_, ws| {
        ws.on_message(|ws, message| {
            let _ = ws.send_message(&message);
        });
    });
    let mut client = Client::connect(addr);
    client.driver.send_text("hello").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Text("hello".into()));
    client.driver.close_connection(1000, "").unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Close(1000, String::new()));
}

/// `max_connections`: connections that hold a thread (here two silent ones that never send
/// their request, and one open WebSocket) count; at the limit a new one is served, one over
/// it gets 503 without a thread, and once one ends there is room again.
#[test]
fn max_connections_answers_503_beyond_the_limit() {
    let server = bound().max_connections(3);
    let addr = serve(server, |_, ws| {
        ws.on_message(|ws, message| {
            let _ = ws.send_message(&message);
        });
    });
    let silent: Vec<TcpStream> = (0..2).map(|_| connect_tcp(addr)).collect();
    // The third, at the limit, is served.
    let mut third = Client::connect(addr);
    third.driver.send_text("third").unwrap();
    third.flush();
    assert_eq!(third.next_event(), Ev::Text("third".into()));
    // One over: 503, closed.
    let refused = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused:?}");
    // A silent one leaves: its thread ends, and the next is served.
    drop(silent);
    let mut served = None;
    for _ in 0..100 {
        let mut stream = connect_tcp(addr);
        stream
            .write_all(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        if &head == b"HTTP/1.1 101" {
            served = Some(stream);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served.is_some(), "no room after a connection ended");
}

/// A client reading a long download more slowly than the server writes it is alive,
/// though the keepalive's ping waits behind the output: the output it keeps taking counts
/// as life. (Its small receive buffer keeps the backlog on the server's side, as a slow link
/// would.)
#[test]
fn a_slow_reader_of_a_long_download_is_not_closed_as_idle() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = bound().timeouts(Timeouts {
        idle: Some(Duration::from_millis(300)),
        ..Timeouts::default()
    });
    let (closes_tx, closes) = mpsc::channel();
    let addr = serve(server, move |_, ws| {
        let closes = closes_tx.clone();
        ws.on_message(|ws, _| {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..128 {
                ws.send_binary(&chunk).unwrap();
            }
        });
        ws.on_close(move |_, code, reason| {
            let _ = closes.send((code, reason.to_string()));
        });
    });
    let mut client = Client::connect(addr);
    socket2::SockRef::from(&client.stream)
        .set_recv_buffer_size(64 * 1024)
        .unwrap();
    client.driver.send_text("flood").unwrap();
    client.flush();
    // About 3 MB/s: the 8 MiB take 2.5 s, eight idle periods.
    let mut received = 0;
    while received < 128 * 64 * 1024 {
        match client.next_event() {
            Ev::Binary(b) => received += b.len(),
            Ev::Ping(_) => {}
            other => panic!("after {received} bytes: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(closes.try_recv().is_err(), "closed while reading");
    client.driver.close_connection(1000, "").unwrap();
    client.flush();
    assert_eq!(closes.recv_timeout(TIMEOUT).unwrap().0, 1000);
}

/// The flood test measures this process's memory: the tests that allocate while it runs
/// (taking `read`) wait for it (`write`).
static MEMORY: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// This process's resident set, from `/proc/self/status` (`VmRSS`, in kB).
fn vm_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_client_that_floods_without_reading_is_slowed_with_bounded_memory() {
    // Alone: the tests that share the process's memory with it wait.
    let _memory = MEMORY.write().unwrap_or_else(|e| e.into_inner());
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    const FRAME: usize = 64 * 1024;
    const FRAMES: usize = 3200; // 200 MiB
    let addr = echo_server();
    let before = vm_rss();
    let client = Client::connect(addr);
    let payload: Vec<u8> = (0..FRAME).map(|i| (i * 31 + i / 253) as u8).collect();
    let frame = masked(OpCode::Binary, &payload);

    // The flooder writes 200 MiB of 64 KiB masked frames and reads nothing; its writes
    // may block for as long as the test does not read.
    let mut flood = client.stream.try_clone().unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let flooder = {
        let written = written.clone();
        std::thread::spawn(move || {
            for _ in 0..FRAMES {
                flood
                    .write_all(&frame)
                    .expect("the flooder is slowed, not cut off");
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // Wait until the flooder is stuck (the server stopped reading), then look at memory.
    let guard = Instant::now() + Duration::from_secs(30);
    let mut last = usize::MAX;
    let mut peak = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = written.load(Ordering::Relaxed);
        peak = peak.max(vm_rss());
        if now == last {
            break;
        }
        assert!(Instant::now() < guard, "the flooder never stopped");
        last = now;
    }
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(vm_rss());
    }
    let stuck_at = written.load(Ordering::Relaxed);
    let growth = peak.saturating_sub(before);
    eprintln!(
        "flood: {} MiB written before the flooder blocked; RSS {} MiB -> peak {} MiB (+{} KiB)",
        (stuck_at * FRAME) >> 20,
        before >> 20,
        peak >> 20,
        growth >> 10
    );
    assert!(stuck_at < FRAMES, "the flooder was never slowed down");
    assert!(
        growth < 64 << 20,
        "RSS grew {} MiB while the peer did not read",
        growth >> 20
    );

    // Now read: every echo arrives intact, and the flooder finishes.
    let mut reader = client.stream.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = [0u8; 10];
    let mut got = vec![0u8; FRAME];
    for i in 0..FRAMES {
        reader.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x82, "frame {i}: a final binary frame");
        assert_eq!(head[1], 127, "frame {i}: unmasked, 64-bit length");
        assert_eq!(
            u64::from_be_bytes(head[2..].try_into().unwrap()),
            FRAME as u64
        );
        reader.read_exact(&mut got).unwrap();
        assert!(got == payload, "echo {i} is intact");
    }
    flooder.join().unwrap();
    assert_eq!(written.load(Ordering::Relaxed), FRAMES);
}

#[test]
fn write_timeout_fails_a_connection_whose_peer_reads_nothing() {
    let server = bound().timeouts(Timeouts {
        write: Duration::from_millis(300),
        ..Timeouts::default()
    });
    let (seen_tx, seen) = mpsc::channel();
    let addr = serve(server, move |_, ws| {
        let (errors, closes) = (seen_tx.clone(), seen_tx.clone());
        ws.on_open(|ws| {
            // More than the socket buffers hold, under the client's max_length.
            ws.send_binary(&vec![1u8; 48 << 20]).unwrap();
        });
        ws.on_error(move |_, e| {
            let _ = errors.send(format!("error: {e}"));
        });
        ws.on_close(move |_, code, reason| {
            let _ = closes.send(format!("close: {code} {reason}"));
        });
    });
    // Completes the handshake, then reads nothing.
    let client = Client::connect(addr);
    let first = seen.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(first.contains("write timed out"), "{first}");
    let second = seen.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(second.starts_with("close: 1006"), "{second}");
    assert!(seen.recv_timeout(Duration::from_millis(200)).is_err());
    drop(client);
}

/// After a refusal, the server reads what the client still sends for at most 2 s in all
/// (so a reset does not destroy the response), not 2 s per read: a client that keeps
/// trickling bytes does not hold the connection's thread.
#[test]
fn a_refused_client_that_keeps_sending_is_closed_within_the_linger() {
    let addr = echo_server();
    let mut stream = connect_tcp(addr);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 4"), "{head:?}");
    let started = std::time::Instant::now();
    // The first write after the server's close draws a reset; the next one fails. The
    // linger is 2 s; 20 trickles take 8 s.
    let closed = (0..20).any(|_| {
        std::thread::sleep(Duration::from_millis(400));
        stream.write_all(b"x").is_err()
    });
    assert!(
        closed,
        "still open after {:?} of trickled bytes",
        started.elapsed()
    );
}

// ----- timeouts, limits and a panicking listener -----

/// A raw socket that has sent an upgrade request for `path`.
fn raw_upgrade_request(addr: SocketAddr, path: &str) -> TcpStream {
    let mut raw = connect_tcp(addr);
    write!(
        raw,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    raw
}

/// A raw socket that completes the upgrade (the 101 head read byte by byte, so nothing
/// after it is consumed).
fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut raw = raw_upgrade_request(addr, "/");
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        raw.read_exact(&mut byte).unwrap();
        seen.push(byte[0]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 101 "), "{seen:?}");
    raw
}

/// `on_close` is called exactly once, also when a listener panics on the connection's
/// thread: the connection is aborted with 1011, as the BlockingClient does (the thread
/// used to die without `on_close`).
#[test]
fn a_panicking_listener_still_gets_on_close() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let addr = start_server(Options::default(), move |_, ws| {
        let tx = tx.lock().unwrap().clone();
        ws.on_message(|ws, message| {
            if message.as_text() == Some("boom") {
                panic!("a listener bug (on purpose)");
            }
            let _ = ws.send_message(&message);
        });
        ws.on_close(move |_, code, _| {
            let _ = tx.send(code);
        });
    });
    let mut client = Client::connect(addr);
    client.driver.send_text("boom").unwrap();
    client.flush();
    let seen_by_client = client.next_event();
    let on_close = rx.recv_timeout(Duration::from_secs(3));
    assert_eq!(
        on_close.ok(),
        Some(1011),
        "on_close on the server; the client saw {seen_by_client:?}"
    );
    assert_eq!(
        seen_by_client,
        Ev::Close(1011, "a listener panicked".into()),
        "the close frame on the wire"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "twice"
    );
    // The server goes on serving others.
    let mut other = Client::connect(addr);
    other.driver.send_text("still here").unwrap();
    other.flush();
    assert_eq!(other.next_event(), Ev::Text("still here".into()));
}

/// A setup closure that panics before the connection opens: the client gets 500 (as from
/// the reactor's server), not a 101 or a silent close, and the server goes on serving.
#[test]
fn a_panicking_setup_closure_answers_500() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let addr = start_server(Options::default(), |request, ws| {
        if request.path == "/boom" {
            panic!("a setup closure bug (on purpose)");
        }
        ws.on_message(|ws, message| {
            let _ = ws.send_message(&message);
        });
    });
    let mut raw = raw_upgrade_request(addr, "/boom");
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 500 "), "{answer:?}");
    assert!(
        answer.ends_with("the server failed to answer the upgrade\n"),
        "{answer:?}"
    );
    let mut other = Client::connect(addr);
    other.driver.send_text("still here").unwrap();
    other.flush();
    assert_eq!(other.next_event(), Ev::Text("still here".into()));
}

/// A setup closure that attaches its listeners and then panics: the client gets 500,
/// and none of those listeners hears of the connection, which never opened (its
/// `on_close` was called with 1011).
#[test]
fn a_setup_closure_that_panics_after_attaching_listeners_runs_none() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let (tx, heard) = mpsc::channel::<String>();
    let tx = std::sync::Mutex::new(tx);
    let addr = start_server(Options::default(), move |_, ws| {
        let open = tx.lock().unwrap().clone();
        let close = open.clone();
        ws.on_open(move |_| {
            let _ = open.send("on_open".into());
        });
        ws.on_close(move |_, code, reason| {
            let _ = close.send(format!("on_close({code}, {reason:?})"));
        });
        panic!("a setup closure bug (on purpose)");
    });
    let mut raw = raw_upgrade_request(addr, "/");
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 500 "), "{answer:?}");
    // The server is done with the connection once it has closed TCP.
    let heard: Vec<String> = heard.try_iter().collect();
    assert!(heard.is_empty(), "listeners ran: {heard:?}");
}

/// A listener that panics with a large reply still queued (the peer reads nothing until
/// then): the peer gets the whole reply, then close 1011, then the server's FIN (only
/// what the socket took at once went out, and the connection was dropped unclosed).
#[test]
fn a_panicking_listener_s_queued_output_goes_out_whole_before_its_1011() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    const BIG: usize = 32 << 20;
    let addr = start_server(Options::default(), |_, ws| {
        ws.on_message(|ws, message| {
            if message.as_text() == Some("boom") {
                ws.send_binary(&vec![7u8; BIG]).unwrap();
                panic!("a listener bug (on purpose)");
            }
        });
    });
    let mut client = Client::connect(addr);
    client.driver.send_text("boom").unwrap();
    client.flush();
    // The reply is queued whole before the panic: far more than the sockets hold.
    match client.next_event() {
        Ev::Binary(b) => assert!(b.len() == BIG && b.iter().all(|&x| x == 7), "{}", b.len()),
        other => panic!("the queued reply first, got {other:?}"),
    }
    assert_eq!(
        client.next_event(),
        Ev::Close(1011, "a listener panicked".into())
    );
    assert!(client.read_to_eof().is_empty(), "nothing after the close");
}

/// The server closes, the peer never answers: after the close
/// timeout TCP is dropped and `on_close` reports 1006.
#[test]
fn unanswered_server_close_times_out() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = bound().timeouts(Timeouts {
        close: Duration::from_millis(300),
        ..Timeouts::default()
    });
    let (tx, rx) = mpsc::channel();
    let addr = serve(server, move |_, ws| {
        let tx = tx.clone();
        ws.on_message(|ws, _| {
            ws.close_connection(1000, "bye").unwrap();
        });
        ws.on_close(move |_, code, reason| {
            let _ = tx.send((code, reason.to_string()));
        });
    });
    let mut raw = raw_upgrade(addr);
    raw.write_all(&masked(OpCode::Text, b"x")).unwrap();
    let started = std::time::Instant::now();
    let mut frames = Vec::new();
    raw.read_to_end(&mut frames).expect("the server drops TCP");
    let took = started.elapsed();
    let parsed = parse_frames(&frames);
    assert_eq!(parsed.len(), 1, "{parsed:?}");
    assert_eq!(parsed[0].close_code(), Some(1000));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let (code, _) = rx.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(code, 1006);
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "twice"
    );
}

/// The close timeout also holds against a peer that never answers the close but
/// keeps sending data: the connection thread reads in a loop that only looks at its
/// deadlines once a read would block.
#[test]
fn unanswered_server_close_times_out_while_the_peer_floods() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = bound().timeouts(Timeouts {
        close: Duration::from_millis(300),
        ..Timeouts::default()
    });
    let (tx, rx) = mpsc::channel();
    let addr = serve(server, move |_, ws| {
        let tx = tx.clone();
        ws.on_message(|ws, _| {
            let _ = ws.close_connection(1000, "bye");
        });
        ws.on_close(move |_, code, _| {
            let _ = tx.send((code, std::time::Instant::now()));
        });
    });
    let raw = raw_upgrade(addr);
    let mut writer = raw.try_clone().unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let chunk: Vec<u8> = (0..64)
        .flat_map(|_| masked(OpCode::Binary, &[7u8; 16 * 1024]))
        .collect();
    let started = std::time::Instant::now();
    let flooder = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(8) {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let closed = rx.recv_timeout(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    let (code, at) = closed.expect("on_close never ran while the peer flooded");
    assert_eq!(code, 1006);
    let took = at.duration_since(started);
    assert!(
        took < Duration::from_secs(3),
        "close timeout 300 ms, took {took:?}"
    );
    drop(raw);
}

/// A request that never completes is dropped after the
/// handshake timeout, with no response.
#[test]
fn incomplete_request_is_dropped_after_the_handshake_timeout() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = bound().timeouts(Timeouts {
        handshake: Duration::from_millis(300),
        ..Timeouts::default()
    });
    let addr = serve(server, |_, _| {});
    let mut raw = connect_tcp(addr);
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = std::time::Instant::now();
    // Trickle a header line every 100 ms: the deadline is for the whole head.
    let mut got = Vec::new();
    raw.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {
                assert!(started.elapsed() < Duration::from_secs(5), "never dropped");
                let _ = raw.write_all(b"X-A: b\r\n");
            }
        }
    }
    let took = started.elapsed();
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

/// `max_length`: at the limit it passes, one over closes 1009.
#[test]
fn max_length_at_the_limit_and_one_over() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let addr = start_server(Options::default().max_length(1000), |_, ws| {
        ws.on_message(|ws, message| {
            let _ = ws.send_message(&message);
        });
    });
    let mut client = Client::connect(addr);
    let at = "a".repeat(1000);
    client.driver.send_text(&at).unwrap();
    client.flush();
    assert_eq!(client.next_event(), Ev::Text(at));
    client.driver.send_text(&"a".repeat(1001)).unwrap();
    client.flush();
    match client.next_event() {
        Ev::Close(1009, _) => {}
        other => panic!("{other:?}"),
    }
}

/// A head of exactly `max_handshake_size` bytes and `max_headers` lines is upgraded,
/// one byte or one line more gets 431, whether it comes in one write or trickles in.
#[test]
fn head_limit_at_the_limit_and_one_over() {
    let _memory = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let options = Options::default().max_handshake_size(512).max_headers(6);
    let addr = start_server(options, |_, _| {});
    // Six header lines, or seven with `extra`.
    let head = |len: usize, extra: bool| {
        let base = "GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Pad: \r\n\r\n";
        let base = if extra {
            base.replace("X-Pad", "X: 1\r\nX-Pad")
        } else {
            base.to_string()
        };
        let pad = len - base.len();
        let h = base.replace("X-Pad: ", &format!("X-Pad: {}", "p".repeat(pad)));
        assert_eq!(h.len(), len);
        h
    };
    for split in [None, Some(100), Some(511)] {
        for (len, extra, want) in [
            (512, false, "HTTP/1.1 101"),
            (513, false, "HTTP/1.1 431"),
            (512, true, "HTTP/1.1 431"),
        ] {
            let request = head(len, extra);
            let mut stream = connect_tcp(addr);
            match split {
                None => stream.write_all(request.as_bytes()).unwrap(),
                Some(at) => {
                    stream.write_all(&request.as_bytes()[..at]).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    stream.write_all(&request.as_bytes()[at..]).unwrap();
                }
            }
            let mut got = [0u8; 12];
            stream.read_exact(&mut got).unwrap();
            assert_eq!(
                &got,
                want.as_bytes(),
                "len {len}, extra {extra}, split {split:?}"
            );
        }
    }
}
