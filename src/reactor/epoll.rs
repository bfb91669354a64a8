//! The epoll backend (through mio): readiness, edge-triggered sockets, reads into one
//! per-loop buffer, writes straight from the session's output. A large message sent back
//! while it is delivered goes out from that buffer (lent to the reply, written at once,
//! then taken back), not copied into the output. The rest of a large frame
//! (at least a read buffer's worth still to come) is read straight into its message's
//! buffer instead, lent by the session (`Service::lend_payload_buffer`): the one `unsafe`
//! here sets that buffer's length after `recv` filled its spare capacity.
//!
//! While it receives such a rest without an idle keepalive, a connection's receive
//! low-water mark is raised (see [`super::low_water`]), so it is woken once per 128 KiB
//! instead of once per loopback segment.
//!
//! Socket reads and writes go through rustix rather than std: on Linux rustix makes the
//! syscall itself, where std goes through libc's `recv`/`send` wrappers, whose
//! cancellation-point bookkeeping was about a quarter of this backend's user time per
//! 20-byte echo. Writes pass `MSG_NOSIGNAL`, vectored ones too (`sendmsg`, where std's
//! `write_vectored` is a `writev` that raises `SIGPIPE` on a reset connection in a process
//! that does not ignore it).

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::core::{Backend, Core, Output, Written};
use super::low_water::{low_water_for, set_low_water};
use super::{Service, Waker};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Reads per connection per turn: a peer that keeps its socket full gets this many, then
/// the loop serves the others and comes back next turn.
const READS_PER_TURN: usize = 4;
/// Connections accepted per turn: a burst waiting in the backlog (up to thousands) is taken
/// over several turns, so the connections already open are served in between.
const ACCEPTS_PER_TURN: usize = 64;
/// Slices per vectored write: `IOV_MAX`, so a subscriber's queue of small published
/// frames (a broadcast round of 500 frames of 22 bytes) leaves in one syscall. With 64,
/// broadcast 500 took 8 writes a round per subscriber and 0.128 µs of server CPU per
/// delivery; with 1024, 0.061 µs.
const WRITE_PARTS: usize = 1024;
/// Slices asked for first: an echo's output is one or two, and filling many empty slices
/// on every write cost more than the rest of the write's user-space work.
const FEW_PARTS: usize = 4;

/// The smallest reply sent from the read buffer it arrived in (see
/// `Service::read_lendable`) rather than copied into the output: the buffer comes back
/// right after the write, so any size could, but below a few KiB the copy costs less than
/// the hand-over.
const IN_PLACE_MIN: usize = 4096;

pub(crate) struct Epoll {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    /// Where every connection of this loop reads into; parsed in place.
    read_buf: Vec<u8>,
    /// Connections that used their read budget with data left: read on next turn (their
    /// edge has been consumed, so no event would come), with whether to read on to the
    /// end of the stream (a FIN or error was pending: it raises no new edge either).
    unfinished: Vec<(usize, bool)>,
    /// Last turn's `unfinished`, being read this turn (kept for its capacity).
    unfinished_due: Vec<(usize, bool)>,
    /// The accept budget ran out with connections left in the backlog: accept on next turn
    /// (edge-triggered, so no new event comes for them).
    accept_pending: bool,
    /// Connections whose receive low-water mark is raised (see [`super::low_water`]).
    raised: HashSet<usize>,
}

impl Backend for Epoll {
    type Socket = TcpStream;
    type Prepared = Poll;

    fn prepare() -> io::Result<(Poll, Waker)> {
        let poll = Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        Ok((poll, Waker::Poll(waker)))
    }

