//! The reactor: thread-per-core event loops that own sockets, buffers and time.
//!
//! It knows nothing of WebSocket frames. Each loop drives connections through the
//! `Service` trait, which the facade (`crate::server`) implements with a `Driver` and the
//! user's handler; sessions live inline in the loop's `Slab`, so a connection costs no
//! `Box`. The loop core (`core`: slab and generations, timer wheel, inbox, stats,
//! admission, shutdown) is written once over a small backend trait that epoll (through
//! mio) and io_uring implement: the `Service` trait is the one interface above the loop,
//! the `Backend` trait the one below it.

pub(crate) mod backend;
pub(crate) mod core;
pub(crate) mod epoll;
pub(crate) mod low_water;
pub(crate) mod tcp_info;
pub(crate) mod timer;
#[cfg(target_os = "linux")]
pub(crate) mod uring;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

/// Sockets' input a loop takes in per turn at most: epoll's events per wait, and the
/// receives an io_uring turn runs before the rest wait for the next one.
pub(crate) const INPUTS_PER_TURN: usize = 1024;

pub(crate) use crate::protocol::driver::Outgoing;

/// Which IO backend runs the event loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// io_uring when the kernel supports everything the backend uses, else epoll.
    #[default]
    Auto,
    /// epoll through mio (kqueue on the BSDs and macOS, where io_uring does not exist).
    Epoll,
    /// io_uring: multishot accept and recv, a provided-buffer ring, batched submission.
    IoUring,
}

impl Backend {
    /// The backend that will actually run, and why (one line, for the log).
    ///
    /// `Auto` probes the kernel (see [`io_uring_support`]); setting the environment
    /// variable `WSD_IO_URING=off` makes the probe fail, which forces epoll where io_uring
    /// is present but unwanted (seccomp filters, auditing).
    pub fn resolve(self) -> Result<(Backend, String), String> {
        match self {
            Backend::Epoll => Ok((Backend::Epoll, "epoll (requested)".into())),
            Backend::IoUring => match io_uring_support() {
                Ok(setup) => Ok((Backend::IoUring, format!("io_uring (requested; {setup})"))),
                Err(why) => Err(format!("io_uring requested but unavailable: {why}")),
            },
            Backend::Auto => Ok(match io_uring_support() {
                Ok(setup) => (
                    Backend::IoUring,
                    format!("io_uring (auto: the kernel supports it; {setup})"),
                ),
                Err(why) => (
                    Backend::Epoll,
                    format!("epoll (auto: io_uring unavailable: {why})"),
                ),
            }),
        }
    }
}

/// Whether this kernel (and environment) supports the io_uring backend: the ring setup
/// flags it will use, or why not.
pub fn io_uring_support() -> Result<&'static str, String> {
    if std::env::var("WSD_IO_URING").is_ok_and(|v| v == "off" || v == "0") {
        return Err("disabled by WSD_IO_URING=off".into());
    }
    probe_io_uring()
}

#[cfg(target_os = "linux")]
fn probe_io_uring() -> Result<&'static str, String> {
    // Probed once per process, on a thread of its own: tearing a ring down queues task
    // work on its creator, which would interrupt the caller's next blocking socket call
    // (EINTR on sockets with timeouts).
    static PROBE: std::sync::OnceLock<Result<&'static str, String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            std::thread::spawn(uring::probe)
                .join()
                .unwrap_or_else(|_| Err("the io_uring probe panicked".into()))
        })
        .clone()
}

#[cfg(not(target_os = "linux"))]
fn probe_io_uring() -> Result<&'static str, String> {
    Err("io_uring exists only on Linux".into())
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "epoll" => Ok(Backend::Epoll),
            "io-uring" | "io_uring" | "iouring" => Ok(Backend::IoUring),
            other => Err(format!(
                "unknown backend {other:?} (expected auto, epoll or io-uring)"
            )),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Epoll => "epoll",
            Backend::IoUring => "io-uring",
        })
    }
}

/// What a connection asks of the loop, collected during a [`Service`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseRequest {
    /// Keep the connection.
    Keep,
    /// Close once everything queued is written (the loop lingers for the peer's FIN).
    AfterFlush,
    /// Close once everything queued is written, without lingering: the peer has said it
    /// sends nothing more (its Close frame arrived), so no unread byte can turn the close
    /// into a reset.
    AfterFlushPeerDone,
    /// Close the socket now.
    Now,
}

