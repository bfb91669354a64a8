//! Chat server: rooms are pub/sub topics, and the server serves its own page.
//!
//! `cargo run --example chat -- [--addr 127.0.0.1:9003] [--backend auto|epoll|io-uring]
//! [--threads N]`, then open <http://127.0.0.1:9003/> in a few browser tabs.
//!
//! Two servers share rooms through Redis (`--features redis`):
//! `cargo run --features redis --example chat -- --addr 127.0.0.1:9003 --redis redis://127.0.0.1:6379/`
//! and the same with `--addr 127.0.0.1:9004`; a line sent on one shows on both.
//!
//! One port serves both: `GET /` (or `/index.html`) is the chat page (HTML, inline
//! script and style, below as [`PAGE`]; another method there gets 405 with `Allow: GET`);
//! `/ws?room=ROOM&nick=NICK` upgrades to the chat itself (a request there that is no
//! upgrade gets 426). Anything else is 404.
//!
//! A member whose connection goes silent (a laptop that sleeps, a network that drops
//! without a FIN) is pinged after 30 s and closed, with its leave notice, after 60 s:
//! browsers answer pings themselves, so a quiet but present member stays.
//!
//! # Protocol
//!
//! The client joins with the query string (percent-encoded, as `encodeURIComponent`
//! writes it) and then sends each chat line as one text message, the line itself. The
//! server answers with JSON text messages, one object each:
//!
//! - `{"type":"welcome","room":R,"nick":N,"members":[...],"server":S,"seq":Q}` to the one
//!   who joined;
//! - `{"type":"join","room":R,"nick":N,"server":S,"seq":Q}` / `{"type":"leave",...}` to the
//!   rest of the room;
//! - `{"type":"message","room":R,"nick":N,"text":T}` to everyone in the room, the sender
//!   included;
//! - `{"type":"error","text":WHY}` to one client: a message it sent was refused.
//!
//! The server trusts nothing the client sends: a nickname is 1 to 24 characters with no
//! control or invisible characters, kept in Unicode's composed form (NFC, so that two
//! spellings of one name are one nickname), a room name 1 to 32 of `A-Z a-z 0-9 - _`, a
//! nickname is unique in its room, a line is 1 to 500 characters with no control characters, and a frame over
//! 16 KiB closes the connection (1009). A bad join gets an `error` and close 1008; a bad
//! line only the `error`. A `/ws` request whose `Origin` is another site is refused (403).
//! The page puts every piece of user text into the DOM with `textContent`, never as HTML.
//!
//! Each room is the topic `room:NAME`: a connection subscribes on join, messages go out
//! with `Ws::publish_all` (every subscriber on every loop, this one included), join and
//! leave notices with `Ws::publish` (everyone but this connection). A closing connection
//! leaves its topics on its own; its `on_close` publishes the leave notice.
//!
//! # Member lists and notices
//!
//! Joins happen on every loop at once, so a member's welcome and another member's join
//! notice can cross: a newcomer subscribes before it reads the member list, and may then
//! get the notice of someone the list already holds. So every change to a room's members
//! takes the next number (`seq`, one sequence per server: `server` names this process),
//! and its notice is published while the room's lock is held, so that notices reach every
//! member in the order of their numbers. A welcome carries the number of the last change
//! its list includes; a client ignores a notice from the same `server` numbered at or
//! below it (the page does). A notice from another server (through Redis) has that
//! server's numbers and always counts.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use unicode_normalization::UnicodeNormalization;
use websocket_driver::server::{
    Handler, HttpResponse, Server, ServerConfig, Upgrade, UpgradeRequest, Ws,
};
use websocket_driver::{Backend, Message, MessageType, Options, code};

/// Longest nickname, in characters.
const MAX_NICK: usize = 24;
/// Longest room name, in characters.
const MAX_ROOM: usize = 32;
/// Longest chat line, in characters.
const MAX_TEXT: usize = 500;
/// Largest message the server reads (a line of 500 four-byte characters fits).
const MAX_FRAME: usize = 16 * 1024;
/// Silence after which a member is pinged (and closed after twice as long).
const IDLE: Duration = Duration::from_secs(30);

