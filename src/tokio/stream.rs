//! [`WebSocketStream`]: one connection driven inline by whoever polls it, with no task or
//! channel in between.

use std::borrow::Cow;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::time::{Instant, Sleep, sleep_until};

use super::config::Config;
use crate::protocol::driver::{Driver, Event, Message, MessageType, ReadyState, Role, SendToken};
use crate::protocol::error::{Error, UsageError};
use crate::protocol::frame::{
    FrameHeader, MAX_HEADER_LEN, OpCode, Status, encode_header, parse_header,
};
use crate::session::timers::{Expired, TimerConfig, Timers};

/// Gathered writes take up to this many parts of the pending output at once.
const WRITE_PARTS: usize = 8;
/// A received message's buffer, given back through a send, is kept for the next message
/// when it is at most this large.
const SPARE_MAX: usize = 64 * 1024;
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
/// What is left goes out on the next poll of any method: keep polling
/// [`WebSocketStream::next`] (an echo loop does), or call [`WebSocketStream::flush`].
/// `Sink::feed` queues frames without writing, so a burst goes out in one write on the
/// next `flush`.
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
    /// The read buffer's usual size, and the most it grows to for a whole frame.
    buf_size: usize,
    buf_max: usize,
    /// Events since the last frame that needed more than `buf_size` (a grown buffer shrinks
    /// back after 64).
    small_frames: u32,
    /// `buf[start..]` begins a frame (the driver is between frames), so a frame can be
    /// read whole before the driver sees it.
    at_frame: bool,
    /// The transport ended while a frame was being read whole; the driver learns it once
    /// it has the bytes.
    eof_seen: bool,
    limit: usize,
    timer_config: TimerConfig,
    timers: Timers,
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
    flushed: bool,
    /// Bytes were written or a deadline fired since the last look (for the connection task).
    progressed: bool,
    /// A transport error to report before the driver's close.
    io_error: Option<io::Error>,
    /// Hand out `Open` first (a client whose handshake consumed the driver's `Open`).
    open_first: bool,
    phase: Phase,
    /// A message buffer to reuse.
    spare: Vec<u8>,
    /// A frame written around the driver, not all taken yet.
    outbox: Outbox,
}

/// What the receive loop found: an owned event, or a payload left in the read buffer
/// (kind, offset, length) for [`WebSocketStream::recv`] to lend out.
enum Slot {
    Owned(Event<'static>),
    Borrowed(Payload, usize, usize),
}

#[derive(Clone, Copy)]
enum Payload {
    Text,
    Binary,
    Ping,
    Pong,
}

/// Answers to an event from [`WebSocketStream::recv`], queued while the event still
/// borrows the read buffer. Each `send*` queues one whole frame without waiting; the
/// frames go out on the stream's next call (see [`WebSocketStream::recv`] for how
/// backpressure applies), except that a large data message with nothing queued before it
/// is written at once, straight from the payload, as far as the transport takes it.
/// Fails with [`UsageError::NotOpen`] once closing.
#[derive(Debug)]
pub struct Reply<'a, S> {
    sending: Sending<'a, S>,
    open: bool,
}

impl<S: AsyncWrite + Unpin> Reply<'_, S> {
    fn queue(&mut self, data: Data<'_>) -> Result<(), Error> {
        if !self.open {
            return Err(not_open());
        }
        // No task waits on this write: a transport that would block leaves the frame to
        // the driver, written on the stream's next poll (which registers the real waker).
        let mut cx = Context::from_waker(Waker::noop());
        self.sending.data(&mut cx, data)
    }

    /// Queues a message as it came: text as text, binary as binary.
    pub fn send_message(&mut self, message: &Message<'_>) -> Result<(), Error> {
        self.queue(Data::of(message))
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: &str) -> Result<(), Error> {
        self.queue(Data::Text(text))
    }

    /// Queues a binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), Error> {
        self.queue(Data::Binary(data))
    }

    /// Queues `data` as `kind` (see [`WebSocketStream::send`]).
    pub fn send(&mut self, data: &[u8], kind: MessageType) -> Result<(), Error> {
        match kind {
            MessageType::Text | MessageType::Binary => self.queue(Data::typed(data, kind)?),
            _ if !self.open => Err(not_open()),
            _ => self.sending.driver.send(data, kind).map(drop),
        }
    }
}

