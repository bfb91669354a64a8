//! The clients against the project's own server over loopback: the blocking client (reader
//! thread) and the reactor-hosted client on both backends.

mod common;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use support::{accept_upgrade, read_head};

use websocket_driver::client::{BlockingClient, ClientReactor, ClientTimeouts};
use websocket_driver::server::{
    Handler, HttpResponse, Server, ServerConfig, ServerHandle, Upgrade, Ws,
};
use websocket_driver::{Backend, Error, HandshakeError, Message, Options, UsageError};

/// Polls `check` until it holds or `limit` passes (a bound on waiting, not on speed).
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    check()
}

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let text = message.as_text().map(str::to_string);
        match text.as_deref() {
            Some("close-4001") => {
                let _ = ws.close_connection(4001, "asked to");
            }
            _ => {
                let _ = ws.send_message(&message);
            }
        }
    }
}

fn echo_server() -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend: Backend::Epoll,
            options: Options::default().accept_protocols(["chat"]),
            ..ServerConfig::default()
        })
        .start(|req| match req.path() {
            "/forbidden" => Upgrade::Reject(HttpResponse::new(403, "no")),
            _ => Upgrade::Accept(Echo),
        })
        .unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Open,
    Text(String),
    Binary(usize, u8),
    Error(String),
    Close(u16, String),
}

fn recorded(client: &BlockingClient) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    let (a, b, c, d) = (tx.clone(), tx.clone(), tx.clone(), tx);
    client.on_open(move |_| {
        let _ = a.send(Seen::Open);
    });
    client.on_message(move |_, m| {
        let _ = b.send(match m {
            Message::Text(t) => Seen::Text(t.into_owned()),
            Message::Binary(bytes) => {
                Seen::Binary(bytes.len(), bytes.iter().fold(0u8, |x, y| x ^ y))
            }
        });
    });
    client.on_error(move |_, e| {
        let _ = c.send(Seen::Error(e.to_string()));
    });
    client.on_close(move |_, code, reason| {
        let _ = d.send(Seen::Close(code, reason.to_string()));
    });
    rx
}

fn next(rx: &mpsc::Receiver<Seen>) -> Seen {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("an event within 20 s")
}

/// A server that refuses the upgrade with `head`, then writes `body` in two TCP writes
/// 50 ms apart, then closes after `linger`.
fn refusing_server(head: &'static str, body: &'static str, linger: Duration) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.set_nodelay(true).unwrap();
        let (first, second) = body.split_at(body.len() / 2);
        for part in [head, first, second] {
            s.write_all(part.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(linger);
    });
    format!("ws://{addr}/")
}

/// The error carries the whole (short) body of a refusal whose parts arrive apart: up to
/// its `Content-Length` while the server keeps the connection, else up to the close.
#[test]
fn blocking_client_reports_a_refusals_body_that_came_after_its_head() {
    for (head, linger) in [
        (
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 20\r\n\r\n",
            Duration::from_secs(5),
        ),
        ("HTTP/1.1 401 Unauthorized\r\n\r\n", Duration::ZERO),
    ] {
        let url = refusing_server(head, "token expired, renew", linger);
        let client = BlockingClient::new(&url, Options::default()).unwrap();
        let err = client.start_connection().unwrap_err();
        assert!(
            matches!(&err, Error::Handshake(HandshakeError::UnexpectedStatus { status: 401, body })
                if body == "token expired, renew"),
            "{head:?}: {err:?}"
        );
    }
}

#[test]
fn blocking_client_text_binary_16_mib_ping_and_close() {
    let server = echo_server();
    let url = format!("ws://{}/echo", server.local_addr());
    let client = BlockingClient::new(&url, Options::default().accept_protocols(["chat"])).unwrap();
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    assert_eq!(client.protocol().as_deref(), Some("chat"));
    client.send_text("Hi").unwrap();
    assert_eq!(next(&events), Seen::Text("Hi".into()));
    let big: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let checksum = big.iter().fold(0u8, |x, y| x ^ y);
    client.send_binary(&big).unwrap();
    assert_eq!(next(&events), Seen::Binary(big.len(), checksum));
    let (pong_tx, pong_rx) = mpsc::channel();
    client
        .send_ping(b"are you there", move |_| {
            let _ = pong_tx.send(());
        })
        .unwrap();
    pong_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the ping callback fires");
    // The seed's write callback: runs once the frame is handed to the socket, and the
    // message it followed arrives.
    let (written_tx, written_rx) = mpsc::channel();
    client
        .send_with(
            b"confirmed",
            websocket_driver::MessageType::Text,
            move |driver| {
                let _ = written_tx.send(driver.buffered_amount());
            },
        )
        .unwrap();
    written_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the write callback fires");
    assert_eq!(next(&events), Seen::Text("confirmed".into()));
    client.close_connection(1000, "bye").unwrap();
    // The close event carries the server's reply: the echoed code, no reason.
    assert_eq!(next(&events), Seen::Close(1000, String::new()));
    assert!(
        events.recv_timeout(Duration::from_millis(200)).is_err(),
        "close fires once"
    );
    assert!(client.send_text("late").is_err());
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn blocking_client_sends_from_many_threads() {
    let server = echo_server();
    let client = Arc::new(
        BlockingClient::new(
            &format!("ws://{}/", server.local_addr()),
            Options::default(),
        )
        .unwrap(),
    );
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    client.send_text(&format!("{t}:{i}")).unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let mut got: Vec<String> = (0..200)
        .map(|_| match next(&events) {
            Seen::Text(t) => t,
            other => panic!("{other:?}"),
        })
        .collect();
    // Per sender, order is kept.
    for t in 0..4 {
        let mine: Vec<usize> = got
            .iter()
            .filter_map(|s| s.strip_prefix(&format!("{t}:")).map(|i| i.parse().unwrap()))
            .collect();
        assert_eq!(mine, (0..50).collect::<Vec<_>>());
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 200);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn blocking_client_server_close_code_and_vanishing_server() {
    let server = echo_server();
    let url = format!("ws://{}/", server.local_addr());
    let client = BlockingClient::new(&url, Options::default()).unwrap();
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    client.send_text("close-4001").unwrap();
    assert_eq!(next(&events), Seen::Close(4001, "asked to".into()));
    server.shutdown(Duration::from_secs(1)).unwrap();

    // A server that vanishes in the middle of a message: error, then 1006, once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = listener.accept().unwrap();
        accept_upgrade(&mut s, "");
        // A 1000-byte binary frame, cut after 10 bytes.
        s.write_all(&[0x82, 126, 0x03, 0xe8]).unwrap();
        s.write_all(&[0u8; 10]).unwrap();
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    fake.join().unwrap();
    assert!(matches!(next(&events), Seen::Error(e) if e.contains("middle of a frame")));
    assert_eq!(next(&events), Seen::Close(1006, String::new()));
    assert!(
        events.recv_timeout(Duration::from_millis(200)).is_err(),
        "close fires once"
    );
}

#[test]
fn blocking_client_handshake_rejections_are_errors() {
    let server = echo_server();
    let client = BlockingClient::new(
        &format!("ws://{}/forbidden", server.local_addr()),
        Options::default(),
    )
    .unwrap();
    let events = recorded(&client);
    let err = client.start_connection().unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err}");
    assert!(
        matches!(&err, Error::Handshake(HandshakeError::UnexpectedStatus { status: 403, body }) if body == "no\n"),
        "{err}"
    );
    assert!(matches!(next(&events), Seen::Error(e) if e.contains("403") && e.contains("no")));
    assert!(matches!(next(&events), Seen::Close(1006, _)));
    // A subprotocol the client did not offer.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        accept_upgrade(&mut s, "Sec-WebSocket-Protocol: evil\r\n");
        std::thread::sleep(Duration::from_millis(500));
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
    let err = client.start_connection().unwrap_err();
    assert!(
        matches!(err, Error::Handshake(HandshakeError::BadResponse(m)) if m.contains("subprotocol")),
        "{err}"
    );
    // Nobody listening: a clear connect error, not a panic.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = BlockingClient::new(&format!("ws://{closed}/"), Options::default())
        .unwrap()
        .start_connection()
        .unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err}");
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Hosted handler: echoes nothing, records everything.
struct Recorder {
    log: Arc<Mutex<Vec<Seen>>>,
    closes: Arc<AtomicUsize>,
    greeting: Option<String>,
}
impl Handler for Recorder {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        self.log.lock().unwrap().push(Seen::Open);
        // Publications are server frames: a client connection cannot take them.
        assert!(matches!(
            ws.subscribe("news"),
            Err(Error::Usage(UsageError::ClientCannotSubscribe))
        ));
        if let Some(text) = &self.greeting {
            ws.send_text(text).unwrap();
        }
    }
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        if let Some(text) = message.as_text() {
            self.log.lock().unwrap().push(Seen::Text(text.to_string()));
        }
        let _ = ws.close_connection(1000, "thanks");
    }
    fn on_error(&mut self, _ws: &mut Ws<'_>, error: &Error) {
        self.log
            .lock()
            .unwrap()
            .push(Seen::Error(error.to_string()));
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, reason: &str) {
        self.log
            .lock()
            .unwrap()
            .push(Seen::Close(code, reason.to_string()));
        self.closes.fetch_add(1, Ordering::Relaxed);
    }
}

