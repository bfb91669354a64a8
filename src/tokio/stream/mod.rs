//! [`WebSocketStream`]: one connection driven inline by whoever polls it, with no task or
//! channel in between. This file: the type, its life (deadlines, the close and the end of
//! the transport) and the `Stream`/`Sink` impls; `read.rs` receives, `write.rs` sends.

mod read;
mod wakers;
mod write;

use wakers::FlushWatch;
pub(crate) use wakers::{Side, SplitWakers};

pub use write::Reply;
use write::{Outbox, recycle};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::time::{Instant, Sleep, sleep_until};

use super::config::Config;
use crate::protocol::driver::{Driver, Event, Message, ReadyState, Role};
use crate::protocol::error::{Error, UsageError};
use crate::session::timers::{
    Delivery, Expired, Stall, TimerConfig, Timers, earliest, write_timed_out,
};

/// Gathered writes take up to this many parts of the pending output at once.
const WRITE_PARTS: usize = 8;
/// A received message's buffer, given back through a send, is kept for the next message
/// when it is at most this large.
const SPARE_MAX: usize = 64 * 1024;
/// Answers queued while events are lent from input already read wait for the input to
/// run out (one gathered write for all of them) until this many bytes are unwritten.
const COALESCE_MAX: usize = 64 * 1024;
/// Data messages from this size on are written straight from the caller's payload when
/// nothing is queued before them (below it, the copy into the driver costs less than a
/// gathered write).
const DIRECT_MIN: usize = 4 * 1024;

/// The clock the deadlines run on (tokio's, so a paused test clock applies).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Where the stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Events flow; `Close` not handed out yet.
    Open,
    /// `Close` was handed out: the next poll writes what is left and ends the transport.
    Ending(Linger),
    /// The transport is done with: `None` from now on.
    Done,
}

/// The steps of ending the transport after the close (RFC 6455 §7.1.1: the server closes
/// TCP first; the client waits for the server to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linger {
    /// Not started: the deadline is not set yet.
    Start,
    /// Writing the last output.
    Flush,
    /// Server: shutting down the write side, then reading what has arrived.
    Shutdown,
    DrainEof,
    /// Client: reading until the server's EOF, then shutting down.
    ClientEof,
    ClientShutdown,
}

