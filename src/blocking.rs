//! A blocking transport over `std::net`: one thread per connection.
//!
//! The simplest way to run the driver for real, and the reference the reactor backends
//! are compared against. Each connection costs a thread and a 64 KiB read buffer.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::driver::{Driver, ReadyState};
use crate::protocol::error::Error;
use crate::protocol::frame::Status;
use crate::protocol::handshake::{Request, RequestParser, error_response, http_response};
use crate::protocol::options::Options;
use crate::websocket::WebSocket;

/// Timeouts of the blocking server.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Time a client has to send its whole upgrade request. Default 10 s.
    pub handshake: Duration,
    /// Time the peer has to answer our close frame before TCP is dropped. Default 5 s.
    pub close: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            close: Duration::from_secs(5),
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

fn flush(stream: &mut TcpStream, ws: &mut WebSocket) -> io::Result<()> {
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
    stream.set_read_timeout(Some(timeouts.handshake))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut parser = RequestParser::new(options.head_limits());
    let (request, len, used) = loop {
        let n = stream.read(&mut buf)?;
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
    let driver = match Driver::make_server(&request, options) {
        Ok(driver) => driver,
        Err(Error::Handshake(e)) => {
            stream.write_all(&error_response(&e))?;
            return linger_close(stream);
        }
        Err(e) => {
            stream.write_all(&http_response(500, &[], &e.to_string()))?;
            return linger_close(stream);
        }
    };
    let mut ws = WebSocket::new(driver);
    app(&request, &mut ws);
    stream.set_read_timeout(None)?;
    ws.start_connection();
    ws.receive(&mut buf[used..len]);
    flush(&mut stream, &mut ws)?;
    while !ws.is_finished() {
        if ws.ready_state() == ReadyState::Closing {
            stream.set_read_timeout(Some(timeouts.close))?;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => {
                ws.receive_eof();
                break;
            }
            Ok(n) => ws.receive(&mut buf[..n]),
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
