//! The loop core: every part of a connection's life that is not IO, written once for all
//! backends.
//!
//! A [`Core`] owns the connection slab (with generations, so a late command never reaches
//! a reused key), the timer wheel, the inbox of cross-thread commands, the loop's stats,
//! admission (`max_connections`), the accept back-off and the graceful shutdown. It drives
//! each connection's session through the [`Service`] trait. A [`Backend`] only moves
//! bytes: it waits for IO, reads, writes and closes sockets, and reports what happened
//! through the core's `on_*` inputs.
//!
//! One loop turn ([`run`]):
//! 1. [`Core::next_timeout`] bounds the wait;
//! 2. [`Backend::wait`] blocks, then reports IO: [`Core::on_accept`], [`Core::on_received`],
//!    [`Core::on_eof`], [`Core::on_read_error`], [`Core::on_writable`], [`Core::on_sent`],
//!    [`Core::on_wake`]…;
//! 3. [`Core::end_turn`] starts queued outgoing connections (a bounded number per turn;
//!    the next wait does not block while more wait), writes what the turn produced (one
//!    [`Backend::write`] per connection that has output: writes are coalesced per turn; a
//!    readiness backend may write a connection's reply right after reading it,
//!    [`Core::flush_now`]), resumes reading for connections whose output drained, fires
//!    due timers, resumes accepting after a back-off and enforces the shutdown deadline.
//!    After each of these steps, which can all call sessions, it settles: it runs the
//!    inbox if the loop's own sessions put something there (their sends and publishes
//!    wait there, unwoken) and writes again, until nothing is left, so nothing a turn
//!    raised waits for a later wake.
//!
//! Flow control: a session whose output is over its cap asks the loop to stop reading
//! (`Io::set_reading(false)`); the backend pauses the socket ([`Backend::pause_reading`])
//! and resumes it ([`Backend::resume_reading`]) once the session asks again.
//!
//! Connection phases: `Active` (the session sees everything) → `Lingering` (all output
//! written, our FIN sent, waiting for the peer's FIN or [`LINGER`]) → `Closing` (the
//! session got `closed`; the slab entry waits until the backend holds no operation on the
//! socket, then is freed and the socket closed). A session that knows the peer sends
//! nothing more (`CloseRequest::AfterFlushPeerDone`: a server that got the peer's Close)
//! goes from `Active` to `Closing` once its output is written, with no lingering.

use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use slab::Slab;

pub(crate) use super::backend::{Backend, Written};
use super::timer::{Deadline, Entry, Wheel};
use super::{
    CloseRequest, Connector, Effects, Envelope, Inbox, Io, LoopConfig, LoopStats, Remote, Service,
};

/// How long a closing connection waits for the peer's FIN after ours.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// Pause before accepting again after EMFILE and the like.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    /// Everything is written and our FIN sent; waiting for the peer's FIN (or LINGER).
    Lingering,
    /// The session is closed; waiting for the backend to let go of the socket.
    Closing,
}

/// The size of one connection's entry in the loop's slab (for size checks).
#[cfg(test)]
pub(crate) const fn slab_entry_size<T, K>() -> usize {
    std::mem::size_of::<Conn<T, K>>()
}

struct Conn<T, K> {
    socket: K,
    /// `None` once the session was handed to [`Service::closed`].
    session: Option<T>,
    generation: u32,
    deadline: Deadline,
    phase: Phase,
    /// `CLOSE_REQUESTED`, `NO_LINGER`, `WRITE_BLOCKED`, `DIRTY`, `READING`: one byte, so
    /// that io_uring's 8-byte socket state fits the same slab entry size as epoll's 4-byte
    /// one.
    flags: u8,
}

/// The session asked to close once its output is written.
const CLOSE_REQUESTED: u8 = 1;
/// Tell the session `drained` when all its output is out: a write was left unfinished,
/// or the session asked ([`Io::notify_drained`](super::Io::notify_drained): it refused a
/// send at its cap, and the socket may take the queue without ever blocking).
const WRITE_BLOCKED: u8 = 2;
/// Listed in `dirty` (output to write at the end of the turn).
const DIRTY: u8 = 4;
/// The loop reads from the socket (not while the output is over the limit).
const READING: u8 = 8;
/// With `CLOSE_REQUESTED`: the peer sends nothing more, so close without lingering.
const NO_LINGER: u8 = 16;

impl<T, K> Conn<T, K> {
    fn is(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }
}

/// The session's output, as one [`Backend::write`] sees it.
pub(crate) struct Output<'s, 'r, S: Service> {
    service: &'s mut S,
    session: &'s mut S::Session,
    io: Io<'r, S::Command>,
    stats: &'s LoopStats,
    /// Whether a panic is caught here rather than ending the loop ([`LoopConfig`]).
    isolate_panics: bool,
    /// A call panicked (a write callback): nothing more is offered, and the connection
    /// fails once the backend's write returns ([`Core::abandon`]).
    panicked: bool,
}

impl<S: Service> Output<'_, '_, S> {
    /// The bytes to write next, as slices for one vectored write (readiness backends);
    /// returns how many of `parts` were filled.
    pub fn parts<'p>(&'p self, parts: &mut [std::io::IoSlice<'p>]) -> usize {
        if self.panicked {
            return 0;
        }
        self.service.output(self.session, parts)
    }

