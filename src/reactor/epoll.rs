//! The epoll backend: one mio `Poll` per thread, edge-triggered sockets.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::timer::{Deadline, Entry, Wheel};
use super::{
    CloseRequest, Envelope, Inbox, Io, LoopConfig, LoopStats, Remote, Service, Waker, channel,
};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// How long a closing connection waits for the peer's FIN after ours.
const LINGER: Duration = Duration::from_secs(2);
/// Pause before retrying accept() after EMFILE and the like.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    /// Output flushed, our FIN sent; waiting for the peer's FIN (or LINGER).
    Lingering,
}

struct Conn<T> {
    stream: TcpStream,
    session: T,
    generation: u32,
    deadline: Deadline,
    close_requested: bool,
    write_blocked: bool,
    phase: Phase,
}

/// Parts a loop needs before its thread starts, so the spawner keeps the [`Remote`].
pub(crate) struct Prepared<C> {
    poll: Poll,
    inbox: Inbox<C>,
    pub remote: Remote<C>,
}

pub(crate) fn prepare<C>() -> io::Result<Prepared<C>> {
    let poll = Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
    let (remote, inbox) = channel(Waker::Poll(waker));
    Ok(Prepared {
        poll,
        inbox,
        remote,
    })
}

pub(crate) struct EventLoop<S: Service> {
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn<S::Session>>,
    service: S,
    wheel: Wheel,
    inbox: Inbox<S::Command>,
    remote: Remote<S::Command>,
    read_buf: Vec<u8>,
    config: LoopConfig,
    stats: Arc<LoopStats>,
    next_generation: u32,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    due: Vec<Entry>,
}

