//! Unit tests of [`Timers`]: each deadline against a real driver pair.

use super::*;
use crate::protocol::driver::Event;
use crate::protocol::frame::Status;
use crate::protocol::handshake::RequestParser;
use crate::protocol::options::Options;

const MS: Duration = Duration::from_millis(1);
const TICK: Duration = Duration::from_nanos(1);

fn config() -> TimerConfig {
    TimerConfig {
        handshake: 1000 * MS,
        close: 300 * MS,
        idle: Some(200 * MS),
        backpressure_grace: Some(500 * MS),
    }
}

/// An open server driver with its 101 and `Open` event already taken.
fn open_server() -> Driver {
    let mut client = Driver::make_client("ws://example.com/", &Options::default()).unwrap();
    client.start_connection();
    let mut parser = RequestParser::new(Options::default().head_limits());
    let Ok(Status::Complete(request, _)) = parser.parse(client.pending_output()) else {
        panic!("the client's request parses");
    };
    let mut server = Driver::make_server(&request, &Options::default()).unwrap();
    server.start_connection();
    drain(&mut server);
    take(&mut server);
    server
}

/// A client driver whose upgrade request went out, still connecting.
fn connecting_client() -> Driver {
    let mut client = Driver::make_client("ws://example.com/", &Options::default()).unwrap();
    client.start_connection();
    take(&mut client);
    client
}

fn take(driver: &mut Driver) -> Vec<u8> {
    let out = driver.pending_output().to_vec();
    driver.consume_output(out.len());
    out
}

fn drain(driver: &mut Driver) -> Vec<String> {
    let mut events = Vec::new();
    while let (_, Some(event)) = driver.poll_event(&mut []) {
        events.push(match event {
            Event::Close { code, reason } => format!("close {code} {reason}"),
            other => format!("{other:?}"),
        });
    }
    events
}

#[test]
fn nothing_armed_at_first() {
    let timers = Timers::new();
    assert_eq!(timers.poll_timeout(), None);
    assert!(!timers.is_expired(Instant::now()));
}

#[test]
fn opening_handshake_times_out_at_the_deadline_not_a_tick_before() {
    let cfg = config();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut client = connecting_client();
    timers.handshake_started(t0, &cfg);
    let deadline = t0 + cfg.handshake;
    assert_eq!(timers.poll_timeout(), Some(deadline));
    assert!(!timers.is_expired(deadline - TICK));
    assert!(timers.is_expired(deadline));
    assert_eq!(
        timers.handle_timeout(deadline - TICK, &cfg, &mut client),
        Expired::Nothing
    );
    assert_eq!(client.ready_state(), ReadyState::Connecting);
    assert_eq!(
        timers.handle_timeout(deadline, &cfg, &mut client),
        Expired::Drop(1006)
    );
    // Why, as an error (as for a refused connect), then the close.
    assert_eq!(
        drain(&mut client),
        [
            r#"Error(Io(Custom { kind: TimedOut, error: "opening handshake timed out" }))"#,
            "close 1006 "
        ]
    );
    assert_eq!(timers.poll_timeout(), None);
}

#[test]
fn opening_clears_the_handshake_deadline_and_arms_idle() {
    let cfg = config();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    timers.handshake_started(t0, &cfg);
    timers.opened(t0 + 10 * MS, &cfg);
    assert_eq!(
        timers.poll_timeout(),
        Some(t0 + 10 * MS + cfg.idle.unwrap())
    );
    let no_idle = TimerConfig { idle: None, ..cfg };
    let mut timers = Timers::new();
    timers.handshake_started(t0, &no_idle);
    timers.opened(t0 + 10 * MS, &no_idle);
    assert_eq!(timers.poll_timeout(), None);
    // Well past the old handshake deadline, an open connection is left alone.
    let mut server = open_server();
    assert_eq!(
        timers.handle_timeout(t0 + 10 * cfg.handshake, &no_idle, &mut server),
        Expired::Nothing
    );
    assert_eq!(server.ready_state(), ReadyState::Open);
}