/// Who is in which room: nicknames are unique per room.
#[derive(Clone)]
struct Rooms {
    state: Arc<Mutex<Members>>,
    /// This process's name in notices (see the module docs).
    server: Arc<str>,
}

/// Every room's members on this server.
#[derive(Default)]
struct Members {
    by_room: HashMap<String, BTreeSet<String>>,
    /// The number of the last change to any room's members (one sequence for the server,
    /// so that a room emptied and filled again does not count from zero).
    seq: u64,
}

impl Rooms {
    fn new() -> Rooms {
        // Unique enough to tell servers sharing a Redis apart: the process id and a
        // randomly keyed hash of the start time.
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let salt = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), started);
        Rooms {
            state: Arc::default(),
            server: format!("{:x}-{:08x}", std::process::id(), salt as u32).into(),
        }
    }
}

/// A validated join request.
struct Join {
    room: String,
    nick: String,
    topic: String,
}

/// One chat connection.
struct Member {
    /// What the upgrade request asked for, or why it cannot be.
    join: Result<Join, String>,
    rooms: Rooms,
    /// Holds its nickname in the room (and so has a leave notice to send).
    joined: bool,
}

impl Member {
    /// Tells the client why and closes with 1008.
    fn refuse(ws: &mut Ws<'_>, why: &str) {
        let _ = ws.send_text(&json!({"type": "error", "text": why}).to_string());
        // A close reason is at most 123 bytes (a long nickname can make it longer).
        let mut end = why.len().min(123);
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        let _ = ws.close_connection(code::POLICY_VIOLATION, &why[..end]);
    }

    fn error(ws: &mut Ws<'_>, why: &str) {
        let _ = ws.send_text(&json!({"type": "error", "text": why}).to_string());
    }
}

impl Handler for Member {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        let join = match &self.join {
            Ok(join) => join,
            Err(why) => return Self::refuse(ws, why),
        };
        // Subscribed before the member list is read: whoever joins after that list was
        // taken publishes a join notice this subscription gets (numbered past the list).
        if let Err(e) = ws.subscribe(&join.topic) {
            return Self::refuse(ws, &format!("cannot join: {e}"));
        }
        let mut state = self.rooms.state.lock().unwrap();
        let members = state.by_room.entry(join.room.clone()).or_default();
        if !members.insert(join.nick.clone()) {
            drop(state);
            let why = format!("the nickname {:?} is taken in #{}", join.nick, join.room);
            // Closing leaves the topic.
            return Self::refuse(ws, &why);
        }
        let members: Vec<String> = members.iter().cloned().collect();
        state.seq += 1;
        let seq = state.seq;
        self.joined = true;
        let server = &*self.rooms.server;
        let welcome = json!({"type": "welcome", "room": join.room, "nick": join.nick,
                             "members": members, "server": server, "seq": seq});
        let _ = ws.send_text(&welcome.to_string());
        // Published under the lock: notices go out in the order of their numbers.
        let notice = json!({"type": "join", "room": join.room, "nick": join.nick,
                            "server": server, "seq": seq});
        if let Err(e) = ws.publish(
            &join.topic,
            notice.to_string().as_bytes(),
            MessageType::Text,
        ) {
            eprintln!("chat: join notice for #{}: {e}", join.room);
        }
        drop(state);
    }

    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let Ok(join) = &self.join else { return };
        if !self.joined {
            return;
        }
        let Some(text) = message.as_text() else {
            return Self::error(ws, "send chat lines as text messages");
        };
        let text = text.trim();
        let len = text.chars().count();
        if len == 0 || len > MAX_TEXT {
            return Self::error(ws, &format!("a line is 1 to {MAX_TEXT} characters"));
        }
        if text.chars().any(char::is_control) {
            return Self::error(ws, "a line may not contain control characters");
        }
        let line = json!({"type": "message", "room": join.room, "nick": join.nick, "text": text});
        if let Err(e) = ws.publish_all(&join.topic, line.to_string().as_bytes(), MessageType::Text)
        {
            eprintln!("chat: message to #{}: {e}", join.room);
        }
    }

    fn on_close(&mut self, ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        let Ok(join) = &self.join else { return };
        if !self.joined {
            return;
        }
        let mut state = self.rooms.state.lock().unwrap();
        if let Some(members) = state.by_room.get_mut(&join.room) {
            members.remove(&join.nick);
            if members.is_empty() {
                state.by_room.remove(&join.room);
            }
        }
        state.seq += 1;
        let seq = state.seq;
        // This connection is leaving: `publish` reaches the rest of the room. Under the
        // lock, as the join notices are.
        let notice = json!({"type": "leave", "room": join.room, "nick": join.nick,
                            "server": &*self.rooms.server, "seq": seq});
        if let Err(e) = ws.publish(
            &join.topic,
            notice.to_string().as_bytes(),
            MessageType::Text,
        ) {
            eprintln!("chat: leave notice for #{}: {e}", join.room);
        }
        drop(state);
    }
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The decoded value of `name` in a query string (the first one).
fn query_param(query: &str, name: &str) -> Result<Option<String>, String> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key).as_deref() == Some(name) {
            return percent_decode(value)
                .map(Some)
                .ok_or_else(|| format!("the {name} is not valid percent-encoded UTF-8"));
        }
    }
    Ok(None)
}