    fn new(poll: Poll, listener: Option<StdListener>) -> io::Result<Self> {
        let listener = match listener {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                let mut listener = TcpListener::from_std(listener);
                poll.registry()
                    .register(&mut listener, LISTENER, Interest::READABLE)?;
                Some(listener)
            }
            None => None,
        };
        Ok(Epoll {
            poll,
            events: Events::with_capacity(super::INPUTS_PER_TURN),
            listener,
            read_buf: Vec::new(),
            unfinished: Vec::new(),
            unfinished_due: Vec::new(),
            accept_pending: false,
            raised: HashSet::new(),
        })
    }

    fn wait<S: Service>(
        &mut self,
        core: &mut Core<S, Self>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        // Unfinished reads and accepts are due now: look for events without sleeping.
        let mut accept = std::mem::take(&mut self.accept_pending);
        let timeout = match self.unfinished.is_empty() && !accept {
            true => timeout,
            false => Some(Duration::ZERO),
        };
        if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            };
        }
        // Lent out while the core is called with `self`.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for event in events.iter() {
            match event.token() {
                // Accepted after this turn's reads: the open connections go first.
                LISTENER => accept = true,
                WAKER => core.on_wake(self),
                Token(key) => {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        // Edge-triggered: a short read drained the socket, and any later
                        // data raises a new edge, so there is no need for the extra read
                        // that returns EAGAIN, unless the peer's FIN or an error is pending
                        // (that raises no new edge: read on until EOF).
                        let drain = event.is_read_closed() || event.is_error();
                        self.read(core, key, drain);
                    }
                    if event.is_writable() {
                        core.on_writable(key);
                    }
                }
            }
        }
        self.events = events;
        // A read may leave its connection unfinished again; those go in the emptied list
        // while this turn's are read from the spare one. Swapped, never reallocated.
        let mut due = std::mem::take(&mut self.unfinished_due);
        std::mem::swap(&mut self.unfinished, &mut due);
        for (key, drain) in due.drain(..) {
            self.read(core, key, drain);
        }
        self.unfinished_due = due;
        if accept {
            self.accept(core);
        }
        Ok(())
    }

    fn attach(&mut self, key: usize, stream: StdStream) -> io::Result<TcpStream> {
        let mut stream = TcpStream::from_std(stream);
        self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(stream)
    }

    fn write<S: Service>(
        &mut self,
        _key: usize,
        stream: &mut TcpStream,
        out: &mut Output<'_, '_, S>,
    ) -> io::Result<Written> {
        loop {
            match write_parts(stream, out) {
                Ok(None) => return Ok(Written::All),
                Ok(Some(n)) => out.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Written::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn fd(stream: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(stream)
    }

    fn finish_writes(&mut self, stream: &mut TcpStream) {
        let _ = stream.shutdown(Shutdown::Write);
    }

    fn detach(&mut self, key: usize, _stream: &mut TcpStream) {
        self.raised.remove(&key);
        // Nothing: an epoll socket is never busy (`is_idle`), so the core drops it right
        // after this, and closing the only descriptor of a socket takes it out of the
        // epoll set (kqueue: its filters) with no `epoll_ctl` of its own. Events already
        // harvested this turn for the key are dropped by the core (the connection is
        // gone), and the key is not reused before the turn's accepts and connects.
    }

    fn pause_reading(&mut self, _key: usize, _: &mut TcpStream) {
        // Nothing to do: readiness is only acted on for connections that read.
    }

    fn resume_reading<S: Service>(&mut self, core: &mut Core<S, Self>, key: usize) {
        // Edge-triggered: what arrived while paused raised its edge already, and so did a
        // FIN, which no later edge repeats: read on to the end (one receive more, that
        // finds nothing, per resume).
        self.read(core, key, true);
    }

    fn is_idle(_: &TcpStream) -> bool {
        true
    }

    fn resume_accepting<S: Service>(&mut self, core: &mut Core<S, Self>) -> io::Result<()> {
        // Edge-triggered: connections that waited in the backlog raise no new event.
        self.accept(core);
        Ok(())
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        if let Some(mut listener) = self.listener.take() {
            self.poll.registry().deregister(&mut listener)?;
        }
        Ok(())
    }

    const TAKES_BACK_INPUT: bool = true;

    fn input_returned(&mut self, buffer: Vec<u8>) {
        // Only while a read has the loop's buffer out (it takes this one instead).
        if self.read_buf.is_empty() {
            self.read_buf = buffer;
        }
    }

    fn quiesce<S: Service>(&mut self, _core: &mut Core<S, Self>) {}
}

/// One write (vectored when the output is in several parts) of what `out` has queued.
/// Returns the bytes written, `None` when nothing is queued.
fn write_parts<S: Service>(
    stream: &mut TcpStream,
    out: &Output<'_, '_, S>,
) -> io::Result<Option<usize>> {
    let mut few = [IoSlice::new(&[]); FEW_PARTS];
    let written = match out.parts(&mut few) {
        0 => return Ok(None),
        n if n < FEW_PARTS => send(stream, &few[..n]),
        _ => {
            // Perhaps more than fit: ask again with room for many.
            let mut many = [IoSlice::new(&[]); WRITE_PARTS];
            let n = out.parts(&mut many);
            send(stream, &many[..n])
        }
    };
    written.map(Some)
}

/// `recv` into `buf`: the bytes read, 0 at EOF.
fn recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    rustix::net::recv(stream, buf, rustix::net::RecvFlags::empty())
        .map(|(n, _)| n)
        .map_err(io::Error::from)
}

/// `recv` appended to `buf`: at most `room` bytes into its spare capacity (which must
/// have that many); the bytes read, 0 at EOF.
fn recv_appending(stream: &TcpStream, buf: &mut Vec<u8>, room: usize) -> io::Result<usize> {
    let spare = &mut buf.spare_capacity_mut()[..room];
    let ((filled, _), _) = rustix::net::recv(stream, spare, rustix::net::RecvFlags::empty())?;
    let n = filled.len();
    // SAFETY: `recv` initialized the first `n` bytes of the spare capacity (`filled`), so
    // the vector's first `len + n` elements are initialized; `n <= room <= capacity - len`.
    #[allow(unsafe_code)]
    unsafe {
        buf.set_len(buf.len() + n)
    };
    Ok(n)
}

/// Sends `parts` (at least one) in one syscall, without `SIGPIPE`.
fn send(stream: &TcpStream, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    let sent = match parts {
        [one] => rustix::net::send(stream, one, SendFlags::NOSIGNAL),
        _ => rustix::net::sendmsg(
            stream,
            parts,
            &mut SendAncillaryBuffer::default(),
            SendFlags::NOSIGNAL,
        ),
    };
    sent.map_err(io::Error::from)
}

impl Epoll {
    /// Raises or lowers `key`'s receive low-water mark to `mark`, with a syscall only when
    /// that changes it.
    fn mark_low_water<S: Service>(&mut self, core: &mut Core<S, Self>, key: usize, mark: usize) {
        if (mark > 1) == self.raised.contains(&key) {
            return;
        }
        let Some(stream) = core.any_socket(key) else {
            return;
        };
        match set_low_water(stream, mark) {
            Ok(()) if mark > 1 => self.raised.insert(key),
            Ok(()) => self.raised.remove(&key),
            // Not raised: the wake-ups stay as they were. Not lowered: tried again at the
            // next receive.
            Err(_) => false,
        };
    }

    /// Accepts up to `ACCEPTS_PER_TURN` connections; with more waiting, the next turn
    /// goes on (`accept_pending`).
    fn accept<S: Service>(&mut self, core: &mut Core<S, Self>) {
        self.accept_pending = false;
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = &self.listener else {
                return;
            };
            if core.accept_paused() {
                return;
            }
            match listener.accept() {
                Ok((stream, peer)) => core.on_accept(self, stream.into(), peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(_) => return core.on_accept_error(),
            }
        }
        self.accept_pending = self.listener.is_some();
    }

    fn read<S: Service>(&mut self, core: &mut Core<S, Self>, key: usize, drain: bool) {
        let mut buf = std::mem::take(&mut self.read_buf);
        if buf.is_empty() {
            buf = vec![0; core.read_buffer_size()];
        }
        let mut budget = READS_PER_TURN;
        while core.reading_socket(key).is_some() {
            if budget == 0 {
                self.unfinished.push((key, drain));
                break;
            }
            budget -= 1;
            // One receive: the rest of a large frame straight into its message's buffer
            // when at least a read buffer's worth of it is still to come, else into the
            // read buffer. `Ok((n, reading, room))`: `n` bytes, whether the connection still
            // reads, and how many would have fit (fewer means the socket is drained).
            let received = match core.lend_payload(key, buf.len()) {
                Some(loan) => {
                    let (mut payload, room) = (loan.buffer, loan.room);
                    let Some(stream) = core.reading_socket(key) else {
                        core.on_payload(self, key, payload, 0);
                        break;
                    };
                    let result = recv_appending(stream, &mut payload, room);
                    // The buffer goes back whatever the receive did.
                    let n = *result.as_ref().unwrap_or(&0);
                    let reading = core.on_payload(self, key, payload, n);
                    // Right after the driver took every byte read, so what it says the
                    // frame still owes is what the socket still owes.
                    if loan.whole {
                        let mark = low_water_for(core.payload_to_come(key));
                        self.mark_low_water(core, key, mark);
                    }
                    result.map(|n| (n, reading, room))
                }
                None => {
                    if !self.raised.is_empty() && self.raised.contains(&key) {
                        // Not receiving into the message's buffer (the frame is complete,
                        // or input held for a paused connection is not in the driver
                        // yet): any byte counts again.
                        self.mark_low_water(core, key, 1);
                    }
                    let Some(stream) = core.reading_socket(key) else {
                        break;
                    };
                    let room = buf.len();
                    match recv(stream, &mut buf) {
                        Ok(n) if n > 0 => {
                            // A socket already full would take part of a reply at most, and
                            // the rest would be copied out of the buffer: copied into the
                            // output at once instead.
                            let min_reply = match core.write_blocked(key) {
                                true => usize::MAX,
                                false => IN_PLACE_MIN,
                            };
                            let reading = core.on_received(self, key, &mut buf, n, min_reply);
                            if buf.is_empty() {
                                // A reply claimed the buffer: written now, and the buffer
                                // back (the unwritten rest of the reply copied out), or, if
                                // that write ended the connection, back from its close.
                                core.flush_now(self, key);
                                buf = match core.reclaim_received(key) {
                                    Some(buffer) => buffer,
                                    None if !self.read_buf.is_empty() => {
                                        std::mem::take(&mut self.read_buf)
                                    }
                                    None => vec![0; core.read_buffer_size()],
                                };
                            }
                            Ok((n, reading, room))
                        }
                        other => other.map(|n| (n, true, room)),
                    }
                }
            };
            match received {
                Ok((0, _, _)) => {
                    core.on_eof(self, key);
                    break;
                }
                Ok((n, reading, room)) => {
                    if !reading || (n < room && !drain) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    core.on_read_error(self, key, error);
                    break;
                }
            }
        }
        self.read_buf = buf;
        core.flush_now(self, key);
    }
}
