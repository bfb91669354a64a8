//! Seed-style closures on top of the [`Driver`]: `on_open`, `on_message`, `on_error`,
//! `on_close` (+ `on_ping`, `on_pong`), ping callbacks and write-completion callbacks.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};

use crate::protocol::driver::{
    Driver, Event, Message, MessageType, Outgoing, ReadyState, SendToken,
};
use crate::protocol::error::{Error, UsageError};
use crate::session::PongWaiters;

type Callback = Box<dyn FnOnce(&mut Driver) + Send>;
type OnOpen = Box<dyn FnMut(&mut Driver) + Send>;
type OnMessage = Box<dyn for<'m> FnMut(&mut Driver, Message<'m>) + Send>;
type OnError = Box<dyn FnMut(&mut Driver, &Error) + Send>;
type OnClose = Box<dyn FnMut(&mut Driver, u16, &str) + Send>;
type OnPayload = Box<dyn FnMut(&mut Driver, &[u8]) + Send>;

/// A [`Driver`] with event handlers attached, like the seed's `ws` object.
///
/// Handlers receive the driver, so they can send (an echo is
/// `ws.on_message(|ws, msg| { let _ = ws.send_message(&msg); })`). Each `on_*` adds a
/// listener; an event runs its listeners in the order they were added (the seed's `on`).
/// Everything of the driver is reachable through `Deref`; the methods that take output
/// (`consume_output`, `poll_output`, `take_output`) or end the connection
/// (`close_connection`, `abort`, `receive_eof`, `receive_error`) have their own versions
/// here, which run the callbacks they make due.
///
/// A listener that panics: the panic goes on to the caller of `receive` (or of the method
/// that ran it), and the `WebSocket` stays usable: the driver is where it was, and the
/// input not read yet is kept and read by the next `receive`. Ping callbacks that the
/// same pong answered after the one that panicked run first thing in that `receive`.
pub struct WebSocket {
    driver: Driver,
    handlers: Handlers,
    /// Input received before `start_connection`, or after an event whose listener
    /// panicked: read by the next `receive`.
    unread: Vec<u8>,
}

/// The listeners and callbacks: apart from the driver, so that they run with it
/// borrowed alongside (it never leaves the `WebSocket`, even when one panics).
#[derive(Default)]
struct Handlers {
    on_open: Vec<OnOpen>,
    on_message: Vec<OnMessage>,
    on_error: Vec<OnError>,
    on_close: Vec<OnClose>,
    on_ping: Vec<OnPayload>,
    on_pong: Vec<OnPayload>,
    ping_callbacks: PongWaiters<Callback>,
    /// The oldest `ping_callbacks` that a pong answered and that have not run yet: they
    /// run one at a time, so that if one panics the rest run on the next `receive`
    /// rather than being dropped unrun.
    pongs_due: usize,
    write_callbacks: VecDeque<(SendToken, Callback)>,
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// `message` lent again: the listeners before the last get a borrowed view of it.
fn lend<'b>(message: &'b Message<'_>) -> Message<'b> {
    match message {
        Message::Text(t) => Message::Text(Cow::Borrowed(t)),
        Message::Binary(b) => Message::Binary(Cow::Borrowed(b)),
    }
}

impl Handlers {
    fn dispatch(&mut self, driver: &mut Driver, event: Event<'_>) {
        match event {
            Event::Open => self.on_open.iter_mut().for_each(|f| f(driver)),
            Event::Message(m) => {
                if let Some((last, first)) = self.on_message.split_last_mut() {
                    for f in first {
                        f(driver, lend(&m));
                    }
                    last(driver, m);
                }
            }
            Event::Ping(p) => self.on_ping.iter_mut().for_each(|f| f(driver, &p)),
            Event::Pong(p) => {
                // The due ones are the oldest: a pong answers them, or more.
                self.pongs_due = self.pongs_due.max(self.ping_callbacks.answers(&p));
                self.run_pongs_due(driver);
                self.on_pong.iter_mut().for_each(|f| f(driver, &p));
            }
            Event::Error(e) => self.on_error.iter_mut().for_each(|f| f(driver, &e)),
            Event::Close { code, reason } => {
                self.ping_callbacks.clear();
                self.pongs_due = 0;
                if driver.handshake_error().is_some() {
                    // A client's handshake failed: the sends queued behind it were dropped
                    // unwritten, and their write callbacks go with them.
                    self.write_callbacks.clear();
                }
                self.on_close
                    .iter_mut()
                    .for_each(|f| f(driver, code, &reason));
            }
        }
    }

    /// Runs the ping callbacks a pong answered, oldest first.
    fn run_pongs_due(&mut self, driver: &mut Driver) {
        while self.pongs_due > 0 {
            self.pongs_due -= 1;
            let callback = self
                .ping_callbacks
                .take_oldest()
                .expect("a due callback is waiting");
            callback(driver);
        }
    }

