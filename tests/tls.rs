//! wss end to end: the reactor's TLS server with a self-signed certificate made at test
//! time, the blocking client and the hosted client, verification on and failing.
#![cfg(feature = "tls")]

mod common;
mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use websocket_driver::client::{BlockingClient, ClientReactor};
use websocket_driver::server::{Handler, Server, ServerConfig, ServerHandle, Upgrade, Ws};
use websocket_driver::tls::{Verify, client_config};
use websocket_driver::{Backend, Error, Message, Options};

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

fn certificate(dir: &str) -> (PathBuf, PathBuf) {
    support::self_signed_pem(&format!("tls-{dir}"))
}

fn tls_server(backend: Backend, cert: &PathBuf, key: &PathBuf) -> ServerHandle {
    Server::bind_tls("127.0.0.1:0", cert, key)
        .unwrap()
        .threads(1)
        .backend(backend)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap()
}

fn blocking_echo(url: &str, verify: &Verify) -> Result<String, Error> {
    let client = BlockingClient::new(url, Options::default())?.verify(verify)?;
    let (tx, rx) = mpsc::channel();
    client.on_message(move |_, m| {
        let _ = tx.send(m.as_text().unwrap_or_default().to_string());
    });
    client.start_connection()?;
    let big = "x".repeat(300_000);
    client.send_text("over tls")?;
    client.send_text(&big)?;
    let first = rx.recv_timeout(Duration::from_secs(10)).expect("echo");
    let second = rx.recv_timeout(Duration::from_secs(10)).expect("big echo");
    assert_eq!(second, big);
    client.close_connection(1000, "")?;
    Ok(first)
}