#[test]
fn idle_pings_at_the_deadline_then_closes_1001_after_another_period() {
    let cfg = config();
    let idle = cfg.idle.unwrap();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    let first = t0 + idle;
    assert_eq!(timers.poll_timeout(), Some(first));
    assert_eq!(
        timers.handle_timeout(first - TICK, &cfg, &mut server),
        Expired::Nothing
    );
    assert!(take(&mut server).is_empty());
    assert_eq!(
        timers.handle_timeout(first, &cfg, &mut server),
        Expired::Ping
    );
    assert_eq!(take(&mut server), [0x89, 0x00], "an empty ping");
    assert!(timers.is_ping_outstanding());
    let second = first + idle;
    assert_eq!(timers.poll_timeout(), Some(second));
    assert_eq!(
        timers.handle_timeout(second - TICK, &cfg, &mut server),
        Expired::Nothing
    );
    assert_eq!(
        timers.handle_timeout(second, &cfg, &mut server),
        Expired::IdleClose
    );
    let out = take(&mut server);
    assert_eq!(&out[..4], [0x88, 2 + 12, 0x03, 0xe9]);
    assert_eq!(&out[4..], b"idle timeout");
    assert_eq!(drain(&mut server), ["close 1001 idle timeout"]);
    // The close frame has the close timeout to get out.
    assert_eq!(timers.poll_timeout(), Some(second + cfg.close));
}

#[test]
fn close_timeout_after_an_idle_abort_drops_with_1006() {
    let cfg = config();
    let idle = cfg.idle.unwrap();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    assert_eq!(
        timers.handle_timeout(t0 + idle, &cfg, &mut server),
        Expired::Ping
    );
    let closed_at = t0 + 2 * idle;
    assert_eq!(
        timers.handle_timeout(closed_at, &cfg, &mut server),
        Expired::IdleClose
    );
    drain(&mut server);
    timers.closed(closed_at, &cfg);
    // Input after the abort does not revive the keepalive once `closed` is reported, and
    // reporting it again keeps the close deadline where it was.
    timers.received(closed_at + MS, &cfg);
    timers.closed(closed_at + MS, &cfg);
    let drop_at = closed_at + cfg.close;
    assert_eq!(timers.poll_timeout(), Some(drop_at));
    assert_eq!(
        timers.handle_timeout(drop_at - TICK, &cfg, &mut server),
        Expired::Nothing
    );
    assert_eq!(
        timers.handle_timeout(drop_at, &cfg, &mut server),
        Expired::Drop(1006)
    );
    assert_eq!(timers.poll_timeout(), None);
}

#[test]
fn reads_reset_idle_and_answer_the_outstanding_ping() {
    let cfg = config();
    let idle = cfg.idle.unwrap();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    // Input just before the deadline pushes it a whole period on.
    timers.received(t0 + idle - TICK, &cfg);
    assert_eq!(timers.poll_timeout(), Some(t0 + 2 * idle - TICK));
    assert_eq!(
        timers.handle_timeout(t0 + idle, &cfg, &mut server),
        Expired::Nothing
    );
    // A ping, then a pong (or anything): no abort at the next deadline, another ping.
    let ping_at = t0 + 2 * idle - TICK;
    assert_eq!(
        timers.handle_timeout(ping_at, &cfg, &mut server),
        Expired::Ping
    );
    let pong_at = ping_at + 50 * MS;
    timers.received(pong_at, &cfg);
    assert!(!timers.is_ping_outstanding());
    assert_eq!(timers.poll_timeout(), Some(pong_at + idle));
    assert_eq!(
        timers.handle_timeout(pong_at + idle, &cfg, &mut server),
        Expired::Ping
    );
    assert_eq!(server.ready_state(), ReadyState::Open);
    // A peer that answers every ping stays open over many periods.
    let mut now = pong_at + idle;
    for _ in 0..10 {
        now += 10 * MS;
        timers.received(now, &cfg);
        now += idle;
        assert_eq!(timers.handle_timeout(now, &cfg, &mut server), Expired::Ping);
    }
    assert_eq!(server.ready_state(), ReadyState::Open);
}