    /// Runs the write callbacks of the sends the driver now counts as written.
    fn run_written(&mut self, driver: &mut Driver) {
        while let Some((token, _)) = self.write_callbacks.front() {
            if !driver.is_sent(*token) {
                break;
            }
            let (_, callback) = self.write_callbacks.pop_front().expect("front exists");
            callback(driver);
        }
    }
}

impl WebSocket {
    /// Wraps a driver; no handlers yet.
    pub fn new(driver: Driver) -> WebSocket {
        WebSocket {
            driver,
            handlers: Handlers::default(),
            unread: Vec::new(),
        }
    }

    /// The wrapped driver.
    pub fn driver(&mut self) -> &mut Driver {
        &mut self.driver
    }

    /// Adds a listener for the connection's opening.
    pub fn on_open(&mut self, f: impl FnMut(&mut Driver) + Send + 'static) -> &mut Self {
        self.handlers.on_open.push(Box::new(f));
        self
    }

    /// Adds a listener for each complete message.
    pub fn on_message(
        &mut self,
        f: impl for<'m> FnMut(&mut Driver, Message<'m>) + Send + 'static,
    ) -> &mut Self {
        self.handlers.on_message.push(Box::new(f));
        self
    }

    /// Adds a listener for a peer that breaks the protocol or a failed handshake (`close`
    /// follows).
    pub fn on_error(&mut self, f: impl FnMut(&mut Driver, &Error) + Send + 'static) -> &mut Self {
        self.handlers.on_error.push(Box::new(f));
        self
    }

    /// Adds a listener for the close, called exactly once, with the close code and reason.
    pub fn on_close(
        &mut self,
        f: impl FnMut(&mut Driver, u16, &str) + Send + 'static,
    ) -> &mut Self {
        self.handlers.on_close.push(Box::new(f));
        self
    }

    /// Adds a listener for each ping's payload (the pong is sent automatically).
    pub fn on_ping(&mut self, f: impl FnMut(&mut Driver, &[u8]) + Send + 'static) -> &mut Self {
        self.handlers.on_ping.push(Box::new(f));
        self
    }

    /// Adds a listener for each pong's payload.
    pub fn on_pong(&mut self, f: impl FnMut(&mut Driver, &[u8]) + Send + 'static) -> &mut Self {
        self.handlers.on_pong.push(Box::new(f));
        self
    }

    /// Sends the handshake (see [`Driver::start_connection`]) and runs `on_open` for a server,
    /// then reads what [`WebSocket::receive`] was given before.
    pub fn start_connection(&mut self) -> bool {
        let started = self.driver.start_connection();
        self.receive(&mut []);
        started
    }

    /// Feeds bytes read from the transport and runs the handlers for every event. Before
    /// [`WebSocket::start_connection`] the bytes are kept, and read once it is called.
    pub fn receive(&mut self, input: &mut [u8]) {
        self.receive_through(input, false);
    }

    /// [`WebSocket::receive`] up to the `Open` event: what follows it is kept for the next
    /// `receive` (a client's runtime hands a server's first frames, read with its 101, to
    /// the thread that runs the connection from then on).
    pub(crate) fn receive_until_open(&mut self, input: &mut [u8]) {
        self.receive_through(input, true);
    }

