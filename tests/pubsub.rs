//! Pub/sub on the reactor, both backends, several loops: every subscriber on every loop
//! gets every message of a burst once and in order; unsubscribe and close stop delivery;
//! a subscriber that never reads is held to the output cap (dropped or closed, per
//! policy) while the others get everything; many topics; the limits of topic names;
//! subscribers joining and leaving while three publishers run.
//!
//! The test server is driven by its clients' messages: `sub:T`, `unsub:T`, `pub:T:DATA`
//! (to every subscriber of T but the sender), `all:T:DATA` (to every subscriber),
//! `topics` and `count:T` (answered to the sender), `rejoin:T` (publishes around
//! leaving and joining T again, all in one turn), `farewell:T` (publish "bye" to T when
//! closed), `close` (the server starts the close handshake) and `mixed:T` (sends and
//! publishes to T, interleaved, by every way a handler has).

mod support;

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Owned, TestClient, eventually};
use websocket_driver::server::{
    BackpressurePolicy, Handler, MAX_TOPIC_LEN, Server, ServerConfig, ServerHandle, Upgrade, Ws,
};
use websocket_driver::{Backend, Error, Message, MessageType, UsageError};

/// Loops per test server: enough that subscribers spread over several.
const LOOPS: usize = 3;

/// These tests hold many sockets and some read RSS: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Subscribes to its request path (without the leading `/`, unless empty) on open, then
/// obeys its client's commands.
/// What `close-and-look` saw.
static SEEN_AFTER_CLOSE: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Member {
    topic: String,
    farewell: Option<String>,
}

impl Handler for Member {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        if !self.topic.is_empty() {
            ws.subscribe(&self.topic).expect("subscribe on open");
        }
    }

    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let Some(text) = message.as_text() else {
            return;
        };
        let reply = match text.split_once(':') {
            Some(("sub", topic)) => match ws.subscribe(topic) {
                Ok(new) => Some(format!("subscribed {new}")),
                Err(e) => Some(format!("error {e}")),
            },
            Some(("unsub", topic)) => Some(format!("unsubscribed {}", ws.unsubscribe(topic))),
            Some(("count", topic)) => Some(format!("count {}", ws.subscribers(topic))),
            Some(("mixed", topic)) => {
                // Its own `Sender`, `publish_all` and a `Publisher`, in one turn, in this
                // order: the connection (subscribed to T) gets them in this order.
                let sender = ws.sender();
                let publisher = ws.publisher();
                let text = MessageType::Text;
                sender.send_text("sender 1").unwrap();
                ws.publish_all(topic, b"publish_all 1", text).unwrap();
                publisher.publish(topic, b"publisher 1", text).unwrap();
                sender.send_text("sender 2").unwrap();
                ws.publish_all(topic, b"publish_all 2", text).unwrap();
                publisher.publish(topic, b"publisher 2", text).unwrap();
                None
            }
            Some(("farewell", topic)) => {
                self.farewell = Some(topic.to_string());
                Some("farewell set".to_string())
            }
            Some(("rejoin", topic)) => {
                // Publications still on their way (in this loop's inbox) when this
                // connection leaves and joins again, by both ways a handler publishes,
                // before, between and after.
                let publisher = ws.publisher();
                let publish = |ws: &mut Ws<'_>, data: &str| {
                    let text = MessageType::Text;
                    let by_publisher = format!("publisher {data}");
                    publisher
                        .publish(topic, by_publisher.as_bytes(), text)
                        .unwrap();
                    let by_handler = format!("publish_all {data}");
                    ws.publish_all(topic, by_handler.as_bytes(), text).unwrap();
                };
                publish(ws, "before");
                ws.unsubscribe(topic);
                publish(ws, "between");
                ws.subscribe(topic).unwrap();
                publish(ws, "after");
                Some("rejoined".to_string())
            }
            Some(("is", topic)) => Some(format!("is {}", ws.is_subscribed(topic))),
            Some((verb @ ("pub" | "all"), rest)) => {
                let (topic, data) = rest.split_once(':').expect("pub:T:DATA");
                let result = match verb {
                    "pub" => ws.publish(topic, data.as_bytes(), MessageType::Text),
                    _ => ws.publish_all(topic, data.as_bytes(), MessageType::Text),
                };
                result.err().map(|e| format!("error {e}"))
            }
            None if text == "close" => {
                ws.close_connection(1000, "").unwrap();
                None
            }
            Some(("close-and-look", topic)) => {
                // What the connection's topics look like right after its own close, in
                // the same handler call (it can no longer answer: recorded instead).
                ws.close_connection(1000, "").unwrap();
                let seen = format!(
                    "is {} subscribers {} topics {} subscribe {}",
                    ws.is_subscribed(topic),
                    ws.subscribers(topic),
                    ws.topics().len(),
                    ws.subscribe(topic).is_ok(),
                );
                SEEN_AFTER_CLOSE.lock().unwrap().push(seen);
                None
            }
            None if text == "topics" => {
                let topics: BTreeSet<String> = ws
                    .topics()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string())
                    .collect();
                Some(format!("topics {topics:?}"))
            }
            _ => None,
        };
        if let Some(reply) = reply {
            let _ = ws.send_text(&reply);
        }
    }

    fn on_close(&mut self, ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        if let Some(topic) = &self.farewell {
            ws.publish_all(topic, b"bye", MessageType::Text).unwrap();
        }
    }
}