fn hosted_clients(backend: Backend) {
    let server = echo_server();
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 2,
        backend,
        ..ServerConfig::default()
    })
    .unwrap();
    assert_eq!(reactor.backend(), backend);
    let closes = Arc::new(AtomicUsize::new(0));
    let logs: Vec<Arc<Mutex<Vec<Seen>>>> = (0..200).map(|_| Arc::default()).collect();
    for (i, log) in logs.iter().enumerate() {
        reactor
            .connect(
                &format!("ws://{}/", server.local_addr()),
                Recorder {
                    log: log.clone(),
                    closes: closes.clone(),
                    greeting: Some(format!("hello {i}")),
                },
            )
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while closes.load(Ordering::Relaxed) < 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                Seen::Open,
                Seen::Text(format!("hello {i}")),
                Seen::Close(1000, String::new())
            ]
        );
    }
    // A refused connection reaches the handler as the connect's own error (not a generic
    // "closed during the handshake") and a 1006 close.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    reactor
        .connect(
            &format!("ws://{nowhere}/"),
            Recorder {
                log: log.clone(),
                closes: closes.clone(),
                greeting: None,
            },
        )
        .unwrap();
    while closes.load(Ordering::Relaxed) < 201 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        matches!(&log[0], Seen::Error(e) if e.to_lowercase().contains("connection refused")),
        "{log:?}"
    );
    assert!(matches!(&log[1], Seen::Close(1006, _)));
    // A refusal whose body came after its head and ran to the close: the whole body.
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let url = refusing_server(
        "HTTP/1.1 401 Unauthorized\r\n\r\n",
        "token expired, renew",
        Duration::ZERO,
    );
    let recorder = Recorder {
        log: log.clone(),
        closes: closes.clone(),
        greeting: None,
    };
    reactor.connect(&url, recorder).unwrap();
    while closes.load(Ordering::Relaxed) < 202 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = log.lock().unwrap().clone();
    assert!(
        matches!(&log[..], [Seen::Error(e), Seen::Close(1006, _)]
            if e.contains("401") && e.ends_with("token expired, renew")),
        "{log:?}"
    );
    reactor.shutdown(Duration::from_secs(1)).unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Queued connects go to this listener, which never accepts: only their start counts.
const QUEUED_CONNECTS: u64 = 5_000;

/// The open connection of `queued_connects_leave_room_for_open_connections`: blocks its
/// loop on "hold" until released, and on "ping" records how many connections the loop had
/// started by then.
struct Probe {
    reactor: Arc<std::sync::OnceLock<ClientReactor<Probe>>>,
    release: Arc<Mutex<mpsc::Receiver<()>>>,
    held: mpsc::Sender<websocket_driver::server::Sender>,
    started_at_ping: Arc<Mutex<Option<u64>>>,
}
impl Handler for Probe {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.send_text("hold").unwrap();
    }
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        match message.as_text() {
            Some("hold") => {
                self.held.send(ws.sender()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
            }
            Some("ping") => {
                let started = self.reactor.get().unwrap().stats().connections_total;
                *self.started_at_ping.lock().unwrap() = Some(started);
            }
            _ => {}
        }
    }
}

