//! The connection task: one per connection, it owns the [`Driver`] and the stream, reads,
//! parses as the receiver asks, applies the senders' commands, writes the driver's output
//! and runs the deadlines.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use ::tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use ::tokio::sync::{Notify, mpsc, oneshot};
use ::tokio::time::{Instant, sleep_until, timeout};

use super::config::Config;
use super::receiver::WsReceiver;
use super::sender::WsSender;
use super::shared::{Ack, Command, Queued, Shared, state_code};
use crate::protocol::driver::{Driver, Event, ReadyState, Role, SendToken};
use crate::protocol::error::{Error, code};
use crate::session::timers::{Expired, TimerConfig, Timers};

/// Events the receiver may lag behind before the connection stops reading.
const EVENT_QUEUE: usize = 32;
/// Commands senders may queue ahead of the connection task (on top of the byte budget).
const COMMAND_QUEUE: usize = 64;

/// Runs a started driver over `stream` on a new task, for transports whose handshake
/// happened elsewhere (the hyper adapter uses this). `read_ahead` holds bytes already read
/// from the stream past the handshake. Queued driver events (a server's `Open`) come out
/// of the receiver first.
pub fn spawn<S>(
    stream: S,
    driver: Driver,
    read_ahead: Vec<u8>,
    config: &Config,
) -> (WsSender, WsReceiver)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    spawn_with(stream, driver, read_ahead, VecDeque::new(), config)
}

pub(super) fn spawn_with<S>(
    stream: S,
    driver: Driver,
    read_ahead: Vec<u8>,
    inbox: VecDeque<Event<'static>>,
    config: &Config,
) -> (WsSender, WsReceiver)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        buffered: AtomicUsize::new(driver.buffered_amount()),
        state: AtomicU8::new(state_code(driver.ready_state())),
        finished: AtomicBool::new(false),
        changed: Notify::new(),
        demand: Notify::new(),
        protocol: driver.protocol().map(str::to_string),
        limit: config.max_backpressure,
    });
    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let end = read_ahead.len();
    let mut buf = read_ahead;
    buf.resize(end.max(config.read_buffer_size.max(1)), 0);
    let connection = Connection {
        driver,
        timers: Timers::new(),
        timer_config: config.timer_config(),
        inbox,
        shared: shared.clone(),
        commands: command_rx,
        written: VecDeque::new(),
        pongs: Vec::new(),
        events: event_tx,
        config: config.clone(),
        close_seen: false,
        buf,
        start: 0,
        end,
        credit: false,
        receiver_gone: false,
    };
    ::tokio::spawn(connection.run(stream));
    (
        WsSender {
            commands: command_tx,
            shared: shared.clone(),
        },
        WsReceiver {
            events: event_rx,
            shared,
            requested: false,
            closed: false,
        },
    )
}

// ----- the connection task -----

/// Writes some of `output` (`Some(n)`), or flushes when it is empty (`None`). Cancel-safe:
/// a write dropped before completing wrote nothing.
async fn write_or_flush<W: AsyncWrite + Unpin>(
    wr: &mut W,
    output: &[u8],
) -> io::Result<Option<usize>> {
    if output.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(output).await.map(Some)
    }
}

struct Connection {
    driver: Driver,
    /// The close deadline and the idle keepalive.
    timers: Timers,
    timer_config: TimerConfig,
    /// Events taken from the driver, not yet handed to the receiver.
    inbox: VecDeque<Event<'static>>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Queued>,
    /// Receipts of confirmed sends, in send order, until their frame is written.
    written: VecDeque<(SendToken, oneshot::Sender<()>)>,
    /// Pings waiting for their pong: payload and receipt, oldest first.
    pongs: Vec<(Vec<u8>, oneshot::Sender<()>)>,
    events: mpsc::Sender<Event<'static>>,
    config: Config,
    /// A `Close` went into the inbox: nothing may follow it.
    close_seen: bool,
    /// The read buffer; `buf[start..end]` is read and not yet parsed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The receiver asked for an event and has not been given one since.
    credit: bool,
    receiver_gone: bool,
}