/// Format characters that print as nothing (zero-width spaces and joiners, direction
/// overrides, the soft hyphen, the byte-order mark): in a nickname they would let
/// "alice" and "alice\u{200b}" look like one person.
fn is_invisible(c: char) -> bool {
    // Unicode's Default_Ignorable_Code_Point, plus the blank braille pattern.
    matches!(c,
        '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}'..='\u{1160}' | '\u{17b4}'..='\u{17b5}'
        | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}' | '\u{2800}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}'
        | '\u{feff}' | '\u{ffa0}' | '\u{fff0}'..='\u{fffb}' | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e0fff}')
}

/// Checks the join request in the `/ws` query string.
fn parse_join(query: &str) -> Result<Join, String> {
    let nick = query_param(query, "nick")?.unwrap_or_default();
    // One spelling per name: "José" typed with a precomposed é and with e + a combining
    // accent is the same text (Unicode canonical equivalence) and looks the same, so it is
    // kept in its composed form (NFC), and the uniqueness check sees one name.
    let nick: String = nick.trim().nfc().collect();
    let nick = nick.as_str();
    let nick_len = nick.chars().count();
    if nick_len == 0 || nick_len > MAX_NICK {
        return Err(format!("a nickname is 1 to {MAX_NICK} characters"));
    }
    if nick.chars().any(|c| c.is_control() || is_invisible(c)) {
        return Err("a nickname may not contain control or invisible characters".into());
    }
    let room = query_param(query, "room")?.unwrap_or_default();
    let room = room.trim();
    let room_len = room.chars().count();
    if room_len == 0 || room_len > MAX_ROOM {
        return Err(format!("a room name is 1 to {MAX_ROOM} characters"));
    }
    if !room
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("a room name is letters, digits, - and _".into());
    }
    Ok(Join {
        room: room.to_string(),
        nick: nick.to_string(),
        topic: format!("room:{room}"),
    })
}

/// A browser sends `Origin`: it must be this server's own (no cross-site hijacking).
/// Clients that are no browser send none and are let in.
fn same_origin(req: &UpgradeRequest<'_>) -> bool {
    match (req.header("Origin"), req.header("Host")) {
        (None, _) => true,
        (Some(origin), Some(host)) => {
            origin == format!("http://{host}") || origin == format!("https://{host}")
        }
        (Some(_), None) => false,
    }
}