/// A WebSocket connection over any tokio `AsyncRead + AsyncWrite` stream, driven inline:
/// the task that polls it reads, parses, writes and runs the deadlines, with no task or
/// channel in between. Created by [`WebSocketStream::accept`], [`WebSocketStream::connect`],
/// [`WebSocketStream::client`], [`WebSocketStream::from_driver`] (any handshake done
/// elsewhere) or the hyper adapter.
///
/// Receiving: [`WebSocketStream::next`] (or `futures_core::Stream`) yields the driver's
/// [`Event`]s in order: `Open`, then messages, pings, pongs and errors, then exactly one
/// `Close`, then `None`. Messages are owned (a copy out of the reused read buffer; a buffer
/// given back through [`WebSocketStream::send_message`] is reused for the next one).
///
/// Sending: `send_text`, `send_binary`, `send_message`, `send`, `send_ping`, `send_pong`,
/// `close_connection`, or the `futures_sink::Sink` of [`Message`]s. Each send waits while
/// the unwritten output is over [`Config::max_backpressure`] (writing meanwhile), then
/// queues the whole frame and writes as much as the transport takes without waiting.
/// What is left goes out when a poll of the stream needs input from the transport (events
/// already read are handed out first, up to 64 KiB of output waiting) or on any send:
/// keep polling [`WebSocketStream::next`] (an echo loop does), or call
/// [`WebSocketStream::flush`].
/// `Sink::feed` queues frames without writing, so a burst goes out in one write on the
/// next `flush`, or on the `next` that finds no more events read (an echo loop that
/// answers with `feed` writes a pipelining peer's burst of answers at once; `send`
/// writes each answer as it goes).
///
/// Input is read as [`WebSocketStream::next`] asks (demand-driven): a task that does not
/// poll it reads nothing and TCP pushes back on the peer. While the unwritten output is
/// over the limit, `next` writes before it parses more (a peer that does not read cannot
/// make this side buffer pongs without end). Pings are answered, and a close echoed, by
/// the driver; deadlines ([`Config::idle_timeout`], [`Config::close_timeout`]) run while
/// the stream is polled.
///
/// After `Close`, poll [`WebSocketStream::next`] once more (to `None`): that writes the
/// last bytes and ends the transport as RFC 6455 asks, within [`Config::close_timeout`]: a
/// server shuts down its side of TCP first (reading what has arrived, so the close is not
/// a reset) and does not wait for the client's; a client waits for the server's. Dropping
/// the stream instead closes the socket at once.
///
/// Cancellation: every method is cancel-safe. All state lives in the stream, so a `next`
/// dropped before it completes loses no input; a `send*` dropped before it completes
/// queued nothing, and once it completed the whole frame is queued (a frame is never
/// written in part on a caller's behalf and then abandoned).
///
/// ```no_run
/// # async fn demo() -> Result<(), websocket_driver::Error> {
/// use websocket_driver::tokio::WebSocketStream;
/// use websocket_driver::{Event, Options};
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
/// let (tcp, _) = listener.accept().await?;
/// let mut ws = WebSocketStream::accept(tcp, &Options::default()).await?;
/// while let Some(event) = ws.next().await {
///     if let Event::Message(message) = event {
///         ws.send_message(message).await?; // echo
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WebSocketStream<S> {
    io: S,
    driver: Driver,
    /// The read buffer, reused; `buf[start..end]` is read and not yet parsed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The read buffer's usual size (it grows for a frame `recv` reads whole), and the
    /// least of a frame's payload still to come that is received straight into its
    /// message's buffer.
    buf_size: usize,
    /// Events since the last frame that needed more than `buf_size` (a grown buffer shrinks
    /// back after 64).
    small_frames: u32,
    /// `buf[start..]` begins a frame (the driver is between frames), so a frame can be
    /// read whole before the driver sees it.
    at_frame: bool,
    /// The transport ended while a frame was being read whole; the driver learns it once
    /// it has the bytes.
    eof_seen: bool,
    /// A payload receive (`poll_payload`) put bytes in the driver's message: it may have
    /// an event for no input.
    payload_in: bool,
    limit: usize,
    timer_config: TimerConfig,
    timers: Timers,
    /// Since when output has waited on a transport that takes none of it (open phase
    /// only: the linger has its own deadline), and how long it may.
    stall: Stall,
    /// Write attempts that moved output (counted in the open phase, wrapping): the idle
    /// keepalive's sign that a peer with our output waiting on it is still taking some.
    progress_marks: u64,
    write_timeout: Duration,
    /// The timer wheel entry, made on first use and re-armed lazily.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline `sleep` is set to.
    armed: Option<std::time::Instant>,
    /// When ending the transport must be over.
    linger_by: Option<std::time::Instant>,
    /// The close deadline was armed (the driver left `Open`).
    closing_noted: bool,
    closed_noted: bool,
    reading: bool,
    writing: bool,
    /// Over the limit, no new input is parsed until the peer takes some output (a peer
    /// that does not read cannot make us queue without bound). Off for the split API's
    /// task, whose senders wait on the limit themselves.
    hold_over_limit: bool,
    /// A write failed while input was still to be parsed: reported once it is.
    write_failure: Option<io::Error>,
    flushed: bool,
    /// Bytes were written or a deadline fired since the last look (for the connection task).
    progressed: bool,
    /// An event to hand out first: the `Open` of a client whose handshake consumed the
    /// driver's, or what a send that had to read the handshake's answer parsed.
    held: Option<Event<'static>>,
    phase: Phase,
    /// A message buffer to reuse.
    spare: Vec<u8>,
    /// A frame written around the driver, not all taken yet.
    outbox: Outbox,
    /// Sets the transport's receive low-water mark, where it has one (see
    /// [`WebSocketStream::with_recv_low_water`]).
    low_water: Option<fn(&S, usize) -> io::Result<()>>,
    /// The mark is raised.
    low_water_raised: bool,
    /// For the `Stream` and `Sink` impls, which a split puts on two tasks.
    split_wakers: SplitWakers,
    /// The transport's flush, while only the transport's own buffer holds output.
    flush_watch: FlushWatch,
}