/// A data message's payload.
#[derive(Clone, Copy)]
enum Data<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

impl<'a> Data<'a> {
    fn of(message: &'a Message<'_>) -> Data<'a> {
        match message {
            Message::Text(t) => Data::Text(t),
            Message::Binary(b) => Data::Binary(b),
        }
    }

    /// `data` as text (checked) or binary.
    fn typed(data: &'a [u8], kind: MessageType) -> Result<Data<'a>, Error> {
        Ok(match kind {
            MessageType::Text => {
                Data::Text(simdutf8::basic::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?)
            }
            _ => Data::Binary(data),
        })
    }

    fn bytes(self) -> &'a [u8] {
        match self {
            Data::Text(t) => t.as_bytes(),
            Data::Binary(b) => b,
        }
    }
}

/// A frame written around the driver that the transport has not taken all of yet: it
/// goes out before anything the driver queued after it.
#[derive(Debug, Default)]
struct Outbox {
    bytes: Vec<u8>,
    pos: usize,
    /// Bytes went out since the last flush.
    unflushed: bool,
}

impl Outbox {
    fn len(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.bytes.len() {
            self.pos = 0;
            self.bytes.clear();
            if self.bytes.capacity() > SPARE_MAX {
                self.bytes = Vec::new();
            }
        }
    }
}

/// The write side as a send sees it.
#[derive(Debug)]
struct Sending<'a, S> {
    io: &'a mut S,
    driver: &'a mut Driver,
    outbox: &'a mut Outbox,
}