/// Thousands of connects queued at once do not hold the loop away from the connections it
/// already has: a turn starts a bounded number (64) of them, so an open connection's next
/// message is handled long before the 5 000th connect starts. (Started all in one turn, at
/// up to milliseconds per `connect` once a destination's ephemeral ports run short, they
/// kept a loop from its sockets for longer than the handshake timeout.)
fn queued_connects_leave_room_for_open_connections(backend: Backend) {
    let server = echo_server();
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reactor = Arc::new(std::sync::OnceLock::new());
    let (release_tx, release_rx) = mpsc::channel();
    let (held_tx, held_rx) = mpsc::channel();
    let started_at_ping = Arc::new(Mutex::new(None));
    let release = Arc::new(Mutex::new(release_rx));
    let probe = || Probe {
        reactor: reactor.clone(),
        release: release.clone(),
        held: held_tx.clone(),
        started_at_ping: started_at_ping.clone(),
    };
    let clients = reactor.get_or_init(|| {
        ClientReactor::start(ServerConfig {
            threads: 1,
            backend,
            ..ServerConfig::default()
        })
        .unwrap()
    });
    clients
        .connect(&format!("ws://{}/", server.local_addr()), probe())
        .unwrap();
    // The loop is now blocked in the probe's handler: queue a message for the probe's
    // connection (echoed back as "ping") and the connects behind it, then release it.
    let sender = held_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    sender.send_text("ping").unwrap();
    let url = format!("ws://{}/", nowhere.local_addr().unwrap());
    for _ in 0..QUEUED_CONNECTS {
        clients.connect(&url, probe()).unwrap();
    }
    release_tx.send(()).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || started_at_ping
            .lock()
            .unwrap()
            .is_some()),
        "the ping's echo never arrived"
    );
    let started = started_at_ping.lock().unwrap().unwrap();
    assert!(
        started < 1 + QUEUED_CONNECTS,
        "all {QUEUED_CONNECTS} queued connects started before the open connection's message"
    );
    // And every queued connect does start.
    assert!(
        eventually(Duration::from_secs(30), || clients
            .stats()
            .connections_total
            == 1 + QUEUED_CONNECTS),
        "{} of {} connections started",
        clients.stats().connections_total,
        1 + QUEUED_CONNECTS
    );
    clients.shutdown(Duration::from_secs(1)).unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn queued_connects_leave_room_for_open_connections_on_epoll() {
    queued_connects_leave_room_for_open_connections(Backend::Epoll);
}

#[test]
fn queued_connects_leave_room_for_open_connections_on_io_uring() {
    queued_connects_leave_room_for_open_connections(Backend::IoUring);
}

#[test]
fn hosted_clients_on_epoll() {
    hosted_clients(Backend::Epoll);
}

#[test]
fn hosted_clients_on_io_uring() {
    hosted_clients(Backend::IoUring);
}

/// A name only the test proxy resolves (to 127.0.0.1): `.invalid` never resolves
/// anywhere else (RFC 6761), so a client that looked the target up itself would fail.
const PROXY_ONLY_HOST: &str = "ws-target.invalid";

/// A one-connection HTTP CONNECT proxy: checks the request and the credentials, answers
/// 200 (or 407), then pipes bytes both ways. It resolves [`PROXY_ONLY_HOST`].
fn connect_proxy(
    expect_auth: Option<&'static str>,
) -> (std::net::SocketAddr, std::thread::JoinHandle<String>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let head = read_head(&mut client);
        let target = head.split_whitespace().nth(1).unwrap().to_string();
        if let Some(auth) = expect_auth
            && !head.contains(&format!("Proxy-Authorization: Basic {auth}\r\n"))
        {
            client
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                      Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
                )
                .unwrap();
            return head;
        }
        let upstream =
            std::net::TcpStream::connect(target.replace(PROXY_ONLY_HOST, "127.0.0.1")).unwrap();
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .unwrap();
        let (mut a, mut b) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut a, &mut b);
            let _ = b.shutdown(std::net::Shutdown::Write);
        });
        let (mut upstream, mut client) = (upstream, client);
        let _ = std::io::copy(&mut upstream, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
        head
    });
    (addr, handle)
}

#[test]
fn blocking_client_through_a_connect_proxy() {
    let server = echo_server();
    // The target's name is the proxy's to resolve.
    let target = format!("{PROXY_ONLY_HOST}:{}", server.local_addr().port());
    let url = format!("ws://{target}/");
    // "user:secret" in base64.
    let (proxy, seen) = connect_proxy(Some("dXNlcjpzZWNyZXQ="));
    let client = BlockingClient::new(&url, Options::default())
        .unwrap()
        .proxy(&format!("http://user:secret@{proxy}"))
        .unwrap();
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    client.send_text("tunnelled").unwrap();
    assert_eq!(next(&events), Seen::Text("tunnelled".into()));
    client.close_connection(1000, "").unwrap();
    drop(client);
    let head = seen.join().unwrap();
    assert!(
        head.starts_with(&format!("CONNECT {target} HTTP/1.1\r\n")),
        "{head}"
    );

    // Wrong credentials: the proxy's 407 is a clear handshake error, with its challenge.
    let (proxy, _) = connect_proxy(Some("bm90LXRoaXM="));
    let err = BlockingClient::new(&url, Options::default())
        .unwrap()
        .proxy(&format!("http://user:secret@{proxy}"))
        .unwrap()
        .start_connection()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Handshake(HandshakeError::ProxyRefused { status: 407, authenticate })
            if authenticate == "Basic realm=\"test\""),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "handshake failed: the proxy refused the tunnel with status 407 \
         (Proxy-Authenticate: Basic realm=\"test\")"
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// The hosted client through the same kind of proxy, on both backends (the target's name
/// resolved by the proxy alone): the tunnel opens,
/// the handshake and messages run through it; a 407 reaches the handler as
/// `ProxyRefused` (status 407, the proxy's challenge) and a 1006 close.
fn hosted_client_through_a_connect_proxy(backend: Backend) {
    let server = echo_server();
    // The target's name is the proxy's to resolve.
    let target = format!("{PROXY_ONLY_HOST}:{}", server.local_addr().port());
    let url = format!("ws://{target}/");
    let (proxy, seen) = connect_proxy(Some("dXNlcjpzZWNyZXQ="));
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    })
    .unwrap()
    .proxy(&format!("http://user:secret@{proxy}"))
    .unwrap();
    let closes = Arc::new(AtomicUsize::new(0));
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let recorder = |greeting: Option<&str>| Recorder {
        log: log.clone(),
        closes: closes.clone(),
        greeting: greeting.map(str::to_string),
    };
    reactor.connect(&url, recorder(Some("tunnelled"))).unwrap();
    assert!(eventually(Duration::from_secs(10), || closes
        .load(Ordering::Relaxed)
        == 1));
    assert_eq!(
        *log.lock().unwrap(),
        [
            Seen::Open,
            Seen::Text("tunnelled".into()),
            Seen::Close(1000, String::new())
        ]
    );
    let head = seen.join().unwrap();
    assert!(
        head.starts_with(&format!("CONNECT {target} HTTP/1.1\r\n")),
        "{head}"
    );
    reactor.shutdown(Duration::from_secs(1)).unwrap();

    // Wrong credentials: the proxy answers 407.
    let (proxy, _) = connect_proxy(Some("bm90LXRoaXM="));
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    })
    .unwrap()
    .proxy(&format!("http://user:secret@{proxy}"))
    .unwrap();
    log.lock().unwrap().clear();
    reactor.connect(&url, recorder(None)).unwrap();
    assert!(eventually(Duration::from_secs(10), || closes
        .load(Ordering::Relaxed)
        == 2));
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        matches!(&seen[0], Seen::Error(e)
            if e.contains("status 407 (Proxy-Authenticate: Basic realm=\"test\")")),
        "{seen:?}"
    );
    assert!(matches!(&seen[1], Seen::Close(1006, _)), "{seen:?}");
    reactor.shutdown(Duration::from_secs(1)).unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn hosted_client_through_a_connect_proxy_on_epoll() {
    hosted_client_through_a_connect_proxy(Backend::Epoll);
}

