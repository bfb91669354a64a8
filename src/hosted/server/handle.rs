//! The running server: [`ServerHandle`] and its [`Stats`].

use super::Command;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::backplane::BackplaneStats;
use super::pubsub::{PubSub, Publisher};
use crate::protocol::driver::MessageType;
use crate::protocol::error::Error;
use crate::reactor::core::LoopThread;
use crate::reactor::{Backend, Envelope, LoopStats, Remote};

/// Server-wide counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now (including those still in the handshake). A connection is
    /// counted out after its close is recorded in `closes` (and after `on_close` ran), and
    /// before its peer can see the TCP connection end: stats that show it gone show its
    /// close code too.
    pub connections_open: usize,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections refused with 503 because of `max_connections`.
    pub connections_refused: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Messages published (by handlers, the server handle and publishers).
    pub published: u64,
    /// Published messages queued on a subscriber (one per subscriber reached).
    pub delivered: u64,
    /// Published messages a subscriber did not get because its output was over the cap.
    pub dropped: u64,
    /// Messages whose reply took the buffer they were received in instead of being copied
    /// into the output: a message that arrived whole in one receive and that a handler
    /// sends back (`send_message` / `send_message_owned`) during its delivery, on a
    /// connection without TLS or permessage-deflate, of at least half a receive buffer
    /// (16 KiB) on io_uring, which keeps the buffer until the send completes, or of 4 KiB
    /// on epoll, which writes the reply at once and reads into the buffer again (where the
    /// socket took only part of the reply, the rest is then copied out; a connection whose
    /// socket is full does not take the buffer). Counted when the reply takes the buffer;
    /// one such reply per receive.
    pub replies_in_place: u64,
    /// Receives made straight into the buffer of a message being reassembled, without a
    /// copy (a `recv` on epoll, a receive operation on io_uring, counted when made): for
    /// the rest of a frame with at least a read buffer's worth (epoll, 64 KiB by default)
    /// or 128 KiB (io_uring) still to come, on a connection without TLS.
    pub payload_receives: u64,
    /// Times a loop stopped taking connections from the listen backlog because it held
    /// 1 024 accepted connections it had not yet set up (io_uring, whose accept takes the
    /// whole backlog at once; a turn sets up 64): connections arrived faster than the
    /// loop could take them, and the rest waited in the kernel's backlog until it could.
    /// Always 0 on epoll, which accepts only what a turn sets up.
    pub accept_pauses: u64,
    /// Connections failed because their handler panicked (see
    /// [`PanicPolicy::CloseConnection`](super::PanicPolicy::CloseConnection)).
    pub handler_panics: u64,
    /// What the backplane (if any) did: messages sent to and received from the other
    /// processes, dropped on the way out, reconnections.
    pub backplane: BackplaneStats,
    /// Closed WebSocket connections by close code (as reported to `on_close`).
    pub closes: std::collections::BTreeMap<u16, u64>,
}

/// Controls a running server from any thread.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    remotes: Vec<Remote<Command>>,
    stats: Vec<Arc<LoopStats>>,
    threads: Mutex<Loops>,
    local_addr: Option<SocketAddr>,
    backend: Backend,
    pubsub: Arc<PubSub>,
}

/// The loops' threads until joined, and how they ended once they are: every `wait` (and
/// `shutdown`) reports it, not only the first, which joins them.
struct Loops {
    running: Vec<LoopThread>,
    /// The last error of a joined loop (kind and message: an `io::Error` is not `Clone`).
    ended: Option<(io::ErrorKind, String)>,
}

/// The one log line saying which backend serves and why, through the [`log`] facade at
/// `info` level (the library never prints; an application that wants the line installs a
/// logger or prints [`ServerHandle::backend`] itself).
fn log_backend(why: &str) {
    log::info!("websocket-driver: serving on {why}");
}