/// A server just opened at `now`, whose every `deadline` call moves to the next idle
/// deadline and says what the timers did there, told `delivery`.
struct IdleDeadlines {
    cfg: TimerConfig,
    timers: Timers,
    server: Driver,
    now: Instant,
}

impl IdleDeadlines {
    fn new() -> IdleDeadlines {
        let (cfg, now) = (config(), Instant::now());
        let mut timers = Timers::new();
        timers.opened(now, &cfg);
        let server = open_server();
        IdleDeadlines {
            cfg,
            timers,
            server,
            now,
        }
    }

    fn deadline(&mut self, delivery: Option<(u64, bool)>) -> Expired {
        self.now += self.cfg.idle.unwrap();
        assert_eq!(self.timers.poll_timeout(), Some(self.now));
        let delivery = delivery.map(|(acked, backlog)| Delivery { acked, backlog });
        let cfg = self.cfg;
        self.timers
            .handle_timeout_with_delivery(self.now, &cfg, &mut self.server, || delivery)
    }
}

/// At an idle deadline with output still waiting, output the peer took since the previous
/// deadline counts as life (the ping waits behind it); without waiting output, or with
/// nothing taken, the plain rule holds. Input starts the comparison over.
#[test]
fn output_being_taken_keeps_a_backlogged_peer_alive_and_nothing_else_does() {
    let mut idle = IdleDeadlines::new();
    // The first deadline has nothing to compare with: a ping, as always.
    assert_eq!(idle.deadline(Some((1000, true))), Expired::Ping);
    assert_eq!(take(&mut idle.server), [0x89, 0x00]);
    // The peer took output meanwhile and more waits: another period, no ping, no close;
    // the ping is still outstanding.
    for acked in [5000, 9000, 9001] {
        assert_eq!(idle.deadline(Some((acked, true))), Expired::Nothing);
        assert!(idle.timers.is_ping_outstanding());
        assert!(take(&mut idle.server).is_empty());
    }
    // Taken, but nothing waits any more: the ping reached the peer, the plain rule.
    assert_eq!(idle.deadline(Some((9500, false))), Expired::IdleClose);

    // Waiting output that the peer stopped taking: the plain rule too.
    let mut idle = IdleDeadlines::new();
    assert_eq!(idle.deadline(Some((7, true))), Expired::Ping);
    assert_eq!(idle.deadline(Some((7, true))), Expired::IdleClose);

    // Input forgets the last mark: the next deadline compares with nothing and pings.
    let mut idle = IdleDeadlines::new();
    assert_eq!(idle.deadline(Some((1, true))), Expired::Ping);
    idle.now += MS;
    idle.timers.received(idle.now, &idle.cfg);
    assert_eq!(idle.deadline(Some((2, true))), Expired::Ping);
    // The count is compared by its low 32 bits; a change above them still shows.
    assert_eq!(
        idle.deadline(Some((2 + (1 << 33) + 5, true))),
        Expired::Nothing
    );
    // A runtime that cannot tell: the plain rule.
    assert_eq!(idle.deadline(None), Expired::IdleClose);
}

#[test]
fn idle_off_means_no_keepalive() {
    let cfg = TimerConfig {
        idle: None,
        ..config()
    };
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    timers.received(t0, &cfg);
    assert_eq!(timers.poll_timeout(), None);
    assert_eq!(
        timers.handle_timeout(t0 + Duration::from_secs(3600), &cfg, &mut server),
        Expired::Nothing
    );
    assert!(take(&mut server).is_empty());
}

