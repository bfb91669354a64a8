//! Resource-leak audit: many connections through each error or early-exit path, then the
//! process's open descriptors (and threads, and the stats' gauges) must return to where
//! they were. Alone in its own test binary, as one test that runs the scenarios in turn:
//! it counts this process's descriptors. Every scenario runs; the failures are reported
//! together at the end.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{TestClient, eventually, open_descriptors};
use websocket_driver::client::{BlockingClient, ClientReactor, ClientTimeouts};
use websocket_driver::server::{
    Handler, HttpResponse, PanicPolicy, Sender, Server, ServerConfig, ServerHandle, Upgrade, Ws,
};
use websocket_driver::{Backend, Error, Message, Options};

const N: usize = 200;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Collected failures.
#[derive(Default)]
struct Audit {
    failures: Vec<String>,
}

impl Audit {
    fn check(&mut self, what: &str, ok: bool, detail: impl FnOnce() -> String) {
        if !ok {
            let line = format!("{what}: {}", detail());
            eprintln!("LEAK? {line}");
            self.failures.push(line);
        } else {
            eprintln!("ok: {what}");
        }
    }

    /// Waits (bounded) for the descriptor count to come back to `baseline`.
    fn fds_back(&mut self, what: &str, baseline: usize) {
        let ok = eventually(Duration::from_secs(15), || {
            open_descriptors().len() <= baseline
        });
        self.check(&format!("{what}: descriptors"), ok, || {
            let now = open_descriptors();
            format!(
                "{baseline} before, {} now; first ones: {:?}",
                now.len(),
                &now[now.len().saturating_sub(8)..]
            )
        });
    }

    fn threads_back(&mut self, what: &str, baseline: usize) {
        let ok = eventually(Duration::from_secs(15), || threads() <= baseline);
        self.check(&format!("{what}: threads"), ok, || {
            format!("{baseline} before, {} now", threads())
        });
    }

    fn open_zero(&mut self, what: &str, stats: impl Fn() -> websocket_driver::server::Stats) {
        let ok = eventually(Duration::from_secs(15), || stats().connections_open == 0);
        self.check(&format!("{what}: connections_open"), ok, || {
            format!("{:?}", stats())
        });
    }
}

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

fn server(
    config: ServerConfig,
    app: impl Fn(&str) -> Upgrade<Echo> + Send + Sync + 'static,
) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(move |request| app(request.path()))
        .unwrap()
}

fn config(backend: Backend) -> ServerConfig {
    ServerConfig {
        threads: 2,
        backend,
        ..ServerConfig::default()
    }
}