#[test]
fn wss_with_verification_against_the_supplied_root() {
    let (cert, key) = certificate("verify");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let server = tls_server(backend, &cert, &key);
        let url = format!("wss://127.0.0.1:{}/", server.local_addr().port());
        assert_eq!(
            blocking_echo(&url, &Verify::CaFile(cert.clone())).unwrap(),
            "over tls"
        );
        assert_eq!(
            blocking_echo(&url, &Verify::DangerouslyDisabled).unwrap(),
            "over tls"
        );
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

#[test]
fn wss_verification_fails_for_an_unknown_issuer() {
    let (cert, key) = certificate("server");
    let (other_ca, _) = certificate("other");
    let server = tls_server(Backend::Epoll, &cert, &key);
    let url = format!("wss://127.0.0.1:{}/", server.local_addr().port());
    let err = blocking_echo(&url, &Verify::CaFile(other_ca)).unwrap_err();
    assert!(matches!(&err, Error::Tls(_)), "{err}");
    // The rustls error itself is the source, not just its text. (Both throwaway
    // certificates carry rcgen's default subject, so rustls reports a bad signature
    // rather than an unknown issuer: any certificate error will do.)
    let source = std::error::Error::source(&err).expect("a TLS error has a source");
    let rustls_error = source
        .downcast_ref::<rustls::Error>()
        .unwrap_or_else(|| panic!("source is not a rustls::Error: {source:?}"));
    assert!(
        matches!(rustls_error, rustls::Error::InvalidCertificate(_)),
        "{rustls_error:?}"
    );
    // The server saw a failed TLS handshake, not a WebSocket connection.
    assert_eq!(server.stats().closes.len(), 0);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn bind_tls_refuses_an_address_in_use() {
    let (cert, key) = certificate("in-use");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = Server::bind_tls(listener.local_addr().unwrap(), &cert, &key).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    let server = tls_server(Backend::Epoll, &cert, &key);
    let err = Server::bind_tls(server.local_addr(), &cert, &key).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    server.shutdown(Duration::from_secs(1)).unwrap();
}

struct Greeter {
    log: Arc<Mutex<Vec<String>>>,
    closes: Arc<AtomicUsize>,
}
impl Handler for Greeter {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.send_text("hello over wss").unwrap();
    }
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        self.log
            .lock()
            .unwrap()
            .push(message.as_text().unwrap_or_default().to_string());
        let _ = ws.close_connection(1000, "");
    }
    fn on_error(&mut self, _ws: &mut Ws<'_>, error: &Error) {
        self.log.lock().unwrap().push(format!("error: {error}"));
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, _reason: &str) {
        self.log.lock().unwrap().push(format!("close {code}"));
        self.closes.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn hosted_clients_speak_wss_on_both_backends() {
    let (cert, key) = certificate("hosted");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let server = tls_server(backend, &cert, &key);
        let reactor: ClientReactor<Greeter> = ClientReactor::start(ServerConfig {
            threads: 1,
            backend,
            client_tls: Some(client_config(&Verify::CaFile(cert.clone())).unwrap()),
            ..ServerConfig::default()
        })
        .unwrap();
        let closes = Arc::new(AtomicUsize::new(0));
        let logs: Vec<Arc<Mutex<Vec<String>>>> = (0..20).map(|_| Arc::default()).collect();
        for log in &logs {
            let handler = Greeter {
                log: log.clone(),
                closes: closes.clone(),
            };
            reactor
                .connect(
                    &format!("wss://127.0.0.1:{}/", server.local_addr().port()),
                    handler,
                )
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while closes.load(Ordering::Relaxed) < 20 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for log in &logs {
            assert_eq!(
                *log.lock().unwrap(),
                vec!["hello over wss".to_string(), "close 1000".to_string()],
                "{backend}"
            );
        }
        reactor.shutdown(Duration::from_secs(1)).unwrap();
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// The output cap holds over wss: a handler sending 64 messages of 64 KiB in one call on
/// the default settings gets the same 16 through and 48 refused as over plain TCP, and
/// the client receives exactly those 16. (`buffered_amount` and the cap also count TLS
/// records sealed but not yet written; `tests/flow.rs` covers a never-reading peer.)
#[test]
fn wss_handler_sends_are_capped() {
    struct Flooder(Arc<AtomicUsize>, Arc<AtomicUsize>);
    impl Handler for Flooder {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            let chunk = vec![3u8; 65536];
            for _ in 0..64 {
                match ws.send_binary(&chunk) {
                    Ok(_) => self.0.fetch_add(1, Ordering::Relaxed),
                    Err(Error::Usage(websocket_driver::UsageError::BufferFull { .. })) => {
                        self.1.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => panic!("{e}"),
                };
            }
        }
    }
    let (cert, key) = certificate("cap");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (accepted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counters = (accepted.clone(), refused.clone());
        let server = Server::bind_tls("127.0.0.1:0", &cert, &key)
            .unwrap()
            .threads(1)
            .backend(backend)
            .start(move |_| Upgrade::Accept(Flooder(counters.0.clone(), counters.1.clone())))
            .unwrap();
        let url = format!("wss://127.0.0.1:{}/", server.local_addr().port());
        let client = BlockingClient::new(&url, Options::default())
            .unwrap()
            .verify(&Verify::CaFile(cert.clone()))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        client.on_message(move |_, m| {
            let _ = tx.send(m.as_bytes().len());
        });
        client.start_connection().unwrap();
        for _ in 0..16 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 65536);
        }
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        assert_eq!(accepted.load(Ordering::Relaxed), 16, "{backend}");
        assert_eq!(refused.load(Ordering::Relaxed), 48, "{backend}");
        client.close_connection(1000, "").unwrap();
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// Bytes after a peer's close_notify are ignored (RFC 8446 §6.1), and ignoring them ends:
/// a client that sends close_notify and 16 KiB more in one write leaves its event loop
/// serving (the loop's other connection still gets its echo). rustls takes no more input
/// once the alert came, which a decrypt loop that waited for its input to run out took
/// forever over. Both backends.
#[test]
fn bytes_after_close_notify_leave_the_loop_serving() {
    use std::io::Write;
    let (cert, key) = certificate("after-close-notify");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let server = tls_server(backend, &cert, &key);
        let url = format!("wss://127.0.0.1:{}/", server.local_addr().port());
        let raw = RawWss::connect(server.local_addr(), &cert);
        let mut wire = {
            let mut tls = raw.tls.lock().unwrap();
            tls.send_close_notify();
            take_records(&mut tls)
        };
        wire.extend(std::iter::repeat_n(0x17u8, 16 * 1024));
        (&raw.socket).write_all(&wire).unwrap();
        let (tx, rx) = mpsc::channel();
        let ca = cert.clone();
        std::thread::spawn(move || {
            let _ = tx.send(blocking_echo(&url, &Verify::CaFile(ca)));
        });
        let echoed = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{backend:?}: the loop stopped serving"));
        assert_eq!(echoed.unwrap(), "over tls");
        drop(raw);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// A one-connection wss server made of rustls and a socket: completes the TLS and
/// WebSocket handshakes, then runs `then` on the open connection and returns its result.
fn raw_wss_server<T: Send + 'static>(
    cert: &std::path::Path,
    key: &std::path::Path,
    then: impl FnOnce(&mut rustls::ServerConnection, &mut std::net::TcpStream) -> T + Send + 'static,
) -> (std::net::SocketAddr, std::thread::JoinHandle<T>) {
    use std::io::Write;
    let config = websocket_driver::tls::server_config_from_pem(cert, key).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let (mut tls, head) = support::tls_accept_head(&mut socket, config);
        tls.writer()
            .write_all(&common::response_for(&head, ""))
            .unwrap();
        while tls.wants_write() {
            tls.write_tls(&mut socket).unwrap();
        }
        then(&mut tls, &mut socket)
    });
    (addr, server)
}

/// A blocking wss client that gets a record it cannot decrypt after opening hears why:
/// `on_error` with the TLS error, then 1006 (it was a bare 1006), and the server gets
/// the client's alert.
#[test]
fn blocking_wss_client_reports_an_undecryptable_record() {
    use std::io::{Read, Write};
    let (cert, key) = certificate("bad-record");
    let (addr, server) = raw_wss_server(&cert, &key, |tls, socket| {
        // Once the client is open (its I/O thread reading), an application-data record
        // no key made.
        std::thread::sleep(Duration::from_millis(300));
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        record.extend([0x5a; 0x40]);
        socket.write_all(&record).unwrap();
        // The client's alert (encrypted, under TLS 1.3), then its close.
        let mut rest = Vec::new();
        let _ = socket.read_to_end(&mut rest);
        let _ = tls.read_tls(&mut &rest[..]);
        format!("{:?}", tls.process_new_packets())
    });
    let client = BlockingClient::new(
        &format!("wss://127.0.0.1:{}/", addr.port()),
        Options::default(),
    )
    .unwrap()
    .verify(&Verify::CaFile(cert.clone()))
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let (errors, closes) = (tx.clone(), tx);
    client.on_error(move |_, e| {
        let _ = errors.send(format!("error {e}"));
    });
    client.on_close(move |_, code, _| {
        let _ = closes.send(format!("close {code}"));
    });
    client.start_connection().unwrap();
    let first = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(first.starts_with("error TLS"), "{first}");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).unwrap(),
        "close 1006"
    );
    drop(client);
    let seen = server.join().unwrap();
    assert!(seen.contains("AlertReceived"), "{seen}");
}