/// The page, served for `GET /`.
fn page() -> HttpResponse {
    let header = |name: &str, value: &str| (name.to_string(), value.to_string());
    HttpResponse {
        status: 200,
        headers: vec![
            header("Content-Type", "text/html; charset=utf-8"),
            header("Cache-Control", "no-store"),
            header("X-Content-Type-Options", "nosniff"),
            header(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self'",
            ),
        ],
        body: PAGE.into(),
    }
}

/// Routes a request: the page, the chat socket, or 404.
fn route(req: &UpgradeRequest<'_>, rooms: &Rooms) -> Upgrade<Member> {
    let (path, query) = req.path().split_once('?').unwrap_or((req.path(), ""));
    match path {
        "/" | "/index.html" if !req.is_websocket() => {
            if req.request.method == "GET" {
                Upgrade::Reject(page())
            } else {
                let mut refusal = HttpResponse::new(405, "method not allowed");
                refusal.headers.push(("Allow".into(), "GET".into()));
                Upgrade::Reject(refusal)
            }
        }
        "/ws" if !same_origin(req) => {
            Upgrade::Reject(HttpResponse::new(403, "cross-origin WebSocket refused"))
        }
        // Not an upgrade at all: the server answers 426 itself.
        "/ws" => Upgrade::Accept(Member {
            join: parse_join(query),
            rooms: rooms.clone(),
            joined: false,
        }),
        _ => Upgrade::Reject(HttpResponse::new(404, "not found")),
    }
}

fn main() {
    let mut addr = "127.0.0.1:9003".to_string();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut backend = Backend::Auto;
    let mut redis: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--addr" => addr = value("--addr"),
            "--threads" => {
                threads = value("--threads")
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .unwrap_or_else(|| usage("--threads needs a number of at least 1"))
            }
            "--backend" => {
                backend = value("--backend")
                    .parse()
                    .unwrap_or_else(|e: String| usage(&e))
            }
            "--redis" => redis = Some(value("--redis")),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if let Err(e) = websocket_driver::raise_open_file_limit() {
        eprintln!("chat: cannot raise the open-file limit: {e}");
    }
    let rooms = Rooms::new();
    let mut server = Server::bind(&addr)
        .unwrap_or_else(|e| usage(&format!("cannot listen on {addr}: {e}")))
        .config(ServerConfig {
            idle_timeout: Some(IDLE),
            ..ServerConfig::default()
        })
        .threads(threads)
        .backend(backend)
        .options(Options::default().max_length(MAX_FRAME));
    if let Some(url) = redis {
        server = with_redis(server, &url);
    }
    let local = server.local_addr().unwrap();
    let handle = server
        .start(move |req| route(req, &rooms))
        .unwrap_or_else(|e| usage(&format!("server failed: {e}")));
    // The browser test reads the address from this line.
    eprintln!(
        "chat: listening on http://{local}/ ({}, {threads} threads)",
        handle.backend()
    );
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .unwrap_or_else(|e| usage(&format!("cannot install signal handlers: {e}")));
    if signals.forever().next().is_some() {
        handle
            .shutdown(Duration::from_secs(5))
            .unwrap_or_else(|e| usage(&format!("shutdown failed: {e}")));
    }
}

/// Rooms span every chat server started with the same Redis (the member lists and the
/// nickname check stay per server).
#[cfg(feature = "redis")]
fn with_redis(server: Server, url: &str) -> Server {
    let backplane = websocket_driver::server::RedisBackplane::connect(url)
        .unwrap_or_else(|e| usage(&format!("cannot reach Redis at {url}: {e}")));
    server.backplane(backplane.prefix("chat:"))
}

#[cfg(not(feature = "redis"))]
fn with_redis(_server: Server, _url: &str) -> Server {
    usage("--redis needs the `redis` feature (cargo run --features redis --example chat …)")
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("chat: {problem}");
    }
    eprintln!(
        "usage: chat [--addr HOST:PORT] [--threads N] [--backend auto|epoll|io-uring] \
         [--redis redis://HOST:PORT/]"
    );
    std::process::exit(2)
}