fn read_all(mut stream: TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

fn rst(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

// ----- the reactor's server -----

fn server_paths(audit: &mut Audit, backend: Backend) {
    let tag = |s: &str| format!("{backend} server {s}");

    // Bad request heads (400), refused upgrades (403) and non-upgrades (426), many at once.
    let base = open_descriptors().len();
    let handle = server(config(backend), |path| match path {
        "/no" => Upgrade::Reject(HttpResponse::new(403, "no")),
        _ => Upgrade::Accept(Echo),
    });
    let with_server = open_descriptors().len();
    let addr = handle.local_addr();
    let mut streams = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(addr).unwrap();
        let head: &[u8] = match i % 3 {
            0 => b"GARBAGE\r\n\r\n",
            1 => b"GET /no HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            _ => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        };
        s.write_all(head).unwrap();
        streams.push(s);
    }
    for s in streams {
        let answer = read_all(s);
        if !answer.starts_with(b"HTTP/1.1 4") {
            audit.check(&tag("refusals answered"), false, || {
                String::from_utf8_lossy(&answer).into_owned()
            });
            break;
        }
    }
    audit.open_zero(&tag("refusals"), || handle.stats());
    audit.fds_back(&tag("refusals"), with_server);

    // Peer reset mid-frame and EOF mid-handshake.
    let mut clients = Vec::new();
    for _ in 0..N / 2 {
        let mut c = TestClient::connect(addr, "/").unwrap();
        c.stream
            .write_all(&[0x82, 0xfe, 0x10, 0x00, 1, 2, 3, 4, 9, 9])
            .unwrap();
        clients.push(c);
    }
    for c in &clients {
        rst(&c.stream);
    }
    drop(clients);
    for _ in 0..N / 2 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgr").unwrap();
        drop(s);
    }
    audit.open_zero(&tag("resets mid-frame / EOF mid-handshake"), || {
        handle.stats()
    });
    audit.fds_back(&tag("resets mid-frame / EOF mid-handshake"), with_server);
    handle.shutdown(Duration::from_secs(2)).unwrap();
    drop(handle);
    audit.fds_back(&tag("refusals, after shutdown"), base);

    // Handshake timeouts (slowloris).
    let handle = server(
        ServerConfig {
            handshake_timeout: Duration::from_millis(300),
            ..config(backend)
        },
        |_| Upgrade::Accept(Echo),
    );
    let with_server = open_descriptors().len();
    let addr = handle.local_addr();
    let mut streams = Vec::new();
    for _ in 0..N {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        streams.push(s);
    }
    for s in streams {
        read_all(s);
    }
    audit.open_zero(&tag("handshake timeouts"), || handle.stats());
    audit.fds_back(&tag("handshake timeouts"), with_server);
    handle.shutdown(Duration::from_secs(2)).unwrap();
    drop(handle);

    // Over capacity: 503s while `max_connections` are open.
    let handle = server(
        ServerConfig {
            max_connections: 4,
            ..config(backend)
        },
        |_| Upgrade::Accept(Echo),
    );
    let with_server = open_descriptors().len();
    let addr = handle.local_addr();
    let held: Vec<TestClient> = (0..4)
        .map(|_| TestClient::connect(addr, "/").unwrap())
        .collect();
    let mut refused = 0;
    for _ in 0..N {
        let s = TcpStream::connect(addr).unwrap();
        if read_all(s).starts_with(b"HTTP/1.1 503") {
            refused += 1;
        }
    }
    audit.check(&tag("503s"), refused == N, || {
        format!("{refused} of {N} refused")
    });
    drop(held);
    audit.open_zero(&tag("over capacity"), || handle.stats());
    audit.fds_back(&tag("over capacity"), with_server);
    // The slots came back: max_connections more can open.
    let again: Vec<_> = (0..4).map(|_| TestClient::connect(addr, "/")).collect();
    audit.check(
        &tag("max_connections slots back"),
        again.iter().all(|c| c.is_ok()),
        || format!("{:?}", again.iter().map(|c| c.is_ok()).collect::<Vec<_>>()),
    );
    drop(again);
    handle.shutdown(Duration::from_secs(2)).unwrap();
    drop(handle);

    // Handler panics (subscribed), in on_open and on_message; the slots, topics and
    // descriptors come back.
    struct Panicky;
    impl Handler for Panicky {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            ws.subscribe("t").unwrap();
            let _ = ws.sender();
            ws.send_with(b"x", websocket_driver::MessageType::Text, |_| {})
                .unwrap();
        }
        fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
            if let Message::Text(t) = &message
                && t == "boom"
            {
                panic!("boom (expected by the leak test)");
            }
        }
    }
    let handle = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            max_connections: N,
            panic_policy: PanicPolicy::CloseConnection,
            ..config(backend)
        })
        .start(|_| Upgrade::Accept(Panicky))
        .unwrap();
    let with_server = open_descriptors().len();
    let addr = handle.local_addr();
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = TestClient::connect(addr, "/").unwrap();
        c.send_text("boom").unwrap();
        clients.push(c);
    }
    for mut c in clients {
        c.wait_eof();
    }
    audit.open_zero(&tag("handler panics"), || handle.stats());
    audit.check(
        &tag("handler panics: subscribers"),
        handle.subscribers("t") == 0,
        || format!("{} subscribers", handle.subscribers("t")),
    );
    audit.fds_back(&tag("handler panics"), with_server);
    // Every slot is free again.
    let again: Vec<_> = (0..N).map(|_| TestClient::connect(addr, "/")).collect();
    audit.check(
        &tag("handler panics: max_connections slots back"),
        again.iter().all(|c| c.is_ok()),
        || {
            format!(
                "{} of {N} opened",
                again.iter().filter(|c| c.is_ok()).count()
            )
        },
    );
    drop(again);
    handle.shutdown(Duration::from_secs(2)).unwrap();
    drop(handle);

    // Shutdown with connections in every phase: open and answering, open and silent (never
    // answers the 1001), mid-handshake, refused (426) with the response unread, subscribed.
    let before = open_descriptors().len();
    let before_threads = threads();
    let handle = server(
        ServerConfig {
            close_timeout: Duration::from_millis(500),
            ..config(backend)
        },
        |_| Upgrade::Accept(Echo),
    );
    let addr = handle.local_addr();
    let open: Vec<TestClient> = (0..20)
        .map(|_| TestClient::connect(addr, "/").unwrap())
        .collect();
    let mut half: Vec<TcpStream> = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost").unwrap();
        half.push(s);
    }
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        half.push(s);
    }
    assert!(eventually(Duration::from_secs(10), || handle
        .stats()
        .connections_open
        == 60));
    handle.shutdown(Duration::from_millis(800)).unwrap();
    audit.check(
        &tag("shutdown: connections_open"),
        handle.stats().connections_open == 0,
        || format!("{:?}", handle.stats()),
    );
    drop(handle);
    drop(open);
    drop(half);
    audit.fds_back(&tag("shutdown with connections in every phase"), before);
    audit.threads_back(
        &tag("shutdown with connections in every phase"),
        before_threads,
    );
}