    /// The first `n` bytes of what [`Output::parts`] offered were written.
    pub fn consume(&mut self, n: usize) {
        LoopStats::add(&self.stats.bytes_out, n as u64);
        if self.panicked {
            return;
        }
        let (service, session, io) = (&mut *self.service, &mut *self.session, &mut self.io);
        self.panicked = guarded(self.isolate_panics, || service.consume(session, io, n)).is_none();
    }

    /// Everything queued, handed over into `into` for the kernel to hold until its send
    /// completes (completion backends). Returns false when nothing is queued.
    pub fn take(&mut self, into: &mut super::Outgoing) -> bool {
        if self.panicked {
            return false;
        }
        let (service, session, io) = (&mut *self.service, &mut *self.session, &mut self.io);
        match guarded(self.isolate_panics, || {
            service.take_output(session, io, into)
        }) {
            Some(taken) => taken,
            None => {
                // A write callback, run once the output was taken: what was taken still
                // goes out, ahead of the failing connection's close.
                self.panicked = true;
                !into.is_empty()
            }
        }
    }
}

/// Runs `f`, a service call that may run the application's code; with `isolate` a panic
/// in it is caught (`None`; the caller drops the connection), else it goes on unwinding
/// and ends the loop.
fn guarded<R>(isolate: bool, f: impl FnOnce() -> R) -> Option<R> {
    if !isolate {
        return Some(f());
    }
    // The connection whose call panicked fails, its handler dropped with everything kept
    // for it (see `Core::abandon`); what the call left half-changed belonged to it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

/// The loop core; see the module documentation.
pub(crate) struct Core<S: Service, B: Backend> {
    conns: Slab<Conn<S::Session, B::Socket>>,
    service: S,
    wheel: Wheel,
    inbox: Inbox<S::Command, S::Connect>,
    remote: Remote<S::Command>,
    config: LoopConfig,
    stats: Arc<LoopStats>,
    next_generation: u32,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    due: Vec<Entry>,
    dirty: Vec<usize>,
    /// Connections whose reading resumes at the end of this turn.
    resumed: Vec<usize>,
    /// Scratch for the targets of a loop-wide command.
    targets: Vec<usize>,
    /// The time of this turn, read on first use (see [`Core::now`]).
    turn_now: Cell<Option<Instant>>,
    /// Outgoing connections may wait in the inbox: the end of the turn starts at most
    /// [`CONNECTS_PER_TURN`] of them, and the next wait does not block while more may wait.
    connects_pending: bool,
}

/// How many queued outgoing connections one turn starts. A `connect` is a syscall that
/// usually takes tens of microseconds, but milliseconds once most of the ephemeral ports
/// to one destination are taken (Linux scans for a free one): thousands queued at once
/// must not hold the loop away from the sockets it already has for seconds.
const CONNECTS_PER_TURN: usize = 64;

/// Runs one loop until a shutdown completes.
pub(crate) fn run<S: Service, B: Backend>(backend: B, core: Core<S, B>) -> io::Result<()> {
    // Locals drop in reverse order when a handler's panic unwinds through here: the
    // backend first (io_uring quiesces its ring, submitting what the turn queued), then
    // the core (its connections' sockets), so no queued operation names a descriptor
    // that was closed and perhaps reused by another loop in between.
    let mut core = core;
    let mut backend = backend;
    core.inbox.claim_thread();
    let turns = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        loop {
            let timeout = core.next_timeout(core.now());
            // The clock is read again, once, when the wait's first event needs it.
            core.turn_now.set(None);
            backend.wait(&mut core, timeout)?;
            core.end_turn(&mut backend)?;
            if core.shutdown_deadline.is_some() && core.conns.is_empty() {
                return Ok(());
            }
        }
    }));
    let result = match turns {
        Ok(result) => result,
        Err(panic) => {
            // A handler panicked with `PanicPolicy::EndLoop`: the loop ends with its
            // connections, which must stop counting (open, against `max_connections`, as
            // subscribers) while the other loops go on. Then the unwind goes on.
            core.forget_all();
            std::panic::resume_unwind(panic);
        }
    };
    core.fail_queued_connects(&mut backend);
    core.close_all(&mut backend);
    backend.quiesce(&mut core);
    result
}

impl<S: Service, B: Backend> Core<S, B> {
    pub fn new(
        service: S,
        inbox: Inbox<S::Command, S::Connect>,
        remote: Remote<S::Command>,
        config: LoopConfig,
        stats: Arc<LoopStats>,
    ) -> Self {
        Core {
            conns: Slab::with_capacity(1024),
            service,
            wheel: Wheel::new(Instant::now()),
            inbox,
            remote,
            config,
            stats,
            next_generation: 0,
            accept_paused_until: None,
            shutdown_deadline: None,
            due: Vec::new(),
            dirty: Vec::new(),
            resumed: Vec::new(),
            targets: Vec::new(),
            turn_now: Cell::new(None),
            connects_pending: false,
        }
    }

    /// The time of this turn. One reading of the clock serves every event of a turn
    /// (a turn lasts microseconds; timers work in milliseconds); the end of the turn
    /// reads it afresh for the timers and the next wait.
    fn now(&self) -> Instant {
        match self.turn_now.get() {
            Some(now) => now,
            None => {
                let now = Instant::now();
                self.turn_now.set(Some(now));
                now
            }
        }
    }