/// The loop's side of one [`Service`] call: the time, the connection's identity, and
/// what the service wants done (a new deadline, a close).
pub(crate) struct Io<'a, C> {
    pub now: Instant,
    pub key: usize,
    pub generation: u32,
    pub remote: &'a Remote<C>,
    pub(crate) effects: Effects,
    /// The connection's socket, for [`Io::delivery`] (set on the calls that have one).
    pub(crate) socket: Option<std::os::fd::BorrowedFd<'a>>,
}

/// What a [`Service`] call asked of the loop for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Effects {
    /// A new deadline (`Some(None)` disarms it).
    pub deadline: Option<Option<Instant>>,
    pub close: CloseRequest,
    /// Stop (`Some(false)`) or resume (`Some(true)`) reading from the socket.
    pub reading: Option<bool>,
    /// Call [`Service::drained`] once all of the connection's output is written.
    pub notify_drained: bool,
}

impl Effects {
    pub(crate) const NONE: Effects = Effects {
        deadline: None,
        close: CloseRequest::Keep,
        reading: None,
        notify_drained: false,
    };
}

impl<'a, C> Io<'a, C> {
    pub(crate) fn new(now: Instant, key: usize, generation: u32, remote: &'a Remote<C>) -> Self {
        Io {
            now,
            key,
            generation,
            remote,
            effects: Effects::NONE,
            socket: None,
        }
    }

    /// How the connection's output is being delivered, as the kernel tells it, with
    /// `ours_waiting` (output in the session's own buffers) added to the backlog (`None`: no
    /// socket on this call, or the kernel did not say).
    pub fn delivery(&self, ours_waiting: bool) -> Option<crate::session::Delivery> {
        self.socket
            .and_then(|fd| tcp_info::delivery_with_ours(fd, ours_waiting))
    }

    /// Replaces the connection's deadline (`None` disarms it).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.effects.deadline = Some(deadline);
    }

    /// Asks the loop to close after flushing (or at once with [`CloseRequest::Now`]).
    /// The first request stands, except that `Now` overrides any other.
    pub fn close(&mut self, how: CloseRequest) {
        if how == CloseRequest::Now || self.effects.close == CloseRequest::Keep {
            self.effects.close = how;
        }
    }

    /// Asks the loop to stop reading from the connection (`false`: its output is over the
    /// limit) or to read again (`true`).
    pub fn set_reading(&mut self, reading: bool) {
        self.effects.reading = Some(reading);
    }

    /// Asks the loop to call [`Service::drained`] once all of the connection's output is
    /// written, whether or not a write blocks on the way (one that takes it all at once
    /// calls it right after).
    pub fn notify_drained(&mut self) {
        self.effects.notify_drained = true;
    }
}