// ----- TLS -----

fn tls_paths(audit: &mut Audit, backend: Backend) {
    let tag = |s: &str| format!("{backend} tls {s}");
    let (cert_path, key_path) = support::self_signed_pem("leaks");
    let tls = websocket_driver::tls::server_config_from_pem(&cert_path, &key_path).unwrap();
    let handle = server(
        ServerConfig {
            tls: Some(tls),
            max_connections: 8,
            // Every batch below waits for it once (a third of the connections say nothing).
            handshake_timeout: Duration::from_millis(200),
            ..config(backend)
        },
        |_| Upgrade::Accept(Echo),
    );
    let with_server = open_descriptors().len();
    let addr = handle.local_addr();
    // Plaintext into TLS (a bad record), a TLS hello cut short, nothing at all (timeout).
    let mut streams = Vec::new();
    for i in 0..N {
        // A few at a time: max_connections is 8, and this is about the bad ones.
        let mut s = TcpStream::connect(addr).unwrap();
        match i % 3 {
            0 => s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
            1 => s
                .write_all(&[0x16, 0x03, 0x01, 0x00, 0x50, 0x01, 0x00])
                .unwrap(),
            _ => {}
        }
        streams.push(s);
        if streams.len() == 4 {
            for s in streams.drain(..) {
                read_all(s);
            }
        }
    }
    for s in streams {
        read_all(s);
    }
    audit.open_zero(&tag("bad handshakes"), || handle.stats());
    audit.fds_back(&tag("bad handshakes"), with_server);
    // Over capacity on TLS: closed without an answer.
    let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    assert!(eventually(Duration::from_secs(10), || handle
        .stats()
        .connections_open
        == 8));
    for _ in 0..N / 4 {
        read_all(TcpStream::connect(addr).unwrap());
    }
    drop(held);
    audit.open_zero(&tag("over capacity"), || handle.stats());
    audit.fds_back(&tag("over capacity"), with_server);
    handle.shutdown(Duration::from_secs(2)).unwrap();
}

// ----- the hosted client -----

