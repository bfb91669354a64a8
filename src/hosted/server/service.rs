//! The per-connection service the loops drive: the upgrade, the session's deadlines,
//! TLS and the handler's events, behind the reactor's `Service` trait.

use super::handler::{Callbacks, Ctx, Gauges, Lendable, Redial, take_callbacks};
use super::pubsub::{LoopTopics, PubSub};
use super::tunnel::{Progress, Tunnel};

mod dispatch;
mod flow;
use super::{
    BackpressurePolicy, ClientInit, Command, Handler, ServerConfig, Upgrade, UpgradeRequest, Ws,
};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::protocol::driver::{Driver, Event, Message, MessageType, ReadyState, Role};
use crate::protocol::error::{Error, code};
use crate::protocol::frame::{FrameRun, SharedFrame, Status};
use crate::protocol::handshake::{RequestParser, error_response};
use crate::reactor::{CloseRequest, Io, KeepBudget, LoopStats, Outgoing, PayloadLoan, Service};

/// Bytes of output buffers a loop keeps for reuse: enough for 500 connections' 16 KiB
/// replies in flight at once (on io_uring each reply's buffer is with the kernel until its
/// send completes, so a loop needs one per connection written to in a turn).
const POOL_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Buffers larger than this are freed, not pooled.
const POOL_MAX_CAPACITY: usize = 256 * 1024;

use crate::session::timers::{Expired, TimerConfig, Timers};
use crate::session::upgrade::{self, Answer, NonUpgrade};

pub(crate) struct WsService<F, H> {
    app: Arc<F>,
    config: Arc<ServerConfig>,
    /// The deadlines' durations, made from `config` once (every delivery asks for them).
    timers: TimerConfig,
    stats: Arc<LoopStats>,
    pool: BufferPool,
    /// Write-completion and pong callbacks of this loop's connections.
    callbacks: RefCell<Callbacks>,
    /// Input read but not yet delivered, by key, for connections whose output is over the
    /// cap (their reading is paused): at most what was left of one read, plus receives
    /// already under way when the pause began.
    held: HashMap<usize, Vec<u8>>,
    /// Connections among `held` whose input ended behind what is held (a TLS peer's
    /// close_notify, read with it): the end is theirs once the held input is delivered.
    #[cfg(feature = "tls")]
    ended_behind: std::collections::HashSet<usize>,
    /// What the `Sender`s of connections that have any share with the loop.
    gauges: RefCell<Gauges>,
    /// Client connections still connecting that have other addresses to try.
    redials: HashMap<usize, Box<Redial>>,
    /// The loop's topic index (and publications for its own subscribers).
    topics: RefCell<LoopTopics>,
    /// This loop's place among the server's loops.
    loop_index: usize,
    pubsub: Arc<PubSub>,
    /// The receive buffer of the read being delivered, while a reply may claim it.
    input: Lendable,
    /// Scratch for decrypted input (TLS connections), shared by the loop.
    #[cfg(feature = "tls")]
    plain: Vec<u8>,
    _handler: PhantomData<fn() -> H>,
}

impl<F, H> WsService<F, H> {
    pub(crate) fn new(
        app: Arc<F>,
        config: Arc<ServerConfig>,
        stats: Arc<LoopStats>,
        (loop_index, pubsub): (usize, Arc<PubSub>),
    ) -> Self {
        WsService {
            app,
            timers: timer_config(&config),
            config,
            stats,
            pool: BufferPool::default(),
            callbacks: RefCell::default(),
            held: HashMap::new(),
            #[cfg(feature = "tls")]
            ended_behind: std::collections::HashSet::new(),
            redials: HashMap::new(),
            gauges: RefCell::default(),
            topics: RefCell::default(),
            loop_index,
            pubsub,
            input: Lendable::default(),
            #[cfg(feature = "tls")]
            plain: Vec::new(),
            _handler: PhantomData,
        }
    }
}

pub(crate) struct Conn<H> {
    phase: Phase<H>,
    peer: Peer,
    /// Handshake, close, idle and backpressure deadlines.
    timers: Timers,
    /// Output the kernel holds (io_uring sends not yet completed).
    in_flight: usize,
    /// TLS state for wss (boxed: plain connections pay one pointer).
    #[cfg(feature = "tls")]
    tls: Option<Box<crate::tls::TlsStream>>,
}

impl<H> Conn<H> {
    fn new(phase: Phase<H>, peer: SocketAddr) -> Conn<H> {
        Conn {
            phase,
            peer: Peer::new(peer),
            timers: Timers::new(),
            in_flight: 0,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// A peer address in 16 bytes instead of 32: IPv4 inline, IPv6 (rarer, and twice the size)
/// boxed.
#[derive(Debug, Clone)]
enum Peer {
    V4(std::net::SocketAddrV4),
    V6(Box<std::net::SocketAddrV6>),
}

impl Peer {
    fn new(addr: SocketAddr) -> Peer {
        match addr {
            SocketAddr::V4(v4) => Peer::V4(v4),
            SocketAddr::V6(v6) => Peer::V6(Box::new(v6)),
        }
    }

    fn get(&self) -> SocketAddr {
        match self {
            Peer::V4(v4) => SocketAddr::V4(*v4),
            Peer::V6(v6) => SocketAddr::V6(**v6),
        }
    }
}

enum Phase<H> {
    Handshake(RequestParser),
    Rejecting(Vec<u8>, usize),
    /// A client connection opening its tunnel through a proxy.
    Tunnel(Box<Tunnel<H>>),
    Open(Driver, H),
    Done,
}

impl<H> Conn<H> {
    /// Gives up a tunnel still opening: the connection continues as an open driver (still
    /// connecting), so timeouts, shutdown and EOF reach the handler as for any client.
    fn untunnel(&mut self) {
        if let Phase::Tunnel(_) = self.phase {
            let Phase::Tunnel(tunnel) = std::mem::replace(&mut self.phase, Phase::Done) else {
                unreachable!()
            };
            self.phase = Phase::Open(tunnel.driver, tunnel.handler);
        }
    }
}

impl<F, H> WsService<F, H>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    /// The deadlines' durations, from the server's settings.
    #[inline]
    fn timer_config(&self) -> TimerConfig {
        self.timers
    }

    /// The handler context for a connection.
    fn ctx<'a>(&'a self, peer: SocketAddr, io: &'a Io<'_, Command>, outside: usize) -> Ctx<'a> {
        Ctx {
            peer,
            key: io.key,
            generation: io.generation,
            remote: io.remote,
            max_backpressure: self.config.max_backpressure,
            close_on_limit: self.close_on_limit(),
            stats: &self.stats,
            outside,
            callbacks: &self.callbacks,
            gauges: &self.gauges,
            topics: &self.topics,
            loop_index: self.loop_index,
            pubsub: &self.pubsub,
            input: &self.input,
        }
    }