impl ServerHandle {
    /// A handle over started loops; logs which backend serves and why.
    pub(crate) fn new(
        remotes: Vec<Remote<Command>>,
        stats: Vec<Arc<LoopStats>>,
        threads: Vec<JoinHandle<io::Result<()>>>,
        local_addr: Option<SocketAddr>,
        backend: Backend,
        why: &str,
        pubsub: Arc<PubSub>,
    ) -> ServerHandle {
        log_backend(why);
        ServerHandle {
            inner: Arc::new(HandleInner {
                remotes,
                stats,
                threads: Mutex::new(Loops {
                    running: threads,
                    ended: None,
                }),
                local_addr,
                backend,
                pubsub,
            }),
        }
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl ServerHandle {
    /// The listening address (`0.0.0.0:0` for a client-only reactor).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .local_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The backend the loops run on (what `Backend::Auto` resolved to).
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            published: self.inner.pubsub.published.load(Ordering::Relaxed),
            backplane: self
                .inner
                .pubsub
                .backplane
                .as_ref()
                .map(|b| b.stats())
                .unwrap_or_default(),
            ..Stats::default()
        };
        for l in &self.inner.stats {
            // Acquire: the closes of the connections counted out are visible below.
            s.connections_open += l.connections_open.load(Ordering::Acquire);
            s.connections_total += l.connections_total.load(Ordering::Relaxed);
            s.connections_refused += l.connections_refused.load(Ordering::Relaxed);
            s.messages_in += l.messages_in.load(Ordering::Relaxed);
            s.messages_out += l.messages_out.load(Ordering::Relaxed);
            s.bytes_in += l.bytes_in.load(Ordering::Relaxed);
            s.bytes_out += l.bytes_out.load(Ordering::Relaxed);
            s.published += l.published.load(Ordering::Relaxed);
            s.delivered += l.delivered.load(Ordering::Relaxed);
            s.dropped += l.dropped.load(Ordering::Relaxed);
            s.replies_in_place += l.replies_in_place.load(Ordering::Relaxed);
            s.payload_receives += l.payload_receives.load(Ordering::Relaxed);
            s.accept_pauses += l.accept_pauses.load(Ordering::Relaxed);
            s.handler_panics += l.handler_panics.load(Ordering::Relaxed);
            for (code, n) in l.closes.lock().expect("stats lock").iter() {
                *s.closes.entry(*code).or_default() += n;
            }
        }
        s
    }

    /// Publishes `data` as `kind` (text or binary) to every subscriber of `topic` on
    /// every loop, encoded once; see [`Publisher::publish`].
    pub fn publish(
        &self,
        topic: impl AsRef<[u8]>,
        data: &[u8],
        kind: MessageType,
    ) -> Result<(), Error> {
        self.publisher().publish(topic, data, kind)
    }

    /// Subscribers of `topic` over the whole server, now.
    pub fn subscribers(&self, topic: impl AsRef<[u8]>) -> usize {
        self.inner.pubsub.subscribers(topic.as_ref())
    }

    /// A handle that publishes from any thread, without the rest of the server's handle.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            pubsub: self.inner.pubsub.clone(),
        }
    }

    /// Stops accepting, sends 1001 to every connection, waits up to `grace` for them to
    /// close, drops the rest, and returns when every loop has stopped and the backplane
    /// (if any) has stopped its IO (the Redis backplane waits up to a second for its
    /// threads).
    ///
    /// Called from a handler (on one of this server's loops), it starts the same shutdown
    /// and returns without waiting for the loops: the handler's own loop can end only
    /// after the handler returns. A thread blocked in [`ServerHandle::wait`] sees the
    /// end.
    pub fn shutdown(&self, grace: Duration) -> io::Result<()> {
        self.inner.pubsub.stop();
        stop_loops(
            &self.inner.remotes,
            crate::instant::deadline_after(Instant::now(), grace),
        );
        let result = if self.on_own_loop() {
            Ok(())
        } else {
            self.wait()
        };
        if let Some(backplane) = &self.inner.pubsub.backplane {
            backplane.stop();
        }
        result
    }

    /// Blocks until every loop has stopped (after a shutdown). Fails if one ended with an
    /// error or panicked ("an event loop panicked"): every call says so, from any thread
    /// (the one that joined the loops and the others alike). From a handler (on one of
    /// this server's loops) it fails at once with [`io::ErrorKind::Deadlock`]: the loop
    /// would wait for itself.
    pub fn wait(&self) -> io::Result<()> {
        if self.on_own_loop() {
            return Err(io::Error::new(
                io::ErrorKind::Deadlock,
                "ServerHandle::wait called from a handler: its loop would wait for itself",
            ));
        }
        // Held while joining: a concurrent `wait` or `shutdown` returns once the loops
        // have ended, with the same outcome.
        let mut loops = self.inner.threads.lock().expect("threads lock");
        let running = std::mem::take(&mut loops.running);
        if let Err(e) = join_loops(running) {
            loops.ended = Some((e.kind(), e.to_string()));
        }
        match &loops.ended {
            Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
            None => Ok(()),
        }
    }
}

impl ServerHandle {
    /// Whether the calling thread runs one of this server's loops (a handler's call).
    fn on_own_loop(&self) -> bool {
        self.inner.remotes.iter().any(Remote::is_own_loop)
    }
}

/// Asks every loop to shut down by `deadline`.
pub(crate) fn stop_loops(remotes: &[Remote<Command>], deadline: Instant) {
    for remote in remotes {
        // A loop that already stopped has nothing left to close.
        let _ = remote.send(Envelope::Shutdown { deadline });
    }
}

/// Waits for the loops' threads to end: the last error, or that one panicked.
pub(crate) fn join_loops(threads: Vec<LoopThread>) -> io::Result<()> {
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(io::Error::other("an event loop panicked")),
        }
    }
    result
}
