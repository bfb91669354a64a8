//! A small blocking WebSocket client for the reactor tests: a client `Driver` over a
//! `std::net::TcpStream`, with every read bounded by a timeout so no test can hang.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use websocket_driver::{Driver, Event, Message, Options};

/// An event with everything owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned {
    Open,
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Error(String),
    Close(u16, String),
}

pub fn own(event: Event<'_>) -> Owned {
    match event {
        Event::Open => Owned::Open,
        Event::Message(Message::Text(t)) => Owned::Text(t.into_owned()),
        Event::Message(Message::Binary(b)) => Owned::Binary(b.into_owned()),
        Event::Ping(p) => Owned::Ping(p.into_owned()),
        Event::Pong(p) => Owned::Pong(p.into_owned()),
        Event::Error(e) => Owned::Error(e.to_string()),
        Event::Close { code, reason } => Owned::Close(code, reason),
    }
}

pub struct TestClient {
    pub stream: TcpStream,
    pub driver: Driver,
    /// Bytes read from the socket so far.
    pub bytes_read: usize,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<Owned>,
}

impl TestClient {
    /// Connects and completes the handshake.
    pub fn connect(addr: SocketAddr, path: &str) -> io::Result<TestClient> {
        let mut client = TestClient::connect_only(addr, path)?;
        match client.next_event()? {
            Owned::Open => Ok(client),
            other => Err(io::Error::other(format!("expected Open, got {other:?}"))),
        }
    }

    /// Connects with these options and completes the handshake.
    pub fn connect_with(addr: SocketAddr, path: &str, options: &Options) -> io::Result<TestClient> {
        let mut client = TestClient::connect_only_with(addr, path, options)?;
        match client.next_event()? {
            Owned::Open => Ok(client),
            other => Err(io::Error::other(format!("expected Open, got {other:?}"))),
        }
    }

    /// Connects and sends the upgrade request without waiting for the response.
    pub fn connect_only(addr: SocketAddr, path: &str) -> io::Result<TestClient> {
        TestClient::connect_only_with(addr, path, &Options::default())
    }