/// The clock the deadlines run on (tokio's, so a paused test clock applies).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Copies borrowed payloads so an event outlives the read buffer.
fn owned(event: Event<'_>) -> Event<'static> {
    match event {
        Event::Open => Event::Open,
        Event::Message(m) => Event::Message(m.into_owned()),
        Event::Ping(p) => Event::Ping(Cow::Owned(p.into_owned())),
        Event::Pong(p) => Event::Pong(Cow::Owned(p.into_owned())),
        Event::Error(e) => Event::Error(e),
        Event::Close { code, reason } => Event::Close { code, reason },
    }
}

impl Connection {
    fn push(&mut self, event: Event<'_>) {
        match event {
            Event::Close { .. } => {
                self.close_seen = true;
                // No pong comes after the close: the pings' receipts fail.
                self.pongs.clear();
            }
            Event::Pong(ref payload) => {
                if let Some(at) = self.pongs.iter().position(|(p, _)| p[..] == payload[..]) {
                    let _ = self.pongs.remove(at).1.send(());
                }
            }
            // A client driver handed over still connecting has just opened.
            Event::Open => self.timers.opened(now(), &self.timer_config),
            _ => {}
        }
        self.inbox.push_back(owned(event));
    }

    /// Moves the events the driver already queued (no input) into the inbox.
    fn drain(&mut self) {
        while let (_, Some(event)) = self.driver.poll_event(&mut []) {
            self.push(event);
        }
    }

    /// Whether the next event may be parsed now.
    ///
    /// While the connection is open, input is parsed one event per request of the
    /// receiver, after the commands queued before that request: an app that answers each
    /// message before asking for the next (an echo) sees its answer go out before whatever
    /// the following frames cause (a protocol error's close, a pong), as with a
    /// synchronous handler. Once closing, nothing can be sent any more, and input is parsed
    /// as it comes (up to the receiver's queue).
    fn may_parse(&self) -> bool {
        self.inbox.is_empty()
            && (self.credit || self.receiver_gone || self.driver.ready_state() != ReadyState::Open)
    }

    /// Parses up to one event from the unparsed input; true if one came.
    fn parse_one(&mut self) -> bool {
        if self.driver.ready_state() == ReadyState::Open {
            // Commands queued before the receiver's request go first.
            while let Ok((command, ack)) = self.commands.try_recv() {
                self.apply(command, ack);
            }
        }
        let mut buf = std::mem::take(&mut self.buf);
        let (used, event) = self.driver.poll_event(&mut buf[self.start..self.end]);
        self.start += used;
        let got = match event {
            Some(event) => {
                self.push(event);
                true
            }
            None => false,
        };
        self.buf = buf;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if got {
            self.credit = false;
        }
        got
    }

    /// The transport failed or ended: report the error (if the connection was not closed
    /// already) and let the driver report its close.
    fn transport_ended(&mut self, error: Option<io::Error>) {
        if let Some(e) = error
            && !self.close_seen
        {
            self.inbox.push_back(Event::Error(Error::Io(e)));
        }
        self.driver.receive_eof();
        self.drain();
    }

    fn apply(&mut self, command: Command, ack: Option<Ack>) {
        let cost = command.cost();
        let mut ping = None;
        // Refused commands (the connection closed meanwhile) are dropped, and so are their
        // receipts' senders: the receipts fail.
        let sent = match command {
            Command::Text(t) => self.driver.send_text(&t),
            Command::Binary(b) => self.driver.send_binary(&b),
            Command::Ping(p) => {
                let sent = self.driver.send_ping(&p);
                ping = Some(p);
                sent
            }
            Command::Pong(p) => self.driver.send_pong(&p),
            Command::Close(c, r) => self.driver.close_connection(c, &r),
        };
        match (sent, ack, ping) {
            (Ok(token), Some(Ack::Written(done)), _) => self.written.push_back((token, done)),
            (Ok(_), Some(Ack::Pong(done)), Some(payload)) => self.pongs.push((payload, done)),
            _ => {}
        }
        self.shared
            .buffered
            .store(self.driver.buffered_amount(), Ordering::Release);
        self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
    }

    /// Completes the receipts of the sends whose frames are now written.
    fn confirm_written(&mut self) {
        while let Some((token, _)) = self.written.front() {
            if !self.driver.is_sent(*token) {
                break;
            }
            let (_, done) = self.written.pop_front().expect("front exists");
            let _ = done.send(());
        }
    }

    /// Hands inbox events to the receiver as far as its queue has room.
    fn try_deliver(&mut self) {
        while let Some(event) = self.inbox.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.inbox.push_front(event);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.receiver_gone = true;
                    self.inbox.clear();
                    return;
                }
            }
        }
    }

    async fn run<S>(mut self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = ::tokio::io::split(stream);
        let shared = self.shared.clone();
        let mut reading = true;
        let mut writing = true;
        let mut flushed = true;
        let mut commands_open = true;
        match self.driver.ready_state() {
            ReadyState::Connecting => self.timers.handshake_started(now(), &self.timer_config),
            _ => self.timers.opened(now(), &self.timer_config),
        }
        loop {
            self.try_deliver();
            if self.may_parse() && self.parse_one() {
                continue;
            }
            self.shared.publish(&self.driver);
            if !writing || self.driver.is_finished() {
                break;
            }
            let state = self.driver.ready_state();
            if self.receiver_gone && !commands_open && state == ReadyState::Open {
                // Nobody can use the connection any more: close it properly.
                let _ = self.driver.close_connection(code::NORMAL, "");
                continue;
            }
            if matches!(state, ReadyState::Closing | ReadyState::Closed) {
                // Once closing, the peer has the close timeout to answer and take the rest.
                self.timers.close_started(now(), &self.timer_config);
            }
            if state == ReadyState::Closed {
                self.timers.closed();
            }
            let deadline = self.timers.poll_timeout().map(Instant::from_std);
            let has_output = !self.driver.pending_output().is_empty();
            let want_input = reading && self.may_parse() && self.start == self.end;
            ::tokio::select! {
                permit = self.events.clone().reserve_owned(), if !self.inbox.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            permit.send(self.inbox.pop_front().expect("the inbox has an event"));
                        }
                        Err(_) => {
                            self.receiver_gone = true;
                            self.inbox.clear();
                        }
                    }
                }
                _ = self.events.closed(), if !self.receiver_gone && self.inbox.is_empty() => {
                    self.receiver_gone = true;
                }
                _ = shared.demand.notified(), if !self.credit => self.credit = true,
                // Write while there is output, then flush (a TLS stream may buffer).
                done = write_or_flush(&mut wr, self.driver.pending_output()),
                    if has_output || !flushed => match done {
                    Ok(Some(0)) => {
                        writing = false;
                        self.transport_ended(Some(io::ErrorKind::WriteZero.into()));
                    }
                    Ok(Some(n)) => {
                        self.driver.consume_output(n);
                        self.confirm_written();
                        flushed = false;
                    }
                    Ok(None) => flushed = true,
                    Err(e) => {
                        writing = false;
                        self.transport_ended(Some(e));
                    }
                },
                command = self.commands.recv(), if commands_open => match command {
                    Some((command, ack)) => self.apply(command, ack),
                    None => commands_open = false,
                },
                read = rd.read(&mut self.buf), if want_input => match read {
                    Ok(0) => {
                        reading = false;
                        self.transport_ended(None);
                    }
                    Ok(n) => {
                        self.start = 0;
                        self.end = n;
                        self.timers.received(now(), &self.timer_config);
                    }
                    Err(e) => {
                        reading = false;
                        self.transport_ended(Some(e));
                    }
                },
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    match self.timers.handle_timeout(now(), &self.timer_config, &mut self.driver) {
                        // The opening or close handshake took too long: drop the peer.
                        Expired::Drop(_) => {
                            self.drain();
                            writing = false;
                        }
                        // A silent peer: the close frame goes out, then the close timeout.
                        Expired::IdleClose => self.drain(),
                        // A keepalive ping is queued (or nothing was due yet).
                        Expired::Ping | Expired::Nothing => {}
                    }
                }
                else => break,
            }
        }
        self.drain();
        // Closed: stop taking commands, tell the senders, hand out the last events while
        // the stream ends.
        self.commands.close();
        self.shared.finish();
        // What was not confirmed by now never will be: fail the receipts (unapplied
        // commands included) now rather than after the linger.
        while self.commands.try_recv().is_ok() {}
        self.written.clear();
        self.pongs.clear();
        let Connection {
            driver,
            inbox,
            events,
            config,
            mut buf,
            ..
        } = self;
        let linger = async {
            if !writing {
                return;
            }
            let wait_eof = async {
                while reading {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => reading = false,
                        Ok(_) => {}
                    }
                }
            };
            if driver.role() == Role::Server {
                // The server closes TCP first (RFC 6455 §7.1.1) but reads on for a moment,
                // so unread bytes do not turn the close into a reset.
                let _ = timeout(config.close_timeout, wr.shutdown()).await;
                let _ = timeout(config.close_timeout, wait_eof).await;
            } else {
                // The client waits for the server to close first.
                let _ = timeout(config.close_timeout, wait_eof).await;
                let _ = timeout(config.close_timeout, wr.shutdown()).await;
            }
        };
        let flush_events = async {
            for event in inbox {
                if events.send(event).await.is_err() {
                    break;
                }
            }
        };
        ::tokio::join!(linger, flush_events);
    }
}
