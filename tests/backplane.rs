//! Pub/sub across processes through Redis (feature `redis`): two `examples/pubsub`
//! processes share one Redis (started here, on a free loopback port, without
//! persistence); clients subscribe on each.
//!
//! `.ci/run` installs `redis-server` when it is missing; without it these tests fail with
//! a clear message rather than pass.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Owned, TestClient, eventually};

/// A child process killed (and reaped) however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis on `port`, without persistence; waits until it answers.
fn start_redis(port: u16) -> Reaped {
    let redis = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}): install it (apt-get install redis-server)")
        });
    let redis = Reaped(redis);
    assert!(
        eventually(Duration::from_secs(10), || redis_command(port, &["PING"])
            .is_some_and(|r| r == "+PONG")),
        "redis-server did not answer on port {port}"
    );
    redis
}

/// One command over RESP; the first line of the answer.
fn redis_command(port: u16, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(command.as_bytes()).ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let line = line.trim_end().to_string();
    if line.starts_with('*') {
        // PUBSUB NUMSUB ch → *2 $len ch :count: the count is the answer.
        let mut rest = String::new();
        for _ in 0..3 {
            rest.clear();
            reader.read_line(&mut rest).ok()?;
        }
        return Some(rest.trim_end().to_string());
    }
    Some(line)
}

/// Redis's count of subscribers (processes) of `channel`.
fn numsub(port: u16, channel: &str) -> Option<String> {
    redis_command(port, &["PUBSUB", "NUMSUB", channel])
}

/// `examples/pubsub` (with the `redis` feature) using the Redis on `redis_port`.
fn start_node(redis_port: u16) -> (Reaped, SocketAddr) {
    start_example("pubsub", redis_port)
}

/// An example (with the `redis` feature) using the Redis on `redis_port`; it names its
/// address on its first line.
fn start_example(name: &str, redis_port: u16) -> (Reaped, SocketAddr) {
    let binary = support::example_binary(name, &["redis"]);
    let mut child = Command::new(binary)
        .args([
            "--addr",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--redis",
            &format!("redis://127.0.0.1:{redis_port}/"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let node = Reaped(child);
    let mut lines = BufReader::new(stderr).lines();
    let line = lines.next().expect("the node's first line").unwrap();
    let addr = line
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ' ']).next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap();
    std::thread::spawn(move || for _ in lines {});
    (node, addr)
}

/// A counter from the node's `GET /stats`.
fn stat(node: SocketAddr, name: &str) -> u64 {
    let mut stream = TcpStream::connect(node).unwrap();
    stream
        .write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let key = format!("\"{name}\":");
    let at = response.find(&key).unwrap_or_else(|| panic!("{response}")) + key.len();
    response[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn message(n: usize) -> Owned {
    if n.is_multiple_of(2) {
        Owned::Text(format!("text {n}"))
    } else {
        Owned::Binary(format!("binary {n}").into_bytes())
    }
}

/// Every message of a 10 000-message burst (text and binary, alternating) published on
/// node A arrives once and in order at subscribers on both nodes; then unsubscribing (the
/// clients leave) takes the nodes off the topic's Redis channel.
#[test]
fn burst_on_one_node_reaches_both_once_and_in_order_then_unsubscribe() {
    const BURST: usize = 10_000;
    let redis_port = free_port();
    let _redis = start_redis(redis_port);
    let (_a, a) = start_node(redis_port);
    let (_b, b) = start_node(redis_port);
    let mut publisher = TestClient::connect(a, "/room").unwrap();
    let on_a = TestClient::connect(a, "/room").unwrap();
    let on_b = TestClient::connect(b, "/room").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || numsub(redis_port, "wsd:/room")
            .is_some_and(|n| n == ":2")),
        "both nodes should subscribe to the topic's channel"
    );
    let readers: Vec<_> = [on_a, on_b]
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                for n in 0..BURST {
                    assert_eq!(client.next_message().unwrap(), message(n));
                }
                client
            })
        })
        .collect();
    let writer = std::thread::spawn(move || {
        for n in 0..BURST {
            match message(n) {
                Owned::Text(t) => publisher.driver.send_text(&t).unwrap(),
                Owned::Binary(b) => publisher.driver.send_binary(&b).unwrap(),
                _ => unreachable!(),
            };
            if n % 64 == 63 {
                publisher.flush().unwrap();
            }
        }
        publisher.flush().unwrap();
        // The publisher is a subscriber too (the example publishes to everyone).
        for n in 0..BURST {
            assert_eq!(publisher.next_message().unwrap(), message(n));
        }
        publisher
    });
    let mut publisher = writer.join().unwrap();
    let mut clients: Vec<TestClient> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    // Exactly once: the next message anyone sees is a marker sent after the burst.
    publisher.send_text("marker").unwrap();
    for client in clients.iter_mut().chain(std::iter::once(&mut publisher)) {
        assert_eq!(client.next_message().unwrap(), Owned::Text("marker".into()));
    }
    assert_eq!(stat(b, "backplane_received"), BURST as u64 + 1);
    assert_eq!(
        stat(a, "backplane_received"),
        0,
        "A got its own messages back"
    );

    // B's only subscriber leaves: B leaves the channel; then A's leave too.
    drop(clients.pop());
    assert!(
        eventually(Duration::from_secs(10), || numsub(redis_port, "wsd:/room")
            .is_some_and(|n| n == ":1")),
        "node B still subscribed"
    );
    drop(clients);
    drop(publisher);
    assert!(
        eventually(Duration::from_secs(10), || numsub(redis_port, "wsd:/room")
            .is_some_and(|n| n == ":0")),
        "a node still subscribed"
    );
}