fn not_open() -> Error {
    UsageError::NotOpen.into()
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketStream<S> {
    /// Runs a started driver over `io`, for transports whose handshake happened elsewhere.
    /// `read_ahead` holds bytes already read from `io` past the handshake. A server driver
    /// must have had [`Driver::start_connection`] called and its 101 written (or marked
    /// written with [`Driver::consume_output`]); its queued `Open` comes out first. A client
    /// driver may be handed over still connecting: the stream then writes its request and
    /// reads the response (within [`Config::handshake_timeout`]).
    pub fn from_driver(io: S, driver: Driver, read_ahead: &[u8], config: &Config) -> Self {
        let mut buf = vec![0u8; config.read_buffer_size.max(read_ahead.len()).max(1)];
        buf[..read_ahead.len()].copy_from_slice(read_ahead);
        let timer_config = config.timer_config();
        let mut timers = Timers::new();
        match driver.ready_state() {
            ReadyState::Connecting => timers.handshake_started(now(), &timer_config),
            _ => timers.opened(now(), &timer_config),
        }
        let at_frame = driver.ready_state() != ReadyState::Connecting;
        WebSocketStream {
            io,
            driver,
            buf,
            start: 0,
            end: read_ahead.len(),
            buf_size: config.read_buffer_size.max(1),
            small_frames: 0,
            at_frame,
            eof_seen: false,
            write_failure: None,
            payload_in: false,
            limit: config.max_backpressure,
            timer_config,
            timers,
            stall: Stall::default(),
            progress_marks: 0,
            write_timeout: config.write_timeout,
            sleep: None,
            armed: None,
            linger_by: None,
            closing_noted: false,
            closed_noted: false,
            reading: true,
            writing: true,
            hold_over_limit: true,
            flushed: true,
            progressed: false,
            held: None,
            phase: Phase::Open,
            spare: Vec::new(),
            outbox: Outbox::default(),
            low_water: None,
            low_water_raised: false,
            split_wakers: SplitWakers::default(),
            flush_watch: FlushWatch::default(),
        }
    }

    /// Lets the stream raise its socket's receive low-water mark (`SO_RCVLOWAT`) while
    /// the rest of a large frame arrives (at least 128 KiB of it still to come), so the
    /// task is woken once per 128 KiB instead of once per TCP segment, and the peer's
    /// kernel wakes it that much less often; the mark goes back to 1 before less than that
    /// is owed. Not while an idle keepalive runs ([`Config::idle_timeout`]), which must
    /// hear of input as it arrives. Over loopback, an echo of 1 MiB messages made 9 % more
    /// echoes a second with it (`examples/echo_tokio.rs`; the hyper adapter 11 %); where
    /// no frame is that large it changes nothing. The hyper and axum adapters set it
    /// themselves when they run on the TCP socket, and so do [`WebSocketStream::connect`]
    /// and the split API's `connect`, whose socket is their own.
    ///
    /// For a plain socket only: the mark counts what the frame still owes in the stream's
    /// own bytes, and a layer between (TLS) that holds part of them in a record it has not
    /// finished could leave the socket short of the mark for good.
    ///
    /// ```no_run
    /// # async fn demo(tcp: tokio::net::TcpStream) -> Result<(), websocket_driver::Error> {
    /// use websocket_driver::{Options, tokio::WebSocketStream};
    /// let ws = WebSocketStream::accept(tcp, &Options::default()).await?.with_recv_low_water();
    /// # let _ = ws; Ok(()) }
    /// ```
    pub fn with_recv_low_water(mut self) -> Self
    where
        S: std::os::fd::AsFd,
    {
        self.low_water = Some(|io, mark| crate::reactor::low_water::set_low_water(io, mark));
        self
    }

    /// Sets the low-water mark with `set` (for transports that hold a socket inside:
    /// hyper's, and the unit tests' recording one).
    #[cfg(any(feature = "hyper", test))]
    pub(crate) fn with_low_water_setter(mut self, set: fn(&S, usize) -> io::Result<()>) -> Self {
        self.low_water = Some(set);
        self
    }

    /// A client whose handshake already consumed the driver's `Open`: hand it out first.
    pub(super) fn with_open_first(mut self) -> Self {
        self.held = Some(Event::Open);
        self
    }

    /// Bookkeeping for an event on its way out.
    fn delivered(&mut self, event: &Event<'static>, cx: &mut Context<'_>) {
        match event {
            Event::Open => self.timers.opened(now(), &self.timer_config),
            Event::Close { .. } => {
                self.phase = Phase::Ending(Linger::Start);
                // The close frame (an echo, or the one failing the connection) goes out now,
                // even if the caller stops polling after this event.
                self.note_state();
                self.poll_write_best_effort(cx);
            }
            Event::Error(_) => {
                self.note_state();
                self.poll_write_best_effort(cx);
            }
            _ => {}
        }
    }

    /// Arms the close deadline once the driver leaves `Open`.
    fn note_state(&mut self) {
        let state = self.driver.ready_state();
        if !self.closing_noted && matches!(state, ReadyState::Closing | ReadyState::Closed) {
            self.closing_noted = true;
            self.timers.close_started(now(), &self.timer_config);
        }
        if !self.closed_noted && state == ReadyState::Closed {
            self.closed_noted = true;
            self.timers.closed(now(), &self.timer_config);
        }
    }

    /// A write failed: stop reading and writing, but what was already read is still
    /// parsed (a peer's last messages and its Close may have come before it reset the
    /// connection); the failure is reported after it, as [`Self::transport_failed`] does.
    fn write_failed(&mut self, e: io::Error) {
        // A change the connection task must look at (its state, what it may parse), as
        // written bytes are: without this a failure met while it only wrote went unseen,
        // and the task waited for a wake that no longer came.
        self.progressed = true;
        if self.start == self.end {
            return self.transport_failed(e);
        }
        self.reading = false;
        self.writing = false;
        self.write_failure = Some(e);
    }

    /// The transport failed: stop reading and writing; the driver reports the error (as
    /// `Error::Io`, after the events it already queued) and then 1006, unless its close was
    /// already reported.
    fn transport_failed(&mut self, e: io::Error) {
        self.reading = false;
        self.writing = false;
        self.start = 0;
        self.end = 0;
        if self.phase == Phase::Open {
            self.driver.receive_error(e);
        } else {
            self.driver.receive_eof();
        }
    }

    /// Polls `deadline` on the one timer entry; true once it has passed. Re-arms lazily: a
    /// later deadline waits for the armed one to fire first, and is armed when it does
    /// (false then means the timer is armed for `deadline` and will wake the task).
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: std::time::Instant) -> bool {
        loop {
            let sleep = match (&mut self.sleep, self.armed) {
                (Some(sleep), Some(armed)) if armed <= deadline => sleep,
                (slot, _) => {
                    let at = Instant::from_std(deadline);
                    self.armed = Some(deadline);
                    match slot {
                        Some(sleep) => {
                            sleep.as_mut().reset(at);
                            sleep
                        }
                        None => slot.insert(Box::pin(sleep_until(at))),
                    }
                }
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.armed = None;
            if now() >= deadline {
                return true;
            }
            // An earlier deadline fired: arm this one before reporting it pending.
        }
    }

    /// Runs the deadlines that passed (the idle keepalive, the close deadline, the write
    /// timeout) and arms the timer for the next.
    #[inline]
    fn poll_timers(&mut self, cx: &mut Context<'_>) {
        // The receive loop asks on every turn; most find no deadline at all (no keepalive
        // configured, no handshake or close under way, no output waiting on the peer).
        if self.timers.is_unarmed() && !(self.writing && self.stall.is_waiting()) {
            return;
        }
        self.run_timers(cx);
    }

    fn run_timers(&mut self, cx: &mut Context<'_>) {
        loop {
            let stalled_by = if self.writing {
                self.stall.deadline(self.write_timeout)
            } else {
                None
            };
            let Some(deadline) = earliest(self.timers.poll_timeout(), stalled_by) else {
                return;
            };
            if !self.poll_deadline(cx, deadline) && self.armed.is_some() {
                return;
            }
            self.progressed = true;
            if stalled_by.is_some_and(|by| now() >= by) {
                // The clock may have run while nobody asked the transport (an app busy
                // elsewhere): ask once more, since a peer that read meanwhile made room.
                if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                    self.write_failed(e);
                    return;
                }
                if self
                    .stall
                    .deadline(self.write_timeout)
                    .is_none_or(|by| now() < by)
                {
                    continue;
                }
                // The peer took nothing for the write timeout: the connection fails (its
                // error, then 1006) as a failed write does.
                self.stall = Stall::default();
                self.write_failed(write_timed_out(self.write_timeout));
                return;
            }
            // Output waiting on a full transport that took some of it since the last idle
            // deadline: the peer is reading (a download it reads slowly puts our ping
            // and its pong behind everything queued), so the idle period starts over.
            let delivery = Delivery {
                acked: self.progress_marks,
                backlog: self.stall.is_waiting(),
            };
            match self.timers.handle_timeout_with_delivery(
                now(),
                &self.timer_config,
                &mut self.driver,
                || Some(delivery),
            ) {
                // The opening or close handshake took too long: drop the peer (the
                // driver's `Close` is queued).
                Expired::Drop(_) => {
                    self.reading = false;
                    self.writing = false;
                    self.start = 0;
                    self.end = 0;
                    return;
                }
                // A ping or an idle close frame is queued; the loop re-arms.
                Expired::IdleClose | Expired::Ping | Expired::Nothing => {}
            }
        }
    }

    /// Ends the transport after the close: the last output, then the TCP close in the
    /// order RFC 6455 §7.1.1 asks, all within the close timeout.
    fn poll_linger(&mut self, cx: &mut Context<'_>, mut step: Linger) -> Poll<()> {
        if step == Linger::Start {
            // A flush after the `Close` may have started the clock already.
            let close = self.timer_config.close;
            self.linger_by
                .get_or_insert_with(|| crate::instant::deadline_after(now(), close));
            step = Linger::Flush;
        }
        let deadline = self.linger_by.expect("set when ending starts");
        loop {
            self.phase = Phase::Ending(step);
            if !self.writing || self.poll_deadline(cx, deadline) {
                return Poll::Ready(());
            }
            step = match step {
                Linger::Start | Linger::Flush => {
                    if ready!(self.poll_write_out(cx)).is_err() {
                        return Poll::Ready(());
                    }
                    match self.driver.role() {
                        Role::Server => Linger::Shutdown,
                        Role::Client => Linger::ClientEof,
                    }
                }
                Linger::Shutdown => {
                    if ready!(Pin::new(&mut self.io).poll_shutdown(cx)).is_err() {
                        return Poll::Ready(());
                    }
                    Linger::DrainEof
                }
                Linger::DrainEof => {
                    // What already arrived is read, so closing the socket does not turn into
                    // a reset; the peer is not waited for (its FIN may never come).
                    let _ = self.poll_drain(cx);
                    return Poll::Ready(());
                }
                Linger::ClientEof => {
                    ready!(self.poll_drain(cx));
                    Linger::ClientShutdown
                }
                Linger::ClientShutdown => {
                    let _ = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
                    return Poll::Ready(());
                }
            };
        }
    }

    /// Reads and discards until EOF or an error.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.reading {
            let mut read = ReadBuf::new(&mut self.buf);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
                Ok(()) if !read.filled().is_empty() => {}
                _ => self.reading = false,
            }
        }
        Poll::Ready(())
    }

    /// Writes pending output and runs the deadlines without parsing input; `Ready` when
    /// something happened (bytes written, a deadline fired). For the connection task.
    pub(super) fn poll_background(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.phase == Phase::Open {
            // A sender's close changed the driver's state: its deadline counts from now.
            self.note_state();
            self.poll_timers(cx);
            self.poll_write_best_effort(cx);
        }
        self.take_progress()
    }

    /// The application holds input back (the connection task parses nothing for now):
    /// the peer's pongs go unheard meanwhile, so the idle keepalive waits with it rather
    /// than take a busy application for a silent peer.
    pub(super) fn input_held(&mut self) {
        self.received();
    }

    /// Whether input already read waits to be parsed (more events may come without a read).
    pub(super) fn has_unparsed_input(&self) -> bool {
        self.start < self.end
    }

    /// Whether bytes were written or a deadline fired since the last call.
    pub(super) fn take_progress(&mut self) -> Poll<()> {
        if std::mem::take(&mut self.progressed) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The backpressure limit.
    pub(super) fn limit(&self) -> usize {
        self.limit
    }

    /// Parses input whatever the output's level (see `hold_over_limit`): for the split
    /// API's task. Holding input there only deadlocked a client that streams to an echo
    /// server: its output over the limit, it stopped reading the echoes, and the server,
    /// blocked writing them, stopped reading it.
    pub(super) fn parse_over_limit(&mut self) {
        self.hold_over_limit = false;
    }

    /// Whether output can still be written (not after a write or the transport failed).
    pub(super) fn can_write(&self) -> bool {
        self.writing
    }
}

