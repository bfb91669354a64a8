//! A blocking transport over `std::net`: one thread per connection.
//!
//! The simplest way to run the driver for real, and the reference the reactor backends
//! are compared against. Each connection costs a thread, a 64 KiB read buffer and a
//! poll descriptor.
//!
//! # Flow control
//!
//! A connection thread never blocks in a write. Once the handshake is done the socket is
//! non-blocking and the thread sleeps in a per-connection [`mio::Poll`] until the socket
//! is readable or writable (or a deadline passes), so two peers that both send big
//! messages while neither reads still make progress: each keeps reading while its output
//! waits. What it reads is bounded too: while more than
//! [`max_backpressure`](BlockingServer::max_backpressure) bytes wait for the peer, the
//! thread stops reading, so a peer that sends without reading is slowed down by TCP
//! (not disconnected), and a connection holds at most about `max_backpressure` plus one
//! message ([`Options::max_length`]) of output. Output that makes no progress for
//! [`Timeouts::write`] fails the connection (`on_error` with a `TimedOut` I/O error,
//! then `on_close` 1006).

pub(crate) mod client;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::protocol::driver::ReadyState;
use crate::protocol::frame::Status;
use crate::protocol::handshake::{Request, RequestParser};
use crate::protocol::options::Options;
use crate::session::timers::{Expired, Stall, TimerConfig, Timers, earliest, write_timed_out};
use crate::session::upgrade::{self, Answer, NonUpgrade, error_response};
use crate::websocket::WebSocket;

/// Outgoing bytes a [`BlockingServer`] connection may have queued before it stops reading
/// its peer (1 MiB, like the reactor server's `max_backpressure`).
pub const DEFAULT_MAX_BACKPRESSURE: usize = 1 << 20;

/// The connection's socket in its `mio::Poll`.
const STREAM: mio::Token = mio::Token(0);

/// Timeouts of the blocking runtime: the server and [`BlockingClient`](crate::client::BlockingClient)
/// (as `ClientTimeouts`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Clients only: the TCP connect (to the server or the proxy). Default 10 s.
    pub connect: Duration,
    /// The opening handshake, whole: a client's upgrade request (server), or from
    /// connected to the 101 response (client). Default 10 s.
    pub handshake: Duration,
    /// Time the peer has to answer our close frame before TCP is dropped. Default 5 s.
    pub close: Duration,
    /// With `Some(t)`: after `t` without input, send a ping; after another `t` still
    /// without input, close with 1001 "idle timeout". Default `None` (off). A peer still
    /// taking our queued output (the kernel sees it acknowledged) counts as alive, since
    /// its pong waits behind that output ([`Delivery`](crate::session::Delivery)).
    pub idle: Option<Duration>,
    /// Queued output that makes no progress for this long (the peer reads nothing) fails
    /// the connection: `on_error` with a `TimedOut` I/O error, then `on_close` 1006. Also
    /// bounds each write of the opening handshake. Default 30 s.
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            close: Duration::from_secs(5),
            idle: None,
            write: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// The deadlines' durations (the write timeout is kept apart, see [`Stall`]).
    pub(crate) fn timer_config(&self) -> TimerConfig {
        TimerConfig {
            handshake: self.handshake,
            close: self.close,
            idle: self.idle,
            backpressure_grace: None,
        }
    }
}

