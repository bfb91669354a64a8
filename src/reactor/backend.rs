//! The one internal trait each IO backend implements (epoll in `epoll.rs`, io_uring in
//! `uring/`), and what a write reports. The loop core (`core.rs`) drives a backend only
//! through this trait; the backend reports IO through the core's `on_*` inputs.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::BorrowedFd;
use std::time::Duration;

use super::core::{Core, Output};
use super::{Service, Waker};

/// What a backend did with a connection's queued output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Everything queued is written (or nothing was queued).
    All,
    /// A send was handed to the kernel; it completes through [`Core::on_sent`].
    Submitted,
    /// Output is left that the socket (or the send in flight) cannot take yet; the backend
    /// reports progress later ([`Core::on_writable`] / [`Core::on_sent`]), and the session
    /// hears `drained` once everything is out.
    Blocked,
}

/// An IO backend: the part of an event loop that differs between epoll and io_uring.
///
/// The core calls `attach` / `write` / `finish_writes` / `detach` for one connection and
/// `resume_accepting` / `stop_accepting` for the listener; the backend calls the core's
/// `on_*` methods from `wait` (and from `resume_accepting`), passing itself along.
pub(crate) trait Backend: Sized + 'static {
    /// Per-connection IO state, stored in the core's slab entry.
    type Socket;
    /// What must exist before the loop's thread starts (the waker's other end).
    type Prepared: Send + 'static;

    /// Makes the parts created on the spawning thread, and the waker other threads use.
    fn prepare() -> io::Result<(Self::Prepared, Waker)>;
    /// Builds the backend on the loop's own thread.
    fn new(prepared: Self::Prepared, listener: Option<TcpListener>) -> io::Result<Self>;
    /// Waits up to `timeout` for IO and reports it to `core`.
    fn wait<S: Service>(
        &mut self,
        core: &mut Core<S, Self>,
        timeout: Option<Duration>,
    ) -> io::Result<()>;
    /// Takes a new connection's socket (non-blocking, accepted or connecting) and starts
    /// reading from it.
    fn attach(&mut self, key: usize, stream: TcpStream) -> io::Result<Self::Socket>;
    /// Writes what `out` holds, as far as the socket takes it.
    fn write<S: Service>(
        &mut self,
        key: usize,
        socket: &mut Self::Socket,
        out: &mut Output<'_, '_, S>,
    ) -> io::Result<Written>;
    /// The socket's descriptor (for questions to the kernel, such as `TCP_INFO`).
    fn fd(socket: &Self::Socket) -> BorrowedFd<'_>;
    /// Sends our FIN (everything queued is written).
    fn finish_writes(&mut self, socket: &mut Self::Socket);
    /// Stops all IO on the socket and drops the kernel's registration of it, if any; it is
    /// closed when the slab entry is freed.
    fn detach(&mut self, key: usize, socket: &mut Self::Socket);
    /// Stops reading from the socket (its output is over the limit): data stays in the
    /// kernel and TCP flow control slows the peer.
    fn pause_reading(&mut self, key: usize, socket: &mut Self::Socket);
    /// Reads from `key`'s socket again after [`Backend::pause_reading`] (at the end of the
    /// turn in which the session asked for it).
    fn resume_reading<S: Service>(&mut self, core: &mut Core<S, Self>, key: usize);
    /// Whether no kernel operation refers to the socket any more, so it may be freed.
    fn is_idle(socket: &Self::Socket) -> bool;
    /// Accepts again after a back-off ([`Core::on_accept_error`]).
    fn resume_accepting<S: Service>(&mut self, core: &mut Core<S, Self>) -> io::Result<()>;
    /// Stops accepting for good and closes the listener (shutdown).
    fn stop_accepting(&mut self) -> io::Result<()>;
    /// Called once when the loop ends, after every connection was closed: release what the
    /// kernel still holds.
    fn quiesce<S: Service>(&mut self, core: &mut Core<S, Self>);

    /// Whether the backend wants back a receive buffer a closing session still holds (lent
    /// to a reply, see [`Core::reclaim_received`]): epoll, whose one read buffer it is.
    const TAKES_BACK_INPUT: bool = false;
    /// A receive buffer a session held when its connection closed (only with
    /// [`Backend::TAKES_BACK_INPUT`]).
    fn input_returned(&mut self, buffer: Vec<u8>) {
        drop(buffer);
    }
}