/// A blocking wss client ends TLS properly when it closes: a close_notify (RFC 8446
/// §6.1) once the WebSocket close handshake is done, and the server closes TCP after it.
#[test]
fn blocking_wss_client_sends_close_notify() {
    use std::io::{Read, Write};
    let (cert, key) = certificate("close-notify");
    let (addr, server) = raw_wss_server(&cert, &key, |tls, socket| {
        let mut plain = Vec::new();
        let mut buf = [0u8; 4096];
        // The client's masked Close, answered; then the server closes TCP.
        while plain.len() < 8 {
            let n = socket.read(&mut buf).unwrap();
            assert!(n > 0, "EOF before the client's Close");
            tls.read_tls(&mut &buf[..n]).unwrap();
            tls.process_new_packets().unwrap();
            let _ = tls.reader().read_to_end(&mut plain);
        }
        assert_eq!(plain[0], 0x88, "{plain:?}");
        tls.writer().write_all(&[0x88, 0x02, 0x03, 0xe8]).unwrap();
        while tls.wants_write() {
            tls.write_tls(socket).unwrap();
        }
        // The client's close_notify; then the server closes TCP (first, as a server does).
        loop {
            let n = socket.read(&mut buf).unwrap_or(0);
            if n == 0 {
                return false;
            }
            tls.read_tls(&mut &buf[..n]).unwrap();
            if tls.process_new_packets().unwrap().peer_has_closed() {
                return true;
            }
        }
    });
    let client = BlockingClient::new(
        &format!("wss://127.0.0.1:{}/", addr.port()),
        Options::default(),
    )
    .unwrap()
    .verify(&Verify::CaFile(cert.clone()))
    .unwrap();
    client.start_connection().unwrap();
    client.close_connection(1000, "").unwrap();
    drop(client);
    assert!(
        server.join().unwrap(),
        "no close_notify before the TCP close"
    );
}

/// A TLS server at its connection limit closes a new connection without a plaintext
/// 503 (which a TLS client would read as a broken record): the client's TLS handshake
/// fails on a closed connection, with no byte received.
#[test]
fn a_tls_server_at_its_limit_closes_without_a_plaintext_answer() {
    use std::io::Read;
    let (cert, key) = certificate("at-limit");
    let tls = websocket_driver::tls::server_config_from_pem(&cert, &key).unwrap();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(websocket_driver::server::ServerConfig {
            threads: 1,
            max_connections: 1,
            ..Default::default()
        })
        .tls(tls)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap();
    let _held = RawWss::connect(server.local_addr(), &cert);
    let mut refused = std::net::TcpStream::connect(server.local_addr()).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = refused.read_to_end(&mut got);
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(server.stats().connections_refused, 1);
    drop(_held);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A raw wss client whose TLS state is shared by a writer and a reader thread without
/// ever holding the lock across a blocking socket call: encrypt under the lock, write the
/// ciphertext outside it; read outside it, decrypt under the lock.
/// The TLS records `tls` has queued to send.
fn take_records<D>(tls: &mut rustls::ConnectionCommon<D>) -> Vec<u8> {
    let mut records = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut records).unwrap();
    }
    records
}

struct RawWss {
    tls: Arc<Mutex<rustls::ClientConnection>>,
    socket: std::net::TcpStream,
    ws: websocket_driver::Driver,
}

impl RawWss {
    /// TLS and WebSocket handshakes with the server at `addr`.
    fn connect(addr: std::net::SocketAddr, ca: &std::path::Path) -> RawWss {
        use std::io::Read;
        let config = client_config(&Verify::CaFile(ca.to_path_buf())).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        tls.complete_io(&mut socket).unwrap();
        let url = format!("wss://127.0.0.1:{}/", addr.port());
        let mut ws = websocket_driver::Driver::make_client(&url, &Options::default()).unwrap();
        ws.start_connection();
        let mut raw = RawWss {
            tls: Arc::new(Mutex::new(tls)),
            socket,
            ws,
        };
        let request = raw.ws.pending_output().to_vec();
        raw.ws.consume_output(request.len());
        raw.send_plain(&request);
        // Read until the 101 has opened the driver.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = raw.socket.read(&mut buf).unwrap();
            assert!(n > 0, "EOF during the handshake");
            let mut plain = raw.decrypt(&buf[..n]);
            let (_, event) = raw.ws.poll_event(&mut plain);
            if let Some(event) = event {
                assert!(matches!(event, websocket_driver::Event::Open), "{event:?}");
                return raw;
            }
        }
    }

    /// Encrypts `plain` under the lock, then writes the records without it.
    fn send_plain(&self, plain: &[u8]) {
        send_tls(&self.tls, &mut &self.socket, plain);
    }

    /// Decrypts what came off the socket.
    fn decrypt(&self, mut ciphertext: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut tls = self.tls.lock().unwrap();
        let mut plain = Vec::new();
        while !ciphertext.is_empty() {
            tls.read_tls(&mut ciphertext).unwrap();
            tls.process_new_packets().unwrap();
            let _ = tls.reader().read_to_end(&mut plain);
        }
        plain
    }
}