    /// The loop's read buffer size (readiness backends read into one buffer of this size).
    /// At least one byte: an empty buffer would read nothing, which reads as the peer's EOF.
    pub fn read_buffer_size(&self) -> usize {
        self.config.read_buffer_size.max(1)
    }

    /// How long the backend looks for more work before it sleeps (io_uring).
    pub fn busy_poll(&self) -> Duration {
        self.config.busy_poll
    }

    /// How long the backend may wait: until the next timer, the end of an accept back-off
    /// or the shutdown deadline; not at all while queued connections wait to be started.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.connects_pending {
            return Some(Duration::ZERO);
        }
        let mut timeout = self.wheel.next_timeout(now);
        for extra in [self.accept_paused_until, self.shutdown_deadline]
            .into_iter()
            .flatten()
        {
            let wait = extra.saturating_duration_since(now);
            timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
        }
        timeout
    }

    /// Whether accepting is paused after an error (the backend should not accept now).
    pub fn accept_paused(&self) -> bool {
        self.accept_paused_until.is_some()
    }

    /// The socket of a connection that is not closing.
    pub fn socket(&mut self, key: usize) -> Option<&mut B::Socket> {
        self.conns
            .get_mut(key)
            .filter(|c| c.phase != Phase::Closing)
            .map(|c| &mut c.socket)
    }

    /// The socket of a connection the loop reads from now: not paused, and active or
    /// lingering (reading on until the peer's FIN, so unread bytes do not turn our close
    /// into a reset).
    pub fn reading_socket(&mut self, key: usize) -> Option<&mut B::Socket> {
        self.conns
            .get_mut(key)
            .filter(|c| c.phase != Phase::Closing && c.is(READING))
            .map(|c| &mut c.socket)
    }

    /// The socket of any connection in the slab, closing ones included (to settle the
    /// backend's bookkeeping when an operation completes).
    pub fn any_socket(&mut self, key: usize) -> Option<&mut B::Socket> {
        self.conns.get_mut(key).map(|c| &mut c.socket)
    }

    // ----- inputs from the backend -----

    /// A connection was accepted.
    pub fn on_accept(&mut self, backend: &mut B, stream: TcpStream, peer: SocketAddr) {
        self.register(backend, stream, peer, None);
    }

    /// accept() failed (EMFILE, ENFILE, ENOBUFS…): the pending connection stays in the
    /// backlog, so try again after a back-off instead of spinning.
    pub fn on_accept_error(&mut self) {
        self.accept_paused_until = Some(self.now() + ACCEPT_BACKOFF);
    }

    /// The backend stopped taking connections from the backlog because it holds as many
    /// accepted and not yet registered as it may (counted in the stats); it takes them
    /// again itself once it has room.
    pub fn on_accept_queue_full(&mut self) {
        LoopStats::add(&self.stats.accept_pauses, 1);
    }

    /// Another thread rang the waker: run the queued commands.
    pub fn on_wake(&mut self, backend: &mut B) {
        self.inbox.rearm();
        self.drain_inbox(backend);
        // Started at the end of the turn, a bounded number at a time.
        self.connects_pending = true;
    }

    /// Runs what waits in the inbox, then the loop-wide commands the service queued from
    /// it; returns whether the inbox had anything.
    fn drain_inbox(&mut self, backend: &mut B) -> bool {
        let mut any = false;
        while let Some(envelope) = self.inbox.next() {
            any = true;
            match envelope {
                Envelope::Conn {
                    key,
                    generation,
                    command,
                } => {
                    self.run_local(backend);
                    if self
                        .conns
                        .get(key)
                        .is_some_and(|c| c.generation == generation && c.phase == Phase::Active)
                    {
                        self.call(backend, key, self.now(), |service, session, io| {
                            service.command(session, io, command)
                        });
                    }
                }
                Envelope::Loop(command) => {
                    if let Some(command) = self.service.queue_local(command) {
                        self.run_local(backend);
                        self.fan_out(backend, command);
                    }
                }
                Envelope::Shutdown { deadline } => {
                    self.run_local(backend);
                    self.begin_shutdown(backend, deadline)
                }
            }
        }
        self.run_local(backend);
        any
    }

    /// Starts up to [`CONNECTS_PER_TURN`] queued outgoing connections; the rest wait for
    /// the next turns (see `connects_pending`).
    fn start_connects(&mut self, backend: &mut B) {
        self.connects_pending = false;
        for _ in 0..CONNECTS_PER_TURN {
            let Some((addr, init)) = self.inbox.next_connect() else {
                return;
            };
            self.connect(backend, addr, init);
        }
        self.connects_pending = true;
    }

    /// `len` bytes arrived for `key` in `input`, a buffer the service may keep for a reply
    /// of at least `min_reply` bytes (see [`Service::read_lendable`]); the backend
    /// receives into another if it did, or takes it back with [`Core::reclaim_received`].
    /// Returns whether the connection still reads.
    pub fn on_received(
        &mut self,
        backend: &mut B,
        key: usize,
        input: &mut Vec<u8>,
        len: usize,
        min_reply: usize,
    ) -> bool {
        self.input(
            backend,
            key,
            len,
            Some(input),
            |service, session, io, input| {
                let input = input.expect("the receive buffer is passed on");
                service.read_lendable(session, io, input, len, min_reply)
            },
        )
    }

    /// The buffer `key`'s session took in [`Core::on_received`], back (see
    /// [`Service::reclaim_received`]); `None` when the connection is gone (its buffer then
    /// came back through [`Backend::input_returned`] if the backend wants it), or holds
    /// none.
    pub fn reclaim_received(&mut self, key: usize) -> Option<Vec<u8>> {
        let session = self.conns.get_mut(key)?.session.as_mut()?;
        self.service.reclaim_received(session)
    }

    /// Whether `key`'s last write found its socket full (and output still waits).
    pub fn write_blocked(&self, key: usize) -> bool {
        self.conns
            .get(key)
            .is_some_and(|conn| conn.is(WRITE_BLOCKED))
    }

    /// Lends the buffer of the large frame `key` is receiving, when at least `min` bytes
    /// of it are still to come (see [`Service::lend_payload_buffer`]): the backend receives
    /// into its spare capacity, at most the returned room, and gives it back with
    /// [`Core::on_payload`] whatever the receive did.
    pub fn lend_payload(&mut self, key: usize, min: usize) -> Option<super::PayloadLoan> {
        let now = self.now();
        let conn = self.conns.get_mut(key)?;
        if conn.phase != Phase::Active {
            return None;
        }
        let session = conn.session.as_mut()?;
        let mut io = Io::new(now, key, conn.generation, &self.remote);
        let lent = self.service.lend_payload_buffer(session, &mut io, min);
        if lent.is_some() {
            LoopStats::add(&self.stats.payload_receives, 1);
        }
        lent
    }

    /// Bytes still to come of the large frame `key` is receiving (see
    /// [`Service::payload_to_come`]).
    pub fn payload_to_come(&self, key: usize) -> u64 {
        match self.conns.get(key) {
            Some(conn) if conn.phase == Phase::Active => conn
                .session
                .as_ref()
                .map_or(0, |session| self.service.payload_to_come(session)),
            _ => 0,
        }
    }

    /// The buffer from [`Core::lend_payload`] is back with `n` bytes received into it.
    /// Returns whether the connection still reads.
    pub fn on_payload(&mut self, backend: &mut B, key: usize, buffer: Vec<u8>, n: usize) -> bool {
        self.input(backend, key, n, None, |service, session, io, _| {
            service.payload_received(session, io, buffer, n)
        })
    }

    /// Hands `len` bytes of input to the session through `read`, with `buffer`, the
    /// receive buffer they are in when the session may keep it.
    fn input(
        &mut self,
        backend: &mut B,
        key: usize,
        len: usize,
        buffer: Option<&mut Vec<u8>>,
        read: impl FnOnce(&mut S, &mut S::Session, &mut Io<'_, S::Command>, Option<&mut Vec<u8>>),
    ) -> bool {
        LoopStats::add(&self.stats.bytes_in, len as u64);
        match self.conns.get(key).map(|c| c.phase) {
            Some(Phase::Active) => self.call_with(backend, key, self.now(), buffer, read),
            // Our side is done: discard until the peer's FIN.
            Some(Phase::Lingering) => true,
            Some(Phase::Closing) | None => false,
        }
    }

    /// The peer closed its side. While reading is paused (output over the cap), the
    /// input the session holds came before the FIN and is still to be handled: the EOF
    /// waits for the resumed read, which meets it again (a FIN stays readable).
    pub fn on_eof(&mut self, backend: &mut B, key: usize) {
        if let Some(c) = self.conns.get_mut(key)
            && c.phase == Phase::Active
        {
            if !c.is(READING) {
                return;
            }
            if c.is(CLOSE_REQUESTED) {
                // The session is closing (the peer's Close came before its FIN): what it
                // queued (its Close answer) is written first, then the socket closes
                // without lingering, the peer's FIN being in.
                c.set(NO_LINGER, true);
                c.set(READING, false);
                backend.pause_reading(key, &mut c.socket);
                self.mark_dirty(key);
                return;
            }
        }
        self.close_now(backend, key, None);
    }

    /// Reading failed (a refused connect, a reset): the connection is gone.
    pub fn on_read_error(&mut self, backend: &mut B, key: usize, error: io::Error) {
        self.close_now(backend, key, Some(error));
    }

    /// The socket can take more output (readiness backends).
    pub fn on_writable(&mut self, key: usize) {
        self.mark_dirty(key);
    }

    /// `n` bytes of a buffer from [`Output::take`] were sent (completion backends).
    pub fn on_sent(&mut self, backend: &mut B, key: usize, n: usize) {
        LoopStats::add(&self.stats.bytes_out, n as u64);
        self.call(backend, key, self.now(), |service, session, io| {
            service.sent(session, io, n)
        });
    }

    /// Writing failed: the connection is gone.
    pub fn on_write_error(&mut self, backend: &mut B, key: usize, error: io::Error) {
        self.close_now(backend, key, Some(error));
    }

    /// An operation on `key`'s socket ended: free a closing connection that has none left.
    pub fn on_released(&mut self, key: usize) {
        if self
            .conns
            .get(key)
            .is_some_and(|c| c.phase == Phase::Closing && B::is_idle(&c.socket))
        {
            self.conns.remove(key);
        }
    }

    // ----- the turn -----

    /// Writes what the turn produced, fires due timers, resumes accepting after a
    /// back-off, and enforces the shutdown deadline.
    pub fn end_turn(&mut self, backend: &mut B) -> io::Result<()> {
        if self.connects_pending {
            self.start_connects(backend);
        }
        self.settle(backend);
        while let Some(key) = self.resumed.pop() {
            if self.reading_socket(key).is_some() {
                backend.resume_reading(self, key);
            }
            self.settle(backend);
        }
        let now = Instant::now();
        self.turn_now.set(Some(now));
        self.expire_timers(backend, now);
        self.settle(backend);
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            backend.resume_accepting(self)?;
            self.settle(backend);
        }
        if self.shutdown_deadline.is_some_and(|t| now >= t) {
            self.close_all(backend);
            self.settle(backend);
        }
        Ok(())
    }

    /// Runs the inbox when the loop's own sessions put something there (their sends to
    /// it wait unwoken: see [`Remote::send`]) and writes what the connections have, until
    /// nothing is left: delivering makes output, and writing runs sessions again (a
    /// `drained`, a close on a write error) that may send more. Every step of the turn
    /// that can call a session ends here, so nothing raised in a turn waits for the next
    /// wake. What other threads sent waits for their wake, as before.
    fn settle(&mut self, backend: &mut B) {
        loop {
            let ran = self.inbox.own_posts() && self.drain_inbox(backend);
            if !ran && self.dirty.is_empty() {
                break;
            }
            self.flush_dirty(backend);
        }
    }

    /// Runs the loop-wide commands the service queued from the inbox (merged where it
    /// can, see [`Service::queue_local`]).
    fn run_local(&mut self, backend: &mut B) {
        while let Some(command) = self.service.next_local() {
            self.fan_out(backend, command);
        }
    }

    /// Hands a loop-wide command to each connection it concerns (one command per loop,
    /// not one per connection).
    fn fan_out(&mut self, backend: &mut B, command: S::Command) {
        let mut targets = std::mem::take(&mut self.targets);
        self.service.targets(&command, &mut targets);
        let now = self.now();
        for key in targets.drain(..) {
            if self
                .conns
                .get(key)
                .is_some_and(|c| c.phase == Phase::Active)
            {
                self.call(backend, key, now, |service, session, io| {
                    service.deliver(session, io, &command)
                });
            }
        }
        self.targets = targets;
    }

    fn flush_dirty(&mut self, backend: &mut B) {
        // Flushing can make more output (a `drained` handler sends): keep going until no
        // connection has any.
        while let Some(key) = self.dirty.pop() {
            self.flush_now(backend, key);
        }
    }

    /// Writes `key`'s output now if it has any, instead of at the end of the turn
    /// (readiness backends, right after reading: the reply leaves while the data is hot).
    pub fn flush_now(&mut self, backend: &mut B, key: usize) {
        if self.conns.get(key).is_some_and(|c| c.is(DIRTY)) {
            self.flush(backend, key);
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key)
            && !conn.is(DIRTY)
        {
            conn.set(DIRTY, true);
            self.dirty.push(key);
        }
    }

    /// Calls the service for one live connection and applies what it asked for (a new
    /// deadline, a close). Returns whether the connection is still active.
    fn call(
        &mut self,
        backend: &mut B,
        key: usize,
        now: Instant,
        f: impl FnOnce(&mut S, &mut S::Session, &mut Io<'_, S::Command>),
    ) -> bool {
        self.call_with(backend, key, now, None, |service, session, io, _| {
            f(service, session, io)
        })
    }

    /// [`Core::call`] with the receive buffer the call delivers from, if it may be kept
    /// (see [`Service::read_lendable`]): should the call panic, the connection's failure
    /// ([`Core::abandon`]) may need it.
    #[inline]
    fn call_with(
        &mut self,
        backend: &mut B,
        key: usize,
        now: Instant,
        mut buffer: Option<&mut Vec<u8>>,
        f: impl FnOnce(&mut S, &mut S::Session, &mut Io<'_, S::Command>, Option<&mut Vec<u8>>),
    ) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        let Some(session) = conn.session.as_mut() else {
            return false;
        };
        let mut io = Io::new(now, key, conn.generation, &self.remote);
        io.socket = Some(B::fd(&conn.socket));
        let service = &mut self.service;
        let lent = buffer.as_deref_mut();
        if guarded(self.config.isolate_panics, || {
            f(service, session, &mut io, lent)
        })
        .is_none()
        {
            return self.abandon(backend, key, buffer);
        }
        let effects = io.effects;
        self.apply(backend, key, effects)
    }

    /// A call for `key` panicked: the connection fails. Its handler (the application's
    /// part of the session) is dropped without another call and the service forgets the
    /// key; what the peer should still hear (close 1011, or 500 before the upgrade) goes
    /// out behind the output already queued, and the connection closes as after any
    /// close, within the close timeout. Where nothing can go out cleanly (the session's
    /// own code panicked too) it is dropped at once, without a word. `buffer`: the
    /// receive buffer whose delivery panicked, if it may be kept. Returns whether the
    /// connection is still active.
    #[cold]
    #[inline(never)]
    fn abandon(&mut self, backend: &mut B, key: usize, buffer: Option<&mut Vec<u8>>) -> bool {
        LoopStats::add(&self.stats.handler_panics, 1);
        let now = self.now();
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        let mut io = Io::new(now, key, conn.generation, &self.remote);
        io.socket = Some(B::fd(&conn.socket));
        let service = &mut self.service;
        // Dropping the handler is the application's code too. A lingering connection (all
        // written, our FIN sent) has nothing more to say.
        let failing = match conn.session.as_mut() {
            Some(session) if conn.phase == Phase::Active => {
                guarded(true, || service.fail(session, &mut io, buffer))
            }
            _ => None,
        };
        // It drops the connection's callbacks, the application's code too.
        let _ = guarded(true, || service.abandoned(&mut io));
        let effects = io.effects;
        if failing == Some(true) {
            log::error!("a handler panicked: its connection fails");
            return self.apply(backend, key, effects);
        }
        log::error!("a handler panicked: its connection is dropped");
        let session = self.conns.get_mut(key).and_then(|conn| conn.session.take());
        let _ = guarded(true, || drop(session));
        // No session: `close_now` has nobody to tell.
        self.close_now(backend, key, None);
        false
    }

    /// Applies a service call's requests. Returns false if the connection is closing.
    fn apply(&mut self, backend: &mut B, key: usize, effects: Effects) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if conn.phase == Phase::Closing {
            return false;
        }
        if let Some(deadline) = effects.deadline {
            self.wheel.reset(key, &mut conn.deadline, deadline);
        }
        if effects.notify_drained {
            conn.set(WRITE_BLOCKED, true);
        }
        match effects.reading {
            Some(false) if conn.is(READING) => {
                conn.set(READING, false);
                backend.pause_reading(key, &mut conn.socket);
            }
            Some(true) if !conn.is(READING) => {
                conn.set(READING, true);
                self.resumed.push(key);
            }
            _ => {}
        }
        match effects.close {
            CloseRequest::Now => {
                self.close_now(backend, key, None);
                false
            }
            CloseRequest::AfterFlush | CloseRequest::AfterFlushPeerDone => {
                // A close already requested with lingering keeps it.
                let lingers = conn.is(CLOSE_REQUESTED) && !conn.is(NO_LINGER);
                let peer_done = effects.close == CloseRequest::AfterFlushPeerDone;
                conn.set(NO_LINGER, peer_done && !lingers);
                conn.set(CLOSE_REQUESTED, true);
                self.mark_dirty(key);
                true
            }
            CloseRequest::Keep => {
                // Any call may have queued output.
                self.mark_dirty(key);
                true
            }
        }
    }

    /// Writes a connection's queued output; once all is out, reports `drained` or starts
    /// a requested close.
    fn flush(&mut self, backend: &mut B, key: usize) {
        let now = self.now();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.set(DIRTY, false);
        if conn.phase != Phase::Active {
            return;
        }
        let Some(session) = conn.session.as_mut() else {
            return;
        };
        let mut out = Output {
            service: &mut self.service,
            session,
            io: Io::new(now, key, conn.generation, &self.remote),
            stats: &self.stats,
            isolate_panics: self.config.isolate_panics,
            panicked: false,
        };
        let written = backend.write(key, &mut conn.socket, &mut out);
        if out.panicked {
            // What the write took is out (or with the kernel); the failure's close is
            // written behind it.
            if let Ok(Written::Blocked) = written {
                self.conns[key].set(WRITE_BLOCKED, true);
            }
            self.abandon(backend, key, None);
            if let Err(error) = written {
                self.close_now(backend, key, Some(error));
            }
            return;
        }
        let effects = out.io.effects;
        if effects != Effects::NONE {
            // Applying marks the connection dirty again only when it asked for something.
            if !self.apply(backend, key, effects) {
                return;
            }
        }
        match written {
            Err(error) => self.close_now(backend, key, Some(error)),
            Ok(Written::Submitted) => {}
            Ok(Written::Blocked) => self.conns[key].set(WRITE_BLOCKED, true),
            Ok(Written::All) => {
                let conn = &mut self.conns[key];
                if conn.is(WRITE_BLOCKED) {
                    conn.set(WRITE_BLOCKED, false);
                    // `drained` may queue more; the next flush of it starts the close.
                    self.call(backend, key, self.now(), |service, session, io| {
                        service.drained(session, io)
                    });
                } else if conn.is(NO_LINGER) {
                    // The peer's Close arrived and ours is written: nothing is left to
                    // read, so closing the socket sends a FIN, not a reset, and the
                    // server still closes TCP first (RFC 6455 §7.1.1).
                    self.close_now(backend, key, None);
                } else if conn.is(CLOSE_REQUESTED) {
                    // The server closes TCP first (RFC 6455 §7.1.1), then reads until the
                    // peer's FIN, so unread bytes do not turn the close into a reset.
                    backend.finish_writes(&mut conn.socket);
                    conn.phase = Phase::Lingering;
                    self.wheel
                        .reset(key, &mut conn.deadline, Some(now + LINGER));
                }
            }
        }
    }

    fn expire_timers(&mut self, backend: &mut B, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(now, &mut due);
        for entry in due.drain(..) {
            let key = entry.key();
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.phase == Phase::Closing || !self.wheel.fires(entry, &mut conn.deadline, now) {
                continue;
            }
            if conn.phase == Phase::Lingering {
                self.close_now(backend, key, None);
                continue;
            }
            self.call(backend, key, now, |service, session, io| {
                service.timeout(session, io)
            });
        }
        Wheel::recycle(&mut due);
        self.due = due;
    }

    // ----- connections -----

    /// Starts an outgoing connection (non-blocking); its session is made of `init`.
    fn connect(&mut self, backend: &mut B, addr: SocketAddr, init: S::Connect) {
        use socket2::{Domain, Protocol, Socket, Type};
        let started = (|| {
            if self.shutdown_deadline.is_some() {
                // Queued before the shutdown, started after it: fails as a connect.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client reactor is shutting down",
                ));
            }
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            match socket.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            Ok(TcpStream::from(socket))
        })();
        match started {
            Ok(stream) => self.register(backend, stream, addr, Some(init)),
            Err(e) => self.connect_failed(backend, init, e),
        }
    }

    /// The loop is ending: outgoing connections still queued (a turn starts at most
    /// [`CONNECTS_PER_TURN`]) fail as connects, so each handler hears of its end, and
    /// no more are taken.
    fn fail_queued_connects(&mut self, backend: &mut B) {
        // Their other addresses, if any, fail the same way (see `connect`).
        self.shutdown_deadline.get_or_insert_with(Instant::now);
        for (addr, init) in self.inbox.close_connects() {
            self.connect(backend, addr, init);
        }
    }

    /// An outgoing connection failed before it had a key: the session's next address, if
    /// it has one, is dialled; otherwise it has reported the failure.
    fn connect_failed(&mut self, backend: &mut B, init: S::Connect, error: io::Error) {
        let mut io = Io::new(self.now(), usize::MAX, 0, &self.remote);
        let service = &mut self.service;
        let next = guarded(self.config.isolate_panics, || {
            service.connect_failed(&mut io, init, error)
        });
        match next {
            Some(Some((addr, init))) => self.connect(backend, addr, init),
            Some(None) => {}
            // Its handler (told of the failure) panicked: nothing is left of it, nor of
            // what it registered under the stand-in key (a `Sender`'s gauge, callbacks).
            None => {
                LoopStats::add(&self.stats.handler_panics, 1);
                log::error!("a handler panicked on a failed connect");
                let service = &mut self.service;
                let _ = guarded(true, || service.abandoned(&mut io));
            }
        }
    }

    /// Adds a socket to the loop: accepted (`init` is `None`, subject to
    /// `max_connections`) or outgoing.
    fn register(
        &mut self,
        backend: &mut B,
        mut stream: TcpStream,
        peer: SocketAddr,
        init: Option<S::Connect>,
    ) {
        let connections = &self.config.connections;
        if connections.fetch_add(1, Ordering::AcqRel) >= self.config.max_connections
            && init.is_none()
        {
            connections.fetch_sub(1, Ordering::AcqRel);
            LoopStats::add(&self.stats.connections_refused, 1);
            // Best effort: a fresh socket's send buffer takes a short response whole.
            use std::io::Write;
            let _ = stream.write(&self.service.over_capacity());
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        if init.is_some() || !NODELAY_INHERITED {
            let _ = stream.set_nodelay(true);
        }
        // A fresh reading: a turn that accepts or connects many sockets can last long
        // enough that its start would make this connection's first deadline early.
        let now = Instant::now();
        self.turn_now.set(Some(now));
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let socket = match backend.attach(key, stream) {
            Ok(socket) => socket,
            Err(e) => {
                connections.fetch_sub(1, Ordering::AcqRel);
                if let Some(init) = init {
                    self.connect_failed(backend, init, e);
                }
                return;
            }
        };
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let mut io = Io::new(now, key, generation, &self.remote);
        let session = match init {
            None => self.service.open(&mut io, peer),
            Some(init) => self.service.connected(&mut io, peer, init),
        };
        let effects = io.effects;
        entry.insert(Conn {
            socket,
            session: Some(session),
            generation,
            deadline: Deadline::default(),
            phase: Phase::Active,
            flags: READING,
        });
        self.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        LoopStats::add(&self.stats.connections_total, 1);
        // An outgoing connection has its upgrade request to send: `apply` marks it dirty.
        self.apply(backend, key, effects);
    }

    /// Ends the connection for the session now (`cause`: the transport's error, if that
    /// is why); the socket closes once the backend holds no operation on it.
    fn close_now(&mut self, backend: &mut B, key: usize, cause: Option<io::Error>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.phase == Phase::Closing {
            return;
        }
        conn.phase = Phase::Closing;
        conn.deadline.clear();
        let (generation, mut session) = (conn.generation, conn.session.take());
        if B::TAKES_BACK_INPUT
            && let Some(buffer) = session
                .as_mut()
                .and_then(|session| self.service.reclaim_received(session))
        {
            // A reply in place and a close in the same read: the loop reads into the buffer
            // again instead of a new one.
            backend.input_returned(buffer);
        }
        // The session records how it ended (its close code) first, then the connection
        // is counted out, then the peer can see the close: a stats reader that sees the
        // connection gone sees its close too, and one that saw the socket's EOF sees the
        // connection gone.
        let retry = session.and_then(|session| {
            let mut io = Io::new(self.now(), key, generation, &self.remote);
            let service = &mut self.service;
            match guarded(self.config.isolate_panics, || {
                service.closed(session, &mut io, cause)
            }) {
                Some(retry) => retry,
                // `on_close` panicked: what the service keeps for the key may be left.
                None => {
                    LoopStats::add(&self.stats.handler_panics, 1);
                    log::error!("a handler panicked in its close");
                    let service = &mut self.service;
                    let _ = guarded(true, || service.abandoned(&mut io));
                    None
                }
            }
        });
        self.config.connections.fetch_sub(1, Ordering::AcqRel);
        self.stats.connections_open.fetch_sub(1, Ordering::Release);
        if let Some(conn) = self.conns.get_mut(key) {
            backend.detach(key, &mut conn.socket);
        }
        self.on_released(key);
        // A connect refused at this address: the session's next one.
        if let Some((addr, init)) = retry {
            self.connect(backend, addr, init);
        }
    }

    /// The loop is ending on a handler's panic: every connection not closed yet is
    /// counted out and its session dropped, and the service forgets what it keeps for it
    /// (its topics above all). Its socket closes when the core is dropped, after the
    /// backend (see [`run`]). Further panics (a handler's drop) are caught: this runs
    /// before the unwind goes on.
    fn forget_all(&mut self) {
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.phase != Phase::Closing)
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            let conn = &mut self.conns[key];
            conn.phase = Phase::Closing;
            let (generation, session) = (conn.generation, conn.session.take());
            let _ = guarded(true, || drop(session));
            let mut io = Io::new(self.now(), key, generation, &self.remote);
            let service = &mut self.service;
            let _ = guarded(true, || service.abandoned(&mut io));
            self.config.connections.fetch_sub(1, Ordering::AcqRel);
            self.stats.connections_open.fetch_sub(1, Ordering::Release);
        }
    }

    fn close_all(&mut self, backend: &mut B) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close_now(backend, key, None);
        }
    }

    /// Stops accepting and asks every open session to close (1001), finishing by
    /// `deadline`.
    fn begin_shutdown(&mut self, backend: &mut B, deadline: Instant) {
        // A failure here only means the listener was already gone.
        let _ = backend.stop_accepting();
        self.accept_paused_until = None;
        self.shutdown_deadline = Some(deadline);
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            if self.conns[key].phase == Phase::Active {
                self.call(backend, key, self.now(), |service, session, io| {
                    service.shutdown(session, io)
                });
            }
        }
    }
}