#[test]
fn hosted_client_through_a_connect_proxy_on_io_uring() {
    hosted_client_through_a_connect_proxy(Backend::IoUring);
}

/// The blocking client's idle keepalive: against a server that answers pings it stays open
/// over several idle periods; against a server that completed the handshake and then
/// only reads, it pings after one idle period, closes with 1001 "idle timeout" after the
/// second, and drops TCP once the close timeout passes unanswered.
#[test]
fn blocking_client_idle_timeout_pings_then_closes_a_silent_server() {
    use common::parse_frames;
    use websocket_driver::protocol::frame::OpCode;
    let idle = Duration::from_millis(250);
    let timeouts = ClientTimeouts {
        idle: Some(idle),
        close: Duration::from_millis(300),
        ..ClientTimeouts::default()
    };

    // The reactor's echo server answers every ping with a pong.
    let server = echo_server();
    let url = format!("ws://{}/", server.local_addr());
    let client = BlockingClient::new(&url, Options::default())
        .unwrap()
        .timeouts(timeouts);
    let events = recorded(&client);
    let (pong_tx, pongs) = mpsc::channel();
    client.on_pong(move |_, payload| {
        let _ = pong_tx.send(payload.to_vec());
    });
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    for _ in 0..4 {
        let pong = pongs
            .recv_timeout(Duration::from_secs(20))
            .expect("a pong for each keepalive ping");
        assert!(pong.is_empty());
    }
    client.send_text("still here").unwrap();
    assert_eq!(next(&events), Seen::Text("still here".into()));
    client.close_connection(1000, "").unwrap();
    assert_eq!(next(&events), Seen::Close(1000, String::new()));
    server.shutdown(Duration::from_secs(1)).unwrap();

    // A fake server that answers the upgrade, then reads and never writes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        accept_upgrade(&mut s, "");
        let opened = std::time::Instant::now();
        let mut frames = Vec::new();
        s.read_to_end(&mut frames)
            .expect("the client drops TCP (timed out?)");
        (frames, opened.elapsed())
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default())
        .unwrap()
        .timeouts(timeouts);
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    assert_eq!(next(&events), Seen::Close(1001, "idle timeout".into()));
    let (frames, dropped_after) = fake.join().unwrap();
    let frames = parse_frames(&frames);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0].opcode, OpCode::Ping);
    assert!(frames[0].mask.is_some() && frames[0].payload.is_empty());
    assert_eq!(frames[1].close_code(), Some(1001));
    assert_eq!(&frames[1].payload[2..], b"idle timeout");
    // Two idle periods, then the close timeout; never sooner (the read timeout bounds
    // the wait from above).
    assert!(dropped_after >= 2 * idle, "{dropped_after:?}");
    assert!(
        events.recv_timeout(Duration::from_millis(200)).is_err(),
        "close fires once"
    );
}

/// The blocking client's keepalive and a server reading a long upload slowly: the ping
/// waits behind the upload, and the upload the server keeps taking counts as life, so the
/// client does not close it as idle. (The server's small receive buffer keeps the backlog
/// on the client's side, as a slow link would.)
#[test]
fn blocking_client_keeps_a_server_slowly_reading_its_upload() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (count, size) = (128usize, 64 * 1024);
    let slow = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        socket2::SockRef::from(&s)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        accept_upgrade(&mut s, "");
        // About 3 MB/s: the 8 MiB take 2.5 s, eight idle periods.
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < count * size {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the client ended the upload after {total} bytes");
            total += n;
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            idle: Some(Duration::from_millis(300)),
            ..ClientTimeouts::default()
        });
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    let chunk = vec![7u8; size];
    for _ in 0..count {
        client.send_binary(&chunk).unwrap();
    }
    let _server = slow.join().unwrap();
    assert!(
        events.try_recv().is_err(),
        "no close while the upload was read"
    );
    assert_eq!(client.ready_state(), websocket_driver::ReadyState::Open);
}

/// A hosted client's opening-handshake deadline ends when it opens: an open connection
/// outlives several handshake timeouts (it used to be aborted with 1006 after one).
#[test]
fn hosted_client_stays_open_past_the_handshake_timeout() {
    let server = echo_server();
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend: Backend::Epoll,
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .unwrap();
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let closes = Arc::new(AtomicUsize::new(0));
    reactor
        .connect(
            &format!("ws://{}/", server.local_addr()),
            Recorder {
                log: log.clone(),
                closes: closes.clone(),
                greeting: None,
            },
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while log.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(*log.lock().unwrap(), vec![Seen::Open]);
    assert_eq!(closes.load(Ordering::Relaxed), 0);
    reactor.shutdown(Duration::from_secs(1)).unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A hosted client whose server accepts and never answers hears why when the opening
/// handshake's deadline passes: `on_error` with a timed-out I/O error, then `on_close`
/// 1006 (the same order as a refused connect), on both backends.
fn hosted_client_handshake_timeout_is_reported_as_an_error(backend: Backend) {
    let (addr, _request_seen, silent) = silent_upgrade_server();
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .unwrap();
    let (log, closes) = connect_recorded(&reactor, &format!("ws://{addr}/"));
    assert!(eventually(Duration::from_secs(20), || closes
        .load(Ordering::Relaxed)
        == 1));
    let log = log.lock().unwrap().clone();
    assert!(
        matches!(&log[..], [Seen::Error(e), Seen::Close(1006, _)] if e.contains("timed out")),
        "{log:?}"
    );
    silent.join().unwrap();
    reactor.shutdown(Duration::from_secs(1)).unwrap();
}

/// A server that accepts one connection, reads its upgrade request (then says so on the
/// returned channel) and never answers; it ends when the client goes.
fn silent_upgrade_server() -> (
    std::net::SocketAddr,
    mpsc::Receiver<()>,
    std::thread::JoinHandle<()>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (requested, request_seen) = mpsc::channel();
    let silent = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = read_head(&mut s);
        let _ = requested.send(());
        // Holds the connection until the client drops it.
        let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
    });
    (addr, request_seen, silent)
}