    fn connect_only_with(
        addr: SocketAddr,
        path: &str,
        options: &Options,
    ) -> io::Result<TestClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{addr}{path}");
        let mut driver = Driver::make_client(&url, options).map_err(io::Error::other)?;
        driver.start_connection();
        let mut client = TestClient {
            stream,
            driver,
            bytes_read: 0,
            buf: vec![0; 64 * 1024],
            pending: Default::default(),
        };
        client.flush()?;
        Ok(client)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        while !self.driver.pending_output().is_empty() {
            let n = self.stream.write(self.driver.pending_output())?;
            self.driver.consume_output(n);
        }
        Ok(())
    }

    pub fn send_binary(&mut self, data: &[u8]) -> io::Result<()> {
        self.driver.send_binary(data).map_err(io::Error::other)?;
        self.flush()
    }

    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.driver.send_text(text).map_err(io::Error::other)?;
        self.flush()
    }

    /// The next event; EOF is reported as the driver's own events (Close 1006).
    pub fn next_event(&mut self) -> io::Result<Owned> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let (_, event) = self.driver.poll_event(&mut []);
            if let Some(event) = event {
                return Ok(own(event));
            }
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => {
                    self.driver.receive_eof();
                    let (_, event) = self.driver.poll_event(&mut []);
                    return event.map(own).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "EOF after close")
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.bytes_read += n;
            let mut at = 0;
            while at < n {
                let (used, event) = self.driver.poll_event(&mut self.buf[at..n]);
                at += used;
                match event {
                    Some(e) => self.pending.push_back(own(e)),
                    None => break,
                }
            }
            // Auto-pongs and close echoes go out at once.
            self.flush()?;
        }
    }

    /// The next message, skipping pings and pongs.
    pub fn next_message(&mut self) -> io::Result<Owned> {
        loop {
            match self.next_event()? {
                Owned::Ping(_) | Owned::Pong(_) => continue,
                other => return Ok(other),
            }
        }
    }

    /// Reads until the server closes TCP; true if it did (within the read timeout).
    pub fn wait_eof(&mut self) -> bool {
        self.read_to_the_end().is_ok()
    }

    /// Reads until the server ends the connection, by a FIN or a reset (a socket closed
    /// with unread input resets); false if the read times out first.
    pub fn wait_ended(&mut self) -> bool {
        match self.read_to_the_end() {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    /// Reads and drops everything until the end of the stream, or the read's error.
    fn read_to_the_end(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 4096];
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Polls `check` until it holds or `limit` passes (a bound on waiting, not an assertion
/// on speed); returns whether it held.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// A deterministic xorshift generator, so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A size from 1 B to 64 KiB, log-uniform so small and large messages both occur.
    pub fn size(&mut self) -> usize {
        let bits = 1 + self.next() % 16;
        1 + (self.next() % (1u64 << bits)) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// An example's binary, built by cargo with `features` (a no-op when an earlier build
/// made it), so a test can run it as a process of its own.
///
/// Built with the `test` profile and the features this test crate was built with (plus
/// `features`): `cargo test` has then compiled the library, and the example itself, for
/// that profile and feature set already, where another profile or feature set would
/// compile the library once more (about a minute of a clean CI run).
pub fn example_binary(name: &str, features: &[&str]) -> std::path::PathBuf {
    use std::process::{Command, Stdio};
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // Without what `cargo test` sets for this process: build scripts (ring's) rerun when
    // these change, and the build would then differ from (and undo) a plain `cargo build`.
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        if var.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&&*var)
        {
            command.env_remove(&*var);
        }
    }
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--profile",
        "test",
        "--example",
        name,
        "--message-format=json-render-diagnostics",
    ]);
    let mut features = features.to_vec();
    let built_with = [
        (cfg!(feature = "tokio"), "tokio"),
        (cfg!(feature = "hyper"), "hyper"),
        (cfg!(feature = "redis"), "redis"),
    ];
    for (on, feature) in built_with {
        if on && !features.contains(&feature) {
            features.push(feature);
        }
    }
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run cargo to build an example");
    assert!(out.status.success(), "cargo build --example {name} failed");
    // The artifact line: {"reason":"compiler-artifact",…,"target":{…"name":"NAME"…},…,"executable":"PATH",…}
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| {
            line.contains(r#""reason":"compiler-artifact""#)
                && line.contains(&format!(r#""name":"{name}""#))
        })
        .find_map(|line| {
            let at = line.find(r#""executable":""#)? + r#""executable":""#.len();
            let end = line[at..].find('"')?;
            Some(std::path::PathBuf::from(&line[at..at + end]))
        })
        .unwrap_or_else(|| panic!("cargo build --example {name} named no executable"))
}

/// The reactor's backends this machine runs: epoll, and io_uring where the kernel allows it.
pub fn backends() -> Vec<websocket_driver::Backend> {
    let mut backends = vec![websocket_driver::Backend::Epoll];
    if websocket_driver::reactor::io_uring_support().is_ok() {
        backends.push(websocket_driver::Backend::IoUring);
    }
    backends
}

/// Echoes, on `backend` with one loop, pipelined messages of sizes that straddle any
/// receive-buffer layout (1 B to 128 KiB + 3, around 125/126 and 64 Ki), from 8
/// connections at once, and checks every reply byte for byte and in order.
pub fn mixed_size_echoes(backend: websocket_driver::Backend) {
    use websocket_driver::server::{Handler, Server, ServerConfig, Upgrade, Ws};

    struct Echo;
    impl Handler for Echo {
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            let _ = ws.send_message(&message);
        }
    }

    const FIXED: [usize; 14] = [
        1, 125, 126, 127, 16_384, 16_391, 20_000, 32_768, 65_535, 65_536, 65_537, 100_000, 131_075,
        3,
    ];
    let config = ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    };
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap();
    assert_eq!(server.backend(), backend);
    let addr = server.local_addr();
    let clients: Vec<_> = (0..8u64)
        .map(|seed| {
            std::thread::spawn(move || {
                let mut client = TestClient::connect(addr, "/").unwrap();
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed + 1));
                let mut echoed = 0;
                for batch in 0..6 {
                    // Under the server's 1 MiB output cap, so the batch never waits on
                    // replies this side has not read yet.
                    let sizes: Vec<usize> = match batch % 2 {
                        0 => FIXED.to_vec(),
                        _ => (0..8).map(|_| rng.size()).collect(),
                    };
                    let messages: Vec<Vec<u8>> = sizes.iter().map(|&n| rng.bytes(n)).collect();
                    for message in &messages {
                        client.send_binary(message).unwrap();
                    }
                    for (i, message) in messages.iter().enumerate() {
                        match client.next_message().unwrap() {
                            Owned::Binary(reply) => assert!(
                                reply == *message,
                                "client {seed} batch {batch} message {i}: {} bytes came back for {}",
                                reply.len(),
                                message.len()
                            ),
                            other => panic!("client {seed}: {other:?}"),
                        }
                        echoed += 1;
                    }
                }
                echoed
            })
        })
        .collect();
    let echoed: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(echoed, 8 * (3 * FIXED.len() + 3 * 8));
    let stats = server.stats();
    assert_eq!(stats.messages_in, echoed as u64);
    // Replies of 16 KiB (io_uring) or 4 KiB (epoll) and more that arrived whole went out
    // from their receive buffer (one per receive), and still came back whole.
    assert!(stats.replies_in_place > 0, "{backend}");
    server.shutdown(Duration::from_secs(2)).unwrap();
}

/// Reads an HTTP head byte by byte (nothing past it is consumed).
pub fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A fake server's side of the handshake: reads the upgrade request and answers 101 with
/// the right accept key plus `extra` header lines.
pub fn accept_upgrade(stream: &mut TcpStream, extra: &str) {
    let head = read_head(stream);
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap();
    let accept = websocket_driver::protocol::handshake::accept_key(key);
    write!(
        stream,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    )
    .unwrap();
}

/// This process's open descriptors, each as `fd -> target` (the directory's own, while it
/// is read, included: the same one each time), sorted for a failure's message.
pub fn open_descriptors() -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let target = std::fs::read_link(&path).ok()?;
            Some(format!("{} -> {}", path.display(), target.display()))
        })
        .collect();
    all.sort();
    all
}

/// The server side of a wss connection accepted on `socket`, by hand: the TLS handshake,
/// then the client's upgrade request head (plaintext). Reads time out after 20 s.
#[cfg(feature = "tls")]
pub fn tls_accept_head(
    socket: &mut TcpStream,
    config: std::sync::Arc<rustls::ServerConfig>,
) -> (rustls::ServerConnection, Vec<u8>) {
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut tls = rustls::ServerConnection::new(config).unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        tls.complete_io(socket).unwrap();
        let mut chunk = [0u8; 4096];
        match tls.reader().read(&mut chunk) {
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    (tls, head)
}

/// A fresh self-signed certificate for 127.0.0.1 and localhost, written as PEM files
/// (certificate, key) under a temporary directory named by `dir` and this process.
pub fn self_signed_pem(dir: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("wsd-{dir}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}