/// Whether accepted sockets inherit `TCP_NODELAY` from their listener, so that setting
/// it once on the listener ([`set_listener_nodelay`]) saves a `setsockopt` per
/// connection. Linux copies it with the rest of the listener's TCP state
/// (`loop_listeners_pass_nodelay_to_accepted_sockets` checks it on the running kernel);
/// elsewhere each accepted socket gets its own call.
const NODELAY_INHERITED: bool = cfg!(target_os = "linux");

/// Sets `TCP_NODELAY` on a loop's listener, for the sockets it accepts.
fn set_listener_nodelay(listener: &TcpListener) -> io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

/// A loop's thread; it ends with the loop's result.
pub(crate) type LoopThread = std::thread::JoinHandle<io::Result<()>>;

/// A started loop: how other threads reach it, and its thread.
pub(crate) struct Spawned<S: Service> {
    pub remote: Remote<S::Command>,
    pub connector: Connector<S::Connect, S::Command>,
    pub thread: LoopThread,
}

/// Spawns one loop thread on backend `B`: `prepare` on this thread, the rest on the new
/// one. Returns once the backend is built there, so that a failure to build it (an
/// io_uring ring the kernel refuses) is this call's error, not a loop thread that ended
/// by itself while the server looked started.
pub(crate) fn spawn<S, B>(
    name: String,
    listener: Option<TcpListener>,
    service: S,
    config: LoopConfig,
    stats: Arc<LoopStats>,
) -> io::Result<Spawned<S>>
where
    S: Service + Send,
    B: Backend,
{
    if let Some(listener) = &listener {
        set_listener_nodelay(listener)?;
    }
    let (prepared, waker) = B::prepare()?;
    let (remote, connector, inbox) = super::channel(waker);
    let loop_remote = remote.clone();
    let (built_tx, built) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        // Built on the loop's thread: io_uring's SINGLE_ISSUER ties a ring to its creator.
        let backend = match B::new(prepared, listener) {
            Ok(backend) => backend,
            Err(e) => {
                let _ = built_tx.send(Err(e));
                return Ok(());
            }
        };
        let _ = built_tx.send(Ok(()));
        run(
            backend,
            Core::new(service, inbox, loop_remote, config, stats),
        )
    })?;
    let failed = match built.recv() {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        // The thread ended without a word: it panicked building the backend.
        Err(_) => Some(io::Error::other(
            "the loop thread ended while building its backend",
        )),
    };
    if let Some(e) = failed {
        let _ = thread.join();
        return Err(e);
    }
    Ok(Spawned {
        remote,
        connector,
        thread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `NODELAY_INHERITED` relies on, checked on the kernel the tests run on: a
    /// socket accepted from a listener that went through `set_listener_nodelay` has
    /// `TCP_NODELAY` already, and one from a plain listener does not (so the check can
    /// fail: Nagle is on by default).
    #[test]
    fn loop_listeners_pass_nodelay_to_accepted_sockets() {
        let accepted_nodelay = |prepare: bool| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            if prepare {
                set_listener_nodelay(&listener).unwrap();
            }
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            accepted.nodelay().unwrap()
        };
        assert!(
            !accepted_nodelay(false),
            "a plain listener's sockets use Nagle"
        );
        if NODELAY_INHERITED {
            assert!(accepted_nodelay(true), "inherited from the listener");
        }
    }
}