/// The per-connection logic a loop drives. Every method gets the session from the slab.
///
/// Call order per connection: `open`, then any number of `read` / `timeout` / `command` /
/// `deliver` / `drained` / `shutdown` / `consume`, then exactly one `closed`.
pub(crate) trait Service: 'static {
    /// Per-connection state, stored inline in the loop's slab.
    type Session;
    /// Work another thread sends to one connection.
    type Command: Send + 'static;
    /// What an outgoing connection is made of (see [`Connector`]).
    type Connect: Send + 'static;

    /// A connection was accepted.
    fn open(&mut self, io: &mut Io<'_, Self::Command>, peer: SocketAddr) -> Self::Session;
    /// An outgoing connection to `peer` (from a [`Connector`]) is being established;
    /// `init` is what the session is made of.
    fn connected(
        &mut self,
        io: &mut Io<'_, Self::Command>,
        peer: SocketAddr,
        init: Self::Connect,
    ) -> Self::Session;
    /// An outgoing connection could not even be started (no socket, no route). Returns
    /// the next address to try with what the connection is made of, if the session has
    /// one (the loop then dials it); `None` once the failure is reported.
    fn connect_failed(
        &mut self,
        io: &mut Io<'_, Self::Command>,
        init: Self::Connect,
        error: io::Error,
    ) -> Option<(SocketAddr, Self::Connect)>;
    /// Bytes arrived (the slice is the loop's read buffer, free to modify in place).
    fn read(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        data: &mut [u8],
    );
    /// Bytes arrived in `input[..len]`, a buffer the backend can give away (io_uring's
    /// receive buffers, epoll's read buffer): the service may take it (leaving an empty
    /// `Vec`) to send a reply of at least `min_reply` bytes from it in place; the backend
    /// then receives into another, or takes it back with [`Service::reclaim_received`].
    /// The default reads the bytes and leaves the buffer.
    fn read_lendable(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        input: &mut Vec<u8>,
        len: usize,
        min_reply: usize,
    ) {
        let _ = min_reply;
        self.read(session, io, &mut input[..len]);
    }
    /// Gives back a buffer taken by [`Service::read_lendable`] (readiness backends, right
    /// after writing): at once if its reply is written, else after copying the reply into
    /// the session's output. `None` when the session holds no such buffer.
    fn reclaim_received(&mut self, session: &mut Self::Session) -> Option<Vec<u8>> {
        let _ = session;
        None
    }
    /// A large frame's payload is being received, with at least `min` bytes of it to come:
    /// lends the buffer the rest goes in, so the backend receives straight into it instead
    /// of into its own buffer and the session copying from there. The default lends
    /// nothing.
    fn lend_payload_buffer(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        min: usize,
    ) -> Option<PayloadLoan> {
        let _ = (session, io, min);
        None
    }
    /// Bytes still to come of the large frame being received (0 when none, or none that
    /// could be lent): lets a backend that must first stop another receive (io_uring's
    /// multishot one) decide to.
    fn payload_to_come(&self, session: &Self::Session) -> u64 {
        let _ = session;
        0
    }
    /// The buffer from [`Service::lend_payload_buffer`], back with `n` bytes appended (it
    /// comes back whatever the receive did, with `n` = 0 when it failed).
    fn payload_received(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        buffer: Vec<u8>,
        n: usize,
    ) {
        let _ = (session, io, buffer, n);
    }
    /// The deadline set through [`Io::set_deadline`] passed.
    fn timeout(&mut self, session: &mut Self::Session, io: &mut Io<'_, Self::Command>);
    /// A command from a [`Sender`](Remote) arrived.
    fn command(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        command: Self::Command,
    );
    /// The connections a loop-wide command ([`Envelope::Loop`], or one from
    /// [`Service::next_local`]) concerns, into `targets`.
    fn targets(&mut self, command: &Self::Command, targets: &mut Vec<usize>);
    /// A loop-wide command for one of its targets.
    fn deliver(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        command: &Self::Command,
    );
    /// The next loop-wide command queued by [`Service::queue_local`] (from the inbox, where
    /// the loop's own sessions' commands wait too). The service may merge neighbours into
    /// one command.
    fn next_local(&mut self) -> Option<Self::Command>;
    /// A loop-wide command from the inbox: queue it behind the loop's own (returning
    /// `None`) so that neighbours can merge, or hand it back to run now. The core runs the
    /// queue before the inbox's next per-connection command and when the inbox is empty,
    /// so the inbox's order holds.
    fn queue_local(&mut self, command: Self::Command) -> Option<Self::Command>;
    /// Output that had blocked, or that the session asked about
    /// ([`Io::notify_drained`]), is fully written.
    fn drained(&mut self, session: &mut Self::Session, io: &mut Io<'_, Self::Command>);
    /// The server is shutting down.
    fn shutdown(&mut self, session: &mut Self::Session, io: &mut Io<'_, Self::Command>);
    /// The bytes to write next, as up to `parts.len()` slices in order (one vectored
    /// write); returns how many were filled.
    fn output<'s>(&self, session: &'s Self::Session, parts: &mut [IoSlice<'s>]) -> usize;
    /// `n` bytes of [`Service::output`] were written (readiness backends).
    fn consume(&mut self, session: &mut Self::Session, io: &mut Io<'_, Self::Command>, n: usize);
    /// Everything queued, handed over into `into` (empty, from the backend's pool) for the
    /// kernel to hold until the send completes (completion backends). Returns false when
    /// nothing is queued.
    fn take_output(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        into: &mut Outgoing,
    ) -> bool;
    /// `n` bytes of a buffer from [`Service::take_output`] were sent (or dropped because the
    /// connection failed).
    fn sent(&mut self, session: &mut Self::Session, io: &mut Io<'_, Self::Command>, n: usize);
    /// The socket is closed (by request, by the peer, by error or by shutdown); `cause` is
    /// the transport's error when one ended it. For an outgoing connection whose connect
    /// failed, returns the next address to try, as [`Service::connect_failed`] does.
    fn closed(
        &mut self,
        session: Self::Session,
        io: &mut Io<'_, Self::Command>,
        cause: Option<std::io::Error>,
    ) -> Option<(SocketAddr, Self::Connect)>;
    /// A call for connection `io.key` panicked (in the application's code, which runs
    /// inside the service): the session drops the application's part (its handler, whose
    /// drop may panic too: the loop catches it) and queues what the peer should still hear,
    /// a close frame or an error response, behind its output. `input` is the receive
    /// buffer whose delivery panicked, if it was one (a reply may have claimed it, as in
    /// [`Service::read_lendable`]). Returns whether the connection goes on to write that
    /// and close as requested through `io`; `false`: the loop drops it at once. Either
    /// way [`Service::abandoned`] follows.
    fn fail(
        &mut self,
        session: &mut Self::Session,
        io: &mut Io<'_, Self::Command>,
        input: Option<&mut Vec<u8>>,
    ) -> bool;
    /// A call for connection `io.key` panicked: forget everything kept for the key
    /// (callbacks, subscriptions, held input). Runs no application code but the drops of
    /// what the application gave (its callbacks).
    fn abandoned(&mut self, io: &mut Io<'_, Self::Command>);
    /// The response for a connection refused because the server is full.
    fn over_capacity(&self) -> Vec<u8>;
}

/// A message to a loop from another thread.
pub(crate) enum Envelope<C> {
    /// For one connection, if it is still the same one (`generation`).
    Conn {
        key: usize,
        generation: u32,
        command: C,
    },
    /// For the loop as a whole: the service names the connections it concerns
    /// ([`Service::targets`]) and each gets it ([`Service::deliver`]).
    Loop(C),
    /// Begin a graceful shutdown that must finish by `deadline`.
    Shutdown { deadline: Instant },
}

/// The handle other threads use to reach a loop: a channel plus a waker. Sends never
/// take a lock the loop holds; the waker is only rung when the loop is not already due
/// to look at the channel.
pub(crate) struct Remote<C> {
    tx: mpsc::Sender<Envelope<C>>,
    waker: Waker,
    notified: Arc<AtomicBool>,
}

/// How another thread interrupts a loop's wait.
#[derive(Clone)]
pub(crate) enum Waker {
    /// mio's eventfd, registered with the epoll instance.
    Poll(Arc<mio::Waker>),
    /// A pipe the io_uring loop keeps a read posted on.
    #[cfg(target_os = "linux")]
    Pipe(Arc<std::io::PipeWriter>),
}

impl Waker {
    fn wake(&self) -> io::Result<()> {
        match self {
            Waker::Poll(waker) => waker.wake(),
            #[cfg(target_os = "linux")]
            Waker::Pipe(pipe) => {
                use std::io::Write;
                (&**pipe).write_all(&[1])
            }
        }
    }
}

impl<C> Clone for Remote<C> {
    fn clone(&self) -> Self {
        Remote {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
            notified: self.notified.clone(),
        }
    }
}

/// A loop's end of its [`Remote`] and [`Connector`]: the channels and the flag that gates
/// wake-ups.
pub(crate) struct Inbox<C, K> {
    rx: mpsc::Receiver<Envelope<C>>,
    connects: mpsc::Receiver<(SocketAddr, K)>,
    /// The [`Connector`]'s end, closed by [`Inbox::close_connects`].
    connect_tx: ConnectQueue<K>,
    notified: Arc<AtomicBool>,
    /// `OWN_POSTS` when last looked at (see [`Inbox::own_posts`]).
    own_posts_seen: std::cell::Cell<u64>,
}

impl<C, K> Inbox<C, K> {
    /// Marks this thread as the one running this inbox's loop (see [`Remote::send`]).
    pub fn claim_thread(&self) {
        OWN_INBOX.with(|own| own.set(Arc::as_ptr(&self.notified) as usize));
    }

    /// Whether the loop's own thread put something in the inbox since the last call: the
    /// turn then drains it (without this, what other threads sent waits for their wake,
    /// and arrives in larger batches).
    pub fn own_posts(&self) -> bool {
        let posts = OWN_POSTS.with(|posts| posts.get());
        posts != self.own_posts_seen.replace(posts)
    }

    /// Call before draining: a send racing with the drain then wakes the loop again.
    pub fn rearm(&self) {
        self.notified.store(false, Ordering::Release);
    }

    /// The next queued envelope, if any.
    pub fn next(&self) -> Option<Envelope<C>> {
        self.rx.try_recv().ok()
    }

    /// The next queued outgoing connection, if any.
    pub fn next_connect(&self) -> Option<(SocketAddr, K)> {
        self.connects.try_recv().ok()
    }

    /// Refuses further connections (`Connector::connect` fails from now on) and returns
    /// those still queued: the loop is ending, and each must be reported as failed.
    pub fn close_connects(&self) -> Vec<(SocketAddr, K)> {
        self.connect_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.connects.try_iter().collect()
    }
}

/// The channels, [`Remote`] and [`Connector`] of one loop, woken through `waker`.
pub(crate) fn channel<C, K>(waker: Waker) -> (Remote<C>, Connector<K, C>, Inbox<C, K>) {
    let (tx, rx) = mpsc::channel();
    let (connect_tx, connects) = mpsc::channel();
    let notified = Arc::new(AtomicBool::new(false));
    let remote = Remote {
        tx,
        waker,
        notified: notified.clone(),
    };
    let connect_tx = Arc::new(Mutex::new(Some(connect_tx)));
    let connector = Connector {
        tx: connect_tx.clone(),
        remote: remote.clone(),
    };
    (
        remote,
        connector,
        Inbox {
            rx,
            connects,
            connect_tx,
            notified,
            own_posts_seen: std::cell::Cell::new(0),
        },
    )
}

thread_local! {
    /// The inbox of the loop running on this thread (its wake flag's address; 0 on other
    /// threads).
    static OWN_INBOX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Envelopes this loop's thread has put in its own inbox so far.
    static OWN_POSTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl<C> Remote<C> {
    /// Queues `envelope` and wakes the loop. Fails if the loop has stopped.
    ///
    /// From the loop's own thread (a session's handler) nothing is woken: the loop drains
    /// its inbox before its turn ends ([`Core`](core::Core)'s settle), so what a handler
    /// sends to its own loop, by any handle, runs in the order it was sent.
    pub fn send(&self, envelope: Envelope<C>) -> io::Result<()> {
        self.tx.send(envelope).map_err(|_| stopped())?;
        if self.is_own_loop() {
            OWN_POSTS.with(|posts| posts.set(posts.get() + 1));
            return Ok(());
        }
        self.wake()
    }

    /// Whether this thread runs the loop this handle reaches.
    pub(crate) fn is_own_loop(&self) -> bool {
        OWN_INBOX.with(|own| own.get()) == Arc::as_ptr(&self.notified) as usize
    }

    /// Makes the loop look at its queues, unless it is already due to.
    fn wake(&self) -> io::Result<()> {
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.waker.wake()?;
        }
        Ok(())
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the event loop has stopped")
}

/// Asks one loop to open outgoing connections: a typed queue beside the loop's inbox,
/// sharing its waker, so a connection's parts (`K`) reach the loop without type erasure.
pub(crate) struct Connector<K, C> {
    /// `None` once the loop has closed its queue ([`Inbox::close_connects`]). Sends go
    /// under the lock, so each connection is either refused here or reaches the loop,
    /// which reports on every one it takes: none is dropped unheard.
    tx: ConnectQueue<K>,
    remote: Remote<C>,
}

type ConnectQueue<K> = Arc<Mutex<Option<mpsc::Sender<(SocketAddr, K)>>>>;

impl<K, C> Connector<K, C> {
    /// Queues a connection to `addr` made of `init`, and wakes the loop. Fails once the
    /// loop has stopped.
    pub fn connect(&self, addr: SocketAddr, init: K) -> io::Result<()> {
        {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            let tx = tx.as_ref().ok_or_else(stopped)?;
            tx.send((addr, init)).map_err(|_| stopped())?;
        }
        self.remote.wake()
    }
}

/// A message's buffer lent to a backend for the rest of a large frame
/// ([`Service::lend_payload_buffer`]).
#[derive(Debug)]
pub(crate) struct PayloadLoan {
    /// The buffer; its length: the bytes so far.
    pub buffer: Vec<u8>,
    /// How many bytes may be appended (never past the frame).
    pub room: usize,
    /// Whether a receive may wait until the whole room has arrived before it reports:
    /// nothing (an idle keepalive) needs to hear of each piece as it comes.
    pub whole: bool,
}

/// Counters of one loop; summed over loops by the server's `stats()`.
#[derive(Debug, Default)]
pub(crate) struct LoopStats {
    pub connections_open: AtomicUsize,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Publishes made by this loop's handlers.
    pub published: AtomicU64,
    /// Published messages queued on a subscriber.
    pub delivered: AtomicU64,
    /// Published messages a subscriber did not get: its output was over the cap.
    pub dropped: AtomicU64,
    /// Messages sent back from the receive buffer they arrived in.
    pub replies_in_place: AtomicU64,
    /// Receives made straight into a large message's buffer.
    pub payload_receives: AtomicU64,
    /// Times the loop stopped accepting with its queue of accepted connections full.
    pub accept_pauses: AtomicU64,
    /// Connections failed (or dropped) because a call for them panicked.
    pub handler_panics: AtomicU64,
    pub closes: Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl LoopStats {
    // Inlined into the services' generic code, which is compiled in the application's
    // crate (a call per message otherwise).
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        // Only the owning loop writes, so a relaxed load + store is enough and cheaper
        // than a locked read-modify-write.
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
}

/// How much buffer memory a loop keeps for reuse: at most `total` bytes of capacity in
/// all, no buffer over `each`, and no empty ones. Bounded by bytes rather than by count, so
/// a loop keeps one buffer per busy connection when replies are small or mid-sized (on
/// io_uring each is with the kernel until its send completes) and never more than a fixed
/// amount of memory. The loop's output-buffer pool and io_uring's spare send batches each
/// keep one.
#[derive(Debug)]
pub(crate) struct KeepBudget {
    total: usize,
    each: usize,
    /// Capacity kept now.
    kept: usize,
}

impl KeepBudget {
    pub const fn new(total: usize, each: usize) -> KeepBudget {
        KeepBudget {
            total,
            each,
            kept: 0,
        }
    }

    /// Whether a buffer of `capacity` may be kept; if so, it is counted until
    /// [`KeepBudget::release`].
    pub fn admit(&mut self, capacity: usize) -> bool {
        let fits = capacity != 0 && capacity <= self.each && self.kept + capacity <= self.total;
        if fits {
            self.kept += capacity;
        }
        fits
    }

    /// A kept buffer of `capacity` was taken back into use.
    pub fn release(&mut self, capacity: usize) {
        self.kept -= capacity;
    }

    /// Capacity kept now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.kept
    }
}

/// Loop settings the reactor itself uses.
#[derive(Debug, Clone)]
pub(crate) struct LoopConfig {
    pub max_connections: usize,
    pub read_buffer_size: usize,
    /// How long an io_uring loop out of completions looks for more before it sleeps.
    pub busy_poll: std::time::Duration,
    /// Shared by every loop of one server, for `max_connections`.
    pub connections: Arc<AtomicUsize>,
    /// A panic in a service call fails that connection ([`Service::fail`], then
    /// [`Service::abandoned`]) instead of ending the loop.
    pub isolate_panics: bool,
}

/// The largest number of connections the open-file limit leaves room for: the current
/// soft limit minus a reserve for listeners, epoll instances and the application's own
/// files. Only reads the limit; [`raise_open_file_limit`](crate::raise_open_file_limit)
/// raises it.
pub fn default_max_connections() -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    (soft as usize).saturating_sub(64).max(16)
}

#[cfg(test)]
mod tests {
    use super::KeepBudget;

    /// Limits at the limit and one over: the total, each buffer's cap, and empty buffers.
    #[test]
    fn a_keep_budget_admits_up_to_its_bounds() {
        let mut budget = KeepBudget::new(100, 40);
        assert!(!budget.admit(0), "an empty buffer is not worth keeping");
        assert!(!budget.admit(41), "one byte over the per-buffer cap");
        assert!(budget.admit(40));
        assert!(budget.admit(40));
        assert!(!budget.admit(21), "one byte over the total");
        assert!(budget.admit(20), "exactly the total");
        assert_eq!(budget.kept(), 100);
        budget.release(40);
        assert_eq!(budget.kept(), 60);
        assert!(budget.admit(40), "released capacity can be kept again");
    }
}