    /// Moves plaintext output (driver frames, a reject response) into TLS, so the loop
    /// writes ciphertext, and runs the write callbacks of what was sealed. A no-op for
    /// plain connections.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn seal(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        #[cfg(feature = "tls")]
        loop {
            let Some(tls) = conn.tls.as_mut() else {
                return;
            };
            match &mut conn.phase {
                Phase::Open(driver, _) => {
                    let pending = driver.pending_output();
                    let sealed = !pending.is_empty() && tls.encrypt(pending).is_ok();
                    if sealed {
                        let n = pending.len();
                        driver.consume_output(n);
                    }
                    if driver.is_finished() {
                        tls.close();
                    }
                    self.recycle(driver);
                    if !sealed {
                        return;
                    }
                    // A callback may send again: seal until nothing is left.
                    self.run_written(conn, io);
                }
                Phase::Rejecting(response, at) => {
                    if *at < response.len() {
                        if tls.encrypt(&response[*at..]).is_err() {
                            return;
                        }
                        *at = response.len();
                    }
                    // Also when there was nothing more to say (a connection that failed
                    // after its close handshake): TLS ends with a close_notify.
                    tls.close();
                    return;
                }
                _ => return,
            }
        }
    }

    /// Bytes queued for this connection outside its driver: handed to the kernel
    /// (io_uring) or encrypted and waiting (TLS).
    fn queued_outside(conn: &Conn<H>) -> usize {
        #[cfg(feature = "tls")]
        let tls = conn.tls.as_ref().map_or(0, |t| t.output().len());
        #[cfg(not(feature = "tls"))]
        let tls = 0;
        conn.in_flight + tls
    }

    /// A call for this connection panicked (see `Service::fail`): before the upgrade the
    /// client gets 500; an open connection drops its handler and fails with close 1011
    /// behind what it had queued. Either way the connection goes on as a refused one
    /// ([`Phase::Rejecting`]): its last bytes written, its input discarded, TCP closed by
    /// this side, within the close timeout. Returns false where nothing can go out
    /// cleanly: a client still connecting, a tunnel, a connection already done, or a reply
    /// that claimed the receive buffer (see [`Lendable`]) when `input` is not that buffer.
    pub(super) fn fail_plain(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        input: Option<&mut Vec<u8>>,
    ) -> bool {
        // The read's offer ends here (the delivery that would have ended it unwound).
        let claimed = self.input.withdraw();
        match std::mem::replace(&mut conn.phase, Phase::Done) {
            Phase::Handshake(_) => {
                // The upgrade closure panicked.
                self.reject(conn, io, upgrade::panicked_response());
                true
            }
            Phase::Open(mut driver, handler) if driver.ready_state() != ReadyState::Connecting => {
                // The application's code: if its drop panics too, the driver goes with it.
                drop(handler);
                let mut input = input;
                if claimed {
                    // The reply's payload is in the receive buffer: the driver takes it,
                    // as after any delivery, for the copy below.
                    let Some(input) = input.as_deref_mut() else {
                        return false;
                    };
                    self.hand_received(&mut driver, input);
                }
                driver.abort(code::INTERNAL_ERROR, "the handler panicked");
                // Its output (own bytes and the shared parts between them, from where the
                // socket left off), copied out: once, for a connection that is ending.
                let mut last = Vec::with_capacity(driver.buffered_amount());
                loop {
                    let part = driver.pending_output();
                    if part.is_empty() {
                        break;
                    }
                    last.extend_from_slice(part);
                    let n = part.len();
                    driver.consume_output(n);
                }
                if let (Some(input), Some(buffer)) = (input, driver.reclaim_received()) {
                    // The receive buffer, copied from, goes back to the loop.
                    *input = buffer;
                }
                self.recycle(&mut driver);
                self.reject(conn, io, last);
                // Read on (and discard) until the peer's Close or FIN: nothing is held.
                io.set_reading(true);
                true
            }
            // Dropped here, the handler's drop caught by the loop.
            _ => false,
        }
    }

    fn reject(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, response: Vec<u8>) {
        conn.phase = Phase::Rejecting(response, 0);
        // The response has the close timeout to get out.
        conn.timers.close_started(io.now, &self.timer_config());
        io.set_deadline(conn.timers.poll_timeout());
        io.close(CloseRequest::AfterFlush);
    }

    fn handshake(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        let Phase::Handshake(parser) = &mut conn.phase else {
            return;
        };
        let (request, used) = match parser.parse(data) {
            Ok(Status::Partial) => return,
            Ok(Status::Complete(request, used)) => (request, used),
            Err(e) => return self.reject(conn, io, error_response(&e)),
        };
        let decision = match (self.app)(&UpgradeRequest {
            request: &request,
            peer: conn.peer.get(),
        }) {
            Upgrade::Accept(handler) => Ok(handler),
            Upgrade::Reject(response) => Err(response),
        };
        let options = &self.config.options;
        let (mut driver, handler) =
            match upgrade::answer(&request, options, decision, NonUpgrade::UpgradeRequired) {
                Answer::Accept(driver, handler) => (driver, handler),
                Answer::Reject(refusal) => return self.reject(conn, io, refusal.response),
            };
        if let Some(buf) = self.pool.pop() {
            driver.provide_output_buffer(buf);
        }
        driver.start_connection();
        conn.phase = Phase::Open(driver, handler);
        conn.timers.opened(io.now, &self.timer_config());
        self.pump(conn, io, &mut data[used..]);
    }

    /// Feeds input to the driver, runs the handler for each event, then settles deadlines
    /// and closing.
    fn pump(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        let outside = Self::queued_outside(conn);
        let Conn {
            phase: Phase::Open(driver, handler),
            timers,
            ..
        } = conn
        else {
            return;
        };
        // A reply is written into a pooled buffer rather than a fresh allocation; the
        // buffer goes back below (nothing written) or once its bytes are sent.
        if !driver.has_output_buffer()
            && let Some(buf) = self.pool.pop()
        {
            driver.provide_output_buffer(buf);
        }
        let timer_config = self.timer_config();
        let ctx = self.ctx(conn.peer.get(), io, outside);
        let cap = self.config.max_backpressure;
        let mut at = 0;
        loop {
            // Over the cap, the handler hears nothing more of the peer's input until the
            // output drains: what is left of this read waits, and so does a message the
            // driver completed from a payload loan (a pump with no input, from a write
            // callback or a command, delivered it over the cap, and its echo was
            // refused). Events the driver queued itself, such as an abort's close, still
            // go out.
            if driver.buffered_amount() + outside > cap
                && (at < data.len() || !driver.has_queued_events())
            {
                break;
            }
            let (used, event) = driver.poll_event(&mut data[at..]);
            at += used;
            let Some(event) = event else { break };
            let mut ws = Ws { driver, ctx: &ctx };
            match event {
                Event::Open => {
                    // Ends a client's opening handshake deadline; starts the keepalive.
                    timers.opened(io.now, &timer_config);
                    handler.on_open(&mut ws)
                }
                Event::Message(m) => {
                    LoopStats::add(&self.stats.messages_in, 1);
                    handler.on_message(&mut ws, whole_words(m))
                }
                Event::Ping(p) => handler.on_ping(&mut ws, &p),
                Event::Pong(p) => {
                    let answered =
                        take_callbacks(&mut self.callbacks.borrow_mut(), io.key, |pending| {
                            pending.take_pongs(&p)
                        });
                    for callback in answered {
                        callback(&mut ws);
                    }
                    handler.on_pong(&mut ws, &p)
                }
                Event::Error(e) => handler.on_error(&mut ws, &e),
                Event::Close { code, reason } => {
                    *self
                        .stats
                        .closes
                        .lock()
                        .expect("stats lock")
                        .entry(code)
                        .or_default() += 1;
                    // Nothing more is written or answered: waiting callbacks never run, and
                    // the connection leaves its topics.
                    self.callbacks.borrow_mut().remove(&io.key);
                    self.topics
                        .borrow_mut()
                        .leave_all(&self.pubsub, self.loop_index, io.key);
                    handler.on_close(&mut ws, code, &reason)
                }
            }
        }
        // ... and the loop stops reading from it (TCP then slows the peer).
        if driver.buffered_amount() + outside > cap {
            self.hold(io, &data[at..]);
        }
        // Nothing to write: the buffer lent above goes back.
        self.recycle(driver);
        self.settle(conn, io);
    }

    /// Over the cap: `rest` of the input being delivered waits (behind whatever the driver
    /// already holds) and the loop stops reading, until the output drains to half
    /// ([`Self::resume_if_drained`]).
    fn hold(&mut self, io: &mut Io<'_, Command>, rest: &[u8]) {
        self.held.entry(io.key).or_default().extend_from_slice(rest);
        io.set_reading(false);
    }

    /// Recomputes the deadline and asks for a close once the driver is finished.
    fn settle(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        let Phase::Open(driver, _) = &conn.phase else {
            return;
        };
        let timer_config = self.timer_config();
        let state = driver.ready_state();
        let backlog = driver.buffered_amount() + Self::queued_outside(conn);
        let over = backlog > self.config.max_backpressure;
        if !self.gauges.get_mut().is_empty()
            && let Some(gauge) = self.gauges.get_mut().get(&io.key)
        {
            gauge.backlog.store(backlog, Ordering::Release);
        }
        if state == ReadyState::Closing {
            conn.timers.close_started(io.now, &timer_config);
            // Closing from this side: it takes no more messages, so it leaves its topics
            // now, not when the peer's Close comes back.
            self.topics
                .get_mut()
                .leave_all(&self.pubsub, self.loop_index, io.key);
        }
        conn.timers.buffered(io.now, over, &timer_config);
        if over {
            // Sends are refused now: the handler hears `on_drain` once all is written,
            // even if the socket then takes it without a write ever blocking.
            io.notify_drained();
        }
        if state == ReadyState::Closed {
            // A server whose peer sent its Close needs no lingering for the peer's FIN. A
            // client waits for the server to close TCP (RFC 6455 §7.1.1), and over TLS
            // the peer's close_notify may still come.
            #[cfg(feature = "tls")]
            let plain = conn.tls.is_none();
            #[cfg(not(feature = "tls"))]
            let plain = true;
            let peer_done = plain && driver.close_received() && driver.role() == Role::Server;
            io.close(match peer_done {
                true => CloseRequest::AfterFlushPeerDone,
                false => CloseRequest::AfterFlush,
            });
            conn.timers.closed(io.now, &timer_config);
        }
        io.set_deadline(conn.timers.poll_timeout());
    }

    fn command_on(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, command: Command) {
        let outside = Self::queued_outside(conn);
        let Phase::Open(driver, _) = &mut conn.phase else {
            if let (Command::Send(data, _), Some(gauge)) =
                (&command, self.gauges.get_mut().get(&io.key))
            {
                // Dropped: no longer waiting in the inbox.
                gauge.queued.fetch_sub(data.len(), Ordering::AcqRel);
            }
            return;
        };
        let result = match command {
            Command::Send(data, kind) => {
                let over = driver.buffered_amount() + outside > self.config.max_backpressure;
                if over && self.close_on_limit() {
                    if let Some(gauge) = self.gauges.get_mut().get(&io.key) {
                        gauge.queued.fetch_sub(data.len(), Ordering::AcqRel);
                    }
                    driver.abort(code::POLICY_VIOLATION, "outgoing buffer limit exceeded");
                    self.pump(conn, io, &mut []);
                    return;
                }
                // A message the `Sender` accepted is queued even past the cap: its own check
                // (the inbox plus the backlog) already bounds how far, and refusing here
                // would lose a message whose send returned Ok.
                let sent = driver.send(&data, kind);
                if sent.is_ok() && !matches!(kind, MessageType::Close(_)) {
                    LoopStats::add(&self.stats.messages_out, 1);
                }
                if let Some(gauge) = self.gauges.get_mut().get(&io.key) {
                    // Into the backlog before out of the inbox count: a concurrent send
                    // sees these bytes twice for a moment (and may be refused), never in
                    // neither (and let past the cap).
                    gauge
                        .backlog
                        .store(driver.buffered_amount() + outside, Ordering::Release);
                    gauge.queued.fetch_sub(data.len(), Ordering::AcqRel);
                }
                sent.map(|_| ())
            }
            Command::Close(code, reason) => driver.close_connection(code, &reason).map(|_| ()),
            Command::Refused => {
                if self.close_on_limit() {
                    driver.abort(code::POLICY_VIOLATION, "outgoing buffer limit exceeded");
                    self.pump(conn, io, &mut []);
                }
                return;
            }
            Command::Publish(publication) => {
                self.deliver_plain(conn, io, &publication.frame);
                return;
            }
            Command::PublishRun(publication) => {
                self.deliver_run(conn, io, &publication.run);
                return;
            }
        };
        // Errors (sending on a closing connection) have no one to report to: the sender
        // already returned. Events the command caused (a close while connecting) run now.
        let _ = result;
        self.pump(conn, io, &mut []);
    }
}