impl<S: AsyncWrite + Unpin> Sending<'_, S> {
    /// Sends a data message: written straight from the payload when that is safe and
    /// worth it, otherwise queued on the driver (a copy into its output).
    fn data(&mut self, cx: &mut Context<'_>, data: Data<'_>) -> Result<(), Error> {
        if self.write_direct(cx, data) {
            return Ok(());
        }
        match data {
            Data::Text(t) => self.driver.send_text(t),
            Data::Binary(b) => self.driver.send_binary(b),
        }
        .map(drop)
    }

    /// A server's large data frame with nothing queued before it: header and payload in
    /// one gathered write, with no copy into the driver's output; the part the transport
    /// does not take is kept in the outbox. False (nothing written) when not eligible or
    /// the transport would block or failed (the driver then queues the frame, and the
    /// stream meets the failure on its next write).
    fn write_direct(&mut self, cx: &mut Context<'_>, data: Data<'_>) -> bool {
        let payload = data.bytes();
        if payload.len() < DIRECT_MIN
            || self.driver.role() != Role::Server
            || self.driver.ready_state() != ReadyState::Open
            || self.driver.buffered_amount() != 0
            || self.outbox.len() != 0
            || !self.io.is_write_vectored()
        {
            return false;
        }
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: match data {
                Data::Text(_) => OpCode::Text,
                Data::Binary(_) => OpCode::Binary,
            },
            mask: None,
            payload_len: payload.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let h = encode_header(&mut head, &header);
        let parts = [IoSlice::new(&head[..h]), IoSlice::new(payload)];
        let n = match Pin::new(&mut *self.io).poll_write_vectored(cx, &parts) {
            Poll::Ready(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        self.outbox.unflushed = true;
        if n < h {
            self.outbox.bytes.extend_from_slice(&head[n..h]);
            self.outbox.bytes.extend_from_slice(payload);
        } else if n < h + payload.len() {
            self.outbox.bytes.extend_from_slice(&payload[n - h..]);
        }
        true
    }
}

/// Copies borrowed payloads so an event outlives the read buffer; a data message's copy
/// goes into `spare`'s allocation when there is one.
fn owned(event: Event<'_>, spare: &mut Vec<u8>) -> Event<'static> {
    match event {
        Event::Open => Event::Open,
        Event::Message(Message::Binary(Cow::Borrowed(b))) => {
            let mut v = std::mem::take(spare);
            v.clear();
            v.extend_from_slice(b);
            Event::Message(Message::Binary(Cow::Owned(v)))
        }
        Event::Message(Message::Text(Cow::Borrowed(t))) => {
            let mut v = std::mem::take(spare);
            v.clear();
            // An empty buffer is valid UTF-8: nothing is validated twice.
            let mut s = String::from_utf8(v).unwrap_or_default();
            s.push_str(t);
            Event::Message(Message::Text(Cow::Owned(s)))
        }
        Event::Message(m) => Event::Message(m.into_owned()),
        Event::Ping(p) => Event::Ping(Cow::Owned(p.into_owned())),
        Event::Pong(p) => Event::Pong(Cow::Owned(p.into_owned())),
        Event::Error(e) => Event::Error(e),
        Event::Close { code, reason } => Event::Close { code, reason },
    }
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
            buf_max: config.max_read_buffer_size.max(config.read_buffer_size),
            small_frames: 0,
            at_frame,
            eof_seen: false,
            limit: config.max_backpressure,
            timer_config,
            timers,
            sleep: None,
            armed: None,
            linger_by: None,
            closing_noted: false,
            closed_noted: false,
            reading: true,
            writing: true,
            flushed: true,
            progressed: false,
            io_error: None,
            open_first: false,
            phase: Phase::Open,
            spare: Vec::new(),
            outbox: Outbox::default(),
        }
    }

    /// A client whose handshake already consumed the driver's `Open`: hand it out first.
    pub(super) fn with_open_first(mut self) -> Self {
        self.open_first = true;
        self
    }

    /// The next event, or `None` once the connection is over (after [`Event::Close`] and
    /// the end of the transport). Cancel-safe.
    pub async fn next(&mut self) -> Option<Event<'static>> {
        poll_fn(|cx| self.poll_next_event(cx)).await
    }

    /// Polls for the next event (what `Stream::poll_next` does).
    pub fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event<'static>>> {
        self.poll_next_slot(cx, false).map(|slot| {
            slot.map(|slot| match slot {
                Slot::Owned(event) => event,
                // Only asked for with `borrow`.
                Slot::Borrowed(..) => unreachable!("an owned parse hands out no ranges"),
            })
        })
    }

    /// The next event borrowed from the read buffer (no copy of its payload), with a
    /// [`Reply`] to queue answers on; `None` once the connection is over. The fastest way
    /// to receive: an echo answers from the read buffer straight into the driver's output.
    /// Cancel-safe, like [`WebSocketStream::next`].
    ///
    /// Answers queued on the [`Reply`] go out on the next call of any method of the stream
    /// (the next `recv` writes them before it reads). They do not wait for backpressure:
    /// instead, `recv` parses no more input while the unwritten output is over
    /// [`Config::max_backpressure`], so the peer is held back by TCP until it reads.
    ///
    /// ```no_run
    /// # async fn demo(mut ws: websocket_driver::tokio::WebSocketStream<tokio::net::TcpStream>)
    /// # -> Result<(), websocket_driver::Error> {
    /// use websocket_driver::Event;
    /// while let Some((event, mut reply)) = ws.recv().await {
    ///     if let Event::Message(message) = event {
    ///         reply.send_message(&message)?; // echo, without copying the message out
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recv(&mut self) -> Option<(Event<'_>, Reply<'_, S>)> {
        let slot = poll_fn(|cx| self.poll_next_slot(cx, true)).await?;
        let event = match slot {
            Slot::Owned(event) => event,
            Slot::Borrowed(kind, at, len) => {
                let payload = &self.buf[at..at + len];
                match kind {
                    Payload::Binary => Event::Message(Message::Binary(Cow::Borrowed(payload))),
                    Payload::Ping => Event::Ping(Cow::Borrowed(payload)),
                    Payload::Pong => Event::Pong(Cow::Borrowed(payload)),
                    Payload::Text => match simdutf8::basic::from_utf8(payload) {
                        Ok(text) => Event::Message(Message::Text(Cow::Borrowed(text))),
                        // The driver validated it: unreachable, but not worth a panic.
                        Err(_) => Event::Message(Message::Text(Cow::Owned(
                            String::from_utf8_lossy(payload).into_owned(),
                        ))),
                    },
                }
            }
        };
        let open = self.can_send();
        Some((
            event,
            Reply {
                sending: Sending {
                    io: &mut self.io,
                    driver: &mut self.driver,
                    outbox: &mut self.outbox,
                },
                open,
            },
        ))
    }

    /// The receive loop: write, run the deadlines, parse, read. With `borrow`, payloads
    /// in the read buffer are handed out as ranges of it.
    fn poll_next_slot(&mut self, cx: &mut Context<'_>, borrow: bool) -> Poll<Option<Slot>> {
        loop {
            match self.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Ending(step) => {
                    ready!(self.poll_linger(cx, step));
                    self.phase = Phase::Done;
                    return Poll::Ready(None);
                }
                Phase::Open => {}
            }
            if self.open_first {
                self.open_first = false;
                return Poll::Ready(Some(Slot::Owned(Event::Open)));
            }
            self.poll_timers(cx);
            self.poll_write_best_effort(cx);
            self.note_state();
            if let Some(e) = self.io_error.take() {
                return Poll::Ready(Some(Slot::Owned(Event::Error(Error::Io(e)))));
            }
            // Over the limit, queued events still come out but no new input is parsed
            // until the peer takes some output (the write above registered for it).
            let over = self.writing
                && self.driver.ready_state() == ReadyState::Open
                && self.unwritten() > self.limit;
            if !over
                && self.reading
                && !self.eof_seen
                && let Some(want) = self.frame_shortfall()
            {
                // Read the rest of the frame before the driver sees it: then it is lent
                // (or copied) once, not reassembled piece by piece.
                match self.poll_fill(cx, want) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        // The driver gets the cut-off frame first, then the EOF.
                        self.eof_seen = true;
                        self.at_frame = false;
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => self.transport_failed(e),
                }
                continue;
            }
            if let Some(slot) = self.parse(over, borrow) {
                if let Slot::Owned(ref event) = slot {
                    self.delivered(event, cx);
                }
                return Poll::Ready(Some(slot));
            }
            if over {
                return Poll::Pending;
            }
            if !self.reading {
                // The driver saw the end of the transport and has nothing left to say.
                self.phase = Phase::Done;
                return Poll::Ready(None);
            }
            if self.eof_seen {
                self.reading = false;
                self.driver.receive_eof();
                continue;
            }
            self.shrink_buffer();
            let mut read = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut self.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        self.reading = false;
                        self.driver.receive_eof();
                    } else {
                        self.start = 0;
                        self.end = n;
                        self.received();
                    }
                }
                Poll::Ready(Err(e)) => self.transport_failed(e),
            }
        }
    }

    fn received(&mut self) {
        if self.timer_config.idle.is_some() {
            self.timers.received(now(), &self.timer_config);
        }
    }

    /// At a frame boundary with part of a binary frame read: how many bytes (from `start`)
    /// the whole frame takes, if it fits the buffer's limit; `None` to let the driver parse
    /// (the frame is whole, too large, not binary, or not a frame at all).
    fn frame_shortfall(&self) -> Option<usize> {
        if !self.at_frame || self.start == self.end {
            return None;
        }
        let input = &self.buf[self.start..self.end];
        // Binary frames only: a text frame's UTF-8 is checked as it arrives, so a bad one
        // fails the connection before the rest of the frame comes (Autobahn 6.4.x).
        if input[0] & 0x0f != OpCode::Binary as u8 {
            return None;
        }
        match parse_header(input, 0b111) {
            Ok(Status::Complete(header, len)) => {
                let total = (len as u64).saturating_add(header.payload_len);
                (total > input.len() as u64 && total <= self.buf_max as u64)
                    .then_some(total as usize)
            }
            Ok(Status::Partial) => Some(MAX_HEADER_LEN.min(self.buf_max)),
            Err(_) => None,
        }
    }

    /// Reads more of a frame that begins at `start` into the buffer, moving it to the
    /// front or growing the buffer (once, zeroed) so `want` bytes fit.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if want > self.buf.len() {
                self.buf.resize(want, 0);
            }
        }
        if want > self.buf_size {
            self.small_frames = 0;
        }
        let mut read = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.end += n;
        if n > 0 {
            self.received();
        }
        Poll::Ready(Ok(n))
    }

    /// A buffer grown for a large frame goes back to its usual size once 64 events in a
    /// row came without another large frame.
    fn shrink_buffer(&mut self) {
        if self.small_frames > 64 && self.buf.len() > self.buf_size && self.start == self.end {
            self.buf.truncate(self.buf_size);
            self.buf.shrink_to_fit();
        }
    }

    /// Parses up to one event: queued ones first, then (unless `queued_only`) the unparsed
    /// input. With `borrow`, a payload still in the read buffer comes out as its range.
    fn parse(&mut self, queued_only: bool, borrow: bool) -> Option<Slot> {
        let input = if queued_only {
            &mut [][..]
        } else {
            &mut self.buf[self.start..self.end]
        };
        // Where the input lies in memory, to find a borrowed payload's offset in `buf`.
        let (lo, hi, start) = (
            input.as_ptr() as usize,
            input.as_ptr() as usize + input.len(),
            self.start,
        );
        let lent = |p: &[u8]| {
            let at = p.as_ptr() as usize;
            (borrow && !p.is_empty() && at >= lo && at + p.len() <= hi)
                .then(|| (at - lo + start, p.len()))
        };
        let (used, event) = self.driver.poll_event(input);
        if used > 0 {
            // A frame ended where an event came out of input (an error stops the driver).
            self.at_frame = matches!(
                event,
                Some(Event::Open | Event::Message(_) | Event::Ping(_) | Event::Pong(_))
            );
            if event.is_some() {
                self.small_frames = self.small_frames.saturating_add(1);
            }
        }
        let slot = event.map(|e| {
            let kind = match &e {
                Event::Message(Message::Binary(Cow::Borrowed(p))) => {
                    lent(p).map(|r| (Payload::Binary, r))
                }
                Event::Message(Message::Text(Cow::Borrowed(t))) => {
                    lent(t.as_bytes()).map(|r| (Payload::Text, r))
                }
                Event::Ping(Cow::Borrowed(p)) => lent(p).map(|r| (Payload::Ping, r)),
                Event::Pong(Cow::Borrowed(p)) => lent(p).map(|r| (Payload::Pong, r)),
                _ => None,
            };
            match kind {
                Some((kind, (at, len))) => Slot::Borrowed(kind, at, len),
                None => Slot::Owned(owned(e, &mut self.spare)),
            }
        });
        self.start += used;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        slot
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
            self.timers.closed();
        }
    }

    /// The transport failed: report it (unless the close was already handed out), stop
    /// reading and writing, and let the driver report its close.
    fn transport_failed(&mut self, e: io::Error) {
        if self.phase == Phase::Open && self.io_error.is_none() && self.reading {
            self.io_error = Some(e);
        }
        self.reading = false;
        self.writing = false;
        self.start = 0;
        self.end = 0;
        self.driver.receive_eof();
    }

    /// Writes the pending output until the transport would block; then flushes.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if std::mem::take(&mut self.outbox.unflushed) {
            self.flushed = false;
        }
        loop {
            let mut parts = [IoSlice::new(&[]); WRITE_PARTS];
            // A frame written around the driver goes first.
            let direct = self.outbox.len();
            let mut k = 0;
            if direct > 0 {
                parts[0] = IoSlice::new(&self.outbox.bytes[self.outbox.pos..]);
                k = 1;
            }
            k += self.driver.pending_output_vectored(&mut parts[k..]);
            if k == 0 || parts[..k].iter().all(|p| p.is_empty()) {
                break;
            }
            let io = Pin::new(&mut self.io);
            let written = if k > 1 && io.is_write_vectored() {
                io.poll_write_vectored(cx, &parts[..k])
            } else {
                io.poll_write(cx, &parts[0])
            };
            match ready!(written) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    let from_outbox = n.min(direct);
                    self.outbox.consume(from_outbox);
                    self.driver.consume_output(n - from_outbox);
                    self.flushed = false;
                    self.progressed = true;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !self.flushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.flushed = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what the transport takes now; a failure ends the connection.
    fn poll_write_best_effort(&mut self, cx: &mut Context<'_>) {
        if self.writing
            && let Poll::Ready(Err(e)) = self.poll_write_out(cx)
        {
            self.transport_failed(e);
        }
    }

    /// Polls `deadline` on the one timer entry; true once it has passed. Re-arms lazily: a
    /// later deadline waits for the armed one to fire first.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: std::time::Instant) -> bool {
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
        now() >= deadline
    }

    /// Runs the deadlines that passed (the idle keepalive, the close deadline).
    fn poll_timers(&mut self, cx: &mut Context<'_>) {
        while let Some(deadline) = self.timers.poll_timeout() {
            if !self.poll_deadline(cx, deadline) && self.armed.is_some() {
                return;
            }
            self.progressed = true;
            match self
                .timers
                .handle_timeout(now(), &self.timer_config, &mut self.driver)
            {
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
            self.linger_by = Some(now() + self.timer_config.close);
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

    /// Waits until the unwritten output is at or under the limit (writing meanwhile), or
    /// fails once the connection can no longer send.
    pub(crate) fn poll_send_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            self.note_state();
            if !self.can_send() {
                return Poll::Ready(Err(not_open()));
            }
            if self.unwritten() <= self.limit {
                return Poll::Ready(Ok(()));
            }
            self.poll_timers(cx);
            if !self.writing {
                return Poll::Ready(Err(not_open()));
            }
            match ready!(self.poll_write_out(cx)) {
                Ok(()) => {}
                Err(e) => self.transport_failed(e),
            }
        }
    }

    fn can_send(&self) -> bool {
        self.phase == Phase::Open
            && self.writing
            && matches!(
                self.driver.ready_state(),
                ReadyState::Connecting | ReadyState::Open
            )
    }

    /// Queues one frame with `queue` once the output is under the limit (data frames) or at
    /// once (control frames), then writes what the transport takes without waiting.
    fn poll_submit<F>(
        &mut self,
        cx: &mut Context<'_>,
        waits: bool,
        queue: &mut Option<F>,
    ) -> Poll<Result<(), Error>>
    where
        F: FnOnce(&mut Sending<'_, S>, &mut Vec<u8>, &mut Context<'_>) -> Result<(), Error>,
    {
        if waits {
            ready!(self.poll_send_ready(cx))?;
        } else {
            self.note_state();
            if !self.can_send() {
                return Poll::Ready(Err(not_open()));
            }
        }
        let queue = queue.take().expect("polled after completion");
        let mut sending = Sending {
            io: &mut self.io,
            driver: &mut self.driver,
            outbox: &mut self.outbox,
        };
        queue(&mut sending, &mut self.spare, cx)?;
        self.note_state();
        self.poll_write_best_effort(cx);
        Poll::Ready(Ok(()))
    }

    async fn submit<F>(&mut self, waits: bool, queue: F) -> Result<(), Error>
    where
        F: FnOnce(&mut Sending<'_, S>, &mut Vec<u8>, &mut Context<'_>) -> Result<(), Error>,
    {
        let mut queue = Some(queue);
        poll_fn(|cx| self.poll_submit(cx, waits, &mut queue)).await
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: impl AsRef<str>) -> Result<(), Error> {
        self.submit(true, |s, _, cx| s.data(cx, Data::Text(text.as_ref())))
            .await
    }

    /// Sends a binary message.
    pub async fn send_binary(&mut self, data: impl AsRef<[u8]>) -> Result<(), Error> {
        self.submit(true, |s, _, cx| s.data(cx, Data::Binary(data.as_ref())))
            .await
    }

    /// Sends a message as it came: text as text, binary as binary. A received message
    /// handed back here gives its buffer to the next received one.
    pub async fn send_message(&mut self, message: Message<'_>) -> Result<(), Error> {
        self.submit(true, |s, spare, cx| {
            s.data(cx, Data::of(&message))?;
            recycle(message, spare);
            Ok(())
        })
        .await
    }

    /// Sends `data` as `kind` (the seed's `send`): text must be UTF-8, pings and pongs at
    /// most 125 bytes, `Close(code)` takes the reason as `data`.
    pub async fn send(&mut self, data: impl AsRef<[u8]>, kind: MessageType) -> Result<(), Error> {
        let data = data.as_ref();
        match kind {
            MessageType::Text | MessageType::Binary => {
                let data = Data::typed(data, kind)?;
                self.submit(true, |s, _, cx| s.data(cx, data)).await
            }
            _ => {
                self.submit(false, |s, _, _| s.driver.send(data, kind).map(drop))
                    .await
            }
        }
    }

    /// Sends a ping (at most 125 bytes); the pong arrives as [`Event::Pong`].
    pub async fn send_ping(&mut self, payload: impl AsRef<[u8]>) -> Result<(), Error> {
        self.submit(false, |s, _, _| {
            s.driver.send_ping(payload.as_ref()).map(drop)
        })
        .await
    }

    /// Sends an unsolicited pong (a heartbeat that needs no answer).
    pub async fn send_pong(&mut self, payload: impl AsRef<[u8]>) -> Result<(), Error> {
        self.submit(false, |s, _, _| {
            s.driver.send_pong(payload.as_ref()).map(drop)
        })
        .await
    }

    /// Starts the close handshake (the seed's `close-connection`): the close frame goes out
    /// after everything queued before it; [`Event::Close`] comes out of
    /// [`WebSocketStream::next`] when the peer answers (or after
    /// [`Config::close_timeout`], with 1006).
    pub async fn close_connection(&mut self, code: u16, reason: &str) -> Result<(), Error> {
        self.submit(false, |s, _, _| {
            s.driver.close_connection(code, reason).map(drop)
        })
        .await
    }

    /// Writes everything queued so far and flushes the transport. Fails if the transport
    /// failed (the error also comes out of [`WebSocketStream::next`]).
    pub async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.poll_flush_all(cx)).await
    }

    pub(crate) fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if !self.writing {
            return Poll::Ready(if self.unwritten() == 0 {
                Ok(())
            } else {
                Err(not_open())
            });
        }
        match ready!(self.poll_write_out(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                let err = Error::Io(io::Error::new(e.kind(), e.to_string()));
                self.transport_failed(e);
                Poll::Ready(Err(err))
            }
        }
    }

    /// Queues one frame with `queue` without waiting (a `Sink::start_send`).
    #[cfg_attr(not(feature = "hyper"), allow(dead_code))]
    pub(crate) fn start_send_with(
        &mut self,
        queue: impl FnOnce(&mut Driver) -> Result<SendToken, Error>,
    ) -> Result<(), Error> {
        if !self.can_send() {
            return Err(not_open());
        }
        queue(&mut self.driver)?;
        self.note_state();
        Ok(())
    }

    /// Writes pending output and runs the deadlines without parsing input; `Ready` when
    /// something happened (bytes written, a deadline fired). For the connection task.
    pub(super) fn poll_background(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.phase == Phase::Open {
            self.poll_timers(cx);
            self.poll_write_best_effort(cx);
        }
        self.take_progress()
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
}

