//! wss end to end: the reactor's TLS server with a self-signed certificate made at test
//! time, the blocking client and the hosted client, verification on and failing.
#![cfg(feature = "tls")]

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

/// A fresh self-signed certificate for 127.0.0.1, written as PEM files.
fn certificate(dir: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("wsd-tls-{}-{dir}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
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
fn wss_cap_counts_sealed_bytes() {
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
