//! Seed-style closures on top of the [`Driver`]: `on_open`, `on_message`, `on_error`,
//! `on_close` (+ `on_ping`, `on_pong`), ping callbacks and write-completion callbacks.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};

use crate::protocol::driver::{Driver, Event, Message, MessageType, ReadyState, SendToken};
use crate::protocol::error::Error;

type Callback = Box<dyn FnOnce(&mut Driver) + Send>;
type OnOpen = Box<dyn FnMut(&mut Driver) + Send>;
type OnMessage = Box<dyn for<'m> FnMut(&mut Driver, Message<'m>) + Send>;
type OnError = Box<dyn FnMut(&mut Driver, &Error) + Send>;
type OnClose = Box<dyn FnMut(&mut Driver, u16, &str) + Send>;
type OnPayload = Box<dyn FnMut(&mut Driver, &[u8]) + Send>;

/// A [`Driver`] with event handlers attached, like the seed's `ws` object.
///
/// Handlers receive the driver, so they can send (an echo is
/// `ws.on_message(|ws, msg| { let _ = ws.send_message(&msg); })`). Everything of the
/// driver is reachable through `Deref`.
#[derive(Default)]
pub struct WebSocket {
    driver: Option<Driver>,
    on_open: Option<OnOpen>,
    on_message: Option<OnMessage>,
    on_error: Option<OnError>,
    on_close: Option<OnClose>,
    on_ping: Option<OnPayload>,
    on_pong: Option<OnPayload>,
    ping_callbacks: Vec<(Vec<u8>, Callback)>,
    write_callbacks: VecDeque<(SendToken, Callback)>,
    /// Input received before `start_connection`, read once it is called.
    unread: Vec<u8>,
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

impl WebSocket {
    /// Wraps a driver; no handlers yet.
    pub fn new(driver: Driver) -> WebSocket {
        WebSocket {
            driver: Some(driver),
            ..WebSocket::default()
        }
    }

    /// The wrapped driver.
    pub fn driver(&mut self) -> &mut Driver {
        self.driver
            .as_mut()
            .expect("a WebSocket always holds a driver")
    }

    /// Called when the connection opens.
    pub fn on_open(&mut self, f: impl FnMut(&mut Driver) + Send + 'static) -> &mut Self {
        self.on_open = Some(Box::new(f));
        self
    }

    /// Called with each complete message.
    pub fn on_message(
        &mut self,
        f: impl for<'m> FnMut(&mut Driver, Message<'m>) + Send + 'static,
    ) -> &mut Self {
        self.on_message = Some(Box::new(f));
        self
    }

    /// Called when the peer breaks the protocol or the handshake fails (`close` follows).
    pub fn on_error(&mut self, f: impl FnMut(&mut Driver, &Error) + Send + 'static) -> &mut Self {
        self.on_error = Some(Box::new(f));
        self
    }

    /// Called exactly once, with the close code and reason.
    pub fn on_close(
        &mut self,
        f: impl FnMut(&mut Driver, u16, &str) + Send + 'static,
    ) -> &mut Self {
        self.on_close = Some(Box::new(f));
        self
    }

    /// Called with each ping's payload (the pong is sent automatically).
    pub fn on_ping(&mut self, f: impl FnMut(&mut Driver, &[u8]) + Send + 'static) -> &mut Self {
        self.on_ping = Some(Box::new(f));
        self
    }

    /// Called with each pong's payload.
    pub fn on_pong(&mut self, f: impl FnMut(&mut Driver, &[u8]) + Send + 'static) -> &mut Self {
        self.on_pong = Some(Box::new(f));
        self
    }

    /// Sends the handshake (see [`Driver::start_connection`]) and runs `on_open` for a server,
    /// then reads what [`WebSocket::receive`] was given before.
    pub fn start_connection(&mut self) -> bool {
        let started = self.driver().start_connection();
        let mut unread = std::mem::take(&mut self.unread);
        self.receive(&mut unread);
        started
    }

    /// Feeds bytes read from the transport and runs the handlers for every event. Before
    /// [`WebSocket::start_connection`] the bytes are kept, and read once it is called.
    pub fn receive(&mut self, input: &mut [u8]) {
        let mut driver = self
            .driver
            .take()
            .expect("a WebSocket always holds a driver");
        let mut at = 0;
        loop {
            let (used, event) = driver.poll_event(&mut input[at..]);
            at += used;
            match event {
                None => {
                    // Only a driver not started yet leaves input unread.
                    self.unread.extend_from_slice(&input[at..]);
                    break;
                }
                Some(event) => self.dispatch(&mut driver, event),
            }
        }
        self.driver = Some(driver);
    }