fn send_tls(tls: &Mutex<rustls::ClientConnection>, socket: &mut impl std::io::Write, plain: &[u8]) {
    use std::io::Write;
    let mut records = Vec::new();
    {
        let mut tls = tls.lock().unwrap();
        let mut at = 0;
        while at < plain.len() {
            // rustls takes plaintext up to its buffer limit; drain records between.
            at += tls.writer().write(&plain[at..]).unwrap();
            while tls.wants_write() {
                tls.write_tls(&mut records).unwrap();
            }
        }
    }
    socket.write_all(&records).unwrap();
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// The flood over wss, default settings, both backends: a client sends 64 MiB of 64 KiB
/// messages without reading for two seconds, then reads while it keeps sending. It is
/// slowed (its writes stall), not dropped, gets every echo back intact and in order, and
/// the process's RSS grows by less than 64 MiB — the cap counts the TLS records sealed
/// but not yet written, so the server stops reading instead of sealing without bound.
#[test]
fn wss_flooding_client_is_slowed_not_dropped() {
    use std::io::Read;
    use std::sync::atomic::AtomicU64;
    let (cert, key) = certificate("flood");
    for backend in [Backend::Epoll, Backend::IoUring] {
        const MESSAGES: u64 = 1024;
        let server = Server::bind_tls("127.0.0.1:0", &cert, &key)
            .unwrap()
            .threads(1)
            .backend(backend)
            .start(|_| Upgrade::Accept(Echo))
            .unwrap();
        let mut raw = RawWss::connect(server.local_addr(), &cert);
        let before = rss_kib();
        let sent = Arc::new(AtomicU64::new(0));
        let writer = {
            let (tls, mut socket, sent) = (
                raw.tls.clone(),
                raw.socket.try_clone().unwrap(),
                sent.clone(),
            );
            let mut encoder = websocket_driver::Driver::make_client(
                &format!("wss://{}/", server.local_addr()),
                &Options::default(),
            )
            .unwrap();
            std::thread::spawn(move || {
                // The encoder only frames (masked): drop its handshake bytes.
                encoder.start_connection();
                let head = encoder.pending_output().len();
                encoder.consume_output(head);
                for i in 0..MESSAGES {
                    let frame = masked_frame(&numbered(i));
                    send_tls(&tls, &mut socket, &frame);
                    sent.store(i + 1, Ordering::Relaxed);
                }
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        let stalled_at = sent.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(sent.load(Ordering::Relaxed), stalled_at, "not slowed");
        assert!(stalled_at < MESSAGES / 2, "{backend}: sent {stalled_at}");
        assert_eq!(
            server.stats().connections_open,
            1,
            "the flooder was dropped"
        );
        let mut peak = rss_kib();
        let mut buf = vec![0u8; 256 * 1024];
        let mut next = 0u64;
        while next < MESSAGES {
            let n = raw.socket.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {next} echoes");
            let mut plain = raw.decrypt(&buf[..n]);
            let mut at = 0;
            loop {
                let (used, event) = raw.ws.poll_event(&mut plain[at..]);
                at += used;
                match event {
                    Some(websocket_driver::Event::Message(m)) => {
                        assert_eq!(m.as_bytes(), &numbered(next)[..], "echo {next}");
                        next += 1;
                    }
                    Some(other) => panic!("unexpected {other:?}"),
                    None => break,
                }
            }
            peak = peak.max(rss_kib());
        }
        writer.join().unwrap();
        let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
        eprintln!("wss {backend}: stalled after {stalled_at}; RSS growth {growth_mib:.1} MiB");
        assert!(
            growth_mib < 64.0,
            "{backend}: RSS grew by {growth_mib:.1} MiB"
        );
        drop(raw);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

fn numbered(i: u64) -> Vec<u8> {
    let mut payload = vec![0u8; 65536];
    payload[..8].copy_from_slice(&i.to_le_bytes());
    for (j, b) in payload[8..].iter_mut().enumerate() {
        *b = (j as u64 ^ i) as u8;
    }
    payload
}

fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    let mask = [0x11, 0x22, 0x33, 0x44];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A thread sending through a `Sender` to a wss connection that never reads is refused
/// (`WouldBlock` wrapping `BufferFull`) once the queue — sealed TLS records included —
/// passes the default cap, having queued no more than the cap plus the socket buffers.
#[test]
fn wss_sender_is_refused_past_the_cap() {
    use websocket_driver::server::Sender;
    struct Register(Arc<Mutex<Option<Sender>>>);
    impl Handler for Register {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            *self.0.lock().unwrap() = Some(ws.sender());
        }
    }
    let (cert, key) = certificate("sender");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let slot = Arc::new(Mutex::new(None));
        let registry = slot.clone();
        let server = Server::bind_tls("127.0.0.1:0", &cert, &key)
            .unwrap()
            .threads(1)
            .backend(backend)
            .start(move |_| Upgrade::Accept(Register(registry.clone())))
            .unwrap();
        let raw = RawWss::connect(server.local_addr(), &cert);
        socket2::SockRef::from(&raw.socket)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        let start = std::time::Instant::now();
        while slot.lock().unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let sender = slot.lock().unwrap().clone().unwrap();
        let mut queued = 0usize;
        let err = loop {
            match sender.send_binary(vec![5u8; 65536]) {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
            assert!(start.elapsed() < Duration::from_secs(20), "never refused");
            if queued.is_multiple_of(16) {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{backend}");
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert!(
            matches!(
                inner,
                Some(Error::Usage(
                    websocket_driver::UsageError::BufferFull { .. }
                ))
            ),
            "{inner:?}"
        );
        assert!(queued * 65536 < 17 << 20, "{backend}: queued {queued}");
        drop(raw);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// A wss `BlockingClient` whose TLS handshake fails hears the TLS error in
/// `on_error` (README: "so does every failure of the blocking client's
/// `start_connection`": `on_error` with its own cause, then `on_close` 1006), not a bare
/// `HandshakeError::Incomplete`. A certificate that does not verify, and a server that
/// answers the ClientHello with plaintext HTTP.
#[test]
fn blocking_wss_handshake_failure_reaches_on_error_as_the_tls_error() {
    use std::io::{Read, Write};
    fn events_of(url: &str, verify: &Verify) -> (Error, Vec<String>) {
        let client = BlockingClient::new(url, Options::default())
            .unwrap()
            .verify(verify)
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let (errors, closes) = (tx.clone(), tx);
        client.on_error(move |_, e| {
            let _ = errors.send(format!("error {e}"));
        });
        client.on_close(move |_, code, _| {
            let _ = closes.send(format!("close {code}"));
        });
        let err = client.start_connection().unwrap_err();
        let mut seen = Vec::new();
        while let Ok(event) = rx.recv_timeout(Duration::from_millis(500)) {
            seen.push(event);
        }
        (err, seen)
    }

    // 1. Verification fails (a certificate from another issuer).
    let (cert, key) = certificate("bad-cert");
    let (other_ca, _) = certificate("other-ca");
    let server = tls_server(Backend::Epoll, &cert, &key);
    let url = format!("wss://127.0.0.1:{}/", server.local_addr().port());
    let (err, seen) = events_of(&url, &Verify::CaFile(other_ca));
    assert!(matches!(&err, Error::Tls(_)), "returned {err}");
    server.shutdown(Duration::from_secs(1)).unwrap();

    // 2. A "server" that answers the ClientHello with plaintext HTTP.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let plain = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = socket.read(&mut buf);
        let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        std::thread::sleep(Duration::from_secs(2));
    });
    let (err2, seen2) = events_of(
        &format!("wss://127.0.0.1:{port}/"),
        &Verify::DangerouslyDisabled,
    );
    plain.join().unwrap();
    assert!(matches!(&err2, Error::Tls(_)), "returned {err2}");

    for (err, seen) in [(err, seen), (err2, seen2)] {
        assert_eq!(seen.len(), 2, "returned {err}, handlers saw {seen:?}");
        assert!(
            seen[0].starts_with("error TLS"),
            "returned {err}, but on_error heard {:?}",
            seen[0]
        );
        assert_eq!(seen[1], "close 1006");
    }
}

/// A raw wss server's move after its 101: a text message "hello" and, in the same write,
/// a record that cannot decrypt; then it holds the connection for 2 s.
fn hello_then_a_bad_record(tls: &mut rustls::ServerConnection, socket: &mut std::net::TcpStream) {
    use std::io::Write;
    std::thread::sleep(Duration::from_millis(300));
    tls.writer()
        .write_all(&[0x81, 0x05, b'h', b'e', b'l', b'l', b'o'])
        .unwrap();
    let mut bytes = take_records(tls);
    bytes.extend([0x17, 0x03, 0x03, 0x00, 0x40]);
    bytes.extend([0x5a; 0x40]);
    socket.write_all(&bytes).unwrap();
    std::thread::sleep(Duration::from_secs(2));
}

/// A record that decrypts, then in the same read one that does not: the first
/// record's plaintext (a text frame) still reaches `on_message` before the error.
#[test]
fn plaintext_before_a_bad_record_in_the_same_read_is_delivered() {
    let (cert, key) = certificate("good-then-bad");
    let (addr, server) = raw_wss_server(&cert, &key, hello_then_a_bad_record);
    let client = BlockingClient::new(
        &format!("wss://127.0.0.1:{}/", addr.port()),
        Options::default(),
    )
    .unwrap()
    .verify(&Verify::CaFile(cert.clone()))
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let (messages, errors) = (tx.clone(), tx);
    client.on_message(move |_, m| {
        let _ = messages.send(format!("message {}", m.as_text().unwrap_or("?")));
    });
    client.on_error(move |_, e| {
        let _ = errors.send(format!("error {e}"));
    });
    client.start_connection().unwrap();
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first, "message hello");
    drop(client);
    let _ = server.join();
}

/// The same on the reactor's hosted client: what decrypted before the bad record is
/// delivered before the error ends the connection.
#[test]
fn hosted_client_gets_the_plaintext_before_a_bad_record() {
    let (cert, key) = certificate("hosted-good-then-bad");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (addr, server) = raw_wss_server(&cert, &key, hello_then_a_bad_record);
        let reactor: ClientReactor<Greeter> = ClientReactor::start(ServerConfig {
            threads: 1,
            backend,
            client_tls: Some(client_config(&Verify::CaFile(cert.clone())).unwrap()),
            ..ServerConfig::default()
        })
        .unwrap();
        let closes = Arc::new(AtomicUsize::new(0));
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let handler = Greeter {
            log: log.clone(),
            closes: closes.clone(),
        };
        reactor
            .connect(&format!("wss://127.0.0.1:{}/", addr.port()), handler)
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while closes.load(Ordering::Relaxed) < 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log.first().map(String::as_str),
            Some("hello"),
            "{backend}: {log:?}"
        );
        assert!(
            log.iter().any(|l| l.starts_with("error: TLS")),
            "{backend}: {log:?}"
        );
        reactor.shutdown(Duration::from_secs(1)).unwrap();
        let _ = server.join();
    }
}

// ---- hostile-peer review (adapters and TLS) ----

/// Reports each connection's close code.
struct CloseReporter(mpsc::Sender<u16>);
impl Handler for CloseReporter {
    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, _reason: &str) {
        let _ = self.0.send(code);
    }
}

fn tls_server_with(
    backend: Backend,
    cert: &PathBuf,
    key: &PathBuf,
    tune: impl FnOnce(&mut ServerConfig),
    closes: mpsc::Sender<u16>,
) -> ServerHandle {
    let mut config = ServerConfig {
        threads: 1,
        backend,
        tls: Some(websocket_driver::tls::server_config_from_pem(cert, key).unwrap()),
        ..ServerConfig::default()
    };
    tune(&mut config);
    let closes = Mutex::new(closes);
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(move |_| Upgrade::Accept(CloseReporter(closes.lock().unwrap().clone())))
        .unwrap()
}

/// Whether the server closed `socket` (EOF or reset) within `within`.
fn closed_within(socket: &std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let start = std::time::Instant::now();
    loop {
        match (&*socket).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
        if start.elapsed() > within {
            return false;
        }
    }
}

/// A TLS handshake that never completes (a TCP connect with nothing sent, and one that
/// sends half a ClientHello) is dropped within the server's handshake timeout, on both
/// backends: the timer starts at accept, before TLS.
#[test]
fn a_tls_handshake_that_never_completes_is_dropped_at_the_handshake_timeout() {
    use std::io::Write;
    let (cert, key) = certificate("tls-handshake-timeout");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (tx, _rx) = mpsc::channel();
        let server = tls_server_with(
            backend,
            &cert,
            &key,
            |c| c.handshake_timeout = Duration::from_millis(500),
            tx,
        );
        let silent = std::net::TcpStream::connect(server.local_addr()).unwrap();
        // Half of a real ClientHello.
        let config = client_config(&Verify::CaFile(cert.clone())).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let hello = take_records(&mut rustls::ClientConnection::new(config, name).unwrap());
        let mut partial = std::net::TcpStream::connect(server.local_addr()).unwrap();
        partial.write_all(&hello[..hello.len() / 2]).unwrap();
        let started = std::time::Instant::now();
        assert!(
            closed_within(&silent, Duration::from_secs(5)),
            "{backend:?}: silent"
        );
        assert!(
            closed_within(&partial, Duration::from_secs(5)),
            "{backend:?}: half hello"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{backend:?}");
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// Garbage instead of TLS (a plaintext upgrade request on the wss port) gets the
/// connection closed at once, on both backends.
#[test]
fn plaintext_on_the_wss_port_is_closed_at_once() {
    use std::io::Write;
    let (cert, key) = certificate("tls-garbage");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (tx, _rx) = mpsc::channel();
        let server = tls_server_with(backend, &cert, &key, |_| {}, tx);
        let mut socket = std::net::TcpStream::connect(server.local_addr()).unwrap();
        socket
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        assert!(
            closed_within(&socket, Duration::from_secs(2)),
            "{backend:?}"
        );
        drop(socket);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// A wss client that sends close_notify without a WebSocket close and keeps TCP open
/// can send the server nothing more (rustls drops all input after the alert, RFC 8446
/// §6.1): its side of the connection has ended, as with a FIN, and the server ends the
/// connection as it does at EOF (on_close 1006); it used to keep it open for good.
#[test]
fn close_notify_without_a_websocket_close_ends_the_connection_with_1006() {
    use std::io::Write;
    let (cert, key) = certificate("close-notify-only");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (tx, rx) = mpsc::channel();
        let server = tls_server_with(backend, &cert, &key, |_| {}, tx);
        let raw = RawWss::connect(server.local_addr(), &cert);
        let wire = {
            let mut tls = raw.tls.lock().unwrap();
            tls.send_close_notify();
            take_records(&mut tls)
        };
        (&raw.socket).write_all(&wire).unwrap();
        let code = rx.recv_timeout(Duration::from_secs(3));
        assert_eq!(
            code,
            Ok(1006),
            "{backend:?}: the connection stays open after the peer's close_notify"
        );
        drop(raw);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// A flood of TLS 1.3 KeyUpdate requests from a client that never reads: rustls answers
/// them with one coalesced KeyUpdate and fails the connection after 32 requests without
/// data between (`TooManyKeyUpdateRequests`), so the server closes it (1006) instead of
/// queueing an answer each.
#[test]
fn a_key_update_flood_is_closed() {
    use std::io::Write;
    let (cert, key) = certificate("key-update-flood");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let (tx, rx) = mpsc::channel();
        let server = tls_server_with(backend, &cert, &key, |_| {}, tx);
        let raw = RawWss::connect(server.local_addr(), &cert);
        let mut wire = Vec::new();
        {
            let mut tls = raw.tls.lock().unwrap();
            for _ in 0..1000 {
                tls.refresh_traffic_keys().unwrap();
                wire.extend(take_records(&mut tls));
            }
        }
        let _ = (&raw.socket).write_all(&wire);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(3)),
            Ok(1006),
            "{backend:?}"
        );
        assert!(
            closed_within(&raw.socket, Duration::from_secs(3)),
            "{backend:?}"
        );
        drop(raw);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// The blocking client the same way: a server's close_notify without a WebSocket Close
/// ends the connection (1006) at once, with the server's TCP connection still open.
#[test]
fn blocking_client_ends_at_a_close_notify_without_a_websocket_close() {
    use std::io::Write;
    let (cert, key) = certificate("blocking-close-notify-only");
    let (addr, server) = raw_wss_server(&cert, &key, |tls, socket| {
        std::thread::sleep(Duration::from_millis(200));
        tls.send_close_notify();
        socket.write_all(&take_records(tls)).unwrap();
        std::thread::sleep(Duration::from_secs(4));
    });
    let client = BlockingClient::new(
        &format!("wss://127.0.0.1:{}/", addr.port()),
        Options::default(),
    )
    .unwrap()
    .verify(&Verify::CaFile(cert.clone()))
    .unwrap();
    let (tx, rx) = mpsc::channel();
    client.on_close(move |_, code, _| {
        let _ = tx.send(code);
    });
    client.start_connection().unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)), Ok(1006));
    drop(client);
    let _ = server.join();
}

// ---- input held over the cap, then the end of the input (close_notify, FIN) ----

/// Echoes each message and reports its close code.
struct EchoReporter(Mutex<mpsc::Sender<u16>>);
impl Handler for EchoReporter {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, _reason: &str) {
        let _ = self.0.lock().unwrap().send(code);
    }
}

/// A wss client writes, in one go, a burst of messages whose echoes pass the cap, then
/// its Close (1000) and a close_notify. Reading pauses partway through the burst (the
/// rest of the read is held back); the close_notify in the same read must not end the
/// connection before the held messages and the Close are delivered: every message is
/// echoed, in order, and the handler hears the peer's 1000 (as over plain TCP, where a
/// FIN behind held input waits for it).
#[test]
fn close_notify_behind_held_input_loses_nothing() {
    use std::io::{Read, Write};
    let (cert, key) = certificate("close-notify-held");
    every_echo_and_1000_on_both_backends(|backend| {
        let tls = websocket_driver::tls::server_config_from_pem(&cert, &key).unwrap();
        let (server, rx) = held_input_server(backend, Some(tls), Options::default());
        let mut raw = RawWss::connect(server.local_addr(), &cert);
        let mut plain = Vec::new();
        for i in 0..HELD_MESSAGES {
            raw.ws.send_binary(&held_input_message(i)).unwrap();
        }
        raw.ws.close_connection(1000, "bye").unwrap();
        plain.extend_from_slice(raw.ws.pending_output());
        let n = plain.len();
        raw.ws.consume_output(n);
        let wire = {
            let mut tls = raw.tls.lock().unwrap();
            use std::io::Write as _;
            tls.writer().write_all(&plain).unwrap();
            tls.send_close_notify();
            take_records(&mut tls)
        };
        (&raw.socket).write_all(&wire).unwrap();
        // Read every echo back.
        let mut echoes = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        raw.socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        'read: loop {
            let n = match raw.socket.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut plain = {
                use std::io::Read as _;
                let mut tls = raw.tls.lock().unwrap();
                let mut c = &buf[..n];
                let mut out = Vec::new();
                while !c.is_empty() {
                    if tls.read_tls(&mut c).is_err() || tls.process_new_packets().is_err() {
                        break 'read;
                    }
                    let _ = tls.reader().read_to_end(&mut out);
                }
                out
            };
            count_echoes(&mut raw.ws, &mut plain, &mut echoes);
        }
        let code = rx.recv_timeout(Duration::from_secs(3));
        drop(raw);
        server.shutdown(Duration::from_secs(1)).unwrap();
        (echoes, code)
    });
}

/// Messages each held-input scenario sends: more than `held_input_server`'s cap holds.
const HELD_MESSAGES: u64 = 20;

/// Runs a held-input scenario on both backends. Each run returns the echoes its client
/// read and the close code the server's handler heard; every run must get every echo and
/// the peer's 1000.
fn every_echo_and_1000_on_both_backends(
    mut scenario: impl FnMut(Backend) -> (u64, Result<u16, mpsc::RecvTimeoutError>),
) {
    let outcomes: Vec<_> = [Backend::Epoll, Backend::IoUring]
        .into_iter()
        .map(|backend| {
            let (echoes, code) = scenario(backend);
            (backend.to_string(), echoes, code)
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("epoll".to_string(), HELD_MESSAGES, Ok(1000)),
            ("io-uring".to_string(), HELD_MESSAGES, Ok(1000)),
        ]
    );
}

/// Starts an echo server that reports close codes on `rx`: one loop, a 16 KiB cap.
fn held_input_server(
    backend: Backend,
    tls: Option<Arc<rustls::ServerConfig>>,
    options: Options,
) -> (ServerHandle, mpsc::Receiver<u16>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let config = ServerConfig {
        threads: 1,
        backend,
        max_backpressure: 16 * 1024,
        tls,
        options,
        ..ServerConfig::default()
    };
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(move |_| Upgrade::Accept(EchoReporter(Mutex::new(tx.lock().unwrap().clone()))))
        .unwrap();
    (server, rx)
}

/// Message `i` of the burst: its number in the first 8 bytes, then 2 KiB that deflate
/// cannot shrink much.
fn held_input_message(i: u64) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..2048u64)
        .map(|j| ((j.wrapping_mul(2654435761) ^ (i * 97)) >> 7) as u8)
        .collect();
    payload[..8].copy_from_slice(&i.to_le_bytes());
    payload
}