impl<F, H> WsService<F, H>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    /// Queues a published frame (by reference) for one subscriber, unless its output is
    /// over the cap: then the message is dropped for it and counted, or under
    /// `BackpressurePolicy::Close { grace: ZERO }` the subscriber is closed with 1008.
    pub(super) fn deliver_plain(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        frame: &SharedFrame,
    ) {
        let outside = Self::queued_outside(conn);
        let Phase::Open(driver, _) = &mut conn.phase else {
            return;
        };
        if driver.ready_state() != ReadyState::Open {
            // Closed while a run was delivered frame by frame: it has left its topics, and
            // the rest of the run is not for it (neither delivered nor dropped).
            return;
        }
        let cap = self.config.max_backpressure;
        if driver.buffered_amount() + outside > cap {
            LoopStats::add(&self.stats.dropped, 1);
            if self.close_on_limit() {
                driver.abort(code::POLICY_VIOLATION, "outgoing buffer limit exceeded");
                self.pump(conn, io, &mut []);
            }
            return;
        }
        let sent = u64::from(driver.send_shared(frame).is_ok());
        let over = driver.buffered_amount() + outside > cap;
        self.delivered(conn, io, sent, over);
    }

    /// Counts `messages` delivered to a subscriber. Over the cap now (`over`): the grace
    /// timer (if any) starts and senders learn it.
    fn delivered(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        messages: u64,
        over: bool,
    ) {
        LoopStats::add(&self.stats.delivered, messages);
        LoopStats::add(&self.stats.messages_out, messages);
        let gauges = self.gauges.get_mut();
        if over {
            self.settle(conn, io);
        } else if !gauges.is_empty()
            && let Some(gauge) = gauges.get(&io.key)
        {
            // Its `Sender`s count this output against the cap as well (it was seen only
            // at the next write or once over the cap, so senders could queue up to a cap
            // more on top of what publications had queued).
            if let Phase::Open(driver, _) = &conn.phase {
                let outside = Self::queued_outside(conn);
                gauge
                    .backlog
                    .store(driver.buffered_amount() + outside, Ordering::Release);
            }
        }
    }

    /// Queues a run of published frames for one subscriber as one part when it would have
    /// taken every one of them alone: it takes them plain, and its output is under the cap
    /// before the last one. Otherwise each frame goes through [`Self::deliver_plain`], so
    /// drops, closes and counts are exactly those of separate publications.
    pub(super) fn deliver_run(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        run: &FrameRun,
    ) {
        let outside = Self::queued_outside(conn);
        let Phase::Open(driver, _) = &mut conn.phase else {
            return;
        };
        let cap = self.config.max_backpressure;
        if takes_run_whole(driver.buffered_amount() + outside, run, cap)
            && matches!(driver.send_shared_run(run), Ok(true))
        {
            let over = driver.buffered_amount() + outside > cap;
            self.delivered(conn, io, run.frames().len() as u64, over);
            return;
        }
        for frame in run.frames() {
            self.deliver_plain(conn, io, frame);
        }
    }

    fn open_plain(&mut self, io: &mut Io<'_, Command>, peer: SocketAddr) -> Conn<H> {
        let mut conn = Conn::new(
            Phase::Handshake(RequestParser::new(self.config.options.head_limits())),
            peer,
        );
        conn.timers.handshake_started(io.now, &self.timer_config());
        io.set_deadline(conn.timers.poll_timeout());
        conn
    }

    fn connected_plain(
        &mut self,
        io: &mut Io<'_, Command>,
        peer: SocketAddr,
        init: ClientInit<H>,
    ) -> Conn<H> {
        let mut conn = Conn::new(Phase::Done, peer);
        let ClientInit {
            mut driver,
            handler,
            proxy,
            #[cfg(feature = "tls")]
            tls,
            redial,
        } = init;
        if let Some(redial) = redial {
            self.redials.insert(io.key, redial);
        }
        if let Some(buf) = self.pool.pop() {
            driver.provide_output_buffer(buf);
        }
        // The upgrade request is queued (behind the proxy's tunnel, if any); the 101 must
        // arrive within the handshake timeout.
        conn.timers.handshake_started(io.now, &self.timer_config());
        if let Some(request) = proxy {
            conn.phase = Phase::Tunnel(Box::new(Tunnel::new(
                request,
                driver,
                handler,
                #[cfg(feature = "tls")]
                tls,
            )));
            io.set_deadline(conn.timers.poll_timeout());
            return conn;
        }
        #[cfg(feature = "tls")]
        {
            conn.tls = tls;
        }
        conn.phase = Phase::Open(driver, handler);
        self.settle(&mut conn, io);
        conn
    }

    fn connect_failed_plain(
        &mut self,
        io: &mut Io<'_, Command>,
        mut init: ClientInit<H>,
        error: io::Error,
    ) -> Option<(SocketAddr, ClientInit<H>)> {
        let mut handler = init.handler;
        if let Some(redial) = init.redial.take_if(|r| r.retries(&error)) {
            match redial.next(handler) {
                Ok(retry) => return Some(retry),
                Err(back) => handler = back,
            }
        }
        let driver = init.driver;
        let mut conn = Conn::new(
            Phase::Open(driver, handler),
            SocketAddr::from(([0, 0, 0, 0], 0)),
        );
        if let Phase::Open(driver, handler) = &mut conn.phase {
            let ctx = self.ctx(conn.peer.get(), io, 0);
            handler.on_error(&mut Ws { driver, ctx: &ctx }, &Error::Io(error));
            driver.abort(code::ABNORMAL, "connect failed");
        }
        self.pump(&mut conn, io, &mut []);
        // No connection holds the key this ran under: nothing its handler registered
        // there (a `Sender`'s gauge, write callbacks) may outlive it, and its `Sender`s
        // fail as a closed connection's do (`forget` marks the gauge gone).
        self.forget(io.key);
        None
    }

    fn read_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        match conn.phase {
            Phase::Handshake(_) => self.handshake(conn, io, data),
            Phase::Tunnel(_) => self.tunnel(conn, io, data),
            Phase::Open(..) => {
                conn.timers.received(io.now, &self.timer_config());
                match self.held.get_mut(&io.key) {
                    // Paused: receives that were already under way queue behind the rest.
                    Some(held) => held.extend_from_slice(data),
                    None => self.pump(conn, io, data),
                }
            }
            Phase::Rejecting(..) | Phase::Done => {}
        }
    }

    /// [`WsService::read_plain`] of `input[..len]`, a receive buffer the backend can give
    /// away: a message of at least `min_reply` bytes sent back while it is delivered claims
    /// it (see [`Lendable`]) and the driver's output keeps it until the reply is written,
    /// or until the backend takes it back ([`Driver::reclaim_received`]).
    fn read_plain_lendable(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        input: &mut Vec<u8>,
        len: usize,
        min_reply: usize,
    ) {
        self.input.offer(input, min_reply);
        self.read_plain(conn, io, &mut input[..len]);
        if !self.input.withdraw() {
            return;
        }
        let Phase::Open(driver, _) = &mut conn.phase else {
            return;
        };
        self.hand_received(driver, input);
    }

    /// Gives the receive buffer to the reply that claimed it (see [`Lendable`]). The driver
    /// may refuse it (a client masks, deflate compresses): the buffer then stays with the
    /// loop.
    fn hand_received(&self, driver: &mut Driver, input: &mut Vec<u8>) {
        match driver.hand_received(std::mem::take(input)) {
            Some(unused) => *input = unused,
            None => LoopStats::add(&self.stats.replies_in_place, 1),
        }
    }

    /// The buffer of the large frame an open connection is receiving, to receive the rest
    /// into (see [`Driver::lend_payload_buffer`]); not while input held back for a paused
    /// connection waits, which must reach the driver first.
    fn lend_payload_plain(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        min: usize,
    ) -> Option<PayloadLoan> {
        let Phase::Open(driver, _) = &mut conn.phase else {
            return None;
        };
        // Most reads are not in such a frame: the driver's answer first, the map after.
        if driver.payload_to_come() < min as u64 || self.held.contains_key(&io.key) {
            return None;
        }
        let (buffer, room) = driver.lend_payload_buffer(min)?;
        Some(PayloadLoan {
            buffer,
            room,
            // An idle keepalive hears of input as it arrives.
            whole: self.config.idle_timeout.is_none(),
        })
    }

    /// The lent buffer is back with `n` bytes received into it: the driver takes it, and
    /// what that completed is delivered.
    fn payload_received_plain(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        buffer: Vec<u8>,
        n: usize,
    ) {
        let Phase::Open(driver, _) = &mut conn.phase else {
            return;
        };
        driver.payload_received(buffer, n);
        if n > 0 {
            conn.timers.received(io.now, &self.timer_config());
        }
        if driver.buffered_amount() + Self::queued_outside(conn) > self.config.max_backpressure {
            // Over the cap (a receive the kernel finished as the loop paused): what this
            // completed waits in the driver, like held input, until the output drains.
            self.hold(io, &[]);
            self.settle(conn, io);
            return;
        }
        self.pump(conn, io, &mut []);
    }

    /// Bytes from the proxy of a client connection that is opening its tunnel.
    fn tunnel(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        let Phase::Tunnel(tunnel) = &mut conn.phase else {
            return;
        };
        match tunnel.receive(data) {
            Progress::Pending => {}
            Progress::Open(mut rest) => {
                let Phase::Tunnel(tunnel) = std::mem::replace(&mut conn.phase, Phase::Done) else {
                    unreachable!()
                };
                let tunnel = *tunnel;
                #[cfg(feature = "tls")]
                {
                    conn.tls = tunnel.tls;
                }
                conn.phase = Phase::Open(tunnel.driver, tunnel.handler);
                // The upgrade request (in TLS for wss) goes out now; what the server sent
                // right behind the proxy's answer is its first input.
                self.seal(conn, io);
                if !rest.is_empty() {
                    self.read(conn, io, &mut rest);
                }
                self.settle(conn, io);
            }
            Progress::Refused(error) => {
                conn.untunnel();
                if let Phase::Open(driver, handler) = &mut conn.phase {
                    let ctx = self.ctx(conn.peer.get(), io, 0);
                    handler.on_error(&mut Ws { driver, ctx: &ctx }, &Error::Handshake(error));
                    driver.abort(code::ABNORMAL, "the proxy refused the tunnel");
                }
                self.pump(conn, io, &mut []);
                io.close(CloseRequest::Now);
            }
        }
    }

    fn timeout_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        conn.untunnel();
        let timer_config = self.timer_config();
        let queued_outside = Self::queued_outside(conn);
        let Phase::Open(driver, _) = &mut conn.phase else {
            // A handshake that took too long (slowloris) or a reject that never flushed.
            io.close(CloseRequest::Now);
            return;
        };
        // A client whose connect never completed (nothing written: an address that drops
        // the SYN) with addresses left: the next one is dialled when this socket closes.
        if driver.ready_state() == ReadyState::Connecting
            && let Some(redial) = self.redials.get_mut(&io.key)
        {
            redial.connect_timed_out = true;
            io.close(CloseRequest::Now);
            return;
        }
        let ours = queued_outside > 0 || driver.buffered_amount() > 0;
        let delivery = || io.delivery(ours);
        match conn
            .timers
            .handle_timeout_with_delivery(io.now, &timer_config, driver, delivery)
        {
            Expired::Drop(_) => {
                self.pump(conn, io, &mut []);
                io.close(CloseRequest::Now);
            }
            // The idle close's frame goes out; the close timeout bounds it.
            Expired::IdleClose => self.pump(conn, io, &mut []),
            Expired::Ping | Expired::Nothing => self.settle(conn, io),
        }
    }

    fn command_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, command: Command) {
        self.command_on(conn, io, command);
    }

    fn drained_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        let outside = Self::queued_outside(conn);
        let Phase::Open(driver, handler) = &mut conn.phase else {
            return;
        };
        if driver.ready_state() != ReadyState::Open {
            return;
        }
        let ctx = self.ctx(conn.peer.get(), io, outside);
        handler.on_drain(&mut Ws { driver, ctx: &ctx });
        // What it queued: a close's events and deadline, as after any handler call.
        self.pump(conn, io, &mut []);
    }

    fn shutdown_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        match &mut conn.phase {
            Phase::Open(driver, _) => match driver.ready_state() {
                ReadyState::Open => {
                    let _ = driver.close_connection(code::GOING_AWAY, "server shutting down");
                    self.pump(conn, io, &mut []);
                }
                // A client still waiting for its 101: nothing to say goodbye to, and no
                // reason to hold the shutdown for it.
                ReadyState::Connecting => {
                    driver.abort(code::ABNORMAL, "shut down before the connection opened");
                    self.pump(conn, io, &mut []);
                    io.close(CloseRequest::Now);
                }
                ReadyState::Closing | ReadyState::Closed => self.pump(conn, io, &mut []),
            },
            Phase::Handshake(_) | Phase::Tunnel(_) => io.close(CloseRequest::Now),
            Phase::Rejecting(..) | Phase::Done => {}
        }
    }

    fn output_plain<'s>(&self, conn: &'s Conn<H>, parts: &mut [IoSlice<'s>]) -> usize {
        match &conn.phase {
            Phase::Open(driver, _) => driver.pending_output_vectored(parts),
            Phase::Rejecting(response, at) => dispatch::one_part(&response[*at..], parts),
            Phase::Tunnel(tunnel) => dispatch::one_part(tunnel.output(), parts),
            _ => 0,
        }
    }

    fn consume_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        match &mut conn.phase {
            Phase::Open(driver, _) => {
                driver.consume_output(n);
                self.run_written(conn, io);
                self.resume_if_drained(conn, io);
                let Phase::Open(driver, _) = &mut conn.phase else {
                    return;
                };
                if conn.timers.is_over_limit()
                    && driver.buffered_amount() <= self.config.max_backpressure
                {
                    conn.timers
                        .buffered(io.now, false, &timer_config(&self.config));
                    self.settle(conn, io);
                    let Phase::Open(driver, _) = &mut conn.phase else {
                        return;
                    };
                    self.recycle(driver);
                    return;
                }
                self.recycle(driver);
            }
            Phase::Rejecting(_, at) => *at += n,
            Phase::Tunnel(tunnel) => tunnel.consume(n),
            _ => {}
        }
    }

    fn take_output_plain(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        into: &mut Outgoing,
    ) -> bool {
        match &mut conn.phase {
            Phase::Open(driver, _) => {
                if !driver.take_output(into) {
                    return false;
                }
                conn.in_flight += into.len();
                // What the callbacks send goes out with the next send.
                self.run_written(conn, io);
                true
            }
            Phase::Rejecting(response, at) => {
                let mut bytes = std::mem::take(response);
                bytes.drain(..*at);
                *at = 0;
                if bytes.is_empty() {
                    return false;
                }
                into.set_own(bytes);
                true
            }
            Phase::Tunnel(tunnel) => match tunnel.take_output() {
                Some(bytes) => {
                    into.set_own(bytes);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    fn sent_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        conn.in_flight = conn.in_flight.saturating_sub(n);
        self.resume_if_drained(conn, io);
        if conn.timers.is_over_limit() {
            self.settle(conn, io);
        }
        // All out: the (spare) buffer the driver writes into goes back to the pool, so an
        // idle connection holds none.
        if conn.in_flight == 0
            && let Phase::Open(driver, _) = &mut conn.phase
        {
            self.recycle(driver);
        }
    }

    fn closed_plain(
        &mut self,
        mut conn: Conn<H>,
        io: &mut Io<'_, Command>,
        cause: Option<io::Error>,
    ) -> Option<(SocketAddr, ClientInit<H>)> {
        conn.untunnel();
        let cause = cause.or_else(|| {
            self.redials
                .get(&io.key)
                .is_some_and(|redial| redial.connect_timed_out)
                .then(|| io::Error::new(io::ErrorKind::TimedOut, "the connect timed out"))
        });
        // A connect refused or timed out with addresses left: the handler goes on at the
        // next one, and nothing is reported.
        let retry = self.redial(&mut conn, io.key, cause.as_ref());
        if retry.is_none()
            && let Phase::Open(driver, _) = &mut conn.phase
        {
            match cause {
                Some(error) => driver.receive_error(error),
                None => driver.receive_eof(),
            }
            self.pump(&mut conn, io, &mut []);
            if let Phase::Open(driver, _) = &mut conn.phase {
                self.recycle(driver);
            }
        }
        self.forget(io.key);
        conn.phase = Phase::Done;
        retry
    }

    /// The key is free for the next connection: no callback, subscription, held input or
    /// gauge of this one may linger (nor a redial, once its connection is gone for good).
    pub(super) fn forget(&mut self, key: usize) {
        self.topics
            .get_mut()
            .leave_all(&self.pubsub, self.loop_index, key);
        self.held.remove(&key);
        #[cfg(feature = "tls")]
        self.ended_behind.remove(&key);
        if let Some(gauge) = self.gauges.get_mut().remove(&key) {
            // Its `Sender`s refuse from now on: what they would queue is dropped.
            gauge.gone.store(true, Ordering::Release);
        }
        self.redials.remove(&key);
        // Last: dropping the application's callbacks may panic (what they captured).
        drop(self.callbacks.get_mut().remove(&key));
    }

    /// `n` bytes of connection `key` went out (plain or TLS). Once any have, its connect
    /// completed, and no other address is tried: a timeout from here on is the server's.
    fn wrote(&mut self, key: usize, n: usize) {
        if n > 0 && !self.redials.is_empty() {
            self.redials.remove(&key);
        }
    }

    /// A client connection that failed to connect with addresses left: a fresh attempt
    /// at the next one, made of its handler.
    fn redial(
        &mut self,
        conn: &mut Conn<H>,
        key: usize,
        cause: Option<&io::Error>,
    ) -> Option<(SocketAddr, ClientInit<H>)> {
        let redial = self.redials.remove(&key)?;
        if !cause.is_some_and(|e| redial.retries(e)) {
            return None;
        }
        match std::mem::replace(&mut conn.phase, Phase::Done) {
            Phase::Open(mut driver, handler) if driver.ready_state() == ReadyState::Connecting => {
                match redial.next(handler) {
                    Ok(retry) => {
                        self.recycle(&mut driver);
                        Some(retry)
                    }
                    Err(handler) => {
                        conn.phase = Phase::Open(driver, handler);
                        None
                    }
                }
            }
            phase => {
                conn.phase = phase;
                None
            }
        }
    }
}

/// The deadlines' durations for a server's settings.
fn timer_config(config: &ServerConfig) -> TimerConfig {
    TimerConfig {
        handshake: config.handshake_timeout,
        close: config.close_timeout,
        idle: config.idle_timeout,
        // No grace: the refused send itself closes (`close_on_limit`), not output that
        // is over the cap with every send accepted (a large message, a slow peer), which
        // the timer dropped at its next tick, mid-frame.
        backpressure_grace: match config.backpressure_policy {
            BackpressurePolicy::Close { grace } if !grace.is_zero() => Some(grace),
            _ => None,
        },
    }
}

impl<F, H> WsService<F, H> {
    /// Returns an emptied output buffer to the pool, so idle connections hold none.
    fn recycle(&mut self, driver: &mut Driver) {
        if let Some(buf) = driver.take_output_buffer() {
            self.pool.push(buf);
        }
    }
}

/// A loop's spare output buffers, within a [`KeepBudget`] of `POOL_MAX_BYTES`.
struct BufferPool {
    buffers: Vec<Vec<u8>>,
    budget: KeepBudget,
}

impl Default for BufferPool {
    fn default() -> Self {
        BufferPool {
            buffers: Vec::new(),
            budget: KeepBudget::new(POOL_MAX_BYTES, POOL_MAX_CAPACITY),
        }
    }
}

impl BufferPool {
    fn pop(&mut self) -> Option<Vec<u8>> {
        let buf = self.buffers.pop()?;
        self.budget.release(buf.capacity());
        Some(buf)
    }

    /// Keeps `buf` if it fits the budget; frees it otherwise.
    fn push(&mut self, buf: Vec<u8>) {
        if self.budget.admit(buf.capacity()) {
            self.buffers.push(buf);
        }
    }
}

/// Whether a subscriber with `queued` bytes of output would take every frame of `run` as
/// separate publications: each is taken while the output is not over `cap` before it, so
/// the whole run is when the output before its last frame is within the cap.
fn takes_run_whole(queued: usize, run: &FrameRun, cap: usize) -> bool {
    let last = run.frames().last().map_or(0, SharedFrame::len);
    queued + run.len() - last <= cap
}

/// `message` rebuilt from its parts. Moved out of an [`Event`] as it is, a borrowed
/// message's length is copied in the pieces of the other variants' fields (2, 4 and 2
/// bytes), and the handler's first read of it, a whole word, waits for those stores to
/// land instead of being forwarded from them: most of a subscriber's per-message cost in
/// `wsload`'s profile (broadcast, 20-byte messages). Rebuilt, the length is one store.
#[inline(always)]
#[allow(clippy::needless_match)] // the match is the point: it rebuilds the value
fn whole_words(message: Message<'_>) -> Message<'_> {
    match message {
        Message::Binary(Cow::Borrowed(bytes)) => Message::Binary(Cow::Borrowed(bytes)),
        Message::Text(Cow::Borrowed(text)) => Message::Text(Cow::Borrowed(text)),
        owned => owned,
    }
}

#[cfg(test)]
mod tests {
    /// Rebuilding a message for the handler keeps its kind, bytes and ownership.
    #[test]
    fn a_message_rebuilt_in_whole_words_is_the_same_message() {
        use super::{Cow, Message, whole_words};
        let bytes = [1u8, 2, 3];
        for message in [
            Message::Binary(Cow::Borrowed(&bytes[..])),
            Message::Binary(Cow::Owned(bytes.to_vec())),
            Message::Text(Cow::Borrowed("héllo")),
            Message::Text(Cow::Owned("héllo".to_string())),
        ] {
            let borrowed = matches!(
                message,
                Message::Binary(Cow::Borrowed(_)) | Message::Text(Cow::Borrowed(_))
            );
            let rebuilt = whole_words(message.clone());
            assert_eq!(rebuilt, message);
            assert_eq!(
                matches!(
                    rebuilt,
                    Message::Binary(Cow::Borrowed(_)) | Message::Text(Cow::Borrowed(_))
                ),
                borrowed
            );
        }
    }

    /// A run goes whole exactly where every one of its frames would have gone alone:
    /// with the output at the cap before its last frame, and not one byte over.
    #[test]
    fn a_run_goes_whole_only_where_each_frame_would() {
        use crate::protocol::driver::MessageType;
        use crate::protocol::frame::{RunPool, SharedFrame};
        let frames: Vec<SharedFrame> = [10, 20, 30]
            .iter()
            .map(|&n| SharedFrame::new(&vec![b'x'; n], MessageType::Binary).unwrap())
            .collect();
        let run = RunPool::default().make(frames.clone());
        // Frame lengths 12, 22 and 32: the output before the last frame is queued + 34.
        let cap = 1000;
        // One by one, the last frame is taken iff queued + 34 <= cap.
        let alone = |queued: usize| {
            let mut out = queued;
            frames.iter().all(|f| {
                let taken = out <= cap;
                out += f.len();
                taken
            })
        };
        for queued in [0, cap - 35, cap - 34, cap - 33, cap, cap + 1] {
            assert_eq!(
                super::takes_run_whole(queued, &run, cap),
                alone(queued),
                "queued {queued}"
            );
        }
        assert!(super::takes_run_whole(cap - 34, &run, cap), "at the limit");
        assert!(
            !super::takes_run_whole(cap - 33, &run, cap),
            "one byte over"
        );
    }

    /// Idle memory per connection is mostly this slab entry; keep it from creeping up.
    #[test]
    fn connection_state_stays_small() {
        struct Quiet;
        impl super::Handler for Quiet {}
        // What an idle open connection keeps inline: the handshake, the subprotocol and
        // the pub/sub queue are each one pointer until used, the event queue and a control
        // frame's partial payload share one; the position after the last queued byte is
        // derived, not stored; deadlines are 8-byte instants.
        assert!(std::mem::size_of::<crate::Driver>() <= 120);
        assert!(std::mem::size_of::<crate::session::timers::Timers>() <= 32);
        assert!(std::mem::size_of::<super::Conn<Quiet>>() <= 184);
        // With the loop's own part of the slab entry (its flags in one byte, io_uring's
        // receive bit and send op id in 4 bytes): 216 bytes at most on either backend,
        // which leaves room under 256 bytes per idle connection for what a burst of
        // accepts leaves in the loop's heap (timer entries; io_uring's spare send batches)
        // (README, "Idle memory"). epoll's socket is a
        // mio `TcpStream`, a descriptor in release builds like std's (debug builds add a
        // selector id).
        use crate::reactor::core::slab_entry_size;
        let epoll = slab_entry_size::<super::Conn<Quiet>, std::net::TcpStream>();
        assert!(epoll <= 216, "{epoll}");
        #[cfg(target_os = "linux")]
        {
            let uring = slab_entry_size::<super::Conn<Quiet>, crate::reactor::uring::Socket>();
            assert!(uring <= 216, "{uring}");
        }
    }

    /// The pool keeps buffers up to its byte bound and one buffer's cap, and frees the
    /// rest; an empty (never grown) buffer is not worth keeping.
    #[test]
    fn the_buffer_pool_keeps_buffers_up_to_its_bounds() {
        use super::{BufferPool, POOL_MAX_BYTES, POOL_MAX_CAPACITY};
        let mut pool = BufferPool::default();
        pool.push(Vec::new());
        assert!(pool.pop().is_none(), "no zero-capacity buffers");
        pool.push(Vec::with_capacity(POOL_MAX_CAPACITY + 1));
        assert!(pool.pop().is_none(), "one byte over the per-buffer cap");
        // Exactly at the byte bound: every buffer kept; one byte more: the last one freed.
        let each = POOL_MAX_CAPACITY;
        for _ in 0..POOL_MAX_BYTES / each {
            let buf = Vec::with_capacity(each);
            assert_eq!(buf.capacity(), each);
            pool.push(buf);
        }
        assert_eq!(pool.budget.kept(), POOL_MAX_BYTES);
        pool.push(Vec::with_capacity(1));
        assert_eq!(pool.budget.kept(), POOL_MAX_BYTES, "over the bound: freed");
        let mut kept = 0;
        while let Some(buf) = pool.pop() {
            assert!(buf.capacity() >= each);
            kept += 1;
        }
        assert_eq!(kept, POOL_MAX_BYTES / each);
        assert_eq!(pool.budget.kept(), 0);
        // Popping makes room again.
        pool.push(Vec::with_capacity(64));
        assert_eq!(pool.pop().map(|b| b.capacity() >= 64), Some(true));
    }
}