impl<S: Service> EventLoop<S> {
    pub fn new(
        prepared: Prepared<S::Command>,
        listener: Option<std::net::TcpListener>,
        service: S,
        config: LoopConfig,
        stats: Arc<LoopStats>,
    ) -> io::Result<Self> {
        let listener = match listener {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                let mut listener = TcpListener::from_std(listener);
                prepared
                    .poll
                    .registry()
                    .register(&mut listener, LISTENER, Interest::READABLE)?;
                Some(listener)
            }
            None => None,
        };
        Ok(EventLoop {
            poll: prepared.poll,
            listener,
            conns: Slab::with_capacity(1024),
            service,
            wheel: Wheel::new(Instant::now()),
            inbox: prepared.inbox,
            remote: prepared.remote,
            read_buf: vec![0; config.read_buffer_size],
            config,
            stats,
            next_generation: 0,
            accept_paused_until: None,
            shutdown_deadline: None,
            due: Vec::new(),
        })
    }

    /// Runs until a shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let mut timeout = self.wheel.next_timeout(now);
            for extra in [self.accept_paused_until, self.shutdown_deadline]
                .into_iter()
                .flatten()
            {
                let wait = extra.saturating_duration_since(now);
                timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_ready(),
                    WAKER => self.drain_remote(),
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            // Edge-triggered: a short read drained the socket, and any later
                            // data raises a new edge, so there is no need for the extra read
                            // that returns EAGAIN, unless the peer's FIN or an error is pending
                            // (that raises no new edge: read on until EOF).
                            let drain = event.is_read_closed() || event.is_error();
                            self.read_ready(key, drain);
                        }
                        if event.is_writable() && self.conns.contains(key) {
                            self.flush(key);
                        }
                    }
                }
            }
            let now = Instant::now();
            self.expire_timers(now);
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
                self.accept_ready();
            }
            if let Some(deadline) = self.shutdown_deadline {
                if now >= deadline {
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        self.close_now(key);
                    }
                }
                if self.conns.is_empty() {
                    return Ok(());
                }
            }
        }
    }

    fn accept_ready(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            if self.accept_paused_until.is_some() {
                return;
            }
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(_) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the pending connection stays in the
                    // backlog and epoll will not report it again, so retry on a timer
                    // instead of spinning.
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        self.register(stream, peer, None);
    }

    /// Starts an outgoing connection; its session comes from `command`.
    fn connect(&mut self, addr: SocketAddr, command: S::Command) {
        match TcpStream::connect(addr) {
            Ok(stream) => self.register(stream, addr, Some(command)),
            Err(e) => {
                let mut io = Io::new(Instant::now(), usize::MAX, 0, &self.remote);
                self.service.connect_failed(&mut io, command, e);
            }
        }
    }

    /// Adds a socket to the loop: accepted (`command` is `None`, subject to
    /// `max_connections`) or outgoing.
    fn register(&mut self, mut stream: TcpStream, peer: SocketAddr, command: Option<S::Command>) {
        let connections = &self.config.connections;
        if connections.fetch_add(1, Ordering::AcqRel) >= self.config.max_connections
            && command.is_none()
        {
            connections.fetch_sub(1, Ordering::AcqRel);
            LoopStats::add(&self.stats.connections_refused, 1);
            // Best effort: a fresh socket's send buffer takes a short response whole.
            let _ = stream.write(&self.service.over_capacity());
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self
            .poll
            .registry()
            .register(
                &mut stream,
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            connections.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let mut io = Io::new(Instant::now(), key, generation, &self.remote);
        let session = match command {
            None => self.service.open(&mut io, peer),
            Some(command) => self.service.connected(&mut io, peer, command),
        };
        let (deadline, close) = (io.deadline, io.close);
        entry.insert(Conn {
            stream,
            session,
            generation,
            deadline: Deadline::default(),
            close_requested: false,
            write_blocked: false,
            phase: Phase::Active,
        });
        self.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        LoopStats::add(&self.stats.connections_total, 1);
        self.apply(key, deadline, close);
    }

    /// Applies what a service call asked for. Returns false if the connection is gone.
    fn apply(
        &mut self,
        key: usize,
        deadline: Option<Option<Instant>>,
        close: CloseRequest,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if let Some(deadline) = deadline {
            self.wheel.reset(key, &mut conn.deadline, deadline);
        }
        match close {
            CloseRequest::Keep => true,
            CloseRequest::Now => {
                self.close_now(key);
                false
            }
            CloseRequest::AfterFlush => {
                conn.close_requested = true;
                true
            }
        }
    }

    fn read_ready(&mut self, key: usize, drain: bool) {
        let mut ended = false;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            match conn.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    LoopStats::add(&self.stats.bytes_in, n as u64);
                    if conn.phase == Phase::Lingering {
                        continue;
                    }
                    let mut io = Io::new(Instant::now(), key, conn.generation, &self.remote);
                    self.service
                        .read(&mut conn.session, &mut io, &mut self.read_buf[..n]);
                    let (deadline, close) = (io.deadline, io.close);
                    if !self.apply(key, deadline, close) {
                        return;
                    }
                    if n < self.read_buf.len() && !drain {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            self.close_now(key);
        } else {
            self.flush(key);
        }
    }

    /// Writes what the session has queued, then handles a requested close.
    fn flush(&mut self, key: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let out = self.service.output(&conn.session);
            if out.is_empty() {
                break;
            }
            match conn.stream.write(out) {
                Ok(n) => {
                    LoopStats::add(&self.stats.bytes_out, n as u64);
                    let mut io = Io::new(Instant::now(), key, conn.generation, &self.remote);
                    self.service.consume(&mut conn.session, &mut io, n);
                    let (deadline, close) = (io.deadline, io.close);
                    if !self.apply(key, deadline, close) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.write_blocked = true;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_now(key);
                    return;
                }
            }
        }
        let conn = &mut self.conns[key];
        if conn.write_blocked {
            conn.write_blocked = false;
            let mut io = Io::new(Instant::now(), key, conn.generation, &self.remote);
            self.service.drained(&mut conn.session, &mut io);
            let (deadline, close) = (io.deadline, io.close);
            if !self.apply(key, deadline, close) {
                return;
            }
            if !self.service.output(&self.conns[key].session).is_empty() {
                return self.flush(key);
            }
        }
        let conn = &mut self.conns[key];
        if conn.close_requested && conn.phase == Phase::Active {
            // The server closes TCP first (RFC 6455 §7.1.1), then reads until the peer's
            // FIN so unread bytes do not turn the close into a reset.
            let _ = conn.stream.shutdown(Shutdown::Write);
            conn.phase = Phase::Lingering;
            let at = Instant::now() + LINGER;
            self.apply(key, Some(Some(at)), CloseRequest::Keep);
        }
    }

    fn close_now(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        drop(conn.stream);
        self.config.connections.fetch_sub(1, Ordering::AcqRel);
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        let mut io = Io::new(Instant::now(), key, conn.generation, &self.remote);
        self.service.closed(conn.session, &mut io);
    }

    fn expire_timers(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(now, &mut due);
        for entry in due.drain(..) {
            let Some(conn) = self.conns.get_mut(entry.key) else {
                continue;
            };
            if !self.wheel.fires(entry, &mut conn.deadline, now) {
                continue;
            }
            if conn.phase == Phase::Lingering {
                self.close_now(entry.key);
                continue;
            }
            let mut io = Io::new(now, entry.key, conn.generation, &self.remote);
            self.service.timeout(&mut conn.session, &mut io);
            let (deadline, close) = (io.deadline, io.close);
            if self.apply(entry.key, deadline, close) {
                self.flush(entry.key);
            }
        }
        self.due = due;
    }

    fn drain_remote(&mut self) {
        self.inbox.rearm();
        while let Some(envelope) = self.inbox.next() {
            match envelope {
                Envelope::Conn {
                    key,
                    generation,
                    command,
                } => {
                    let Some(conn) = self.conns.get_mut(key) else {
                        continue;
                    };
                    if conn.generation != generation || conn.phase != Phase::Active {
                        continue;
                    }
                    let mut io = Io::new(Instant::now(), key, generation, &self.remote);
                    self.service.command(&mut conn.session, &mut io, command);
                    let (deadline, close) = (io.deadline, io.close);
                    if self.apply(key, deadline, close) {
                        self.flush(key);
                    }
                }
                Envelope::Connect { addr, command } => self.connect(addr, command),
                Envelope::Shutdown { deadline } => self.begin_shutdown(deadline),
            }
        }
    }

    fn begin_shutdown(&mut self, deadline: Instant) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.accept_paused_until = None;
        self.shutdown_deadline = Some(deadline);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.phase != Phase::Active {
                continue;
            }
            let mut io = Io::new(Instant::now(), key, conn.generation, &self.remote);
            self.service.shutdown(&mut conn.session, &mut io);
            let (deadline, close) = (io.deadline, io.close);
            if self.apply(key, deadline, close) {
                self.flush(key);
            }
        }
    }
}