fn start(backend: Backend, config: ServerConfig) -> ServerHandle {
    start_with_loops(backend, LOOPS, config)
}

fn start_with_loops(backend: Backend, loops: usize, config: ServerConfig) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: loops,
            backend,
            ..config
        })
        .start(|request| {
            Upgrade::Accept(Member {
                topic: request.path().trim_start_matches('/').to_string(),
                farewell: None,
            })
        })
        .unwrap()
}

fn text(client: &mut TestClient) -> String {
    match client.next_message().unwrap() {
        Owned::Text(t) => t,
        other => panic!("expected a text message, got {other:?}"),
    }
}

fn subscribers(server: &ServerHandle, topic: &str, n: usize) {
    assert!(
        eventually(Duration::from_secs(10), || server.subscribers(topic) == n),
        "{topic}: {} subscribers, expected {n}",
        server.subscribers(topic)
    );
}

/// 30 subscribers (spread over the loops by the kernel's SO_REUSEPORT hash) each get all
/// 10 000 messages published from another thread, once and in order; then 10 000 more,
/// published by one of them inside its handler with `publish_all`, reach all of them, the
/// publisher included, in order.
fn burst_reaches_every_subscriber_once_and_in_order(backend: Backend) {
    let _turn = turn();
    const SUBSCRIBERS: usize = 30;
    const BURST: usize = 10_000;
    let server = start(backend, ServerConfig::default());
    let addr = server.local_addr();
    let clients: Vec<TestClient> = (0..SUBSCRIBERS)
        .map(|_| TestClient::connect(addr, "/burst").unwrap())
        .collect();
    subscribers(&server, "burst", SUBSCRIBERS);

    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            std::thread::spawn(move || {
                for round in ["handle", "handler"] {
                    for n in 0..BURST {
                        assert_eq!(text(&mut client), format!("{round} {n}"), "client {i}");
                    }
                    if round == "handle" && i == 0 {
                        // This client publishes the second burst from inside its handler.
                        for n in 0..BURST {
                            client.send_text(&format!("all:burst:handler {n}")).unwrap();
                        }
                    }
                }
                client
            })
        })
        .collect();
    for n in 0..BURST {
        server
            .publish("burst", format!("handle {n}").as_bytes(), MessageType::Text)
            .unwrap();
    }
    let mut clients: Vec<TestClient> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    // Nothing more is queued for anyone: the next message is the answer to a command.
    clients[0].send_text("count:burst").unwrap();
    assert_eq!(text(&mut clients[0]), format!("count {SUBSCRIBERS}"));
    let stats = server.stats();
    assert_eq!(stats.published, 2 * BURST as u64);
    assert_eq!(stats.delivered, (2 * BURST * SUBSCRIBERS) as u64);
    assert_eq!(stats.dropped, 0);
    drop(clients);
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// A subscription gets what is published after it and nothing from before, even what was
/// still on its way to the loop when it was made: a connection that leaves and joins again
/// in one turn gets only the publications made after it joined again, while one that stayed
/// gets them all. Once with the rejoining connection the only subscriber (so publishes made
/// while it was out skip its loop), once with company (one loop, so they share it).
fn a_subscription_gets_what_is_published_after_it(backend: Backend) {
    let _turn = turn();
    let server = start_with_loops(backend, 1, ServerConfig::default());
    let addr = server.local_addr();
    for company in [false, true] {
        let topic = format!("rejoin-{company}");
        let mut rejoiner = TestClient::connect(addr, &format!("/{topic}")).unwrap();
        let mut stayer = company.then(|| TestClient::connect(addr, &format!("/{topic}")).unwrap());
        subscribers(&server, &topic, 1 + company as usize);
        rejoiner.send_text(&format!("rejoin:{topic}")).unwrap();
        let got: Vec<String> = (0..3).map(|_| text(&mut rejoiner)).collect();
        // The answer (sent at once), then the two "after" ones in the order they were
        // made; nothing published before the second subscribe.
        assert_eq!(
            got,
            ["rejoined", "publisher after", "publish_all after"],
            "company: {company}"
        );
        rejoiner.send_text("count:nothing").unwrap();
        assert_eq!(text(&mut rejoiner), "count 0", "company: {company}");
        if let Some(stayer) = &mut stayer {
            let got: Vec<String> = (0..6).map(|_| text(stayer)).collect();
            assert_eq!(
                got,
                [
                    "publisher before",
                    "publish_all before",
                    "publisher between",
                    "publish_all between",
                    "publisher after",
                    "publish_all after"
                ]
            );
        }
    }
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// A connection the server starts closing leaves its topics at once (it takes no more
/// messages), not when the peer answers: here the peer never answers, and the close
/// handshake would wait for a minute.
fn a_connection_closed_by_the_server_leaves_its_topics_at_once(backend: Backend) {
    let _turn = turn();
    let server = start(
        backend,
        ServerConfig {
            close_timeout: Duration::from_secs(60),
            ..ServerConfig::default()
        },
    );
    let addr = server.local_addr();
    let mut leaving = TestClient::connect(addr, "/closing").unwrap();
    let staying = TestClient::connect(addr, "/closing").unwrap();
    subscribers(&server, "closing", 2);
    leaving.send_text("close").unwrap();
    subscribers(&server, "closing", 1);
    drop((leaving, staying));
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// A connection that closes itself has left its topics by the time `close_connection`
/// returns (it said it was still subscribed until its handler returned), and after the
/// server's shutdown a publish fails instead of being counted.
fn a_closing_connection_leaves_at_once_and_a_stopped_server_refuses_publishes(backend: Backend) {
    let _turn = turn();
    let server = start(backend, ServerConfig::default());
    let addr = server.local_addr();
    let mut closing = TestClient::connect(addr, "/look").unwrap();
    let mut staying = TestClient::connect(addr, "/look").unwrap();
    subscribers(&server, "look", 2);
    SEEN_AFTER_CLOSE.lock().unwrap().clear();
    closing.send_text("close-and-look:look").unwrap();
    assert!(matches!(
        closing.next_message().unwrap(),
        Owned::Close(1000, _)
    ));
    assert_eq!(
        *SEEN_AFTER_CLOSE.lock().unwrap(),
        ["is false subscribers 1 topics 0 subscribe false"]
    );
    subscribers(&server, "look", 1);
    server
        .publish("look", b"still here", MessageType::Text)
        .unwrap();
    assert_eq!(text(&mut staying), "still here");
    let published = server.stats().published;
    assert_eq!(published, 1);
    drop((closing, staying));
    server.shutdown(Duration::from_secs(5)).unwrap();
    let after = server.publish("look", b"too late", MessageType::Text);
    assert!(
        matches!(&after, Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotConnected),
        "{after:?}"
    );
    assert!(
        server
            .publisher()
            .publish("look", b"x", MessageType::Text)
            .is_err()
    );
    assert_eq!(server.stats().published, published);
}

/// A publication made by a handler that runs late in a turn (here `on_close`, when the
/// close handshake's deadline drops a peer that never answered) reaches the subscribers on
/// its own loop in that turn, not whenever something else wakes the loop.
fn publications_from_late_handlers_leave_in_their_turn(backend: Backend) {
    let _turn = turn();
    let server = start_with_loops(
        backend,
        1,
        ServerConfig {
            close_timeout: Duration::from_millis(200),
            ..ServerConfig::default()
        },
    );
    let addr = server.local_addr();
    let mut listener = TestClient::connect(addr, "/farewells").unwrap();
    let mut leaver = TestClient::connect(addr, "/").unwrap();
    leaver.send_text("farewell:farewells").unwrap();
    assert_eq!(text(&mut leaver), "farewell set");
    // The leaver never answers the server's Close: 200 ms later the loop drops it (its
    // `on_close` publishes), and nothing else happens on the server. Once the drop shows
    // here as the end of the stream, the listener asks something: its answer must come
    // after "bye", which left in the turn of the drop, not with the next turn's output.
    leaver.send_text("close").unwrap();
    let mut buf = [0u8; 4096];
    while matches!(leaver.stream.read(&mut buf), Ok(n) if n > 0) {}
    listener.send_text("count:farewells").unwrap();
    assert_eq!(text(&mut listener), "bye");
    assert_eq!(text(&mut listener), "count 1");
    drop((leaver, listener));
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// A never-reading subscriber under `Close { grace: ZERO }` that passes the cap inside a run
/// of merged publications is refused once and closed, as with separate publications: the
/// rest of the run is not counted as dropped for a connection that has left.
fn a_subscriber_closed_inside_a_run_is_refused_once(backend: Backend) {
    let _turn = turn();
    let server = start_with_loops(
        backend,
        1,
        ServerConfig {
            max_backpressure: 64 * 1024,
            close_timeout: Duration::from_millis(300),
            backpressure_policy: BackpressurePolicy::Close {
                grace: Duration::ZERO,
            },
            ..ServerConfig::default()
        },
    );
    let addr = server.local_addr();
    let _slow = TestClient::connect(addr, "/flood").unwrap();
    let mut publisher = TestClient::connect(addr, "/").unwrap();
    subscribers(&server, "flood", 1);
    // 1 000-byte publications, many per turn: they merge into runs of about 16. The slow
    // subscriber's socket buffers fill first, then its output passes the cap.
    let command = format!("all:flood:{}", "x".repeat(1000));
    let mut sent = 0;
    while !server.stats().closes.contains_key(&1008) {
        assert!(sent < 100_000, "the slow subscriber was never closed");
        for _ in 0..200 {
            publisher.send_text(&command).unwrap();
        }
        sent += 200;
        publisher.send_text("count:flood").unwrap();
        // Everything sent so far is published once the answer is here.
        assert!(text(&mut publisher).starts_with("count "));
    }
    let stats = server.stats();
    assert!(stats.dropped <= 1, "{stats:?}");
    subscribers(&server, "flood", 0);
    drop((_slow, publisher));
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// A handler's sends through its own loop's `Sender`, its `publish_all`s and its
/// `Publisher`'s publishes, interleaved in one turn, reach a connection of that loop in the
/// order it made them (they all wait in the loop's inbox, which the turn drains before it
/// ends), and another loop's subscriber gets the publications in that order too.
fn a_handlers_sends_and_publishes_keep_their_order_on_its_loop(backend: Backend) {
    let _turn = turn();
    let server = start_with_loops(backend, 2, ServerConfig::default());
    let addr = server.local_addr();
    // Subscribers until both loops have one (the kernel spreads connections by hash).
    let mut clients = Vec::new();
    while clients.len() < 16 {
        clients.push(TestClient::connect(addr, "/mixed").unwrap());
    }
    subscribers(&server, "mixed", clients.len());
    let mut mixer = clients.remove(0);
    mixer.send_text("mixed:mixed").unwrap();
    let expected = [
        "sender 1",
        "publish_all 1",
        "publisher 1",
        "sender 2",
        "publish_all 2",
        "publisher 2",
    ];
    let got: Vec<String> = (0..6).map(|_| text(&mut mixer)).collect();
    assert_eq!(got, expected);
    for client in &mut clients {
        let got: Vec<String> = (0..4).map(|_| text(client)).collect();
        assert_eq!(
            got,
            [
                "publish_all 1",
                "publisher 1",
                "publish_all 2",
                "publisher 2"
            ]
        );
    }
    drop((mixer, clients));
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// One thread's direct sends (`Sender`) and publishes reach each subscriber in the order
/// the thread made them: a loop merges publications that wait in its inbox back to back,
/// but never across a send queued between them.
fn sends_and_publishes_from_one_thread_keep_their_order(backend: Backend) {
    let _turn = turn();
    const CLIENTS: usize = 6;
    const MESSAGES: usize = 6_000;
    struct Registered(Arc<Mutex<Vec<websocket_driver::server::Sender>>>);
    impl Handler for Registered {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            ws.subscribe("mix").unwrap();
            self.0.lock().unwrap().push(ws.sender());
        }
    }
    let senders = Arc::new(Mutex::new(Vec::new()));
    let registry = senders.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: LOOPS,
            backend,
            ..ServerConfig::default()
        })
        .start(move |_| Upgrade::Accept(Registered(registry.clone())))
        .unwrap();
    let clients: Vec<TestClient> = (0..CLIENTS)
        .map(|_| TestClient::connect(server.local_addr(), "/").unwrap())
        .collect();
    subscribers(&server, "mix", CLIENTS);
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            std::thread::spawn(move || {
                for n in 0..MESSAGES {
                    assert_eq!(text(&mut client), n.to_string(), "client {i}");
                }
            })
        })
        .collect();
    let senders = senders.lock().unwrap().clone();
    assert_eq!(senders.len(), CLIENTS);
    // Runs of publishes of varying length between the direct sends.
    for n in 0..MESSAGES {
        if n % 7 == 0 || n % 11 == 0 {
            for sender in &senders {
                while let Err(e) = sender.send_text(n.to_string()) {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        } else {
            server
                .publish("mix", n.to_string().as_bytes(), MessageType::Text)
                .unwrap();
        }
    }
    for reader in readers {
        reader.join().unwrap();
    }
    assert_eq!(server.stats().dropped, 0);
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// `publish` leaves the sender out; `unsubscribe` and closing stop delivery and the
/// counts follow.
fn unsubscribe_and_close_stop_delivery(backend: Backend) {
    let _turn = turn();
    let server = start(backend, ServerConfig::default());
    let addr = server.local_addr();
    let mut a = TestClient::connect(addr, "/news").unwrap();
    let mut b = TestClient::connect(addr, "/news").unwrap();
    let mut c = TestClient::connect(addr, "/news").unwrap();
    subscribers(&server, "news", 3);

    // `pub` from a: b and c get it, a does not (its next message is its own reply).
    a.send_text("pub:news:from a").unwrap();
    assert_eq!(text(&mut b), "from a");
    assert_eq!(text(&mut c), "from a");
    a.send_text("is:news").unwrap();
    assert_eq!(text(&mut a), "is true");

    // b leaves the topic: it gets nothing more from it.
    b.send_text("unsub:news").unwrap();
    assert_eq!(text(&mut b), "unsubscribed true");
    b.send_text("unsub:news").unwrap();
    assert_eq!(text(&mut b), "unsubscribed false");
    subscribers(&server, "news", 2);
    b.send_text("sub:other").unwrap();
    assert_eq!(text(&mut b), "subscribed true");
    b.send_text("sub:other").unwrap();
    assert_eq!(text(&mut b), "subscribed false");
    server
        .publish("news", b"after unsubscribe", MessageType::Text)
        .unwrap();
    server
        .publish("other", b"marker", MessageType::Text)
        .unwrap();
    assert_eq!(text(&mut b), "marker", "b still got news");
    assert_eq!(text(&mut a), "after unsubscribe");
    assert_eq!(text(&mut c), "after unsubscribe");
    b.send_text("topics").unwrap();
    assert_eq!(text(&mut b), r#"topics {"other"}"#);

    // c closes: it leaves every topic.
    c.driver.close_connection(1000, "bye").unwrap();
    c.flush().unwrap();
    assert!(matches!(c.next_message().unwrap(), Owned::Close(1000, _)));
    subscribers(&server, "news", 1);
    server
        .publish("news", b"after close", MessageType::Text)
        .unwrap();
    assert_eq!(text(&mut a), "after close");
    // A topic without subscribers costs nothing and is no error.
    server.publish("nobody", b"x", MessageType::Binary).unwrap();
    assert_eq!(server.subscribers("nobody"), 0);
    drop((a, b, c));
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// Topic names: up to `MAX_TOPIC_LEN` bytes, one more is refused with a clear error (on
/// the connection and on the handle); only text (UTF-8) and binary can be published.
fn topic_limits_and_publishable_kinds(backend: Backend) {
    let _turn = turn();
    let server = start(backend, ServerConfig::default());
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    let at_limit = "t".repeat(MAX_TOPIC_LEN);
    client.send_text(&format!("sub:{at_limit}")).unwrap();
    assert_eq!(text(&mut client), "subscribed true");
    let over = "t".repeat(MAX_TOPIC_LEN + 1);
    client.send_text(&format!("sub:{over}")).unwrap();
    assert_eq!(
        text(&mut client),
        format!(
            "error topic of {} bytes is longer than the maximum of {MAX_TOPIC_LEN}",
            MAX_TOPIC_LEN + 1
        )
    );
    server
        .publish(&at_limit, b"at the limit", MessageType::Text)
        .unwrap();
    assert_eq!(text(&mut client), "at the limit");
    assert!(matches!(
        server.publish(&over, b"x", MessageType::Text),
        Err(Error::Usage(UsageError::TopicTooLong { len, max })) if len == MAX_TOPIC_LEN + 1 && max == MAX_TOPIC_LEN
    ));
    assert!(matches!(
        server.publish(&at_limit, &[0xff, 0xfe], MessageType::Text),
        Err(Error::Usage(UsageError::InvalidUtf8))
    ));
    assert!(matches!(
        server.publish(&at_limit, b"x", MessageType::Ping),
        Err(Error::Usage(UsageError::NotPublishable))
    ));
    server
        .publish(&at_limit, &[0xff, 0xfe], MessageType::Binary)
        .unwrap();
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Binary(vec![0xff, 0xfe])
    );
    drop(client);
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// 10 000 topics with 2 subscribers each (100 pairs of connections, each pair on 100
/// topics of its own): one publish per topic reaches exactly its two subscribers.
fn ten_thousand_topics_with_two_subscribers_each(backend: Backend) {
    let _turn = turn();
    const PAIRS: usize = 100;
    const PER_PAIR: usize = 100;
    let server = start(backend, ServerConfig::default());
    let addr = server.local_addr();
    let mut clients: Vec<TestClient> = (0..2 * PAIRS)
        .map(|_| TestClient::connect(addr, "/").unwrap())
        .collect();
    for (i, client) in clients.iter_mut().enumerate() {
        for t in 0..PER_PAIR {
            client
                .driver
                .send_text(&format!("sub:topic-{}", (i / 2) * PER_PAIR + t))
                .unwrap();
        }
        client.flush().unwrap();
    }
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            std::thread::spawn(move || {
                for _ in 0..PER_PAIR {
                    assert_eq!(text(&mut client), "subscribed true");
                }
                let mut got = BTreeSet::new();
                for _ in 0..PER_PAIR {
                    got.insert(text(&mut client));
                }
                let expected: BTreeSet<String> = (0..PER_PAIR)
                    .map(|t| format!("topic-{}", (i / 2) * PER_PAIR + t))
                    .collect();
                assert_eq!(got, expected, "client {i}");
                client
            })
        })
        .collect();
    for t in 0..PAIRS * PER_PAIR {
        subscribers(&server, &format!("topic-{t}"), 2);
    }
    for t in 0..PAIRS * PER_PAIR {
        let topic = format!("topic-{t}");
        server
            .publish(&topic, topic.as_bytes(), MessageType::Text)
            .unwrap();
    }
    for reader in readers {
        drop(reader.join().unwrap());
    }
    let stats = server.stats();
    assert_eq!(stats.delivered, (2 * PAIRS * PER_PAIR) as u64);
    // Every connection closed: every topic is gone.
    subscribers(&server, "topic-0", 0);
    subscribers(&server, &format!("topic-{}", PAIRS * PER_PAIR - 1), 0);
    server.shutdown(Duration::from_secs(5)).unwrap();
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// One subscriber never reads while 64 MiB of 64 KiB messages are published to its topic:
/// past the cap its deliveries are dropped and counted (default policy) or it is closed
/// with 1008 (`Close { grace: 0 }`); three readers get every message in order, and the
/// server's memory stays bounded (RSS growth under 48 MiB, sampled throughout).
fn never_reading_subscriber_is_held_to_the_cap(backend: Backend, policy: BackpressurePolicy) {
    let _turn = turn();
    const MESSAGES: usize = 1024;
    const SIZE: usize = 64 * 1024;
    let server = start(
        backend,
        ServerConfig {
            backpressure_policy: policy,
            ..ServerConfig::default()
        },
    );
    let addr = server.local_addr();
    let mut slow = TestClient::connect(addr, "/flood").unwrap();
    let readers: Vec<TestClient> = (0..3)
        .map(|_| TestClient::connect(addr, "/flood").unwrap())
        .collect();
    subscribers(&server, "flood", 4);
    let before = rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = rss_kib();
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib());
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(rss_kib())
        })
    };
    // How far each reader got: the publisher keeps within 8 messages (512 KiB, half the
    // cap) of the slowest reader, so readers are never over the cap; the slow subscriber
    // never reads at all.
    let progress: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let readers: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let progress = progress.clone();
            std::thread::spawn(move || {
                for n in 0..MESSAGES {
                    let Owned::Binary(payload) = client.next_message().unwrap() else {
                        panic!("expected binary");
                    };
                    assert_eq!(payload.len(), SIZE);
                    assert_eq!(payload[..8], (n as u64).to_le_bytes());
                    progress[i].store(n + 1, Ordering::Release);
                }
                client
            })
        })
        .collect();
    let mut payload = vec![0x5a; SIZE];
    for n in 0..MESSAGES {
        payload[..8].copy_from_slice(&(n as u64).to_le_bytes());
        server
            .publish("flood", &payload, MessageType::Binary)
            .unwrap();
        assert!(
            eventually(Duration::from_secs(20), || progress
                .iter()
                .all(|p| p.load(Ordering::Acquire) + 8 > n)),
            "a reader stopped"
        );
    }
    match policy {
        BackpressurePolicy::DropNew => assert!(
            eventually(Duration::from_secs(20), || {
                let stats = server.stats();
                stats.delivered + stats.dropped == 4 * MESSAGES as u64
            }),
            "not every publication was delivered or dropped"
        ),
        _ => assert!(
            eventually(Duration::from_secs(10), || server
                .stats()
                .closes
                .contains_key(&1008)),
            "the slow subscriber was not closed with 1008"
        ),
    }
    // The readers got everything; they stay connected until the end.
    let readers: Vec<TestClient> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let stats = server.stats();
    match policy {
        BackpressurePolicy::DropNew => {
            assert!(stats.dropped > 0, "nothing was dropped for the slow reader");
            assert_eq!(stats.delivered + stats.dropped, 4 * MESSAGES as u64);
            // The slow reader is still connected and gets what it was given, in order.
            let mut last = None;
            let mut got = 0;
            while got < stats.delivered as usize - 3 * MESSAGES {
                let Owned::Binary(payload) = slow.next_message().unwrap() else {
                    panic!("expected binary");
                };
                let n = u64::from_le_bytes(payload[..8].try_into().unwrap());
                assert!(last.is_none_or(|l| n > l), "out of order");
                last = Some(n);
                got += 1;
            }
            slow.send_text("count:flood").unwrap();
            assert_eq!(text(&mut slow), "count 4");
            assert!(stats.closes.is_empty(), "closed: {:?}", stats.closes);
        }
        _ => {
            // Closed: it left the topic. Its close frame sits behind the output it never
            // read, so it may or may not reach it before the connection is dropped.
            subscribers(&server, "flood", 3);
            assert_eq!(stats.closes.get(&1008), Some(&1));
            loop {
                match slow.next_event() {
                    // A frame cut by the drop reads as an error, then 1006.
                    Ok(Owned::Binary(_) | Owned::Error(_)) => continue,
                    Ok(Owned::Close(code, _)) => {
                        assert!(code == 1008 || code == 1006, "closed with {code}");
                        break;
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(_) => break,
                }
            }
        }
    }
    drop(readers);
    stop.store(true, Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    assert!(
        peak.saturating_sub(before) < 48 * 1024,
        "RSS grew by {} KiB",
        peak - before
    );
    drop(slow);
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// Subscribers join and leave all the time (half of them with the close handshake, half
/// by dropping TCP) while two threads publish through the server handle and a client
/// publishes from inside its handler: every subscriber sees each publisher's messages
/// with no gap, repeat or reordering from the first it gets to the last; nothing is
/// dropped; once all have left the topic has no subscribers, and a newcomer still gets
/// the next publish.
fn subscribers_come_and_go_during_publishes(backend: Backend) {
    let _turn = turn();
    const CHURNERS: usize = 12;
    const CYCLES: usize = 40;
    const READ: usize = 300;
    let server = start(
        backend,
        ServerConfig {
            max_backpressure: 16 << 20,
            ..ServerConfig::default()
        },
    );
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    // Publishers: "hN" from a handler (its client is subscribed to nothing), "aN" and
    // "bN" from two threads through the handle; 5 messages a millisecond each.
    let mut publishers = Vec::new();
    for name in ["a", "b"] {
        let (server, stop, published) = (server.clone(), stop.clone(), published.clone());
        publishers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..5 {
                    let data = format!("{name} {n}");
                    server
                        .publish("churn", data.as_bytes(), MessageType::Text)
                        .unwrap();
                    n += 1;
                }
                published.fetch_add(5, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    {
        let (stop, published) = (stop.clone(), published.clone());
        publishers.push(std::thread::spawn(move || {
            let mut client = TestClient::connect(addr, "/").unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..5 {
                    client.send_text(&format!("all:churn:h {n}")).unwrap();
                    n += 1;
                }
                published.fetch_add(5, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
            // Everything sent before is published once this answer comes back.
            client.send_text("count:churn").unwrap();
            assert!(text(&mut client).starts_with("count "));
        }));
    }
    let churners: Vec<_> = (0..CHURNERS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut received = 0u64;
                for cycle in 0..CYCLES {
                    let mut client = TestClient::connect(addr, "/churn").unwrap();
                    let mut last: [Option<u64>; 3] = [None; 3];
                    for _ in 0..READ {
                        let message = text(&mut client);
                        let (name, n) = message.split_once(' ').expect("NAME N");
                        let n: u64 = n.parse().unwrap();
                        let slot = &mut last[match name {
                            "a" => 0,
                            "b" => 1,
                            "h" => 2,
                            other => panic!("client {i}: from an unknown publisher {other:?}"),
                        }];
                        if let Some(before) = *slot {
                            assert_eq!(
                                n,
                                before + 1,
                                "client {i}, cycle {cycle}: {name} {n} after {before}"
                            );
                        }
                        *slot = Some(n);
                        received += 1;
                    }
                    if (i + cycle) % 2 == 0 {
                        // The close handshake: publications may still come before the
                        // server's close.
                        client.driver.close_connection(1000, "").unwrap();
                        client.flush().unwrap();
                        while !matches!(client.next_message().unwrap(), Owned::Close(..)) {}
                        assert!(client.wait_eof());
                    }
                    // Otherwise TCP just goes away with the client.
                }
                received
            })
        })
        .collect();
    let received: u64 = churners.into_iter().map(|c| c.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    for publisher in publishers {
        publisher.join().unwrap();
    }
    subscribers(&server, "churn", 0);
    let mut newcomer = TestClient::connect(addr, "/churn").unwrap();
    subscribers(&server, "churn", 1);
    server.publish("churn", b"last", MessageType::Text).unwrap();
    assert_eq!(text(&mut newcomer), "last");
    let stats = server.stats();
    assert_eq!(
        stats.published,
        published.load(Ordering::Relaxed) as u64 + 1
    );
    assert_eq!(stats.dropped, 0);
    assert_eq!(received, (CHURNERS * CYCLES * READ) as u64);
    assert!(stats.delivered >= received, "{stats:?}, {received} read");
    drop(newcomer);
    server.shutdown(Duration::from_secs(5)).unwrap();
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            use super::*;
            $(#[test] fn $name() { super::$name(Backend::Epoll) })*
        }
        #[cfg(target_os = "linux")]
        mod io_uring {
            use super::*;
            $(#[test] fn $name() { super::$name(Backend::IoUring) })*
        }
    };
}

on_both_backends!(
    burst_reaches_every_subscriber_once_and_in_order,
    sends_and_publishes_from_one_thread_keep_their_order,
    a_subscription_gets_what_is_published_after_it,
    a_handlers_sends_and_publishes_keep_their_order_on_its_loop,
    publications_from_late_handlers_leave_in_their_turn,
    a_connection_closed_by_the_server_leaves_its_topics_at_once,
    a_closing_connection_leaves_at_once_and_a_stopped_server_refuses_publishes,
    a_subscriber_closed_inside_a_run_is_refused_once,
    unsubscribe_and_close_stop_delivery,
    topic_limits_and_publishable_kinds,
    ten_thousand_topics_with_two_subscribers_each,
    slow_subscriber_dropped,
    slow_subscriber_closed,
    subscribers_come_and_go_during_publishes,
);

fn slow_subscriber_dropped(backend: Backend) {
    never_reading_subscriber_is_held_to_the_cap(backend, BackpressurePolicy::DropNew);
}

fn slow_subscriber_closed(backend: Backend) {
    never_reading_subscriber_is_held_to_the_cap(
        backend,
        BackpressurePolicy::Close {
            grace: Duration::ZERO,
        },
    );
}

mod sender_gauge_after_publications {
    use super::*;
    use websocket_driver::server::Sender;

    /// Subscribes to "t" and hands its `Sender` over on open; "sleep" blocks its loop for
    /// a while (so what other threads send waits in the inbox).
    struct Sub(Arc<Mutex<Vec<Sender>>>, bool);
    impl Handler for Sub {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            if self.1 {
                ws.subscribe("t").unwrap();
                self.0.lock().unwrap().push(ws.sender());
            }
        }
        fn on_message(&mut self, _ws: &mut Ws<'_>, message: Message<'_>) {
            if message.as_text() == Some("sleep") {
                std::thread::sleep(Duration::from_millis(600));
            }
        }
    }

    /// `Sender::send` counts a subscriber's output grown by publications (still under the
    /// cap): once that output plus what senders queued is over the cap, a send is refused
    /// (the gauge saw publications' output only at the next write, so senders could queue
    /// up to a cap more).
    fn a_sender_counts_output_queued_by_publications(backend: Backend) {
        let _turn = turn();
        const CAP: usize = 256 * 1024;
        const CHUNK: usize = 16 * 1024;
        let senders = Arc::new(Mutex::new(Vec::new()));
        let registry = senders.clone();
        let server = Server::bind("127.0.0.1:0")
            .unwrap()
            .config(ServerConfig {
                threads: 1,
                backend,
                max_backpressure: CAP,
                ..ServerConfig::default()
            })
            .start(move |req| Upgrade::Accept(Sub(registry.clone(), req.path() == "/sub")))
            .unwrap();
        let addr = server.local_addr();
        // A subscriber that never reads, behind a small receive buffer.
        let slow = TestClient::connect(addr, "/sub").unwrap();
        socket2::SockRef::from(&slow.stream)
            .set_recv_buffer_size(4096)
            .unwrap();
        let mut sleeper = TestClient::connect(addr, "/").unwrap();
        assert!(eventually(Duration::from_secs(5), || senders
            .lock()
            .unwrap()
            .len()
            == 1));
        let sender = senders.lock().unwrap()[0].clone();
        let base = server.stats().bytes_out;
        let payload = vec![b'p'; 1020]; // a 1 024-byte frame
        let frame = 1024u64;
        // Fill the kernel's buffers: publish until what was written stops growing (and
        // stays put for a while more: a loop kept off the CPU writes nothing either).
        let mut last = 0;
        loop {
            for _ in 0..128 {
                server.publish("t", &payload, MessageType::Binary).unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
            let out = server.stats().bytes_out - base;
            if out == last {
                std::thread::sleep(Duration::from_millis(200));
                if server.stats().bytes_out - base == last {
                    break;
                }
            }
            last = server.stats().bytes_out - base;
        }
        // The subscriber's backlog now: what was delivered to it and not written.
        let backlog = |server: &ServerHandle| {
            let s = server.stats();
            s.delivered * frame - (s.bytes_out - base)
        };
        let stats = server.stats();
        assert_eq!(stats.dropped, 0, "{stats:?}");
        // Publish until the subscriber holds about CAP - 2 chunks (still under the cap).
        while backlog(&server) < (CAP - 2 * CHUNK) as u64 {
            server.publish("t", &payload, MessageType::Binary).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        let held = backlog(&server);
        let stats = server.stats();
        assert_eq!(stats.dropped, 0, "still under the cap: {stats:?}");
        // Block the loop, then send from this thread until refused.
        sleeper.send_text("sleep").unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let mut accepted = 0usize;
        while accepted < 4 * CAP {
            match sender.send_binary(vec![7u8; CHUNK]) {
                Ok(()) => accepted += CHUNK,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Refused once output + queued is over the cap: at most one chunk past it.
        assert!(
            held as usize + accepted <= CAP + CHUNK,
            "the output held {held} bytes (cap {CAP}), yet senders queued {accepted} more \
             before a refusal: {} in all",
            held as usize + accepted
        );
        drop(sleeper);
        drop(slow);
        let _ = server.shutdown(Duration::from_secs(1));
    }

    on_both_backends!(a_sender_counts_output_queued_by_publications);
}