/// Connects `reactor` to `url` with a `Recorder` that sends nothing; returns its log and
/// its close count.
fn connect_recorded(
    reactor: &ClientReactor<Recorder>,
    url: &str,
) -> (Arc<Mutex<Vec<Seen>>>, Arc<AtomicUsize>) {
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let closes = Arc::new(AtomicUsize::new(0));
    reactor
        .connect(
            url,
            Recorder {
                log: log.clone(),
                closes: closes.clone(),
                greeting: None,
            },
        )
        .unwrap();
    (log, closes)
}

#[test]
fn hosted_client_handshake_timeout_is_reported_as_an_error_on_epoll() {
    hosted_client_handshake_timeout_is_reported_as_an_error(Backend::Epoll);
}

#[test]
fn hosted_client_handshake_timeout_is_reported_as_an_error_on_io_uring() {
    hosted_client_handshake_timeout_is_reported_as_an_error(Backend::IoUring);
}

/// A shutdown closes a client still waiting for its 101 at once (there is no one to send
/// 1001 to): its handler hears a 1006 that says so, rather than the connection holding
/// the shutdown for its whole grace and then ending as a cut-off handshake.
fn shutdown_ends_a_client_still_connecting(backend: Backend) {
    let (addr, request_seen, silent) = silent_upgrade_server();
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    })
    .unwrap();
    let (log, _closes) = connect_recorded(&reactor, &format!("ws://{addr}/"));
    request_seen.recv_timeout(Duration::from_secs(10)).unwrap();
    reactor.shutdown(Duration::from_secs(3)).unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [Seen::Close(
            1006,
            "shut down before the connection opened".into()
        )]
    );
    silent.join().unwrap();
}

#[test]
fn shutdown_ends_a_client_still_connecting_on_epoll() {
    shutdown_ends_a_client_still_connecting(Backend::Epoll);
}

#[test]
fn shutdown_ends_a_client_still_connecting_on_io_uring() {
    shutdown_ends_a_client_still_connecting(Backend::IoUring);
}

/// Every way `start_connection` can fail fires `error` and then `close` 1006 once, as
/// the docs say, not only a failed handshake: here a refused connect and a proxy that
/// refuses the tunnel. Calling it again on a client that failed changes nothing.
#[test]
fn blocking_client_start_failures_fire_error_and_close() {
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = BlockingClient::new(&format!("ws://{nowhere}/"), Options::default()).unwrap();
    let events = recorded(&client);
    let err = client.start_connection().unwrap_err();
    assert!(matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused));
    assert!(matches!(next(&events), Seen::Error(e) if e.to_lowercase().contains("refused")));
    assert!(matches!(next(&events), Seen::Close(1006, _)));
    assert!(client.start_connection().is_err());
    assert!(events.recv_timeout(Duration::from_millis(200)).is_err());

    let (proxy, _) = connect_proxy(Some("bm90LXRoaXM="));
    let client = BlockingClient::new("ws://127.0.0.1:9/", Options::default())
        .unwrap()
        .proxy(&format!("http://user:secret@{proxy}"))
        .unwrap();
    let events = recorded(&client);
    assert!(client.start_connection().is_err());
    assert!(matches!(next(&events), Seen::Error(e) if e.contains("407")));
    assert!(matches!(next(&events), Seen::Close(1006, _)));
}

/// A connection the server resets after opening reaches `on_error` as the reset itself
/// (then 1006), not as a plain end of stream.
#[test]
fn blocking_client_reports_a_reset_as_its_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, reset) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        accept_upgrade(&mut s, "");
        reset.recv().unwrap();
        // Linger 0: close sends a reset.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    go.send(()).unwrap();
    let error = next(&events);
    assert!(
        matches!(&error, Seen::Error(e) if e.to_lowercase().contains("reset")),
        "{error:?}"
    );
    assert!(matches!(next(&events), Seen::Close(1006, _)));
    server.join().unwrap();
}

/// `close_connection` waits for the server to close TCP after the close handshake (RFC
/// 6455 §7.1.1: the server closes first, and holds the TIME_WAIT) rather than closing
/// as soon as the server's Close arrives; it returns once the server has.
#[test]
fn blocking_client_close_waits_for_the_servers_tcp_close() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        accept_upgrade(&mut s, "");
        // The client's masked Close (2 + 4 + 2 bytes for code 1000).
        let mut close = [0u8; 8];
        s.read_exact(&mut close).unwrap();
        assert_eq!(close[0], 0x88);
        s.write_all(&[0x88, 0x02, 0x03, 0xe8]).unwrap();
        // The client must not close TCP before the server: nothing arrives for a while.
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let early = match s.read(&mut [0u8; 16]) {
            Ok(0) => "the client closed TCP first",
            Ok(_) => "the client sent more",
            Err(_) => "",
        };
        drop(s);
        early
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    client.close_connection(1000, "").unwrap();
    assert_eq!(next(&events), Seen::Close(1000, String::new()));
    assert_eq!(server.join().unwrap(), "");
}

/// A proxy that trickles its answer (a byte every 200 ms, never finishing the head) is cut
/// off by the handshake timeout as a whole, not per byte: a timed-out error (then 1006).
#[test]
fn blocking_client_bounds_a_trickling_proxy_by_the_handshake_timeout() {
    let (proxy, trickler) = trickling_proxy();
    let client = BlockingClient::new("ws://127.0.0.1:9/", Options::default())
        .unwrap()
        .proxy(&format!("http://{proxy}"))
        .unwrap()
        .timeouts(ClientTimeouts {
            handshake: Duration::from_secs(1),
            ..ClientTimeouts::default()
        });
    let events = recorded(&client);
    let err = client.start_connection().unwrap_err();
    assert!(
        matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "{err}"
    );
    assert!(matches!(next(&events), Seen::Error(e) if e.contains("timed out")));
    assert!(matches!(next(&events), Seen::Close(1006, _)));
    drop(client);
    trickler.join().unwrap();
}