#[test]
fn close_timeout_at_the_deadline_not_a_tick_before() {
    let cfg = config();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    server.close_connection(1000, "bye").unwrap();
    take(&mut server);
    let started = t0 + 20 * MS;
    timers.close_started(started, &cfg);
    // Later reports keep the first deadline.
    timers.close_started(started + 100 * MS, &cfg);
    let deadline = started + cfg.close;
    // The idle keepalive stops while closing, and input does not restart it: the close
    // deadline alone applies (the keepalive used to ping a closing connection, which
    // sends nothing, and close it with 1001 before that deadline).
    assert_eq!(timers.poll_timeout(), Some(deadline));
    timers.received(started + 10 * MS, &cfg);
    assert_eq!(timers.poll_timeout(), Some(deadline));
    assert_eq!(
        timers.handle_timeout(deadline - TICK, &cfg, &mut server),
        Expired::Nothing
    );
    assert!(
        take(&mut server).is_empty(),
        "no keepalive ping while closing"
    );
    let no_idle = TimerConfig { idle: None, ..cfg };
    let mut timers = Timers::new();
    timers.opened(t0, &no_idle);
    timers.close_started(started, &no_idle);
    assert_eq!(timers.poll_timeout(), Some(deadline));
    assert_eq!(
        timers.handle_timeout(deadline - TICK, &no_idle, &mut server),
        Expired::Nothing
    );
    assert_eq!(
        timers.handle_timeout(deadline, &no_idle, &mut server),
        Expired::Drop(1006)
    );
    assert_eq!(drain(&mut server), ["close 1006 close handshake timed out"]);
}

#[test]
fn a_refusal_replaces_the_handshake_deadline_with_the_close_one() {
    let cfg = config();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    timers.handshake_started(t0, &cfg);
    timers.close_started(t0 + 5 * MS, &cfg);
    assert_eq!(timers.poll_timeout(), Some(t0 + 5 * MS + cfg.close));
    assert!(!timers.is_expired(t0 + 5 * MS + cfg.close - TICK));
    assert!(timers.is_expired(t0 + 5 * MS + cfg.close));
}

#[test]
fn backpressure_grace_aborts_1008_at_the_deadline_not_a_tick_before() {
    let cfg = TimerConfig {
        idle: None,
        ..config()
    };
    let grace = cfg.backpressure_grace.unwrap();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    timers.buffered(t0, false, &cfg);
    assert_eq!(timers.poll_timeout(), None);
    let over_at = t0 + 30 * MS;
    timers.buffered(over_at, true, &cfg);
    assert!(timers.is_over_limit());
    // Staying over keeps the start of the grace period.
    timers.buffered(over_at + 100 * MS, true, &cfg);
    let deadline = over_at + grace;
    assert_eq!(timers.poll_timeout(), Some(deadline));
    assert_eq!(
        timers.handle_timeout(deadline - TICK, &cfg, &mut server),
        Expired::Nothing
    );
    assert_eq!(
        timers.handle_timeout(deadline, &cfg, &mut server),
        Expired::Drop(1008)
    );
    let out = take(&mut server);
    assert_eq!(&out[..4], [0x88, 2 + 30, 0x03, 0xf0]);
    assert_eq!(
        drain(&mut server),
        ["close 1008 outgoing buffer limit exceeded"]
    );
}

#[test]
fn going_under_the_limit_cancels_the_grace() {
    let cfg = TimerConfig {
        idle: None,
        ..config()
    };
    let grace = cfg.backpressure_grace.unwrap();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    timers.buffered(t0, true, &cfg);
    timers.buffered(t0 + grace - TICK, false, &cfg);
    assert!(!timers.is_over_limit());
    assert_eq!(timers.poll_timeout(), None);
    assert_eq!(
        timers.handle_timeout(t0 + grace, &cfg, &mut server),
        Expired::Nothing
    );
    // Over again: a fresh grace period from then.
    let again = t0 + grace + 10 * MS;
    timers.buffered(again, true, &cfg);
    assert_eq!(timers.poll_timeout(), Some(again + grace));
    // Without a grace (the drop-new policy) being over arms nothing.
    let drop_new = TimerConfig {
        backpressure_grace: None,
        ..cfg
    };
    let mut timers = Timers::new();
    timers.buffered(t0, true, &drop_new);
    assert!(timers.is_over_limit());
    assert_eq!(timers.poll_timeout(), None);
}

