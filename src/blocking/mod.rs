//! A blocking transport over `std::net`: one thread per connection.
//!
//! The simplest way to run the driver for real, and the reference the reactor backends
//! are compared against. Each connection costs a thread and a 64 KiB read buffer.

pub(crate) mod client;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::driver::ReadyState;
use crate::protocol::frame::Status;
use crate::protocol::handshake::{Request, RequestParser};
use crate::protocol::options::Options;
use crate::session::timers::{Expired, TimerConfig, Timers};
use crate::session::upgrade::{self, Answer, NonUpgrade, error_response};
use crate::websocket::WebSocket;

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
    /// without input, close with 1001 "idle timeout". Default `None` (off).
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            close: Duration::from_secs(5),
            idle: None,
        }
    }
}

impl Timeouts {
    /// The deadlines' durations (writes block, so there is no backpressure grace).
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
}

impl BlockingServer {
    /// Listens on `addr`.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<BlockingServer> {
        Ok(BlockingServer {
            listener: TcpListener::bind(addr)?,
            options: Options::default(),
            timeouts: Timeouts::default(),
        })
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
    /// calls `make-server` and `on`).
    pub fn serve<F>(self, app: F) -> io::Result<()>
    where
        F: Fn(&Request, &mut WebSocket) + Send + Sync + 'static,
    {
        let app = Arc::new(app);
        let options = Arc::new(self.options);
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
            let (app, options, timeouts) = (app.clone(), options.clone(), self.timeouts);
            let spawned = std::thread::Builder::new()
                .name("wsd-conn".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    let _ = serve_connection(stream, &options, timeouts, &*app);
                });
            if spawned.is_err() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Writes everything `ws` has queued (running its write callbacks as bytes go out).
pub(crate) fn flush(stream: &mut TcpStream, ws: &mut WebSocket) -> io::Result<()> {
    while !ws.pending_output().is_empty() {
        let n = stream.write(ws.pending_output())?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        ws.consume_output(n);
    }
    Ok(())
}

/// Runs one server connection to its end on the calling thread.
pub fn serve_connection(
    mut stream: TcpStream,
    options: &Options,
    timeouts: Timeouts,
    app: &(dyn Fn(&Request, &mut WebSocket) + Send + Sync),
) -> io::Result<()> {
    stream.set_nodelay(true)?;
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
    app(&request, &mut ws);
    ws.start_connection();
    timers.opened(Instant::now(), &config);
    ws.receive(&mut buf[used..len]);
    flush(&mut stream, &mut ws)?;
    while !ws.is_finished() {
        match ws.ready_state() {
            ReadyState::Closing => timers.close_started(Instant::now(), &config),
            ReadyState::Closed => timers.closed(),
            _ => {}
        }
        match read_by(&mut stream, &mut buf, timers.poll_timeout()) {
            Ok(Some(0)) | Err(_) => {
                ws.receive_eof();
                break;
            }
            Ok(Some(n)) => {
                timers.received(Instant::now(), &config);
                ws.receive(&mut buf[..n]);
            }
            Ok(None) => {
                let expired = timers.handle_timeout(Instant::now(), &config, ws.driver());
                // Run the handlers for what the timers did (an abort's close).
                ws.receive(&mut []);
                if let Expired::Drop(_) = expired {
                    // The handshake or close took too long: drop the peer.
                    return Ok(());
                }
            }
        }
        if flush(&mut stream, &mut ws).is_err() {
            ws.receive_eof();
            return Ok(());
        }
    }
    flush(&mut stream, &mut ws)?;
    linger_close(stream)
}

/// The server closes TCP first (RFC 6455 §7.1.1), but reads what the peer still sends
/// for a moment, so unread data does not turn the close into a reset that could destroy
/// the close frame in flight.
fn linger_close(mut stream: TcpStream) -> io::Result<()> {
    stream.shutdown(Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut sink = [0u8; 4096];
    while let Ok(n) = stream.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}