/// A proxy on a free port that reads one `CONNECT` and then trickles an answer that never
/// ends its head (a byte every 200 ms, for up to 20 s, or until the client goes).
fn trickling_proxy() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap();
    let trickler = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let _ = read_head(&mut client);
        for byte in b"HTTP/1.1 200 Connection established but slowly"
            .iter()
            .cycle()
            .take(100)
        {
            std::thread::sleep(Duration::from_millis(200));
            if client.write_all(&[*byte]).is_err() {
                break;
            }
        }
    });
    (proxy, trickler)
}

/// The hosted client's tunnel and 101 share one handshake deadline: a proxy that trickles
/// its answer is cut off when it passes (1 s here, the trickle lasting 20 s), with 1006,
/// on both backends.
fn hosted_client_bounds_a_trickling_proxy_by_the_handshake_timeout(backend: Backend) {
    let (proxy, trickler) = trickling_proxy();
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        handshake_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .unwrap()
    .proxy(&format!("http://{proxy}"))
    .unwrap();
    let closes = Arc::new(AtomicUsize::new(0));
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let started = std::time::Instant::now();
    reactor
        .connect(
            "ws://127.0.0.1:9/",
            Recorder {
                log: log.clone(),
                closes: closes.clone(),
                greeting: None,
            },
        )
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || closes
        .load(Ordering::Relaxed)
        == 1));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "{backend:?}: ended after {took:?}"
    );
    let seen = log.lock().unwrap().clone();
    assert!(
        matches!(seen.last(), Some(Seen::Close(1006, _))) && !seen.contains(&Seen::Open),
        "{backend:?}: {seen:?}"
    );
    reactor.shutdown(Duration::from_secs(1)).unwrap();
    trickler.join().unwrap();
}

#[test]
fn hosted_client_bounds_a_trickling_proxy_by_the_handshake_timeout_on_epoll() {
    hosted_client_bounds_a_trickling_proxy_by_the_handshake_timeout(Backend::Epoll);
}

#[test]
fn hosted_client_bounds_a_trickling_proxy_by_the_handshake_timeout_on_io_uring() {
    hosted_client_bounds_a_trickling_proxy_by_the_handshake_timeout(Backend::IoUring);
}

/// Connects a `Recorder` (sending `greeting` once open) to `url` at `addrs` in turn, and
/// returns what it heard once its connection has ended (within 10 s).
fn dial(
    reactor: &ClientReactor<Recorder>,
    url: &str,
    addrs: &[SocketAddr],
    greeting: Option<&str>,
) -> Vec<Seen> {
    let closes = Arc::new(AtomicUsize::new(0));
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    reactor
        .connect_at(
            url,
            addrs,
            &Options::default(),
            Recorder {
                log: log.clone(),
                closes: closes.clone(),
                greeting: greeting.map(str::to_string),
            },
        )
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || closes
        .load(Ordering::Relaxed)
        == 1));
    log.lock().unwrap().clone()
}

/// What a `Recorder` that sent `greeting` to the echo server hears: its echo, and the close
/// it then starts.
fn echoed(greeting: &str) -> Vec<Seen> {
    vec![
        Seen::Open,
        Seen::Text(greeting.into()),
        Seen::Close(1000, String::new()),
    ]
}

fn client_reactor(backend: Backend, handshake_timeout: Duration) -> ClientReactor<Recorder> {
    ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        handshake_timeout,
        ..ServerConfig::default()
    })
    .unwrap()
}

/// A hosted client tries a name's addresses in turn: here `connect_at` with an address
/// that refuses the connect, then the echo server's. The handler hears nothing of the
/// refused one (no error, no close): it opens, echoes and closes at the second. With
/// only the refusing address, the refusal is reported once, as before.
fn hosted_client_tries_the_next_address_when_one_refuses(backend: Backend) {
    let server = echo_server();
    let refusing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let reactor = client_reactor(backend, Duration::from_secs(10));
    let url = format!("ws://{}/", server.local_addr());
    let log = dial(
        &reactor,
        &url,
        &[refusing, server.local_addr()],
        Some("second address"),
    );
    assert_eq!(log, echoed("second address"));
    let log = dial(&reactor, &url, &[refusing], None);
    assert!(
        matches!(&log[..], [Seen::Error(e), Seen::Close(1006, _)]
            if e.to_lowercase().contains("refused")),
        "{log:?}"
    );
    reactor.shutdown(Duration::from_secs(1)).unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn hosted_client_tries_the_next_address_when_one_refuses_on_epoll() {
    hosted_client_tries_the_next_address_when_one_refuses(Backend::Epoll);
}

#[test]
fn hosted_client_tries_the_next_address_when_one_refuses_on_io_uring() {
    hosted_client_tries_the_next_address_when_one_refuses(Backend::IoUring);
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to
/// it neither completes nor fails (an address that black-holes connects, on loopback).
/// The returned streams hold the queue full.
fn black_hole() -> (socket2::Socket, SocketAddr, Vec<std::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // A backlog of 0 queues one connection; connects past it wait for an accept that
    // never comes.
    let fillers = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    (listener, addr, fillers)
}

/// A hosted client whose connect to the first address never completes (the SYN is
/// dropped) gives that address up at the handshake timeout and goes on at the next, as
/// the blocking client does: the handler opens there and hears nothing of the first.
/// A server that took the connection and never answers is not retried: its timeout is
/// reported (the whole attempt's).
fn hosted_client_gives_up_a_black_holed_address(backend: Backend) {
    let server = echo_server();
    let (_hole, hole, _fillers) = black_hole();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reactor = client_reactor(backend, Duration::from_millis(300));
    let url = format!("ws://{}/", server.local_addr());
    let log = dial(
        &reactor,
        &url,
        &[hole, server.local_addr()],
        Some("past the hole"),
    );
    assert_eq!(log, echoed("past the hole"));
    // Connected to a server that never answers, with an address left: not retried.
    let addrs = [silent.local_addr().unwrap(), server.local_addr()];
    let log = dial(&reactor, &url, &addrs, None);
    assert!(
        matches!(&log[..], [Seen::Error(e), Seen::Close(1006, _)] if e.contains("timed out")),
        "{log:?}"
    );
    reactor.shutdown(Duration::from_secs(1)).unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn hosted_client_gives_up_a_black_holed_address_on_epoll() {
    hosted_client_gives_up_a_black_holed_address(Backend::Epoll);
}

#[test]
fn hosted_client_gives_up_a_black_holed_address_on_io_uring() {
    hosted_client_gives_up_a_black_holed_address(Backend::IoUring);
}

/// An order-sensitive checksum of a message.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn blocking_client_and_server_both_send_64_mib_while_the_other_sends_too() {
    use websocket_driver::blocking::BlockingServer;
    const SIZE: usize = 64 << 20;
    let options = Options::default().max_length(128 << 20);
    let to_client: Arc<Vec<u8>> = Arc::new((0..SIZE).map(|i| (i % 251) as u8).collect());
    let to_server: Vec<u8> = (0..SIZE).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    let (want_at_client, want_at_server) = (checksum(&to_client), checksum(&to_server));

    let server = BlockingServer::bind("127.0.0.1:0")
        .unwrap()
        .options(options.clone());
    let addr = server.local_addr().unwrap();
    let (server_got_tx, server_got) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = server.serve(move |_, ws| {
            let big = to_client.clone();
            ws.on_open(move |ws| {
                ws.send_binary(&big).unwrap();
            });
            let got = Mutex::new(server_got_tx.clone());
            ws.on_message(move |_, m| {
                let bytes = m.as_bytes();
                let _ = got.lock().unwrap().send((bytes.len(), checksum(bytes)));
            });
        });
    });

    // The whole exchange runs on its own thread, so a deadlock fails the test.
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let client = BlockingClient::new(&format!("ws://{addr}/"), options).unwrap();
        let (client_got_tx, client_got) = mpsc::channel();
        let got = Mutex::new(client_got_tx);
        client.on_message(move |_, m| {
            let bytes = m.as_bytes();
            let _ = got.lock().unwrap().send((bytes.len(), checksum(bytes)));
        });
        client.start_connection().unwrap();
        // The server's 64 MiB is on its way already; send ours at the same time.
        client.send_binary(&to_server).unwrap();
        let at_client = client_got.recv_timeout(Duration::from_secs(60));
        let at_server = server_got.recv_timeout(Duration::from_secs(60));
        client.close_connection(1000, "").unwrap();
        let _ = done_tx.send((at_client, at_server));
    });
    let (at_client, at_server) = done
        .recv_timeout(Duration::from_secs(60))
        .expect("both 64 MiB messages cross within 60 s (no deadlock)");
    assert_eq!(at_client.unwrap(), (SIZE, want_at_client));
    assert_eq!(at_server.unwrap(), (SIZE, want_at_server));
}

