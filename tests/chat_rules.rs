//! The chat example (`examples/chat.rs`) over plain WebSocket clients, no browser: the
//! rules its module docs state.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use websocket_driver::client::BlockingClient;
use websocket_driver::{Message, Options};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_chat() -> (Killed, String) {
    start_chat_with("1", "epoll")
}

fn start_chat_with(threads: &str, backend: &str) -> (Killed, String) {
    let binary = support::example_binary("chat", &[]);
    let mut child = Command::new(&binary)
        .args([
            "--addr",
            "127.0.0.1:0",
            "--threads",
            threads,
            "--backend",
            backend,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("listening line");
        if let Some(rest) = line.strip_prefix("chat: listening on http://") {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    (Killed(child), addr)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Joins `room` as `nick`; returns the client and the first JSON message it got.
fn join(addr: &str, room: &str, nick: &str) -> (BlockingClient, mpsc::Receiver<Value>, Value) {
    let url = format!("ws://{addr}/ws?room={}&nick={}", encode(room), encode(nick));
    let client = BlockingClient::new(&url, Options::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    client.on_message(move |_, m| {
        if let Message::Text(t) = m {
            let _ = tx.send(serde_json::from_str::<Value>(&t).unwrap());
        }
    });
    client.start_connection().unwrap();
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a first message");
    (client, rx, first)
}

/// The module docs: "a nickname is 1 to 24 characters with no control or invisible
/// characters" ("alice" and "alice\u{200b}" would look like one person). Other characters
/// that print as nothing pass the check, so a second "alice" joins the room.
#[test]
fn chat_refuses_nicknames_that_only_add_invisible_characters() {
    let (_server, addr) = start_chat();
    let (_alice, _rx, welcome) = join(&addr, "r", "alice");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let mut let_in = Vec::new();
    for (name, fake) in [
        ("U+FE0F variation selector", "alice\u{fe0f}"),
        ("U+034F combining grapheme joiner", "alice\u{34f}"),
        ("U+E0061 tag latin small a", "alice\u{e0061}"),
        ("U+3164 hangul filler", "alice\u{3164}"),
        ("U+2800 braille blank", "alice\u{2800}"),
    ] {
        let (_c, _rx, first) = join(&addr, "r", fake);
        if first["type"] == "welcome" {
            let_in.push(format!(
                "{name}: welcomed as {:?}, members {}",
                first["nick"], first["members"]
            ));
        }
    }
    assert!(
        let_in.is_empty(),
        "look-alike nicknames joined:\n{}",
        let_in.join("\n")
    );
}

/// (Expected to pass) the other documented rules: a nickname is unique in its room, a
/// foreign Origin gets 403, a line over 500 characters gets an error, a frame over
/// 16 KiB closes with 1009.
#[test]
fn chat_documented_rules() {
    let (_server, addr) = start_chat();
    let (alice, rx, welcome) = join(&addr, "r", "alice");
    assert_eq!(welcome["type"], "welcome");
    let (_dup, _rx2, first) = join(&addr, "r", "alice");
    assert_eq!(first["type"], "error", "{first}");

    alice.send_text(&"x".repeat(500)).unwrap();
    let echo = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(echo["type"], "message", "{echo}");
    alice.send_text(&"x".repeat(501)).unwrap();
    let refused = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(refused["type"], "error", "{refused}");

    let (tx, closes) = mpsc::channel();
    alice.on_close(move |_, code, _| {
        let _ = tx.send(code);
    });
    alice.send_text(&"y".repeat(16 * 1024 + 1)).unwrap();
    assert_eq!(closes.recv_timeout(Duration::from_secs(5)).unwrap(), 1009);

    // A cross-site page's Origin.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /ws?room=r&nick=eve HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 403");
}

/// A nickname is unique in its room, however it is spelled: "José" written precomposed
/// (U+00E9) and decomposed ("e" + U+0301 combining acute) is the same text to Unicode
/// (canonically equivalent) and renders identically, so the second is refused (both
/// joined as different people).
#[test]
fn chat_refuses_a_canonically_equivalent_duplicate_nickname() {
    let (_server, addr) = start_chat();
    let (_a, _rx, welcome) = join(&addr, "r", "Jos\u{e9}");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let (_b, _rx2, first) = join(&addr, "r", "Jose\u{301}");
    assert_eq!(first["type"], "error", "a second \"José\" joined: {first}");
}

/// `--threads 0` is no number of loops: chat and pubsub refuse it as echo does ("--threads
/// needs a number of at least 1", exit 2; they announced "0 threads" and ran one loop).
#[test]
fn chat_and_pubsub_threads_zero_is_refused_or_reported_truthfully() {
    let mut wrong = Vec::new();
    for example in ["chat", "pubsub"] {
        let binary = support::example_binary(example, &[]);
        let mut child = Command::new(&binary)
            .args([
                "--addr",
                "127.0.0.1:0",
                "--threads",
                "0",
                "--backend",
                "epoll",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let status = child.try_wait().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        if first.contains(" 0 threads") {
            wrong.push(format!("{example}: {first:?} (exited: {status:?})"));
        }
    }
    assert!(
        wrong.is_empty(),
        "started with --threads 0:\n{}",
        wrong.join("\n")
    );
}

/// A response to HEAD carries no content (RFC 9110 §9.3.2: "the server MUST NOT send
/// content in the response"): the chat answers `HEAD /` (405) and `HEAD /nope` (404) with
/// their heads only (the text bodies followed).
#[test]
fn chat_head_responses_have_no_body() {
    use std::io::{Read, Write};
    let (_server, addr) = start_chat();
    let mut with_body = Vec::new();
    for path in ["/", "/nope"] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "HEAD {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response).to_string();
        let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
        if !body.is_empty() {
            with_body.push(format!(
                "HEAD {path}: {:?} then body {body:?}",
                head.lines().next()
            ));
        }
    }
    assert!(with_body.is_empty(), "{}", with_body.join("\n"));
}

/// One client's view of a room's members, kept by the rule the module docs give a client
/// (and the page follows): the welcome's list, then every join and leave notice from the
/// same server numbered past the welcome's. Notices must arrive in the order of their
/// numbers, and none past the welcome may contradict the view (a join of someone listed,
/// a leave of someone absent).
struct View {
    nick: String,
    server: String,
    /// The welcome's number: notices at or below it are in its list.
    listed: u64,
    /// The number of the last notice applied.
    last: u64,
    members: std::collections::BTreeSet<String>,
    wrong: Vec<String>,
}

impl View {
    fn new(welcome: &Value) -> View {
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let listed = welcome["seq"].as_u64().expect("welcome carries a number");
        View {
            nick: welcome["nick"].as_str().unwrap().to_string(),
            server: welcome["server"]
                .as_str()
                .expect("welcome names its server")
                .into(),
            listed,
            last: listed,
            members: welcome["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_string())
                .collect(),
            wrong: Vec::new(),
        }
    }

    fn apply(&mut self, notice: &Value) {
        let (Some(kind), Some(nick), Some(seq)) = (
            notice["type"].as_str(),
            notice["nick"].as_str(),
            notice["seq"].as_u64(),
        ) else {
            return self.wrong.push(format!("not a notice: {notice}"));
        };
        if notice["server"] != self.server.as_str() {
            return self
                .wrong
                .push(format!("another server's notice: {notice}"));
        }
        if seq <= self.listed {
            return;
        }
        if seq <= self.last {
            return self.wrong.push(format!(
                "{}: {notice} after number {}",
                self.nick, self.last
            ));
        }
        self.last = seq;
        let changed = match kind {
            "join" => self.members.insert(nick.to_string()),
            "leave" => self.members.remove(nick),
            _ => false,
        };
        if !changed {
            self.wrong.push(format!(
                "{}: {notice} contradicts {:?}",
                self.nick, self.members
            ));
        }
    }
}

/// Joins on several loops at once: a newcomer subscribes before it reads the member list,
/// so it can get the join notice of someone its welcome already lists (the page showed
/// "bob joined" under a welcome naming bob), and a leave and a join of one nickname could
/// cross. Every client keeps its view by the documented rule; no notice may contradict
/// it, and every view ends as the room's true members, through a burst of joins and a
/// burst of leaves, on both backends.
#[test]
fn chat_member_views_agree_through_concurrent_joins_and_leaves() {
    const CLIENTS: usize = 24;
    for backend in ["epoll", "io-uring"] {
        let (_server, addr) = start_chat_with("2", backend);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
        let joined: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (addr, barrier) = (addr.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    join(&addr, "race", &format!("m{i:02}"))
                })
            })
            .collect();
        let mut members: Vec<_> = joined
            .into_iter()
            .map(|t| {
                let (client, rx, welcome) = t.join().unwrap();
                (client, rx, View::new(&welcome))
            })
            .collect();
        let everyone: std::collections::BTreeSet<String> =
            (0..CLIENTS).map(|i| format!("m{i:02}")).collect();
        settle(&mut members, &everyone, backend);

        // Half leave at once; the rest must see exactly the other half go.
        let leaving: Vec<_> = members.drain(CLIENTS / 2..).collect();
        let closers: Vec<_> = leaving
            .into_iter()
            .map(|(client, rx, _)| {
                std::thread::spawn(move || {
                    let _ = client.close_connection(1000, "bye");
                    assert!(client.wait_closed(Duration::from_secs(5)));
                    drop(rx);
                })
            })
            .collect();
        for closer in closers {
            closer.join().unwrap();
        }
        let staying: std::collections::BTreeSet<String> =
            (0..CLIENTS / 2).map(|i| format!("m{i:02}")).collect();
        settle(&mut members, &staying, backend);
    }
}

/// Applies notices until every view is `expected` (or 10 s pass), then checks them.
fn settle(
    members: &mut [(BlockingClient, mpsc::Receiver<Value>, View)],
    expected: &std::collections::BTreeSet<String>,
    backend: &str,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for (_, rx, view) in members.iter_mut() {
        while view.members != *expected && view.wrong.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(notice) => view.apply(&notice),
                Err(_) => break,
            }
        }
    }
    let wrong: Vec<String> = members
        .iter()
        .flat_map(|(_, _, view)| {
            let mut wrong = view.wrong.clone();
            if view.members != *expected {
                wrong.push(format!("{} sees {:?}", view.nick, view.members));
            }
            wrong
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{backend}, expected {expected:?}:\n{}",
        wrong.join("\n")
    );
}