/// Reads with `deadline` as the socket's read timeout. `Ok(None)`: the deadline passed
/// first (it may have passed already).
pub(crate) fn read_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> io::Result<Option<usize>> {
    loop {
        let timeout = match deadline {
            None => None,
            Some(t) => match t.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Ok(None),
            },
        };
        stream.set_read_timeout(timeout)?;
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            // A timeout (or a signal): look at the deadline again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A thread-per-connection WebSocket server.
///
/// ```no_run
/// use websocket_driver::blocking::BlockingServer;
/// let server = BlockingServer::bind("127.0.0.1:9001").unwrap();
/// server.serve(|_request, ws| {
///     ws.on_message(|ws, msg| {
///         let _ = ws.send_message(&msg);
///     });
/// }).unwrap();
/// ```
#[derive(Debug)]
pub struct BlockingServer {
    listener: TcpListener,
    options: Options,
    timeouts: Timeouts,
    max_backpressure: usize,
    max_connections: usize,
}

impl BlockingServer {
    /// Listens on `addr`.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<BlockingServer> {
        Ok(BlockingServer {
            listener: TcpListener::bind(addr)?,
            options: Options::default(),
            timeouts: Timeouts::default(),
            max_backpressure: DEFAULT_MAX_BACKPRESSURE,
            max_connections: crate::reactor::default_max_connections() / DESCRIPTORS_PER_CONNECTION,
        })
    }

    /// Most connections served at once, each on its thread (the handshake included);
    /// beyond, a new one is answered 503 and closed without a thread. Default: what the
    /// current soft open-file limit allows, minus a reserve
    /// ([`default_max_connections`](crate::reactor::default_max_connections), the reactor's
    /// default), divided by the three descriptors each connection holds here (its socket,
    /// a second handle on it for the end, and its own epoll instance). A connection that
    /// finds no descriptor left for those is answered 503 before any listener runs.
    pub fn max_connections(mut self, connections: usize) -> BlockingServer {
        self.max_connections = connections;
        self
    }

    /// Outgoing bytes a connection may have queued before it stops reading its peer
    /// (default [`DEFAULT_MAX_BACKPRESSURE`]); see [flow control](crate::blocking#flow-control).
    pub fn max_backpressure(mut self, bytes: usize) -> BlockingServer {
        self.max_backpressure = bytes;
        self
    }

    /// Sets the driver options for every connection.
    pub fn options(mut self, options: Options) -> BlockingServer {
        self.options = options;
        self
    }

    /// Sets the timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> BlockingServer {
        self.timeouts = timeouts;
        self
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the listener fails. `app` runs for each valid upgrade
    /// request, before the 101 is sent, to attach handlers (like the seed's app, which
    /// calls `make-server` and `on`). If it panics, that client gets 500, none of the
    /// listeners it attached runs, and the server goes on; a listener that panics later
    /// fails its connection with close 1011, sent after everything already queued.
    pub fn serve<F>(self, app: F) -> io::Result<()>
    where
        F: Fn(&Request, &mut WebSocket) + Send + Sync + 'static,
    {
        let app = Arc::new(app);
        let options = Arc::new(self.options);
        let open = Arc::new(AtomicUsize::new(0));
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23) => {
                    // EMFILE / ENFILE: back off instead of spinning on the pending connection.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e),
            };
            if open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
                open.fetch_sub(1, Ordering::AcqRel);
                refuse_over_capacity(stream);
                continue;
            }
            let (app, options, timeouts) = (app.clone(), options.clone(), self.timeouts);
            let limit = self.max_backpressure;
            let counted = Counted(open.clone());
            let spawned = std::thread::Builder::new()
                .name("wsd-conn".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    let _counted = counted;
                    let _ = run_connection(stream, &options, timeouts, limit, &*app);
                });
            if spawned.is_err() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Descriptors one connection holds: its socket, a second handle on it and an epoll
/// instance.
const DESCRIPTORS_PER_CONNECTION: usize = 3;

/// One connection counted against [`BlockingServer::max_connections`] while its thread runs
/// (also when it panics, or when the thread could not be started).
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a connection over [`BlockingServer::max_connections`] with 503, as the reactor
/// does, without a thread: a fresh socket's send buffer takes the short response whole.
fn refuse_over_capacity(mut stream: TcpStream) {
    let response = crate::protocol::handshake::http_response(
        503,
        &[("Retry-After", "1")],
        "server is at its connection limit",
    );
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&response);
    let _ = stream.shutdown(Shutdown::Both);
}