/// Redis dies mid-stream: both nodes keep serving their own subscribers, the cross-node
/// messages are counted as dropped, and once Redis is back (same port) cross-node delivery
/// resumes without restarting either node.
#[test]
fn redis_outage_keeps_local_delivery_and_recovers() {
    let redis_port = free_port();
    let redis = start_redis(redis_port);
    let (_a, a) = start_node(redis_port);
    let (_b, b) = start_node(redis_port);
    let mut on_a = TestClient::connect(a, "/news").unwrap();
    let mut on_b = TestClient::connect(b, "/news").unwrap();
    assert!(eventually(Duration::from_secs(10), || numsub(
        redis_port,
        "wsd:/news"
    )
    .is_some_and(|n| n == ":2")));
    on_a.send_text("before").unwrap();
    assert_eq!(on_a.next_message().unwrap(), Owned::Text("before".into()));
    assert_eq!(on_b.next_message().unwrap(), Owned::Text("before".into()));

    drop(redis);
    // Local delivery goes on on both nodes; what A sends for B is dropped and counted.
    for n in 0..20 {
        on_a.send_text(&format!("during {n}")).unwrap();
        assert_eq!(
            on_a.next_message().unwrap(),
            Owned::Text(format!("during {n}"))
        );
        on_b.send_text(&format!("b during {n}")).unwrap();
        assert_eq!(
            on_b.next_message().unwrap(),
            Owned::Text(format!("b during {n}"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(stat(a, "backplane_dropped") > 0, "no drop counted on A");
    assert!(stat(b, "backplane_dropped") > 0, "no drop counted on B");

    let _redis = start_redis(redis_port);
    // The nodes reconnect with backoff (at most 2 s apart) and subscribe again.
    assert!(
        eventually(Duration::from_secs(20), || numsub(redis_port, "wsd:/news")
            .is_some_and(|n| n == ":2")),
        "the nodes did not subscribe again"
    );
    // Publish until one crosses (the publisher's own connection may still be in its
    // backoff); everything B gets from now on is in order.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "cross-node delivery did not resume"
        );
        on_a.send_text(&format!("after {n}")).unwrap();
        assert_eq!(
            on_a.next_message().unwrap(),
            Owned::Text(format!("after {n}"))
        );
        n += 1;
        if stat(b, "backplane_received") > 1 {
            break on_b.next_message().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Owned::Text(first) = first else {
        panic!("expected text, got {first:?}")
    };
    let first: usize = first.strip_prefix("after ").unwrap().parse().unwrap();
    for m in first + 1..n {
        assert_eq!(
            on_b.next_message().unwrap(),
            Owned::Text(format!("after {m}"))
        );
    }
    assert!(stat(a, "backplane_reconnects") >= 1);
    assert!(stat(b, "backplane_reconnects") >= 1);
}

/// A node whose connection for publishing was cut (Redis killed it; its subscriber
/// connection stays) still joins the Redis channel of a topic that gets its first local
/// subscriber then, with nothing published on that node: the failed wake-up of its
/// subscriber thread is tried again after the backoff.
#[test]
fn a_topic_joined_while_publishing_is_cut_is_still_subscribed() {
    let redis_port = free_port();
    let _redis = start_redis(redis_port);
    let (_b, b) = start_node(redis_port);
    let _first = TestClient::connect(b, "/first").unwrap();
    assert!(eventually(Duration::from_secs(10), || numsub(
        redis_port,
        "wsd:/first"
    )
    .is_some_and(|n| n == ":1")));
    // Every client but pub/sub ones (and this command's own): the node's publishing
    // connection. The subscriber notices a new topic by itself within its read timeout, so
    // the subscription above can land before the publisher (woken by the same join) has
    // connected: kill until there was one connection to kill.
    assert!(
        eventually(Duration::from_secs(10), || redis_command(
            redis_port,
            &["CLIENT", "KILL", "TYPE", "normal"]
        )
        .is_some_and(|killed| killed == ":1")),
        "the node's one publishing connection never appeared"
    );
    let _second = TestClient::connect(b, "/second").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || numsub(
            redis_port,
            "wsd:/second"
        )
        .is_some_and(|n| n == ":1")),
        "the node never subscribed to the new topic's channel"
    );
    assert!(stat(b, "backplane_reconnects") >= 1);
}

/// Two chat servers on two ports share rooms: a line sent on one reaches the same room on
/// the other, and not another room.
#[test]
fn two_chat_servers_share_rooms() {
    let redis_port = free_port();
    let _redis = start_redis(redis_port);
    let (_a, a) = start_example("chat", redis_port);
    let (_b, b) = start_example("chat", redis_port);
    let mut alice = TestClient::connect(a, "/ws?room=alpha&nick=alice").unwrap();
    let mut bob = TestClient::connect(b, "/ws?room=alpha&nick=bob").unwrap();
    let mut carol = TestClient::connect(b, "/ws?room=beta&nick=carol").unwrap();
    for client in [&mut alice, &mut bob, &mut carol] {
        let Owned::Text(welcome) = client.next_message().unwrap() else {
            panic!("expected a welcome")
        };
        assert!(welcome.contains(r#""type":"welcome""#), "{welcome}");
    }
    assert!(eventually(Duration::from_secs(10), || numsub(
        redis_port,
        "chat:room:alpha"
    )
    .is_some_and(|n| n == ":2")));
    alice.send_text("hello from A").unwrap();
    for client in [&mut alice, &mut bob] {
        let line = loop {
            let Owned::Text(line) = client.next_message().unwrap() else {
                panic!("expected text")
            };
            if line.contains(r#""type":"message""#) {
                break line;
            }
        };
        assert!(line.contains(r#""text":"hello from A""#), "{line}");
        assert!(line.contains(r#""nick":"alice""#), "{line}");
    }
    // carol (room beta, on B) got nothing of alpha: her next message is her own line.
    carol.send_text("beta only").unwrap();
    let Owned::Text(line) = carol.next_message().unwrap() else {
        panic!("expected text")
    };
    assert!(line.contains(r#""text":"beta only""#), "{line}");
}