impl<S> WebSocketStream<S> {
    /// The connection state.
    pub fn ready_state(&self) -> ReadyState {
        self.driver.ready_state()
    }

    /// Whether messages can be sent.
    pub fn is_open(&self) -> bool {
        self.driver.ready_state() == ReadyState::Open
    }

    /// Bytes queued and not yet written (the browser API's `bufferedAmount`).
    pub fn buffered_amount(&self) -> usize {
        self.unwritten()
    }

    /// Bytes of a frame written around the driver still waiting for the transport (they
    /// go out before anything the driver holds).
    pub(super) fn unwritten_around_driver(&self) -> usize {
        self.outbox.len()
    }

    fn unwritten(&self) -> usize {
        self.driver.buffered_amount() + self.outbox.len()
    }

    /// The agreed subprotocol, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.driver.protocol()
    }

    /// `"hybi-13"`.
    pub fn version(&self) -> &'static str {
        "hybi-13"
    }

    /// The driver (read-only: state, role, subprotocol).
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    pub(super) fn driver_mut(&mut self) -> &mut Driver {
        &mut self.driver
    }

    /// The transport.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The transport. Reading or writing it directly corrupts the connection.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> futures_core::Stream for WebSocketStream<S> {
    type Item = Event<'static>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<'static>>> {
        let this = self.get_mut();
        let waker = this.split_wakers.waker(Side::Receiving, cx).clone();
        this.poll_next_event(&mut Context::from_waker(&waker))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> futures_core::FusedStream for WebSocketStream<S> {
    fn is_terminated(&self) -> bool {
        self.phase == Phase::Done
    }
}

/// The `Stream` and `Sink` sides may be polled from two tasks (`StreamExt::split`): each
/// wakes when the other's poll took over the socket's or the deadline's waker (see
/// `SplitWakers`).
///
/// Messages go in whole: `poll_ready` waits while the output is over the limit,
/// `start_send` queues the frame, `poll_flush` writes and flushes, `poll_close` starts the
/// close handshake (1000) if it has not started and flushes. `SinkExt::send` therefore
/// returns once the frame is written; `feed` queues only.
impl<'a, S: AsyncRead + AsyncWrite + Unpin> futures_sink::Sink<Message<'a>> for WebSocketStream<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let waker = this.split_wakers.waker(Side::Sending, cx).clone();
        this.poll_send_ready(&mut Context::from_waker(&waker))
    }

    fn start_send(self: Pin<&mut Self>, item: Message<'a>) -> Result<(), Error> {
        let this = self.get_mut();
        let spare = &mut this.spare;
        if !(this.phase == Phase::Open && this.writing) {
            return Err(not_open());
        }
        this.driver.send_message(&item)?;
        recycle(item, spare);
        this.note_state();
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let waker = this.split_wakers.waker(Side::Sending, cx).clone();
        this.poll_flush_all(&mut Context::from_waker(&waker))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.driver.ready_state() == ReadyState::Open {
            this.driver
                .close_connection(crate::protocol::error::code::NORMAL, "")?;
            this.note_state();
        }
        let waker = this.split_wakers.waker(Side::Sending, cx).clone();
        this.poll_flush_all(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::time::Duration;

    use ::tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;
    use crate::protocol::options::Options;
    use crate::reactor::low_water::LOW_WATER;

    thread_local! {
        /// The marks the stream under test set, in order (its setter runs on the test's
        /// own thread: a current-thread runtime).
        static MARKS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    fn record(_: &DuplexStream, mark: usize) -> io::Result<()> {
        MARKS.with(|marks| marks.borrow_mut().push(mark));
        Ok(())
    }

    /// A server stream over a duplex pipe with `options` and `config`, its `Open` taken,
    /// and the open client driver and the pipe's other end.
    async fn open_server(
        options: &Options,
        config: &Config,
    ) -> (WebSocketStream<DuplexStream>, Driver, DuplexStream) {
        let (server_end, mut client_end) = duplex(8 << 20);
        let mut client = Driver::make_client("ws://pipe/", options).unwrap();
        client.start_connection();
        client_end.write_all(client.pending_output()).await.unwrap();
        let n = client.pending_output().len();
        client.consume_output(n);
        let mut ws = WebSocketStream::accept_with(server_end, options, config, |_| Ok(()))
            .await
            .unwrap();
        let mut response = vec![0; 4096];
        let n = client_end.read(&mut response).await.unwrap();
        assert!(matches!(
            client.poll_event(&mut response[..n]).1,
            Some(Event::Open)
        ));
        assert!(matches!(ws.next().await, Some(Event::Open)));
        (ws, client, client_end)
    }

    /// Sends a 1 MiB and then a 10-byte message through a stream that records its marks,
    /// and returns the marks.
    async fn marks_for_a_large_then_a_small_message(config: &Config) -> Vec<usize> {
        MARKS.with(|marks| marks.borrow_mut().clear());
        let (ws, mut client, mut client_end) = open_server(&Options::default(), config).await;
        let mut ws = ws.with_low_water_setter(record);
        let large: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        client.send_binary(&large).unwrap();
        client.send_binary(b"small one!").unwrap();
        client_end.write_all(client.pending_output()).await.unwrap();
        for expected in [&large[..], b"small one!"] {
            let event = ::tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("the stream does not wait on a stale mark");
            match event {
                Some(Event::Message(Message::Binary(data))) => assert!(data == expected),
                other => panic!("{other:?}"),
            }
        }
        MARKS.with(|marks| marks.take())
    }

    /// Raised once while the 1 MiB frame owes at least 128 KiB, lowered once before it
    /// owes less; never under an idle keepalive.
    #[::tokio::test]
    async fn the_low_water_mark_follows_what_a_large_frame_still_owes() {
        let marks = marks_for_a_large_then_a_small_message(&Config::default()).await;
        assert_eq!(marks, [LOW_WATER, 1]);
        let keepalive = Config::default().idle_timeout(Duration::from_secs(30));
        let marks = marks_for_a_large_then_a_small_message(&keepalive).await;
        assert!(marks.is_empty(), "{marks:?}");
    }

    /// With a read buffer larger than the mark (512 KiB), the end of a large frame is read
    /// into the read buffer, and that read may bring the first bytes of the next, small
    /// frame: the mark is not raised for such a read, so the small frame's last bytes
    /// still wake the stream (it waited for them forever under a raised mark).
    #[::tokio::test]
    async fn a_small_frame_after_a_large_one_is_not_held_by_the_mark_with_a_large_read_buffer() {
        let config = Config::default().read_buffer_size(512 * 1024);
        MARKS.with(|marks| marks.borrow_mut().clear());
        let (ws, mut client, mut client_end) = open_server(&Options::default(), &config).await;
        let mut ws = ws.with_low_water_setter(record);
        let large: Vec<u8> = (0..1_200_000).map(|i| (i % 251) as u8).collect();
        client.send_binary(&large).unwrap();
        client.send_binary(b"small one!").unwrap();
        let wire = client.pending_output().to_vec();
        let frame_len = 14 + large.len();
        client_end.write_all(&wire[..1_000_000]).await.unwrap();
        assert!(
            ::tokio::time::timeout(Duration::from_millis(50), ws.next())
                .await
                .is_err()
        );
        // The frame's end and 3 bytes of the next frame's header, in one read.
        client_end
            .write_all(&wire[1_000_000..frame_len + 3])
            .await
            .unwrap();
        match ws.next().await {
            Some(Event::Message(Message::Binary(data))) => assert!(data == large),
            other => panic!("{other:?}"),
        }
        assert!(
            ::tokio::time::timeout(Duration::from_millis(50), ws.next())
                .await
                .is_err()
        );
        let marks = MARKS.with(|marks| marks.borrow().clone());
        assert_eq!(
            marks.last(),
            Some(&1),
            "lowered while the small frame waits: {marks:?}"
        );
        client_end.write_all(&wire[frame_len + 3..]).await.unwrap();
        match ws.next().await {
            Some(Event::Message(Message::Binary(data))) => assert_eq!(&data[..], b"small one!"),
            other => panic!("{other:?}"),
        }
    }

    /// With permessage-deflate agreed a large message is compressed too: the direct write
    /// of a large frame (header and payload, no copy) is for uncompressed connections only.
    #[::tokio::test]
    async fn large_sends_are_compressed_when_deflate_is_agreed() {
        let options = Options::default().deflate(true);
        let (mut ws, mut client, mut client_end) = open_server(&options, &Config::default()).await;
        assert!(client.deflate_params().is_some(), "deflate agreed");
        for len in [1000, 16 * 1024, 300 * 1024] {
            ws.send_binary(vec![0u8; len]).await.unwrap();
            ws.flush().await.unwrap();
            let mut wire = vec![0u8; 1 << 20];
            let n = client_end.read(&mut wire).await.unwrap();
            assert!(
                wire[0] & 0x40 != 0,
                "{len} B sent uncompressed ({n} B on the wire)"
            );
            assert!(n < len / 10, "{len} B of zeros took {n} B");
            match client.poll_event(&mut wire[..n]).1 {
                Some(Event::Message(Message::Binary(data))) => assert_eq!(data.len(), len),
                other => panic!("{other:?}"),
            }
        }
    }

    /// `connect` opens the socket itself, so it sets the mark; `accept` over a socket the
    /// caller opened leaves that to the caller.
    #[::tokio::test]
    async fn connect_sets_the_low_water_mark_and_accept_leaves_it_to_the_caller() {
        let listener = ::tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = ::tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let ws = WebSocketStream::accept(tcp, &Options::default())
                .await
                .unwrap();
            ws.low_water.is_some()
        });
        let ws = WebSocketStream::connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        assert!(ws.low_water.is_some(), "connect sets the mark");
        assert!(!server.await.unwrap(), "accept leaves it to the caller");
    }
}