/// Parses the echoes in `input`, each checked to be the next in order; returns the
/// bytes used (a frame's start the driver did not take waits for the rest).
fn count_echoes(ws: &mut websocket_driver::Driver, input: &mut [u8], echoes: &mut u64) -> usize {
    let mut at = 0;
    loop {
        let (used, event) = ws.poll_event(&mut input[at..]);
        at += used;
        match event {
            Some(websocket_driver::Event::Message(m)) => {
                assert_eq!(&m.as_bytes()[..8], &echoes.to_le_bytes());
                *echoes += 1;
            }
            Some(_) => {}
            None => return at,
        }
    }
}

/// The test above over plain TCP (with `options`): the same burst, Close and then a FIN
/// (shutdown of the write side). Held input is delivered before the EOF: every echo and
/// the peer's 1000, on both backends.
fn fin_behind_held_input_loses_nothing(options: Options) {
    use std::io::{Read, Write};
    every_echo_and_1000_on_both_backends(|backend| {
        let (server, rx) = held_input_server(backend, None, options.clone());
        let addr = server.local_addr();
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut ws = websocket_driver::Driver::make_client(
            &format!("ws://127.0.0.1:{}/", addr.port()),
            &options,
        )
        .unwrap();
        ws.start_connection();
        let head = ws.pending_output().to_vec();
        ws.consume_output(head.len());
        socket.write_all(&head).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        loop {
            let n = socket.read(&mut buf).unwrap();
            assert!(n > 0);
            pending.extend_from_slice(&buf[..n]);
            let (used, event) = ws.poll_event(&mut pending);
            let open = event.map(|e| matches!(e, websocket_driver::Event::Open));
            pending.drain(..used);
            if let Some(open) = open {
                assert!(open);
                break;
            }
        }
        for i in 0..HELD_MESSAGES {
            ws.send_binary(&held_input_message(i)).unwrap();
        }
        ws.close_connection(1000, "bye").unwrap();
        let wire = ws.pending_output().to_vec();
        ws.consume_output(wire.len());
        socket.write_all(&wire).unwrap();
        socket.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echoes = 0u64;
        loop {
            let n = match socket.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            let used = count_echoes(&mut ws, &mut pending, &mut echoes);
            pending.drain(..used);
        }
        let code = rx.recv_timeout(Duration::from_secs(3));
        server.shutdown(Duration::from_secs(1)).unwrap();
        (echoes, code)
    });
}