    /// The transport ended: runs `on_error` (if a message was cut off) and `on_close` 1006.
    pub fn receive_eof(&mut self) {
        self.driver().receive_eof();
        self.receive(&mut []);
    }

    /// The transport failed with `error`: runs `on_error` with it and `on_close` 1006.
    pub fn receive_error(&mut self, error: std::io::Error) {
        self.driver().receive_error(error);
        self.receive(&mut []);
    }

    fn dispatch(&mut self, driver: &mut Driver, event: Event<'_>) {
        match event {
            Event::Open => {
                if let Some(f) = &mut self.on_open {
                    f(driver)
                }
            }
            Event::Message(m) => {
                if let Some(f) = &mut self.on_message {
                    f(driver, m)
                }
            }
            Event::Ping(p) => {
                if let Some(f) = &mut self.on_ping {
                    f(driver, &p)
                }
            }
            Event::Pong(p) => {
                if let Some(at) = self
                    .ping_callbacks
                    .iter()
                    .position(|(payload, _)| payload[..] == p[..])
                {
                    let (_, callback) = self.ping_callbacks.remove(at);
                    callback(driver);
                }
                if let Some(f) = &mut self.on_pong {
                    f(driver, &p)
                }
            }
            Event::Error(e) => {
                if let Some(f) = &mut self.on_error {
                    f(driver, &e)
                }
            }
            Event::Close { code, reason } => {
                self.ping_callbacks.clear();
                if let Some(f) = &mut self.on_close {
                    f(driver, code, &reason)
                }
            }
        }
    }

    /// Sends a ping; `on_pong` runs when a pong with the same payload arrives.
    pub fn send_ping(
        &mut self,
        payload: &[u8],
        on_pong: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        let token = self.driver().send_ping(payload)?;
        self.ping_callbacks
            .push((payload.to_vec(), Box::new(on_pong)));
        Ok(token)
    }

    /// Sends like [`Driver::send`] and runs `on_written` once the bytes have been handed to
    /// the transport (the seed's `:callback`).
    pub fn send_with(
        &mut self,
        data: &[u8],
        kind: MessageType,
        on_written: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        let token = self.driver().send(data, kind)?;
        self.write_callbacks
            .push_back((token, Box::new(on_written)));
        Ok(token)
    }

    /// Fails the connection from the transport's side (a write that timed out, say): runs
    /// `on_error` with `error`, ends the connection with `code` and `reason` (see
    /// [`Driver::abort`]) and runs `on_close`. Does nothing once the connection is closed.
    pub fn fail(&mut self, error: Error, code: u16, reason: &str) {
        if self.ready_state() == ReadyState::Closed {
            return;
        }
        let mut driver = self
            .driver
            .take()
            .expect("a WebSocket always holds a driver");
        if let Some(f) = &mut self.on_error {
            f(&mut driver, &error)
        }
        if driver.ready_state() == ReadyState::Connecting {
            // Sends queued while connecting are dropped, never written.
            self.write_callbacks.clear();
        }
        driver.abort(code, reason);
        self.driver = Some(driver);
        self.receive(&mut []);
    }

    /// Closes (see [`Driver::close_connection`]); runs `on_close` at once if still connecting
    /// (the sends queued until then are dropped, and their write callbacks with them).
    pub fn close_connection(&mut self, code: u16, reason: &str) -> Result<SendToken, Error> {
        let connecting = self.ready_state() == ReadyState::Connecting;
        let token = self.driver().close_connection(code, reason)?;
        if connecting {
            self.write_callbacks.clear();
        }
        self.receive(&mut []);
        Ok(token)
    }

    /// Marks `n` bytes written (see [`Driver::consume_output`]) and runs the write
    /// callbacks of the sends that are now complete.
    pub fn consume_output(&mut self, n: usize) {
        let mut driver = self
            .driver
            .take()
            .expect("a WebSocket always holds a driver");
        driver.consume_output(n);
        while let Some((token, _)) = self.write_callbacks.front() {
            if !driver.is_sent(*token) {
                break;
            }
            let (_, callback) = self.write_callbacks.pop_front().expect("front exists");
            callback(&mut driver);
        }
        self.driver = Some(driver);
        // Callbacks may have closed a connecting driver.
        self.receive(&mut []);
    }
}

impl Deref for WebSocket {
    type Target = Driver;
    fn deref(&self) -> &Driver {
        self.driver
            .as_ref()
            .expect("a WebSocket always holds a driver")
    }
}

impl DerefMut for WebSocket {
    fn deref_mut(&mut self) -> &mut Driver {
        self.driver()
    }
}