#[derive(Clone)]
struct Recorder {
    closes: Arc<AtomicUsize>,
    senders: Arc<Mutex<Vec<Sender>>>,
}
impl Handler for Recorder {
    fn on_error(&mut self, ws: &mut Ws<'_>, _error: &Error) {
        self.senders.lock().unwrap().push(ws.sender());
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        self.closes.fetch_add(1, Ordering::Relaxed);
    }
}

/// A proxy that refuses every CONNECT with 403.
fn refusing_proxy() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = support::read_head(&mut stream);
            let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        }
    });
    addr
}

fn client_paths(audit: &mut Audit, backend: Backend, proxy: SocketAddr) {
    let tag = |s: &str| format!("{backend} client {s}");
    let before = open_descriptors().len();
    let before_threads = threads();
    let reactor: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 2,
        backend,
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .unwrap();
    let with_reactor = open_descriptors().len();
    let refusing = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    };
    // A server that accepts and never answers (handshake timeouts).
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let echo = server(config(backend), |_| Upgrade::Accept(Echo));
    let with_echo = open_descriptors().len();
    let echo_addr = echo.local_addr();

    let closes = Arc::new(AtomicUsize::new(0));
    let senders: Arc<Mutex<Vec<Sender>>> = Arc::default();
    let handler = Recorder {
        closes: closes.clone(),
        senders: senders.clone(),
    };
    // Refused connects, redials (refused, refused, then silent), handshake timeouts.
    let mut expected = 0;
    for i in 0..N {
        let addrs: Vec<SocketAddr> = match i % 4 {
            0 => vec![refusing],
            1 => vec![refusing, refusing, silent_addr],
            2 => vec![silent_addr],
            // A connect that fails at once (no key ever held).
            _ => vec!["255.255.255.255:9".parse().unwrap()],
        };
        reactor
            .connect_at(
                "ws://127.0.0.1/",
                &addrs,
                &Options::default(),
                handler.clone(),
            )
            .unwrap();
        expected += 1;
    }
    let ok = eventually(Duration::from_secs(20), || {
        closes.load(Ordering::Relaxed) == expected
    });
    audit.check(&tag("failed connects all closed"), ok, || {
        format!("{} of {expected} closes", closes.load(Ordering::Relaxed))
    });
    // Senders made in on_error of connections that never opened: nothing to send to.
    let sent: Vec<_> = senders
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.send_text("after close").map_err(|e| e.kind()))
        .collect();
    let ok_sends = sent.iter().filter(|r| r.is_ok()).count();
    audit.check(
        &tag("Sender of a connection that never opened fails"),
        ok_sends == 0,
        || {
            format!(
                "{ok_sends} of {} sends to a connection that never opened returned Ok",
                sent.len()
            )
        },
    );
    drop(silent);

    // The same, with a handler that panics in its `on_error`: what it registered under the
    // connect's stand-in key (its `Sender`'s gauge) must not outlive it either.
    #[derive(Clone)]
    struct PanicsOnError(Arc<Mutex<Vec<Sender>>>);
    impl Handler for PanicsOnError {
        fn on_error(&mut self, ws: &mut Ws<'_>, _error: &Error) {
            self.0.lock().unwrap().push(ws.sender());
            panic!("on_error panics (expected by the leak test)");
        }
    }
    let panicking: ClientReactor<PanicsOnError> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    })
    .unwrap();
    let kept: Arc<Mutex<Vec<Sender>>> = Arc::default();
    for _ in 0..20 {
        panicking
            .connect_at(
                "ws://127.0.0.1/",
                &["255.255.255.255:9".parse().unwrap()],
                &Options::default(),
                PanicsOnError(kept.clone()),
            )
            .unwrap();
    }
    let ok = eventually(Duration::from_secs(10), || {
        panicking.stats().handler_panics == 20
    });
    audit.check(&tag("panicking on_error on a failed connect"), ok, || {
        format!("{:?}", panicking.stats())
    });
    let ok_sends = kept
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.send_text("after a panic").is_ok())
        .count();
    audit.check(
        &tag("Sender of a failed connect whose on_error panicked fails"),
        ok_sends == 0,
        || format!("{ok_sends} of 20 sends returned Ok"),
    );
    panicking.shutdown(Duration::from_secs(1)).unwrap();
    drop(panicking);
    kept.lock().unwrap().clear();

    audit.open_zero(&tag("failed connects"), || reactor.stats());
    audit.fds_back(&tag("failed connects"), with_echo);

    // Through a proxy that refuses.
    let reactor_p = reactor; // same loops
    let closes_before = closes.load(Ordering::Relaxed);
    let proxied: ClientReactor<Recorder> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    })
    .unwrap()
    .proxy(&format!("http://{proxy}"))
    .unwrap();
    let with_proxied = open_descriptors().len();
    for _ in 0..N / 2 {
        proxied
            .connect(&format!("ws://{echo_addr}/"), handler.clone())
            .unwrap();
    }
    let ok = eventually(Duration::from_secs(20), || {
        closes.load(Ordering::Relaxed) == closes_before + N / 2
    });
    audit.check(&tag("proxy refusals all closed"), ok, || {
        format!(
            "{} of {} closes",
            closes.load(Ordering::Relaxed) - closes_before,
            N / 2
        )
    });
    audit.open_zero(&tag("proxy refusals"), || proxied.stats());
    audit.fds_back(&tag("proxy refusals"), with_proxied);
    proxied.shutdown(Duration::from_secs(1)).unwrap();
    drop(proxied);

    echo.shutdown(Duration::from_secs(1)).unwrap();
    drop(echo);
    reactor_p.shutdown(Duration::from_secs(1)).unwrap();
    drop(reactor_p);
    senders.lock().unwrap().clear();
    let _ = with_reactor;
    audit.fds_back(&tag("after shutdown"), before);
    audit.threads_back(&tag("after shutdown"), before_threads);
}