#[test]
fn plain_fin_behind_held_input_loses_nothing() {
    fin_behind_held_input_loses_nothing(Options::default());
}

#[test]
fn deflate_fin_behind_held_input_loses_nothing() {
    fin_behind_held_input_loses_nothing(Options::default().deflate(true));
}

/// Echoes, and panics on the text "panic" (after queueing its echo), or in `on_close`.
struct EchoThenMaybePanic;
impl Handler for EchoThenMaybePanic {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
        if message.as_text() == Some("panic") {
            panic!("a wss handler panics (on purpose)");
        }
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        panic!("a wss handler panics in on_close (on purpose)");
    }
}

/// Runs `send` on the raw client's driver and sends what it queued.
fn send_raw(raw: &mut RawWss, send: impl FnOnce(&mut websocket_driver::Driver)) {
    send(&mut raw.ws);
    let out = raw.ws.pending_output().to_vec();
    raw.ws.consume_output(out.len());
    raw.send_plain(&out);
}

/// Reads until the server closes TCP: the plaintext received, and whether a
/// close_notify came before the end.
fn read_to_the_end(raw: &mut RawWss) -> (Vec<u8>, bool) {
    use std::io::Read;
    let mut plain = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = raw.socket.read(&mut buf).unwrap_or(0);
        if n == 0 {
            // With no new records, processing only reports the state so far.
            let mut tls = raw.tls.lock().unwrap();
            let notified = tls.process_new_packets().unwrap().peer_has_closed();
            return (plain, notified);
        }
        plain.extend(raw.decrypt(&buf[..n]));
    }
}