#[test]
fn blocking_client_write_timeout_fails_with_1006_against_a_server_that_never_reads() {
    use std::time::Instant;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (hold_tx, hold) = mpsc::channel::<()>();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        accept_upgrade(&mut s, "");
        // Holds the connection open and reads nothing until the test is done.
        let _ = hold.recv_timeout(Duration::from_secs(60));
        drop(s);
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            write: Duration::from_millis(500),
            ..ClientTimeouts::default()
        });
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);

    let started = Instant::now();
    let sent = client.send_binary(&vec![7u8; 64 << 20]);
    let took = started.elapsed();
    match sent {
        Err(Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains("write timed out"), "{e}");
        }
        other => panic!("the send fails with the write timeout, got {other:?}"),
    }
    // A hang guard, not a speed test: the timeout is 500 ms.
    assert!(took < Duration::from_secs(20), "failed after {took:?}");
    assert!(matches!(next(&events), Seen::Error(e) if e.contains("write timed out")));
    assert!(matches!(next(&events), Seen::Close(1006, _)));
    assert!(
        events.recv_timeout(Duration::from_millis(200)).is_err(),
        "close fires once"
    );
    drop(client);
    let _ = hold_tx.send(());
    fake.join().unwrap();
}

/// A close frame that arrives in the same segment as the 101 is handled while
/// `start_connection` runs, so `on_close` fires before the I/O thread has written
/// anything; an application that drops the client right then (as the Autobahn client
/// does) must still send the close reply.
#[test]
fn blocking_client_dropped_in_on_close_still_answers_the_close() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let head = read_head(&mut stream);
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let accept = websocket_driver::protocol::handshake::accept_key(key);
        let mut reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        reply.extend_from_slice(&[0x88, 0x02, 0x03, 0xe8]); // close 1000, same write
        stream.write_all(&reply).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 2 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    client.on_close(move |_, code, _| {
        let _ = tx.send(code);
    });
    client.start_connection().unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1000);
    drop(client);
    let got = server.join().unwrap();
    assert_eq!(got.first(), Some(&0x88), "no close reply: {got:?}");
}

/// A shutdown ends every connection the client reactor was asked for, each handler
/// hearing its close once: those open or waiting for their 101 (1006), and those still
/// queued for a later turn (a turn starts at most 64), which fail as connects. A connect
/// asked for after the shutdown is refused by `connect` itself.
fn hosted_client_shutdown_ends_every_queued_connect(backend: Backend) {
    // Takes connections into its backlog and never answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", silent.local_addr().unwrap());
    let reactor = client_reactor(backend, Duration::from_secs(30));
    let closes = Arc::new(AtomicUsize::new(0));
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let recorder = || Recorder {
        log: log.clone(),
        closes: closes.clone(),
        greeting: None,
    };
    const ASKED: usize = 300;
    for _ in 0..ASKED {
        reactor.connect(&url, recorder()).unwrap();
    }
    reactor.shutdown(Duration::ZERO).unwrap();
    assert!(
        reactor.connect(&url, recorder()).is_err(),
        "a connect after the shutdown was taken"
    );
    // Every handler heard its close by the time `shutdown` returned.
    assert_eq!(closes.load(Ordering::Relaxed), ASKED);
    let log = log.lock().unwrap();
    let closed = log
        .iter()
        .filter(|seen| matches!(seen, Seen::Close(1006, _)))
        .count();
    assert_eq!(closed, ASKED, "{log:?}");
    assert!(!log.contains(&Seen::Open));
}

#[test]
fn hosted_client_shutdown_ends_every_queued_connect_epoll() {
    hosted_client_shutdown_ends_every_queued_connect(Backend::Epoll);
}

#[test]
fn hosted_client_shutdown_ends_every_queued_connect_io_uring() {
    hosted_client_shutdown_ends_every_queued_connect(Backend::IoUring);
}

