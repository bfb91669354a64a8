//! The Redis backplane (feature `redis`) against a Redis that misbehaves: a fake Redis on
//! 127.0.0.1:0 in the test, speaking enough RESP2 for the `redis` crate (the connection
//! handshake's `CLIENT SETINFO`, `PING`, `SUBSCRIBE`, `UNSUBSCRIBE`, `PUBLISH`), with a
//! policy per test for what it answers, when it goes silent and when it hangs up. It
//! records every command and every connection its client closed.
#![cfg(feature = "redis")]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::eventually;
use websocket_driver::MessageType;
use websocket_driver::server::{
    Backplane, BackplaneStats, Handler, Inbound, RedisBackplane, Server, ServerHandle, Upgrade,
};

/// What the fake does with one command.
enum Act {
    Reply(Vec<u8>),
    /// Reads on, answers nothing.
    Silent,
    /// Hangs up.
    Close,
    /// Writes the pieces with `pause` between them.
    Pieces(Vec<Vec<u8>>, Duration),
}

/// One connection to the fake, as its policy sees it.
struct Conn {
    id: usize,
    /// Channels this connection is subscribed to.
    subscribed: usize,
    /// Hang up once the client has sent nothing for this long.
    idle_close: Option<Duration>,
}

impl Conn {
    /// What a healthy Redis answers.
    fn answer(&mut self, args: &[Vec<u8>]) -> Act {
        let name = args[0].to_ascii_uppercase();
        Act::Reply(match &name[..] {
            b"PING" if self.subscribed > 0 => array(&[bulk(b"pong"), bulk(b"")]),
            b"PING" => b"+PONG\r\n".to_vec(),
            b"SUBSCRIBE" | b"UNSUBSCRIBE" => {
                let mut replies = Vec::new();
                for channel in &args[1..] {
                    if name == b"SUBSCRIBE" {
                        self.subscribed += 1;
                    } else {
                        self.subscribed = self.subscribed.saturating_sub(1);
                    }
                    let kind = name.to_ascii_lowercase();
                    let count = format!(":{}\r\n", self.subscribed).into_bytes();
                    replies.extend(array(&[bulk(&kind), bulk(channel), count]));
                }
                replies
            }
            b"PUBLISH" => b":0\r\n".to_vec(),
            _ => b"+OK\r\n".to_vec(),
        })
    }
}

fn bulk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

fn array(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for item in items {
        out.extend_from_slice(item);
    }
    out
}

const NOPERM: &[u8] =
    b"-NOPERM User default has no permissions to access one of the channels used as arguments\r\n";

#[derive(Clone)]
enum Seen {
    Command {
        conn: usize,
        args: Vec<Vec<u8>>,
        at: Instant,
    },
    /// The client closed the connection (EOF or reset).
    Closed { conn: usize },
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Command { conn, args, .. } => {
                let args: Vec<_> = args.iter().map(|a| String::from_utf8_lossy(a)).collect();
                write!(f, "#{conn} {args:?}")
            }
            Seen::Closed { conn } => write!(f, "#{conn} closed"),
        }
    }
}

type Policy = dyn Fn(&mut Conn, &[Vec<u8>]) -> Act + Send + Sync;

struct FakeRedis {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeRedis {
    /// A fake that answers every command but hangs up at `command`.
    fn closing_at(command: &'static str) -> FakeRedis {
        FakeRedis::start(move |conn, args| {
            if args[0].eq_ignore_ascii_case(command.as_bytes()) {
                Act::Close
            } else {
                conn.answer(args)
            }
        })
    }

    /// Waits (up to 5 s) until a client has sent `command`.
    fn wait_for(&self, command: &str) {
        assert!(
            eventually(Duration::from_secs(5), || !self
                .commands(command)
                .is_empty()),
            "no {command} within 5 s: {:?}",
            self.seen()
        );
    }