/// The whole client: user text reaches the DOM only through `textContent`.
const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>websocket-driver chat</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 44rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin: 0 0 .5rem; }
  form { display: flex; gap: .5rem; margin: .5rem 0; }
  input { flex: 1; padding: .35rem .5rem; font: inherit; }
  button { padding: .35rem .9rem; font: inherit; }
  #status { margin: .25rem 0; font-size: .9rem; color: #666; }
  #log { list-style: none; margin: 0; padding: .5rem; height: 20rem; overflow-y: auto;
         border: 1px solid #ccc; border-radius: 4px; background: #fafafa; }
  #log li { padding: .1rem 0; white-space: pre-wrap; overflow-wrap: anywhere; }
  #log .nick { font-weight: 600; margin-right: .5rem; }
  #log li.notice { color: #777; font-style: italic; }
  #log li.error { color: #b00020; }
</style>
</head>
<body>
<h1>Chat</h1>
<form id="join-form">
  <input id="nick" placeholder="nickname" maxlength="24" autocomplete="off" required>
  <input id="room" placeholder="room" maxlength="32" value="lobby" required>
  <button id="join" type="submit">Join</button>
</form>
<p id="status">not connected</p>
<ul id="log" aria-live="polite"></ul>
<form id="send-form">
  <input id="text" placeholder="message" maxlength="500" autocomplete="off" disabled>
  <button id="send" type="submit" disabled>Send</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let socket = null;

// One <li> per line, data-type = the server's message type; each part is a <span>
// whose text is set with textContent, so user text is never parsed as HTML.
function line(type, parts) {
  const li = document.createElement("li");
  li.dataset.type = type;
  li.className = type === "message" ? "message" : type === "error" ? "error" : "notice";
  for (const [cls, text] of parts) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = String(text);
    li.append(span);
  }
  const log = $("log");
  log.append(li);
  log.scrollTop = log.scrollHeight;
}

function ready(on) {
  $("text").disabled = !on;
  $("send").disabled = !on;
  if (on) $("text").focus();
}

function join() {
  if (socket) socket.close(1000, "rejoining");
  const nick = $("nick").value.trim(), room = $("room").value.trim();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws?room=${encodeURIComponent(room)}` +
                           `&nick=${encodeURIComponent(nick)}`);
  socket = ws;
  // The server and number of the last member change this socket's welcome listed: a
  // notice numbered at or below it is already in the list (see the server's docs).
  let listed = { server: null, seq: 0 };
  $("status").textContent = "connecting…";
  ws.onmessage = (event) => {
    let m;
    try { m = JSON.parse(event.data); } catch { return; }
    switch (m.type) {
      case "welcome":
        listed = { server: m.server, seq: m.seq };
        $("status").textContent = `in #${m.room} as ${m.nick}`;
        line("welcome", [["text", `joined #${m.room} as ${m.nick}; here: ${m.members.join(", ")}`]]);
        ready(true);
        break;
      case "join":
      case "leave":
        if (m.server === listed.server && m.seq <= listed.seq) break;
        line(m.type, [["text", `${m.nick} ${m.type === "join" ? "joined" : "left"}`]]);
        break;
      case "message": line("message", [["nick", m.nick], ["text", m.text]]); break;
      case "error": line("error", [["text", m.text]]); break;
    }
  };
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    ready(false);
    $("status").textContent = `disconnected (${event.code}${event.reason ? ": " + event.reason : ""})`;
  };
}

$("join-form").addEventListener("submit", (event) => { event.preventDefault(); join(); });
$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!socket || socket.readyState !== WebSocket.OPEN || !text.trim()) return;
  socket.send(text);
  $("text").value = "";
});
</script>
</body>
</html>
"##;