    /// Takes the input kept for the next `receive` (what [`WebSocket::receive_until_open`]
    /// left behind the `Open`), so that the thread that runs the connection from then on
    /// reads it, not whichever thread calls in first.
    pub(crate) fn take_unread(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.unread)
    }

    fn receive_through(&mut self, input: &mut [u8], until_open: bool) {
        if self.unread.is_empty() {
            return self.receive_now(input, until_open);
        }
        // Kept input goes first (rare: before the start, or after a listener's panic).
        let mut all = std::mem::take(&mut self.unread);
        all.extend_from_slice(input);
        self.receive_now(&mut all, until_open);
    }

    fn receive_now(&mut self, input: &mut [u8], until_open: bool) {
        let WebSocket {
            driver,
            handlers,
            unread,
        } = self;
        if handlers.pongs_due > 0 {
            // Left by a callback that panicked: the rest run before anything new is read.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handlers.run_pongs_due(driver)
            }));
            if let Err(panic) = ran {
                unread.extend_from_slice(input);
                std::panic::resume_unwind(panic);
            }
        }
        let mut at = 0;
        loop {
            let (used, event) = driver.poll_event(&mut input[at..]);
            at += used;
            let Some(event) = event else {
                // Only a driver not started yet leaves input unread.
                unread.extend_from_slice(&input[at..]);
                return;
            };
            let opened = matches!(event, Event::Open);
            let dispatched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handlers.dispatch(driver, event)
            }));
            if let Err(panic) = dispatched {
                // The listener's panic goes on to the caller; what was not read yet is
                // kept for the next `receive` (the event itself was delivered).
                unread.extend_from_slice(&input[at..]);
                std::panic::resume_unwind(panic);
            }
            if opened && until_open {
                unread.extend_from_slice(&input[at..]);
                return;
            }
        }
    }

    /// The transport ended: runs `on_error` (if a message was cut off) and `on_close` 1006.
    pub fn receive_eof(&mut self) {
        self.drop_sends_if_connecting();
        self.driver.receive_eof();
        self.receive(&mut []);
    }

    /// The transport failed with `error`: runs `on_error` with it and `on_close` 1006.
    pub fn receive_error(&mut self, error: std::io::Error) {
        self.drop_sends_if_connecting();
        self.driver.receive_error(error);
        self.receive(&mut []);
    }

    /// The connection ends before it opened: the sends queued until then are dropped,
    /// never written, and their write callbacks with them.
    fn drop_sends_if_connecting(&mut self) {
        if self.driver.ready_state() == ReadyState::Connecting {
            self.handlers.write_callbacks.clear();
        }
    }

    /// Sends a ping; `on_pong` runs when a pong with the same payload arrives, or the pong
    /// of a later ping (which answers the earlier ones too: RFC 6455 §5.5.3 lets a peer
    /// answer only the latest of several pings), before the `on_pong` listeners. It never
    /// runs if the connection closes first.
    pub fn send_ping(
        &mut self,
        payload: &[u8],
        on_pong: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        let token = self.driver.send_ping(payload)?;
        self.handlers
            .ping_callbacks
            .push(payload.to_vec(), Box::new(on_pong));
        Ok(token)
    }

    /// Sends like [`Driver::send`] and runs `on_written` once the bytes have been handed to
    /// the transport (the seed's `:callback`), by [`WebSocket::consume_output`],
    /// [`WebSocket::poll_output`] or [`WebSocket::take_output`].
    pub fn send_with(
        &mut self,
        data: &[u8],
        kind: MessageType,
        on_written: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        let connecting = self.driver.ready_state() == ReadyState::Connecting;
        let token = self.send(data, kind)?;
        // A close while connecting writes nothing: its callback would never run.
        if !(connecting && matches!(kind, MessageType::Close(_))) {
            self.handlers
                .write_callbacks
                .push_back((token, Box::new(on_written)));
        }
        Ok(token)
    }

    /// Sends like [`Driver::send`]; a [`MessageType::Close`] closes as
    /// [`WebSocket::close_connection`] does (at once, with `on_close`, while connecting).
    pub fn send(&mut self, data: &[u8], kind: MessageType) -> Result<SendToken, Error> {
        match kind {
            MessageType::Close(code) => {
                let reason = std::str::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                self.close_connection(code, reason)
            }
            _ => self.driver.send(data, kind),
        }
    }

    /// Fails the connection from the transport's side (a write that timed out, say): runs
    /// `on_error` with `error`, ends the connection with `code` and `reason` (see
    /// [`Driver::abort`]) and runs `on_close`. Does nothing once the connection is closed.
    pub fn fail(&mut self, error: Error, code: u16, reason: &str) {
        if self.driver.ready_state() == ReadyState::Closed {
            return;
        }
        let WebSocket {
            driver, handlers, ..
        } = self;
        handlers.on_error.iter_mut().for_each(|f| f(driver, &error));
        self.abort(code, reason);
    }

    /// Ends the connection at once (see [`Driver::abort`]) and runs `on_close`; the sends
    /// queued while connecting are dropped with their write callbacks.
    pub fn abort(&mut self, code: u16, reason: &str) {
        self.drop_sends_if_connecting();
        self.driver.abort(code, reason);
        self.receive(&mut []);
    }

    /// Closes (see [`Driver::close_connection`]); runs `on_close` at once if still connecting
    /// (the sends queued until then are dropped, and their write callbacks with them).
    pub fn close_connection(&mut self, code: u16, reason: &str) -> Result<SendToken, Error> {
        let connecting = self.driver.ready_state() == ReadyState::Connecting;
        let token = self.driver.close_connection(code, reason)?;
        if connecting {
            self.handlers.write_callbacks.clear();
        }
        self.receive(&mut []);
        Ok(token)
    }

    /// Marks `n` bytes written (see [`Driver::consume_output`]) and runs the write
    /// callbacks of the sends that are now complete.
    pub fn consume_output(&mut self, n: usize) {
        self.driver.consume_output(n);
        self.written();
    }

    /// Copies pending output into `buf` (see [`Driver::poll_output`]) and runs the write
    /// callbacks of the sends that are now complete.
    pub fn poll_output(&mut self, buf: &mut [u8]) -> usize {
        let n = self.driver.poll_output(buf);
        self.written();
        n
    }

    /// Hands all pending output over (see [`Driver::take_output`]) and runs the write
    /// callbacks of the sends that are now complete.
    pub fn take_output(&mut self, into: &mut Outgoing) -> bool {
        let taken = self.driver.take_output(into);
        self.written();
        taken
    }

    fn written(&mut self) {
        self.handlers.run_written(&mut self.driver);
        // Callbacks may have closed a connecting driver.
        self.receive(&mut []);
    }
}

impl Deref for WebSocket {
    type Target = Driver;
    fn deref(&self) -> &Driver {
        &self.driver
    }
}

impl DerefMut for WebSocket {
    fn deref_mut(&mut self) -> &mut Driver {
        &mut self.driver
    }
}