    fn start(policy: impl Fn(&mut Conn, &[Vec<u8>]) -> Act + Send + Sync + 'static) -> FakeRedis {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let policy: Arc<Policy> = Arc::new(policy);
        let log = seen.clone();
        std::thread::spawn(move || {
            for (id, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                let (log, policy) = (log.clone(), policy.clone());
                std::thread::spawn(move || serve(id, stream, &log, &*policy));
            }
        });
        FakeRedis { addr, seen }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Every command named `name` (any case): connection, arguments after the name, time.
    fn commands(&self, name: &str) -> Vec<(usize, Vec<Vec<u8>>, Instant)> {
        self.seen()
            .into_iter()
            .filter_map(|seen| match seen {
                Seen::Command { conn, args, at }
                    if args[0].eq_ignore_ascii_case(name.as_bytes()) =>
                {
                    Some((conn, args[1..].to_vec(), at))
                }
                _ => None,
            })
            .collect()
    }

    /// The connections that sent `name`, in order, each once.
    fn connections_sending(&self, name: &str) -> Vec<usize> {
        let mut conns = Vec::new();
        for (conn, _, _) in self.commands(name) {
            if !conns.contains(&conn) {
                conns.push(conn);
            }
        }
        conns
    }

    fn closed(&self, conn: usize) -> bool {
        self.seen()
            .iter()
            .any(|seen| matches!(seen, Seen::Closed { conn: c } if *c == conn))
    }
}

fn serve(id: usize, stream: TcpStream, log: &Mutex<Vec<Seen>>, policy: &Policy) {
    let mut conn = Conn {
        id,
        subscribed: 0,
        idle_close: None,
    };
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        reader.get_ref().set_read_timeout(conn.idle_close).unwrap();
        match read_command(&mut reader) {
            Ok(Some(args)) => {
                log.lock().unwrap().push(Seen::Command {
                    conn: id,
                    args: args.clone(),
                    at: Instant::now(),
                });
                match policy(&mut conn, &args) {
                    Act::Reply(bytes) => {
                        if writer.write_all(&bytes).is_err() {
                            log.lock().unwrap().push(Seen::Closed { conn: id });
                            return;
                        }
                    }
                    Act::Pieces(pieces, pause) => {
                        for (n, piece) in pieces.iter().enumerate() {
                            if n > 0 {
                                std::thread::sleep(pause);
                            }
                            if writer.write_all(piece).is_err() {
                                return;
                            }
                        }
                    }
                    Act::Silent => {}
                    Act::Close => {
                        let _ = writer.shutdown(Shutdown::Both);
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // Idle too long: the fake hangs up, as Redis's `timeout` does.
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            Ok(None) | Err(_) => {
                log.lock().unwrap().push(Seen::Closed { conn: id });
                return;
            }
        }
    }
}

/// One RESP2 command (an array of bulk strings); `None` at EOF.
fn read_command(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<Vec<u8>>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let bad = || std::io::Error::other(format!("not a RESP2 command: {line:?}"));
    let count: usize = line
        .trim_end()
        .strip_prefix('*')
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let len: usize = header
            .trim_end()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not a bulk string: {header:?}")))?;
        let mut arg = vec![0; len + 2];
        reader.read_exact(&mut arg)?;
        arg.truncate(len);
        args.push(arg);
    }
    Ok(Some(args))
}

/// Lends the test the backplane the server runs, so the test can subscribe and publish
/// through it (as the server's loops would) and read its counters.
struct Lent(Arc<RedisBackplane>);

impl Backplane for Lent {
    fn start(&self, inbound: Inbound) {
        self.0.start(inbound)
    }
    fn subscribe(&self, topic: &[u8]) {
        self.0.subscribe(topic)
    }
    fn unsubscribe(&self, topic: &[u8]) {
        self.0.unsubscribe(topic)
    }
    fn publish(&self, topic: &[u8], data: &[u8], kind: MessageType) {
        self.0.publish(topic, data, kind)
    }
    fn stats(&self) -> BackplaneStats {
        self.0.stats()
    }
    fn stop(&self) {
        self.0.stop()
    }
}

struct Idle;
impl Handler for Idle {}

/// A server whose backplane uses `redis`; the backplane, for the test.
fn start(redis: &FakeRedis) -> (ServerHandle, Arc<RedisBackplane>) {
    let backplane = Arc::new(RedisBackplane::connect(&redis.url()).expect("the fake answers"));
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .threads(1)
        .backplane(Lent(backplane.clone()))
        .start(|_| Upgrade::Accept(Idle))
        .unwrap();
    (server, backplane)
}

/// The fake's policy for "the first connection that subscribes answers its first
/// `SUBSCRIBE`, then nothing more (a half-open connection: the host lost power, a NAT
/// dropped the flow)"; every other connection is healthy. Returns the silent one's id.
fn silent_after_first_subscribe() -> (FakeRedis, Arc<Mutex<Option<usize>>>) {
    let silent: Arc<Mutex<Option<usize>>> = Arc::default();
    let chosen = silent.clone();
    let redis = FakeRedis::start(move |conn, args| {
        let mut silent = chosen.lock().unwrap();
        if *silent == Some(conn.id) {
            return Act::Silent;
        }
        if silent.is_none() && args[0].eq_ignore_ascii_case(b"SUBSCRIBE") {
            *silent = Some(conn.id);
        }
        conn.answer(args)
    });
    (redis, silent)
}

/// A subscriber connection that stops answering (nothing closes it) is found out with a
/// PING and replaced: a topic joined afterwards reaches Redis on a new connection, and
/// the reconnection is counted.
#[test]
fn a_subscribe_after_the_subscriber_connection_went_silent_reaches_redis() {
    let (redis, silent) = silent_after_first_subscribe();
    let (server, backplane) = start(&redis);
    assert!(eventually(Duration::from_secs(5), || silent
        .lock()
        .unwrap()
        .is_some()));
    let silent = silent.lock().unwrap().unwrap();
    backplane.subscribe(b"room");
    assert!(
        eventually(Duration::from_secs(10), || redis
            .commands("SUBSCRIBE")
            .iter()
            .any(
                |(conn, args, _)| *conn != silent && args.contains(&b"wsd:room".to_vec())
            )),
        "the topic never reached Redis on a new connection: {:?}",
        redis.seen()
    );
    assert!(backplane.stats().reconnects >= 1);
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// An idle subscriber connection that stops answering is pinged, and replaced when the
/// PING gets no answer.
#[test]
fn an_idle_subscriber_connection_that_stops_answering_is_replaced() {
    let (redis, silent) = silent_after_first_subscribe();
    let (server, backplane) = start(&redis);
    assert!(eventually(Duration::from_secs(5), || silent
        .lock()
        .unwrap()
        .is_some()));
    let silent = silent.lock().unwrap().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || redis
            .connections_sending("SUBSCRIBE")
            .iter()
            .any(|&conn| conn != silent)),
        "no new subscriber connection: {:?}",
        redis.seen()
    );
    assert!(
        redis
            .commands("PING")
            .iter()
            .any(|(conn, _, _)| *conn == silent),
        "the silent connection was never pinged"
    );
    assert!(redis.closed(silent), "the silent connection was not closed");
    assert!(backplane.stats().reconnects >= 1);
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// At shutdown the subscriber thread closes its connection by itself, though the
/// publisher's wake-up cannot reach it (here every `PUBLISH` gets the connection closed,
/// and the fake routes nothing).
#[test]
fn shutdown_closes_the_subscriber_connection_without_the_wake_up() {
    let redis = FakeRedis::closing_at("PUBLISH");
    let (server, backplane) = start(&redis);
    redis.wait_for("SUBSCRIBE");
    let subscriber = redis.connections_sending("SUBSCRIBE")[0];
    backplane.publish(b"room", b"x", MessageType::Text);
    assert!(!backplane.is_stopped());
    server.shutdown(Duration::from_millis(100)).unwrap();
    // The shutdown waited for the backplane's threads (they used to run on for up to
    // the subscriber's 250 ms poll).
    assert!(
        backplane.is_stopped(),
        "a backplane thread outlived shutdown"
    );
    assert!(
        eventually(Duration::from_secs(3), || redis.closed(subscriber)),
        "the subscriber's connection is still open after shutdown"
    );
}

/// A `PUBLISH` that Redis refuses (`-NOPERM` for one channel) costs that message only:
/// the others of its pipeline count as sent, and the connection is kept.
#[test]
fn a_refused_publish_is_counted_alone_and_keeps_the_connection() {
    let redis = FakeRedis::start(|conn, args| {
        if args[0].eq_ignore_ascii_case(b"PUBLISH") && args[1] == b"wsd:denied" {
            Act::Reply(NOPERM.to_vec())
        } else {
            conn.answer(args)
        }
    });
    let (server, backplane) = start(&redis);
    for _ in 0..5 {
        backplane.publish(b"ok", b"1", MessageType::Text);
        backplane.publish(b"denied", b"2", MessageType::Text);
        backplane.publish(b"ok", b"3", MessageType::Binary);
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            let stats = backplane.stats();
            stats.sent + stats.dropped == 15
        }),
        "{:?}",
        backplane.stats()
    );
    let stats = backplane.stats();
    assert_eq!((stats.sent, stats.dropped, stats.reconnects), (10, 5, 0));
    assert_eq!(redis.connections_sending("PUBLISH").len(), 1);
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// A Redis that accepts connections but drops each one at its first `PUBLISH` is retried
/// with a growing backoff (50 ms doubling), not every 50 ms forever.
#[test]
fn a_publisher_connection_that_fails_each_time_backs_off() {
    let redis = FakeRedis::closing_at("PUBLISH");
    let (server, backplane) = start(&redis);
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        backplane.publish(b"room", b"x", MessageType::Text);
        std::thread::sleep(Duration::from_millis(10));
    }
    // 50 + 100 + 200 + 400 ms of backoff fit in 1.5 s after the first try (the next
    // waits 800 ms): 5 connections; 30 with the backoff stuck at 50 ms.
    let tries = redis.connections_sending("PUBLISH").len();
    assert!(
        (2..=7).contains(&tries),
        "{tries} publishing connections in 1.5 s"
    );
    assert!(backplane.stats().dropped > 0);
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// Redis closing an idle publishing connection (its `timeout`, a load balancer) does not
/// cost the next batch: the publisher checks a connection idle for over a second before
/// sending on it, and sends on a new one.
#[test]
fn a_publisher_connection_closed_while_idle_loses_nothing() {
    let redis = FakeRedis::start(|conn, args| {
        if args[0].eq_ignore_ascii_case(b"PUBLISH") {
            conn.idle_close = Some(Duration::from_millis(300));
        }
        conn.answer(args)
    });
    let (server, backplane) = start(&redis);
    backplane.publish(b"room", b"first", MessageType::Text);
    assert!(eventually(Duration::from_secs(5), || backplane
        .stats()
        .sent
        == 1));
    let first = redis.connections_sending("PUBLISH")[0];
    // The fake hangs up after 300 ms without a command.
    std::thread::sleep(Duration::from_millis(1500));
    backplane.publish(b"room", b"second", MessageType::Text);
    assert!(
        eventually(Duration::from_secs(5), || redis
            .commands("PUBLISH")
            .iter()
            .any(
                |(conn, args, _)| *conn != first && args[1].ends_with(b"second")
            )),
        "the batch after the idle close was lost: {:?}",
        backplane.stats()
    );
    let stats = backplane.stats();
    assert_eq!((stats.sent, stats.dropped), (2, 0));
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// A `SUBSCRIBE` that Redis refuses (`-NOPERM`: an ACL) is not taken for a subscription:
/// it is tried again (with backoff) until Redis accepts it.
#[test]
fn a_refused_subscribe_is_tried_again() {
    let refused = Arc::new(AtomicBool::new(false));
    let once = refused.clone();
    let redis = FakeRedis::start(move |conn, args| {
        if args[0].eq_ignore_ascii_case(b"SUBSCRIBE")
            && args[1..].iter().any(|a| a == b"wsd:room")
            && !once.swap(true, Ordering::SeqCst)
        {
            Act::Reply(NOPERM.to_vec())
        } else {
            conn.answer(args)
        }
    });
    let (server, backplane) = start(&redis);
    redis.wait_for("SUBSCRIBE");
    backplane.subscribe(b"room");
    let tries = || {
        redis
            .commands("SUBSCRIBE")
            .iter()
            .filter(|(_, args, _)| args.contains(&b"wsd:room".to_vec()))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(5), || tries() >= 2),
        "the refused SUBSCRIBE was not tried again: {:?}",
        redis.seen()
    );
    assert!(refused.load(Ordering::SeqCst));
    // Accepted the second time: no more tries (nor reconnections).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tries(), 2);
    assert_eq!(redis.connections_sending("SUBSCRIBE").len(), 1);
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// A Redis that accepts the connection and its handshake but hangs up at `SUBSCRIBE` is
/// retried with a growing backoff, not in a tight loop.
#[test]
fn a_subscriber_connection_that_fails_at_once_backs_off() {
    let redis = FakeRedis::closing_at("SUBSCRIBE");
    let (server, _backplane) = start(&redis);
    redis.wait_for("SUBSCRIBE");
    std::thread::sleep(Duration::from_millis(1200));
    let first = redis.commands("SUBSCRIBE")[0].2;
    let within_a_second = redis
        .commands("SUBSCRIBE")
        .iter()
        .filter(|(_, _, at)| at.duration_since(first) <= Duration::from_secs(1))
        .count();
    // 50 + 100 + 200 + 400 ms of backoff: 5 tries in the first second.
    assert!(
        (2..=6).contains(&within_a_second),
        "{within_a_second} subscriber connections in 1 s"
    );
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// A message that arrives in two pieces, with a pause longer than the subscriber's read
/// timeout between them, is read whole: the timeout loses nothing of what was read.
#[test]
fn a_message_split_by_a_pause_arrives_whole() {
    let redis = FakeRedis::start(|conn, args| {
        let Act::Reply(confirmation) = conn.answer(args) else {
            unreachable!()
        };
        if !(args[0].eq_ignore_ascii_case(b"SUBSCRIBE") && args[1] == b"wsd:room") {
            return Act::Reply(confirmation);
        }
        // Text from another node (id 0xabab…).
        let mut payload = vec![1, 1];
        payload.extend_from_slice(&[0xab; 8]);
        payload.extend_from_slice(&vec![b'x'; 100_000]);
        let message = array(&[bulk(b"message"), bulk(b"wsd:room"), bulk(&payload)]);
        let (head, tail) = message.split_at(message.len() / 2);
        let mut first = confirmation;
        first.extend_from_slice(head);
        Act::Pieces(vec![first, tail.to_vec()], Duration::from_millis(700))
    });
    let (server, backplane) = start(&redis);
    backplane.subscribe(b"room");
    assert!(
        eventually(Duration::from_secs(5), || backplane.stats().received == 1),
        "{:?}",
        backplane.stats()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(backplane.stats().reconnects, 0);
    assert_eq!(redis.connections_sending("SUBSCRIBE").len(), 1);
    server.shutdown(Duration::from_millis(100)).unwrap();
}

/// `connect` gives up on a Redis that completes the handshake and then never answers
/// the probe `PING`, instead of waiting forever.
#[test]
fn connect_gives_up_on_a_redis_that_stalls_after_the_handshake() {
    let redis = FakeRedis::start(|conn, args| {
        if args[0].eq_ignore_ascii_case(b"PING") {
            Act::Silent
        } else {
            conn.answer(args)
        }
    });
    let url = redis.url();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(RedisBackplane::connect(&url).map(|_| ()));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connect still waiting after 10 s");
    assert!(result.is_err(), "a stalled PING was taken for an answer");
    assert_eq!(redis.commands("PING").len(), 1);
}

/// The fake itself: a healthy policy answers the crate's handshake, `PING` and
/// `SUBSCRIBE` as Redis does (a check on the helpers the tests above rely on).
#[test]
fn the_fake_answers_like_redis() {
    let redis = FakeRedis::start(|conn, args| conn.answer(args));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    redis::cmd("PING").exec(&mut con).unwrap();
    let n: i64 = redis::cmd("PUBLISH")
        .arg("a")
        .arg("b")
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 0);
    let mut pubsub = con.as_pubsub();
    pubsub.subscribe("x").unwrap();
    let pong: Vec<String> = pubsub.ping().unwrap();
    assert_eq!(pong, ["pong", ""]);
    assert_eq!(
        redis.connections_sending("PING"),
        [redis.connections_sending("SUBSCRIBE")[0]]
    );
}
