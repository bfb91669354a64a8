//! The state a [`BlockingClient`](super::BlockingClient)'s I/O thread and its senders
//! share under one lock: the seed-style `WebSocket`, TLS, the timers and the output that
//! waits for the socket.

use std::io::{self, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::lock;

/// Most plaintext encrypted ahead of the socket on wss (the rest stays in the driver).
#[cfg(feature = "tls")]
const TLS_CHUNK: usize = 256 * 1024;
use crate::protocol::driver::ReadyState;
use crate::protocol::error::Error;
use crate::session::timers::{Stall, TimerConfig, Timers, write_timed_out};
use crate::websocket::WebSocket;

/// The connection state the I/O thread and senders share, under one lock.
pub(super) struct Session {
    pub(super) ws: WebSocket,
    /// The connection's deadlines; the I/O thread sleeps until the next one.
    pub(super) timers: Timers,
    pub(super) timer_config: TimerConfig,
    pub(super) write_timeout: Duration,
    #[cfg(feature = "tls")]
    pub(super) tls: Option<crate::tls::TlsStream>,
    /// Decrypted input, reused across reads (wss only).
    #[cfg(feature = "tls")]
    pub(super) plain: Vec<u8>,
    /// The non-blocking socket, once open (the I/O thread reads it, anyone writes it).
    pub(super) stream: Option<Arc<mio::net::TcpStream>>,
    /// Wakes the I/O thread (to time output a sender left behind, or a close).
    pub(super) waker: Option<Arc<mio::Waker>>,
    /// Since when queued output has made no progress.
    pub(super) stall: Stall,
    /// Why writing failed, once it has.
    pub(super) failed: Option<(io::ErrorKind, String)>,
    /// The I/O thread has ended: nothing more will be written.
    pub(super) ended: bool,
    /// `start_connection` was called: a second call changes nothing (it used to dial
    /// again and re-arm the handshake deadline of the open connection).
    pub(super) started: bool,
}

impl std::ops::Deref for Session {
    type Target = WebSocket;
    fn deref(&self) -> &WebSocket {
        &self.ws
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut WebSocket {
        &mut self.ws
    }
}

impl Session {
    /// Tells the timers the state the driver is in now.
    pub(super) fn track(&mut self) {
        match self.ws.ready_state() {
            ReadyState::Closing => self
                .timers
                .close_started(Instant::now(), &self.timer_config),
            ReadyState::Closed => self.timers.closed(Instant::now(), &self.timer_config),
            _ => {}
        }
    }

    /// Whether the server's TLS close_notify arrived (wss): it can send nothing more, not
    /// even its WebSocket Close, so its input has ended as with a FIN.
    pub(super) fn peer_closed_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls.as_ref() {
            return tls.peer_closed();
        }
        false
    }

    /// Feeds bytes read from the socket (decrypting them first on wss).
    pub(super) fn receive(&mut self, data: &mut [u8]) -> Result<(), Error> {
        self.receive_through(data, false)
    }

    /// [`Session::receive`] during the opening handshake: the events up to `Open` run
    /// (on the caller of `start_connection`); what the server sent behind its 101 is
    /// kept for the I/O thread, where `on_message` and the rest run.
    pub(super) fn receive_handshake(&mut self, data: &mut [u8]) -> Result<(), Error> {
        self.receive_through(data, true)
    }

    fn receive_through(&mut self, data: &mut [u8], until_open: bool) -> Result<(), Error> {
        self.timers.received(Instant::now(), &self.timer_config);
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls.as_mut() {
            self.plain.clear();
            let decrypted = tls.decrypt(data, &mut self.plain);
            if until_open {
                self.ws.receive_until_open(&mut self.plain);
            } else {
                self.ws.receive(&mut self.plain);
            }
            return decrypted;
        }
        if until_open {
            self.ws.receive_until_open(data);
        } else {
            self.ws.receive(data);
        }
        Ok(())
    }

    /// The bytes to write next (on wss, encrypting up to `TLS_CHUNK` more of the
    /// driver's output when the last ciphertext has gone).
    pub(super) fn output(&mut self) -> io::Result<&[u8]> {
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls.as_mut() {
            if tls.output().is_empty() {
                let pending = self.ws.pending_output();
                if !pending.is_empty() {
                    let n = pending.len().min(TLS_CHUNK);
                    tls.encrypt(&pending[..n])?;
                    self.ws.consume_output(n);
                }
            }
            return Ok(tls.output());
        }
        Ok(self.ws.pending_output())
    }

    /// Marks the first `n` bytes of [`Session::output`] written.
    pub(super) fn consumed(&mut self, n: usize) {
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls.as_mut() {
            tls.consume(n);
            return;
        }
        self.ws.consume_output(n);
    }

    /// Writes what the socket takes, and on wss then ends TLS with a close_notify (RFC
    /// 8446 §6.1) once everything the driver queued is encrypted ahead of it. Idempotent.
    pub(super) fn close_tls(&mut self) {
        self.write_ready();
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls.as_mut()
            && self.ws.pending_output().is_empty()
        {
            tls.close();
            self.write_ready();
        }
    }

    pub(super) fn has_output(&self) -> bool {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls
            && !tls.output().is_empty()
        {
            return true;
        }
        !self.ws.pending_output().is_empty()
    }

    /// Writes what the socket takes now, without blocking (nothing before the socket is
    /// open), and notes progress for the write timeout. An error fails the connection.
    pub(super) fn write_ready(&mut self) {
        let Some(stream) = self.stream.clone() else {
            return;
        };
        if self.failed.is_some() {
            return;
        }
        let mut progressed = false;
        let result = loop {
            let out = match self.output() {
                Ok([]) => break Ok(()),
                Ok(out) => out,
                Err(e) => break Err(e),
            };
            match (&*stream).write(out) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.consumed(n);
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let pending = self.has_output();
        self.stall.update(progressed, pending, Instant::now);
        if let Err(e) = result {
            self.write_failed(e);
        }
    }

    /// Ends the connection after a failed write: a timeout is an error (`on_error`, then
    /// `on_close` 1006); a peer that went away is an end of stream (`on_close` 1006).
    pub(super) fn write_failed(&mut self, e: io::Error) {
        self.failed = Some((e.kind(), e.to_string()));
        if e.kind() == io::ErrorKind::TimedOut {
            self.ws
                .fail(e.into(), crate::code::ABNORMAL, "write timed out");
        } else {
            self.ws.receive_eof();
        }
        if let Some(stream) = &self.stream {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Fails the connection if its output has made no progress for the write timeout.
    pub(super) fn check_stall(&mut self, now: Instant) {
        if self.failed.is_none()
            && self
                .stall
                .deadline(self.write_timeout)
                .is_some_and(|d| d <= now)
        {
            self.write_failed(write_timed_out(self.write_timeout));
        }
    }

    pub(super) fn wake(&self) {
        if let Some(waker) = &self.waker {
            let _ = waker.wake();
        }
    }
}

pub(super) struct Shared {
    pub(super) session: Mutex<Session>,
    /// Signalled whenever output went out or the connection changed state.
    pub(super) changed: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Session> {
        lock(&self.session)
    }

    pub(super) fn wait<'a>(&self, guard: MutexGuard<'a, Session>) -> MutexGuard<'a, Session> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
}