/// An owned message's buffer becomes the spare, for the next received message.
fn recycle(message: Message<'_>, spare: &mut Vec<u8>) {
    let buffer = match message {
        Message::Binary(Cow::Owned(v)) => v,
        Message::Text(Cow::Owned(s)) => s.into_bytes(),
        _ => return,
    };
    if buffer.capacity() <= SPARE_MAX && buffer.capacity() > spare.capacity() {
        *spare = buffer;
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
        self.get_mut().poll_next_event(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> futures_core::FusedStream for WebSocketStream<S> {
    fn is_terminated(&self) -> bool {
        self.phase == Phase::Done
    }
}

/// Messages go in whole: `poll_ready` waits while the output is over the limit,
/// `start_send` queues the frame, `poll_flush` writes and flushes, `poll_close` starts the
/// close handshake (1000) if it has not started and flushes. `SinkExt::send` therefore
/// returns once the frame is written; `feed` queues only.
impl<'a, S: AsyncRead + AsyncWrite + Unpin> futures_sink::Sink<Message<'a>> for WebSocketStream<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().poll_send_ready(cx)
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
        self.get_mut().poll_flush_all(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.driver.ready_state() == ReadyState::Open {
            this.driver
                .close_connection(crate::protocol::error::code::NORMAL, "")?;
            this.note_state();
        }
        this.poll_flush_all(cx)
    }
}