/// A listener that panics on the blocking client's I/O thread fails the connection as
/// an internal error (1011 to the server, `on_close` here) instead of leaving a client
/// whose every later call panicked and whose drop aborted the process.
#[test]
fn blocking_client_survives_a_panicking_listener() {
    let server = echo_server();
    let url = format!("ws://{}/", server.local_addr());
    let client = BlockingClient::new(&url, Options::default()).unwrap();
    client.on_message(|_, m| {
        if m.as_text() == Some("boom") {
            panic!("a listener bug");
        }
    });
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    client.send_text("boom").unwrap();
    assert_eq!(
        next(&events),
        Seen::Close(1011, "a listener panicked".into())
    );
    assert_eq!(client.ready_state(), websocket_driver::ReadyState::Closed);
    assert!(matches!(
        client.send_text("again"),
        Err(Error::Usage(UsageError::NotOpen))
    ));
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// `start_connection` on a client already started changes nothing: it used to dial the
/// server again and re-arm the handshake deadline, which then dropped the open
/// connection (1006, "close handshake timed out").
#[test]
fn blocking_client_second_start_connection_leaves_the_open_one_alone() {
    let server = echo_server();
    let url = format!("ws://{}/", server.local_addr());
    let client = BlockingClient::new(&url, Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            handshake: Duration::from_millis(300),
            ..ClientTimeouts::default()
        });
    let events = recorded(&client);
    client.start_connection().unwrap();
    assert_eq!(next(&events), Seen::Open);
    assert!(matches!(
        client.start_connection(),
        Err(Error::Usage(UsageError::NotOpen))
    ));
    std::thread::sleep(Duration::from_millis(600));
    client.send_text("still there?").unwrap();
    assert_eq!(next(&events), Seen::Text("still there?".into()));
    assert_eq!(client.ready_state(), websocket_driver::ReadyState::Open);
    assert_eq!(server.stats().connections_total, 1);
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A handshake that times out reaches `on_error` as the timeout `start_connection`
/// returns (it heard "connection closed during the handshake").
#[test]
fn blocking_client_handshake_timeout_reaches_on_error_as_a_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            handshake: Duration::from_millis(300),
            ..ClientTimeouts::default()
        });
    let events = recorded(&client);
    let err = client.start_connection().unwrap_err();
    assert!(
        matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "{err:?}"
    );
    let error = next(&events);
    assert!(
        matches!(&error, Seen::Error(e) if e.contains("timed out")),
        "on_error heard {error:?}"
    );
    assert!(matches!(next(&events), Seen::Close(1006, _)));
    drop(listener);
}

/// A server that floods pings and never reads: the blocking client reads on (it must, to
/// see the server's messages), and its pongs coalesce (RFC 6455 §5.5.3: only the last
/// unanswered ping needs one), so its output stays a few bytes instead of a pong per ping
/// (46 MB of them for 16 MiB of pings before).
#[test]
fn blocking_client_output_stays_bounded_under_a_ping_flood() {
    use std::io::Write;
    const PING_FLOOD: usize = 16 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let flooder = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        accept_upgrade(&mut s, "");
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk: Vec<u8> = [0x89u8, 0x00].repeat(32 * 1024);
        let mut sent = 0;
        while sent < PING_FLOOD {
            s.write_all(&chunk).expect("the client keeps reading");
            sent += chunk.len();
        }
        s.write_all(&[0x81, 5, b'p', b'r', b'o', b'b', b'e'])
            .unwrap();
        s
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    client.on_message(move |driver, _| {
        let _ = tx.send(driver.buffered_amount());
    });
    client.start_connection().unwrap();
    let buffered = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the message after the pings");
    // Under 16 KiB of pongs, then at most two more (6 bytes each: the client masks): one
    // partly written, which is not replaced, and the one that replaces the rest.
    assert!(
        buffered <= 16 * 1024 + 2 * 6,
        "{buffered} bytes of output queued after {PING_FLOOD} bytes of pings"
    );
    let _server = flooder.join().unwrap();
}

/// RFC 3986 §3.2.2: a host is an IP literal in brackets, an IPv4 address or a reg-name,
/// which holds no `:`: an unbracketed colon in the host is refused (`ws://host:80:81/`
/// parsed as host `host:80` with `Host: [host:80]:81`, and `ws://::1/` as host `:` port
/// 1), and so are brackets around anything but an IPv6 address, as the proxy URL parser
/// refuses them. A bracketed IPv6 address still parses.
#[test]
fn client_urls_with_a_colon_in_an_unbracketed_host_are_refused() {
    use websocket_driver::protocol::handshake::ClientUrl;
    for url in ["ws://host:80:81/", "ws://::1/", "ws://[example.com]/"] {
        let parsed = ClientUrl::parse(url);
        assert!(parsed.is_err(), "{url} parsed as {parsed:?}");
        assert!(
            matches!(
                BlockingClient::new(url, Options::default()),
                Err(Error::Usage(UsageError::InvalidUrl(_)))
            ),
            "{url}"
        );
    }
    assert!(websocket_driver::session::proxy::Proxy::parse("http://host:80:81/").is_err());
    let v6 = ClientUrl::parse("ws://[::1]:9001/chat").unwrap();
    assert_eq!((v6.host.as_str(), v6.port), ("::1", 9001));
    assert_eq!(v6.host_header, "[::1]:9001");
}

/// Tells the test how its connection closed.
struct ToldOfClose(mpsc::Sender<(u16, String)>);
impl Handler for ToldOfClose {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.send_text("hello").unwrap();
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, reason: &str) {
        let _ = self.0.send((code, reason.to_string()));
    }
}

/// Panics on the first message.
struct PanicsOnMessage;
impl Handler for PanicsOnMessage {
    fn on_message(&mut self, _ws: &mut Ws<'_>, _message: Message<'_>) {
        panic!("a client handler panics (on purpose)");
    }
}

/// A hosted client whose handler panics fails its connection as a server's does: the
/// server hears close 1011, and the client reactor counts the panic, lets the connection
/// go and goes on connecting.
fn a_panicking_client_handler_fails_its_connection(backend: Backend) {
    let (told, closes) = mpsc::channel();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .threads(1)
        .start(move |_| Upgrade::Accept(ToldOfClose(told.clone())))
        .unwrap();
    let clients: ClientReactor<PanicsOnMessage> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    })
    .unwrap();
    let url = format!("ws://{}/", server.local_addr());
    for round in 1..=3 {
        clients.connect(&url, PanicsOnMessage).unwrap();
        assert_eq!(
            closes.recv_timeout(Duration::from_secs(10)).unwrap(),
            (1011, "the handler panicked".to_string()),
            "{backend}: round {round}"
        );
        assert!(
            eventually(Duration::from_secs(10), || {
                let stats = clients.stats();
                stats.handler_panics == round && stats.connections_open == 0
            }),
            "{backend}: {:?}",
            clients.stats()
        );
    }
    clients.shutdown(Duration::from_secs(1)).unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn a_panicking_client_handler_fails_its_connection_on_epoll() {
    a_panicking_client_handler_fails_its_connection(Backend::Epoll);
}

#[test]
fn a_panicking_client_handler_fails_its_connection_on_io_uring() {
    a_panicking_client_handler_fails_its_connection(Backend::IoUring);
}