#[test]
fn the_handshake_deadline_wins_over_the_others_when_all_passed() {
    let cfg = config();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    timers.buffered(t0, true, &cfg);
    server.close_connection(1000, "").unwrap();
    timers.close_started(t0, &cfg);
    let late = t0 + Duration::from_secs(60);
    assert_eq!(
        timers.handle_timeout(late, &cfg, &mut server),
        Expired::Drop(1006)
    );
    // Then the grace over the idle keepalive.
    let mut timers = Timers::new();
    let mut server = open_server();
    timers.opened(t0, &cfg);
    timers.buffered(t0, true, &cfg);
    assert_eq!(
        timers.handle_timeout(late, &cfg, &mut server),
        Expired::Drop(1008)
    );
}

#[test]
fn poll_timeout_is_always_the_earliest_deadline() {
    // A small deterministic walk over random inputs: after each, poll_timeout is the
    // minimum of the deadlines a model computes independently.
    let cfg = config();
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut handshake, mut closing, mut idle, mut grace, mut over) =
        (None, false, None::<Instant>, None::<Instant>, false);
    let mut now = t0;
    for _ in 0..10_000 {
        now += Duration::from_millis(next() % 50);
        match next() % 7 {
            0 => {
                timers.handshake_started(now, &cfg);
                handshake = Some(now + cfg.handshake);
                closing = false;
            }
            1 => {
                timers.opened(now, &cfg);
                if !closing {
                    handshake = None;
                }
                idle = Some(now + cfg.idle.unwrap());
            }
            2 => {
                timers.received(now, &cfg);
                // Only while the keepalive runs (opened, not closing).
                if !closing && idle.is_some() {
                    idle = Some(now + cfg.idle.unwrap());
                }
            }
            3 => {
                timers.close_started(now, &cfg);
                if !closing {
                    handshake = Some(now + cfg.close);
                    closing = true;
                }
                idle = None;
            }
            4 => {
                timers.closed(now, &cfg);
                if !closing {
                    handshake = Some(now + cfg.close);
                    closing = true;
                }
                idle = None;
            }
            _ => {
                let o = next() % 2 == 0;
                timers.buffered(now, o, &cfg);
                if !o {
                    grace = None;
                } else if !over {
                    grace = Some(now + cfg.backpressure_grace.unwrap());
                }
                over = o;
            }
        }
        let want = [handshake, idle, grace].into_iter().flatten().min();
        assert_eq!(timers.poll_timeout(), want);
        assert_eq!(timers.is_unarmed(), want.is_none());
        if let Some(w) = want {
            assert!(!timers.is_expired(w - TICK));
            assert!(timers.is_expired(w));
        }
    }
}

/// Input that arrives during the opening handshake (a client reading the start of the
/// server's response) must not arm the idle keepalive: the keepalive is for an open
/// connection ([`Timers::opened`] starts it), and the handshake deadline alone bounds the
/// handshake. With `idle` shorter than `handshake`, the idle deadline used to come first:
/// a ping was queued on the connecting driver, and one idle period later the connection
/// was aborted with 1001 "idle timeout" long before the handshake timed out.
#[test]
fn input_during_the_opening_handshake_arms_no_idle_keepalive() {
    let cfg = config();
    let idle = cfg.idle.unwrap();
    assert!(idle < cfg.handshake);
    let t0 = Instant::now();
    let mut timers = Timers::new();
    let mut client = connecting_client();
    timers.handshake_started(t0, &cfg);
    // Part of the 101 arrives.
    timers.received(t0 + 10 * MS, &cfg);
    assert_eq!(
        timers.poll_timeout(),
        Some(t0 + cfg.handshake),
        "the handshake deadline is the only one while connecting"
    );
    let first = timers.handle_timeout(t0 + 10 * MS + idle, &cfg, &mut client);
    let second = timers.handle_timeout(t0 + 10 * MS + 2 * idle, &cfg, &mut client);
    assert_eq!(
        (first, second, client.ready_state()),
        (Expired::Nothing, Expired::Nothing, ReadyState::Connecting),
        "events: {:?}",
        drain(&mut client)
    );
}