/// Writes what the socket takes now without blocking. `Ok(true)`: some bytes went out.
fn write_ready(mut stream: impl Write, ws: &mut WebSocket) -> io::Result<bool> {
    let mut progressed = false;
    while !ws.pending_output().is_empty() {
        match stream.write(ws.pending_output()) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                ws.consume_output(n);
                progressed = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(progressed)
}

/// Runs one server connection to its end on the calling thread, with at most
/// [`DEFAULT_MAX_BACKPRESSURE`] bytes of output queued before it stops reading
/// ([`BlockingServer`] lets that be set).
pub fn serve_connection(
    stream: TcpStream,
    options: &Options,
    timeouts: Timeouts,
    app: &(dyn Fn(&Request, &mut WebSocket) + Send + Sync),
) -> io::Result<()> {
    run_connection(stream, options, timeouts, DEFAULT_MAX_BACKPRESSURE, app)
}

fn run_connection(
    mut stream: TcpStream,
    options: &Options,
    timeouts: Timeouts,
    max_backpressure: usize,
    app: &(dyn Fn(&Request, &mut WebSocket) + Send + Sync),
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(timeouts.write))?;
    let config = timeouts.timer_config();
    let mut timers = Timers::new();
    timers.handshake_started(Instant::now(), &config);
    let mut buf = vec![0u8; 64 * 1024];
    let mut parser = RequestParser::new(options.head_limits());
    let (request, len, used) = loop {
        let Some(n) = read_by(&mut stream, &mut buf, timers.poll_timeout())? else {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "opening handshake timed out",
            ));
        };
        if n == 0 {
            return Ok(());
        }
        match parser.parse(&buf[..n]) {
            Ok(Status::Complete(request, used)) => break (request, n, used),
            Ok(Status::Partial) => continue,
            Err(e) => {
                stream.write_all(&error_response(&e))?;
                return linger_close(stream);
            }
        }
    };
    let driver = match upgrade::answer(&request, options, Ok(()), NonUpgrade::BadRequest) {
        Answer::Accept(driver, ()) => driver,
        Answer::Reject(refusal) => {
            stream.write_all(&refusal.response)?;
            return linger_close(stream);
        }
    };
    let mut ws = WebSocket::new(driver);
    // The descriptors the connection holds besides its socket, before any listener runs
    // (at the open-file limit a connection whose `on_open` ran would otherwise end
    // without `on_close`): a second handle, kept for writing after a listener's panic has
    // dropped the first, and the epoll instance it waits in. Without them: 503.
    let (spare, mut poll) = match stream
        .try_clone()
        .and_then(|spare| Ok((spare, mio::Poll::new()?)))
    {
        Ok(held) => held,
        Err(e) => {
            refuse_over_capacity(stream);
            return Err(e);
        }
    };
    // A listener (or `app`) that panics ends the connection as the blocking client's I/O
    // thread does: close 1011 to the peer if it is open (500 if `app` panicked before the
    // 101), `on_close` here, once.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> io::Result<()> {
        app(&request, &mut ws);
        ws.start_connection();
        timers.opened(Instant::now(), &config);
        ws.receive(&mut buf[used..len]);

        // From here on the socket is non-blocking (blocking again for the end).
        stream.set_nonblocking(true)?;
        let mut conn = mio::net::TcpStream::from_std(stream);
        poll.registry().register(
            &mut conn,
            STREAM,
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        )?;
        let mut events = mio::Events::with_capacity(4);
        let mut stall = Stall::default();
        let mut eof = false;
        loop {
            let progressed = match write_ready(&conn, &mut ws) {
                Ok(progressed) => progressed,
                Err(_) => {
                    // The peer is gone.
                    ws.receive_eof();
                    return Ok(());
                }
            };
            let now = Instant::now();
            stall.update(progressed, !ws.pending_output().is_empty(), || now);
            if ws.is_finished() {
                break;
            }
            match ws.ready_state() {
                ReadyState::Closing => timers.close_started(now, &config),
                ReadyState::Closed => timers.closed(now, &config),
                _ => {}
            }
            // Read unless the peer has not taken what we owe it: what we read may add to it.
            if !eof && ws.buffered_amount() <= max_backpressure {
                match (&conn).read(&mut buf) {
                    Ok(0) => {
                        ws.receive_eof();
                        eof = true;
                        continue;
                    }
                    Ok(n) => {
                        timers.received(now, &config);
                        ws.receive(&mut buf[..n]);
                        continue;
                    }
                    // Drained: wait for the socket below.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        ws.receive_eof();
                        eof = true;
                        continue;
                    }
                }
            }
            // Nothing to do until the socket is ready again or a deadline passes: the input is
            // drained (or not wanted now) and the output went as far as the socket took it.
            if stall.deadline(timeouts.write).is_some_and(|d| d <= now) {
                ws.fail(
                    write_timed_out(timeouts.write).into(),
                    crate::code::ABNORMAL,
                    "write timed out",
                );
                return Err(write_timed_out(timeouts.write));
            }
            if timers.poll_timeout().is_some_and(|d| d <= now) {
                // A peer still taking queued output counts as alive (see `Delivery`).
                let ours = !ws.pending_output().is_empty();
                let fd = std::os::fd::AsFd::as_fd(&conn);
                let delivery = || crate::reactor::tcp_info::delivery_with_ours(fd, ours);
                let expired =
                    timers.handle_timeout_with_delivery(now, &config, ws.driver(), delivery);
                // Run the handlers for what the timers did (an abort's close).
                ws.receive(&mut []);
                if let Expired::Drop(_) = expired {
                    // The handshake or close took too long: drop the peer.
                    return Ok(());
                }
                continue;
            }
            let deadline = earliest(timers.poll_timeout(), stall.deadline(timeouts.write));
            let timeout = deadline.map(|d| d.saturating_duration_since(now));
            match poll.poll(&mut events, timeout) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
        }
        drop(poll);
        if ws.driver().close_received() {
            // The peer sends nothing after its Close: closing now sends a FIN, not a reset,
            // and frees this thread without waiting for the peer's FIN.
            return Ok(());
        }
        let linger = TcpStream::from(conn);
        linger.set_nonblocking(false)?;
        linger_close(linger)
    }));
    match ran {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            // The connection failed after it opened (the socket, the epoll instance): the
            // handler hears of it, `on_close` once, unless the close was reported already.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ws.receive_error(io::Error::new(e.kind(), e.to_string()))
            }));
            Err(e)
        }
        Err(_) => {
            // The socket is the spare's alone now (the panic dropped the other handle), and
            // blocking again: what is left goes out whole, within the write timeout.
            let _ = spare.set_nonblocking(false);
            if ws.ready_state() == ReadyState::Connecting {
                // `app` itself panicked before the 101: the client gets 500, as from the
                // reactor, and no WebSocket close; no listener `app` attached hears of a
                // connection that never opened.
                if (&spare).write_all(&upgrade::panicked_response()).is_ok() {
                    let _ = linger_close(spare);
                }
                return Ok(());
            }
            // A listener panicked: close 1011 behind everything already queued (`on_close`
            // once), then TCP closes as after any other close.
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ws.abort(crate::code::INTERNAL_ERROR, "a listener panicked");
                write_all_output(&spare, &mut ws)
            }));
            if matches!(written, Ok(Ok(()))) && !ws.driver().close_received() {
                let _ = linger_close(spare);
            }
            Ok(())
        }
    }
}

/// Writes all pending output on a blocking socket: [`write_ready`], which there stops
/// short only when a write times out.
fn write_all_output(stream: impl Write, ws: &mut WebSocket) -> io::Result<()> {
    write_ready(stream, ws)?;
    if ws.pending_output().is_empty() {
        Ok(())
    } else {
        Err(io::ErrorKind::TimedOut.into())
    }
}

/// The server closes TCP first (RFC 6455 §7.1.1), but reads what the peer still sends
/// for a moment (2 s in all, however it trickles in), so unread data does not turn the
/// close into a reset that could destroy the close frame in flight.
fn linger_close(mut stream: TcpStream) -> io::Result<()> {
    stream.shutdown(Shutdown::Write)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut sink = [0u8; 4096];
    while let Ok(Some(n)) = read_by(&mut stream, &mut sink, Some(deadline)) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}