// ----- the blocking runtime -----

fn blocking_paths(audit: &mut Audit, proxy: SocketAddr) {
    use websocket_driver::blocking::{BlockingServer, Timeouts};
    let tag = |s: &str| format!("blocking {s}");
    let server = BlockingServer::bind("127.0.0.1:0")
        .unwrap()
        .max_connections(64)
        .timeouts(Timeouts {
            handshake: Duration::from_millis(300),
            ..Timeouts::default()
        });
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let _ = server.serve(|request, ws| {
            if request.path == "/panic" {
                panic!("app panics (expected by the leak test)");
            }
            ws.on_message(|ws, message| {
                if let Message::Text(t) = &message
                    && t == "boom"
                {
                    panic!("listener panics (expected by the leak test)");
                }
                let _ = ws.send_message(&message);
            });
        });
    });
    std::thread::sleep(Duration::from_millis(100));
    let base = open_descriptors().len();
    let base_threads = threads();
    let mut streams = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(addr).unwrap();
        match i % 4 {
            0 => s.write_all(b"GARBAGE\r\n\r\n").unwrap(),
            1 => s.write_all(b"GET / HTTP/1.1\r\n").unwrap(),
            2 => rst(&s),
            _ => s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
        }
        streams.push(s);
        if streams.len() == 32 {
            for s in streams.drain(..) {
                read_all(s);
            }
        }
    }
    for s in streams {
        read_all(s);
    }
    for _ in 0..N / 4 {
        let mut c = TestClient::connect(addr, "/").unwrap();
        c.send_text("boom").unwrap();
        c.wait_eof();
        let c = TestClient::connect_only(addr, "/panic").unwrap();
        read_all(c.stream);
    }
    audit.fds_back(&tag("server error paths"), base);
    audit.threads_back(&tag("server error paths"), base_threads);

    // Client start failures: refused, proxy refusal, handshake timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let refusing = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    };
    let base = open_descriptors().len();
    let base_threads = threads();
    for i in 0..N / 2 {
        let (url, via_proxy) = match i % 3 {
            0 => (format!("ws://{refusing}/"), false),
            1 => (format!("ws://{addr}/"), true),
            _ => (format!("ws://{silent_addr}/"), false),
        };
        let mut client = BlockingClient::new(&url, Options::default())
            .unwrap()
            .timeouts(ClientTimeouts {
                handshake: Duration::from_millis(100),
                ..ClientTimeouts::default()
            });
        if via_proxy {
            client = client.proxy(&format!("http://{proxy}")).unwrap();
        }
        assert!(client.start_connection().is_err());
        drop(client);
    }
    drop(silent);
    audit.fds_back(&tag("client start failures"), base);
    audit.threads_back(&tag("client start failures"), base_threads);
}