/// Over TLS a panicking handler's connection fails as a plain one's does: its queued echo
/// and then close 1011 reach the client sealed like everything before them, and TLS ends
/// with a close_notify; so does a connection whose handler panics in `on_close`, after
/// the close handshake, with nothing more to say.
#[test]
fn a_panicking_wss_handler_sends_its_close_sealed() {
    let (cert, key) = certificate("panic");
    for backend in [Backend::Epoll, Backend::IoUring] {
        let server = Server::bind_tls("127.0.0.1:0", &cert, &key)
            .unwrap()
            .threads(1)
            .backend(backend)
            .start(|_| Upgrade::Accept(EchoThenMaybePanic))
            .unwrap();
        let mut raw = RawWss::connect(server.local_addr(), &cert);
        send_raw(&mut raw, |ws| {
            ws.send_text("panic").unwrap();
        });
        let (plain, notified) = read_to_the_end(&mut raw);
        // The echo, then Close 1011 "the handler panicked".
        let mut expected = b"\x81\x05panic\x88\x16".to_vec();
        expected.extend_from_slice(&1011u16.to_be_bytes());
        expected.extend_from_slice(b"the handler panicked");
        assert_eq!(plain, expected, "{backend}");
        assert!(notified, "{backend}: no close_notify after close 1011");

        let mut raw = RawWss::connect(server.local_addr(), &cert);
        send_raw(&mut raw, |ws| {
            ws.close_connection(1000, "bye").unwrap();
        });
        let (plain, notified) = read_to_the_end(&mut raw);
        // The server's answer: Close 1000 (its code, without the reason).
        assert_eq!(plain, b"\x88\x02\x03\xe8", "{backend}: the close's answer");
        assert!(
            notified,
            "{backend}: no close_notify after on_close panicked"
        );
        assert_eq!(server.stats().handler_panics, 2, "{backend}");
        drop(raw);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// A wss client whose close_notify comes before its upgrade request is complete can send
/// nothing more (TLS drops every record after the alert), so the request never will be:
/// the server ends the connection at once, as for a FIN there, on both backends. (It
/// waited for the handshake timeout, 10 s by default.)
#[test]
fn a_close_notify_during_the_upgrade_ends_the_connection() {
    use std::io::Write;
    let (cert, key) = certificate("close-notify-upgrade");
    let mut open = Vec::new();
    for backend in [Backend::Epoll, Backend::IoUring] {
        let server = Server::bind("127.0.0.1:0")
            .unwrap()
            .config(ServerConfig {
                threads: 1,
                backend,
                tls: Some(websocket_driver::tls::server_config_from_pem(&cert, &key).unwrap()),
                handshake_timeout: Duration::from_secs(10),
                ..ServerConfig::default()
            })
            .start(|_| Upgrade::Accept(Echo))
            .unwrap();
        for half_a_head in [&b""[..], b"GET / HTTP/1.1\r\nHost: x\r\n"] {
            let config = client_config(&Verify::CaFile(cert.clone())).unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = rustls::ClientConnection::new(config, name).unwrap();
            let mut socket = std::net::TcpStream::connect(server.local_addr()).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            tls.complete_io(&mut socket).unwrap();
            tls.writer().write_all(half_a_head).unwrap();
            tls.send_close_notify();
            let mut records = Vec::new();
            while tls.wants_write() {
                tls.write_tls(&mut records).unwrap();
            }
            // TCP stays open: only the alert says the client is done.
            socket.write_all(&records).unwrap();
            if !closed_within(&socket, Duration::from_secs(3)) {
                open.push(format!(
                    "{backend:?}, {:?} then close_notify",
                    String::from_utf8_lossy(half_a_head)
                ));
            }
        }
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
    assert!(
        open.is_empty(),
        "still open 3 s after the close_notify: {open:#?}"
    );
}