// ----- tokio -----

fn tokio_paths(audit: &mut Audit) {
    use websocket_driver::tokio::{Config, accept_with};
    let tag = |s: &str| format!("tokio {s}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = open_descriptors().len();
    let (tasks, kept) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config::default()
            .handshake_timeout(Duration::from_millis(300))
            .close_timeout(Duration::from_millis(300));
        let baseline = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let kept = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let kept = kept.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let config = config.clone();
                    let kept = kept.clone();
                    tokio::spawn(async move {
                        let mut path = String::new();
                        let accepted = accept_with(stream, &Options::default(), &config, |r| {
                            path = r.path.clone();
                            Ok(())
                        })
                        .await;
                        if let Ok((tx, mut rx)) = accepted {
                            if path == "/silent" {
                                // The app lets go of both halves: the task closes, and
                                // the peer never answers.
                                return;
                            }
                            // Read until the end, keeping the sender (as an app may).
                            while rx.next().await.is_some() {}
                            kept.lock().unwrap().push(tx);
                        }
                    });
                }
            })
        };
        let baseline = baseline + 1;
        // Peers: reset mid-frame, vanish silently after open (the close times out),
        // stall mid-handshake, send garbage.
        let handles: Vec<_> = (0..N)
            .map(|i| {
                tokio::task::spawn_blocking(move || match i % 4 {
                    0 => {
                        let mut c = TestClient::connect(addr, "/").unwrap();
                        c.stream.write_all(&[0x82, 0xfe, 0x10, 0x00, 1, 2]).unwrap();
                        rst(&c.stream);
                    }
                    1 => {
                        let c = TestClient::connect(addr, "/silent").unwrap();
                        // Never answers the close, never closes TCP until dropped.
                        std::thread::sleep(Duration::from_millis(800));
                        drop(c);
                    }
                    2 => {
                        let mut s = TcpStream::connect(addr).unwrap();
                        s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
                        read_all(s);
                    }
                    _ => {
                        let mut s = TcpStream::connect(addr).unwrap();
                        s.write_all(b"GARBAGE\r\n\r\n").unwrap();
                        read_all(s);
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let metrics = tokio::runtime::Handle::current().metrics();
        let mut ok = false;
        for _ in 0..150 {
            if metrics.num_alive_tasks() <= baseline {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.abort();
        ((ok, metrics.num_alive_tasks(), baseline), kept)
    });
    audit.check(&tag("connection tasks end"), tasks.0, || {
        format!("{} alive tasks, {} expected", tasks.1, tasks.2)
    });
    drop(kept);
    drop(rt);
    audit.fds_back(&tag("error paths"), base);
}

#[test]
fn error_paths_leak_nothing() {
    let mut audit = Audit::default();
    let proxy = refusing_proxy();
    for backend in support::backends() {
        server_paths(&mut audit, backend);
        tls_paths(&mut audit, backend);
        client_paths(&mut audit, backend, proxy);
    }
    blocking_paths(&mut audit, proxy);
    tokio_paths(&mut audit);
    assert!(
        audit.failures.is_empty(),
        "leaks:\n{}",
        audit.failures.join("\n")
    );
}
