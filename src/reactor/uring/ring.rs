//! The io_uring ring with a safe API: an op table whose entries own everything the kernel
//! may touch, and the provided-buffer ring. Most of the crate's `unsafe` is here (the rest:
//! epoll's receive into a vector's spare capacity, `SO_RCVLOWAT`, and the unmask kernel's
//! dispatch); every block says why it is sound.
//!
//! Ownership rules (the tokio-uring / monoio model): a submitted operation's buffer is
//! owned by value by its [`Op`] in the table (send buffers, the wake buffer) or by the
//! [`BufRing`] (receive buffers) until its final completion is reaped; ops are only
//! removed from the table through [`Ring::finish`] after that completion. At exit the
//! backend cancels everything, reaps, and unregisters the buffer ring before freeing it.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::net::TcpStream;
use std::os::fd::{FromRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use slab::Slab;

use crate::reactor::Outgoing;

/// The buffer group multishot receives pick from.
const BUF_GROUP: u16 = 0;
/// `IORING_RECVSEND_POLL_FIRST` (Linux 5.19), in a receive's `ioprio`.
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// Slots in the ring's table of registered sockets (see [`Ring::register_socket`]): a
/// connection whose key is below it is named by its slot in receives and sends, which
/// spares the kernel a descriptor lookup and a reference count per operation (`fget` was
/// 2 % of a 16 KiB echo's samples). The kernel keeps a pointer per slot (32 KiB per loop)
/// and a small node per socket in one. Connections past it use their descriptor.
const SOCKET_SLOTS: u32 = 4096;

/// How an operation names its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketRef {
    /// A slot of the registered-socket table.
    Slot(u32),
    /// The descriptor.
    Fd(RawFd),
}

/// Builds `$body` with `$t` bound to the io_uring target for `$socket` (`Fixed` or `Fd`,
/// two types: so the body is expanded once for each).
macro_rules! on_socket {
    ($socket:expr, |$t:ident| $body:expr) => {
        match $socket {
            SocketRef::Slot(slot) => {
                let $t = Fixed(slot);
                $body
            }
            SocketRef::Fd(fd) => {
                let $t = Fd(fd);
                $body
            }
        }
    };
}

/// The result of a waiting `io_uring_enter`: timing out, being interrupted, or finding
/// the completion queue busy all just end the wait.
fn waited(entered: io::Result<usize>) -> io::Result<()> {
    match entered {
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
            ) =>
        {
            Err(e)
        }
        _ => Ok(()),
    }
}

/// Builds a ring with the fastest setup the kernel accepts: SINGLE_ISSUER + DEFER_TASKRUN,
/// else COOP_TASKRUN, else plain.
fn build(entries: u32) -> io::Result<(IoUring, &'static str)> {
    type Configure = fn(&mut io_uring::Builder);
    let attempts: [(&'static str, Configure); 3] = [
        ("single_issuer+defer_taskrun", |b| {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }),
        ("coop_taskrun", |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }),
        ("plain", |_| {}),
    ];
    let mut last = None;
    for (name, configure) in attempts {
        let mut builder = IoUring::builder();
        configure(&mut builder);
        match builder.setup_cqsize(entries * 4).build(entries) {
            Ok(ring) => return Ok((ring, name)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no ring")))
}

/// Checks that the kernel has every operation and feature the backend uses.
/// Returns the ring setup flags that will be used.
pub(crate) fn probe() -> Result<&'static str, String> {
    let (ring, setup) = build(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("probing opcodes failed: {e}"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Read::CODE, "read"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "the kernel lacks IORING_OP_{}",
                name.to_uppercase()
            ));
        }
    }
    let bufs = BufRing::new(&ring, 1, 64, 7)
        .map_err(|e| format!("provided-buffer rings unsupported: {e}"))?;
    bufs.unregister(&ring);
    Ok(setup)
}

/// An operation the kernel holds, with everything it points into.
pub(crate) enum Op {
    /// Multishot accept on the listener.
    Accept,
    /// A read of the wake pipe into its own buffer.
    Wake(Box<[u8; 64]>),
    /// A send of what the batch holds after its first `sent` bytes, for its connection
    /// (boxed: the op table's entries stay small, one receive per connection lives there).
    Send(Box<SendBatch>),
    /// Cancels another op.
    Cancel,
}

/// A send's bytes with the `sendmsg` header and iovecs that point into them: boxed, so
/// the header's address stays put while the kernel reads it, and pooled by the backend.
pub(crate) struct SendBatch {
    pub out: Outgoing,
    /// The connection it is for.
    pub key: usize,
    /// Bytes of `out` the kernel has taken.
    pub sent: usize,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            out: Outgoing::default(),
            key: 0,
            sent: 0,
            iov: Vec::new(),
            // SAFETY: `msghdr` is a plain C struct for which all-zero is valid (null
            // pointers, zero lengths).
            msg: unsafe { std::mem::zeroed() },
        }
    }
}

impl SendBatch {
    /// Drops the iovecs (they point into the batch) and empties the batch.
    pub fn clear(&mut self) {
        self.iov.clear();
        self.out.clear();
        self.sent = 0;
    }
}

/// Most iovecs in one `sendmsg` (`IOV_MAX`); a longer batch is sent in parts.
const MAX_IOVECS: usize = 1024;

/// `user_data` of a connection's multishot receive: this bit and the connection's key. A
/// receive owns no buffer of its own (it picks from the registered ring), so it needs no
/// entry in the op table: an idle connection costs the table nothing.
const RECV: u64 = 1 << 63;

/// With [`RECV`] and the key: a receive into a message's own buffer (see
/// [`Ring::recv_payload`]), single-shot.
const PAYLOAD: u64 = 1 << 61;

/// `user_data` of an update of the registered-socket table: this bit and the slot. Only a
/// failed one completes (see [`Ring::update_slot`]).
const SLOT_UPDATE: u64 = 1 << 62;

/// One reaped completion.
pub(crate) struct Completion {
    /// The op table entry (`usize::MAX` for a receive: see `recv`).
    pub op: usize,
    /// The connection whose multishot receive completed.
    pub recv: Option<usize>,
    pub result: i32,
    /// Whether the (multishot) op stays armed.
    pub more: bool,
    /// The receive buffer a successful `Recv` filled.
    pub buffer: Option<u16>,
    /// The connection a successful `Accept` produced.
    pub accepted: Option<TcpStream>,
    /// The message buffer a payload receive (see [`Ring::recv_payload`]) filled, back
    /// with the bytes received appended.
    pub payload: Option<Vec<u8>>,
}

/// The ring and its op table.
pub(crate) struct Ring {
    ring: IoUring,
    ops: Slab<Op>,
    /// Multishot receives armed and not yet finished (they are not in `ops`).
    receives: usize,
    /// Slots in the registered-socket table (0: the kernel refused one).
    slots: u32,
    /// The descriptor each slot's last queued fill reads (see [`Ring::update_slot`]).
    slot_fds: Box<[RawFd]>,
    /// The message buffers payload receives fill, by connection: each is the kernel's
    /// from the submission until its completion is reaped.
    payloads: std::collections::HashMap<usize, Vec<u8>>,
}

impl Ring {
    pub fn new(entries: u32) -> io::Result<Ring> {
        let (ring, _) = build(entries)?;
        // Sparse: every slot starts empty. Without it (before Linux 5.19) every socket is
        // named by its descriptor.
        let slots = match ring.submitter().register_files_sparse(SOCKET_SLOTS) {
            Ok(()) => SOCKET_SLOTS,
            Err(e) => {
                log::debug!("io_uring: no registered-socket table ({e}); using descriptors");
                0
            }
        };
        Ok(Ring {
            ring,
            ops: Slab::with_capacity(1024),
            receives: 0,
            slots,
            slot_fds: vec![-1; slots as usize].into_boxed_slice(),
            payloads: std::collections::HashMap::new(),
        })
    }

    /// Puts connection `key`'s socket in slot `key` of the registered-socket table, and
    /// returns how operations name it from now on: by its slot, or (past the table, or if
    /// the update cannot be queued) by its descriptor. The update goes in the submission
    /// queue, ahead of the operations that will name the slot, and the kernel runs queued
    /// entries in order (an update runs inline, at submission): so no syscall of its own.
    /// The descriptor must stay open until the next submission (a connection's does: its
    /// receive is queued behind the update). A socket in a slot must be released with
    /// [`Ring::release_socket`] when its connection ends: the table holds a reference.
    pub fn register_socket(&mut self, key: usize, fd: RawFd) -> SocketRef {
        match u32::try_from(key) {
            Ok(slot) if slot < self.slots => match self.update_slot(slot, Some(fd)) {
                Ok(()) => SocketRef::Slot(slot),
                Err(e) => {
                    log::debug!(
                        "io_uring: socket slot {slot} not filled ({e}); using its descriptor"
                    );
                    SocketRef::Fd(fd)
                }
            },
            _ => SocketRef::Fd(fd),
        }
    }

    /// Empties `socket`'s slot (nothing for a descriptor) at the next submission, so the
    /// table no longer keeps the socket open; operations already under way keep their own
    /// reference until they end. A later [`Ring::register_socket`] of the same slot is
    /// queued behind it.
    pub fn release_socket(&mut self, socket: SocketRef) {
        if let SocketRef::Slot(slot) = socket
            && let Err(e) = self.update_slot(slot, None)
        {
            // Only when the queue cannot be submitted: the socket then stays open until
            // the slot is reused or the ring is dropped.
            log::warn!("io_uring: releasing socket slot {slot} failed: {e}");
        }
    }

    /// Queues an update of one slot of the registered-socket table: `fd`, or empty. It
    /// posts a completion only if it fails (`CQE_SKIP_SUCCESS`, Linux 5.17; the sparse table
    /// itself needs 5.19, so no kernel with slots lacks it): a completion would end the
    /// loop's next wait at once, one extra turn per connection opened and closed. So it
    /// has no entry in the op table; the descriptor the kernel reads sits in the slot's
    /// cell of `slot_fds`, which only the next registration of the same slot rewrites, and
    /// that one is queued behind this update and wins in any case.
    fn update_slot(&mut self, slot: u32, fd: Option<RawFd>) -> io::Result<()> {
        /// What an emptied slot is set to.
        static EMPTY: RawFd = -1;
        let fds: *const RawFd = match fd {
            Some(fd) => {
                let cell = &mut self.slot_fds[slot as usize];
                *cell = fd;
                cell
            }
            None => &EMPTY,
        };
        let entry = opcode::FilesUpdate::new(fds, 1)
            .offset(slot as i32) // slot < SOCKET_SLOTS
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(SLOT_UPDATE | u64::from(slot));
        self.push(entry)
    }

    /// Queues an SQE for op `op`; when the submission queue is full, hands it to the
    /// kernel first.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points to is owned by its `ops` entry (send
            // batches: their own bytes, the shared frames they hold references to, and the
            // boxed `msghdr` and iovecs of a `sendmsg`, rebuilt only by `resend` between a
            // completion and the next submission; wake buffers), by a registered
            // `BufRing`, or by `payloads` (a payload receive's message buffer, removed
            // only when its completion is reaped, and leaked by `quiesce` if it is not),
            // and outlives the operation (a slot update reads a cell of the ring's own
            // `slot_fds`, or a static, when it is submitted): ops are only removed by
            // `finish`, after their final completion was reaped; a `Ring` or `BufRing`
            // dropped with operations in flight leaks what they own. (Memory only: a
            // descriptor an entry names must stay open until the entry is submitted, which
            // the backend keeps: see `register_socket` and `Uring::stop_accepting`.)
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn start(&mut self, op: Op, build: impl FnOnce(&mut Op) -> squeue::Entry) -> io::Result<usize> {
        let id = self.ops.insert(op);
        let entry = build(&mut self.ops[id]).user_data(id as u64);
        if let Err(e) = self.push(entry) {
            self.ops.remove(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Arms a multishot accept on `listener`.
    pub fn accept(&mut self, listener: RawFd) -> io::Result<usize> {
        self.start(Op::Accept, |_| {
            opcode::AcceptMulti::new(Fd(listener))
                .flags(libc::SOCK_CLOEXEC)
                .build()
        })
    }

    /// Posts a read of the wake pipe.
    pub fn read_wake(&mut self, pipe: RawFd) -> io::Result<usize> {
        self.start(Op::Wake(Box::new([0; 64])), |op| {
            let Op::Wake(buf) = op else { unreachable!() };
            opcode::Read::new(Fd(pipe), buf.as_mut_ptr(), 64).build()
        })
    }

    /// Arms a multishot receive for connection `key` into the buffer ring.
    pub fn recv(&mut self, socket: SocketRef, key: usize) -> io::Result<()> {
        self.push(recv_entry(socket, key, false))?;
        self.receives += 1;
        Ok(())
    }

    /// Like [`Ring::recv`], but the receive starts with a poll instead of an attempt at
    /// submission (`IORING_RECVSEND_POLL_FIRST`): for a socket that already holds data, as
    /// one whose receive ran out of buffers does. A readable socket's receive then runs as
    /// deferred task work, at most ~20 per `io_uring_enter`, like any other. Attempted at
    /// submission, a turn's worth of such re-armed receives could take every buffer before
    /// the receives they were meant to follow ran, and end with `ENOBUFS` again, turn after
    /// turn: with 512 KiB of buffers and 500 sockets holding 16 KiB each, 9 submissions
    /// per echoed message where 1 (the send) is enough.
    pub fn recv_polled(&mut self, socket: SocketRef, key: usize) -> io::Result<()> {
        self.push(recv_entry(socket, key, true))?;
        self.receives += 1;
        Ok(())
    }

    /// One receive into the buffer ring, polled first (a single completion, with the
    /// multishot receive's `user_data`): what follows a payload receive, so that the next
    /// frame's header is seen, and a large frame's rest goes into its message's buffer,
    /// before a multishot receive would have taken the whole frame into provided buffers.
    pub fn recv_once(&mut self, socket: SocketRef, key: usize) -> io::Result<()> {
        let entry = on_socket!(socket, |target| opcode::Recv::new(
            target,
            std::ptr::null_mut(),
            0
        )
        .buf_group(BUF_GROUP)
        .ioprio(IORING_RECVSEND_POLL_FIRST)
        .build())
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(RECV | key as u64);
        self.push(entry)?;
        self.receives += 1;
        Ok(())
    }

    /// Receives up to `room` bytes of connection `key` into the spare capacity of
    /// `buffer` (a message's buffer, the rest of a large frame going straight into it).
    /// With `whole`, one completion once all have arrived (`MSG_WAITALL`), or with what did
    /// at EOF, an error or a cancel; without, a completion with whatever the socket held.
    /// The buffer is the operation's until then; the completion hands it back
    /// ([`Completion::payload`]) with the bytes received appended.
    pub fn recv_payload(
        &mut self,
        socket: SocketRef,
        key: usize,
        mut buffer: Vec<u8>,
        room: usize,
        whole: bool,
    ) -> io::Result<()> {
        let room = room
            .min(buffer.capacity() - buffer.len())
            .min(u32::MAX as usize) as u32;
        let at = buffer.spare_capacity_mut().as_mut_ptr().cast::<u8>();
        let flags = if whole { libc::MSG_WAITALL } else { 0 };
        let entry = on_socket!(socket, |target| opcode::Recv::new(target, at, room)
            .flags(flags)
            .build())
        .user_data(RECV | PAYLOAD | key as u64);
        // Moving the `Vec` into the map does not move its heap memory, where `at` points.
        let earlier = self.payloads.insert(key, buffer);
        assert!(earlier.is_none(), "one payload receive per connection");
        if let Err(e) = self.push(entry) {
            self.payloads.remove(&key);
            return Err(e);
        }
        self.receives += 1;
        Ok(())
    }

    /// Cancels connection `key`'s receive: its multishot receive, or with `payload` its
    /// payload receive (the last completion still comes).
    pub fn cancel_recv(&mut self, key: usize, payload: bool) -> io::Result<()> {
        let kind = if payload { RECV | PAYLOAD } else { RECV };
        self.cancel_user_data(kind | key as u64)
    }

    /// Sends `batch` (owned by the op until its completion) for connection `key`.
    pub fn send(
        &mut self,
        socket: SocketRef,
        key: usize,
        mut batch: Box<SendBatch>,
    ) -> io::Result<usize> {
        batch.key = key;
        batch.sent = 0;
        self.start(Op::Send(batch), |op| send_entry(op, socket))
    }

    /// Sends the rest of send op `op` after a short send (same op, same buffer).
    /// If it cannot be queued, the op is finished (dropped) before the error returns:
    /// nothing of it is in flight, and nothing else would remove it.
    pub fn resend(&mut self, op: usize, socket: SocketRef) -> io::Result<()> {
        let entry = send_entry(&mut self.ops[op], socket).user_data(op as u64);
        self.push(entry).inspect_err(|_| {
            self.ops.remove(op);
        })
    }

    /// Cancels op `target` (its completion still comes, with `-ECANCELED` or a result).
    pub fn cancel(&mut self, target: usize) -> io::Result<()> {
        self.cancel_user_data(target as u64)
    }

    fn cancel_user_data(&mut self, target: u64) -> io::Result<()> {
        self.start(Op::Cancel, |_| opcode::AsyncCancel::new(target).build())
            .map(|_| ())
    }

    pub fn op(&self, id: usize) -> Option<&Op> {
        self.ops.get(id)
    }

    pub fn op_mut(&mut self, id: usize) -> Option<&mut Op> {
        self.ops.get_mut(id)
    }

    /// Removes an op whose final completion was reaped, returning what it owned.
    pub fn finish(&mut self, id: usize) -> Op {
        self.ops.remove(id)
    }

    /// Drops a reaped completion unhandled (the loop is ending): its op leaves the table
    /// if this was its final completion, so [`Ring::quiesce`] does not wait for it. The
    /// kernel is done with what it owns (a payload buffer, an accepted socket: closed).
    pub fn forget_reaped(&mut self, completion: Completion) {
        if completion.recv.is_none() && !completion.more && self.ops.contains(completion.op) {
            self.ops.remove(completion.op);
        }
    }

    /// Submits everything queued and waits up to `timeout` for one completion. A zero
    /// timeout does not wait at all (see [`Ring::run_pending`] for why that is not a wait with a
    /// zero timeout).
    pub fn enter(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let entered = match timeout {
            Some(t) if t.is_zero() => self.ring.submit(),
            Some(t) => {
                let ts = Timespec::from(t);
                self.ring
                    .submitter()
                    .submit_with_args(1, &SubmitArgs::new().timespec(&ts))
            }
            None => self.ring.submit_and_wait(1),
        };
        waited(entered)
    }

    /// Runs deferred task work (completed receives) the last enter left pending, without
    /// waiting; false when the kernel flags none (then nothing was entered).
    ///
    /// A wait runs at most max(20, wait_nr) deferred task-work items before it returns
    /// (Linux 6.13+), so a turn would see only ~20 of the sockets that have data, and a
    /// broadcast turn would write every subscriber once per ~20 publishes (broadcast 500:
    /// 14 sends per subscriber a round, against epoll's 2). The backend calls this between
    /// completion batches of one turn, a few times: each call runs at most as many items
    /// as a wait, and the batch before it has handed its receive buffers back, so a turn
    /// needs buffers for ~20 receives at a time, not for all of them.
    ///
    /// It enters with GETEVENTS and `min_complete` 0. A drain used to ask for 96
    /// completions with a zero timeout instead: with fewer pending than that, such a call
    /// goes on into the kernel's wait loop (and arms a timer for the timeout) before it
    /// gives up. At 10 × 1 KiB against an io_uring client that tripled the waits per echoed
    /// message (`io_uring:io_uring_cqring_wait`, 0.035 against 0.011) and cost up to 30 % of
    /// the msgs/s.
    ///
    /// `queued`: entries were queued since the last enter that should run now (re-armed
    /// receives), so enter even if no task work is flagged.
    pub fn run_pending(&mut self, queued: bool) -> io::Result<bool> {
        if !queued && !self.ring.submission().taskrun() {
            return Ok(false);
        }
        // `submit` enters with GETEVENTS (so runs task work) while the kernel flags some
        // pending, and never waits.
        waited(self.ring.submit())?;
        Ok(true)
    }

    /// Submits what is queued, then looks for completions without sleeping for up to
    /// `spin` (running the task work the kernel flags, which is how completed receives
    /// arrive with deferred task work). Returns whether any arrived.
    pub fn poll_for(&mut self, spin: Duration) -> io::Result<bool> {
        waited(self.ring.submit())?;
        let start = std::time::Instant::now();
        loop {
            if !self.ring.completion().is_empty() {
                return Ok(true);
            }
            if start.elapsed() >= spin {
                return Ok(false);
            }
            self.run_pending(false)?;
            std::hint::spin_loop();
        }
    }

    /// Moves up to `max` available completions into `out` (the rest stay in the queue).
    pub fn reap(&mut self, out: &mut Vec<Completion>, max: usize) {
        for cqe in self.ring.completion().take(max) {
            let (data, result, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            if data & RECV != 0 {
                let more = cqueue::more(flags);
                if !more {
                    self.receives -= 1;
                }
                let key = (data & !(RECV | PAYLOAD)) as usize;
                let payload = (data & PAYLOAD != 0).then(|| {
                    let mut buffer = self
                        .payloads
                        .remove(&key)
                        .expect("a payload receive owns a buffer");
                    if result > 0 {
                        // SAFETY: the kernel wrote `result` bytes (at most the room it was
                        // given, which fits the spare capacity) from the buffer's end on,
                        // so they are initialized; and it is done with the buffer.
                        unsafe { buffer.set_len(buffer.len() + result as usize) };
                    }
                    buffer
                });
                out.push(Completion {
                    op: usize::MAX,
                    recv: Some(key),
                    result,
                    more,
                    buffer: cqueue::buffer_select(flags),
                    accepted: None,
                    payload,
                });
                continue;
            }
            if data & SLOT_UPDATE != 0 {
                // Never seen (the slot is inside the table, the descriptor open): the
                // slot stays as it was, and a filled one's connection sees its receive
                // fail (EBADF) and closes like any connection whose read fails.
                let slot = data & !SLOT_UPDATE;
                log::warn!(
                    "io_uring: updating socket slot {slot} failed: {}",
                    io::Error::from_raw_os_error(-result)
                );
                continue;
            }
            let op = data as usize;
            let accepted =
                (result >= 0 && matches!(self.ops.get(op), Some(Op::Accept))).then(|| {
                    // SAFETY: an accept completion's result is a descriptor the kernel just
                    // created for us; each completion is reaped once, so nothing else owns it.
                    unsafe { TcpStream::from_raw_fd(result) }
                });
            out.push(Completion {
                op,
                recv: None,
                result,
                more: cqueue::more(flags),
                buffer: cqueue::buffer_select(flags),
                accepted,
                payload: None,
            });
        }
    }

    /// A provided-buffer ring of `count` buffers of `size` bytes for multishot receives.
    pub fn buffers(&self, count: u16, size: usize) -> io::Result<BufRing> {
        BufRing::new(&self.ring, count, size, BUF_GROUP)
    }

    /// Cancels every operation, waits (bounded) for their completions, and unregisters
    /// `bufs` so no kernel reference to loop memory outlives the loop; if something could
    /// not be reaped the buffer memory is leaked rather than freed.
    pub fn quiesce(&mut self, bufs: Option<BufRing>) {
        let _ = self.ring.submit();
        let _ = self.ring.submitter().register_sync_cancel(
            Some(Timespec::from(Duration::from_secs(1))),
            CancelBuilder::any(),
        );
        let mut reaped = Vec::new();
        for _ in 0..100 {
            self.reap(&mut reaped, usize::MAX);
            for completion in reaped.drain(..) {
                self.forget_reaped(completion);
            }
            if self.ops.is_empty() && self.receives == 0 {
                break;
            }
            let _ = self.enter(Some(Duration::from_millis(10)));
        }
        let done = self.ops.is_empty() && self.receives == 0;
        if !done {
            // The kernel may still write into them (payload buffers, the wake read's
            // buffer) or read from them (a send batch's parts): leaked, not freed.
            std::mem::forget(std::mem::take(&mut self.payloads));
            std::mem::forget(std::mem::take(&mut self.ops));
        }
        if let Some(bufs) = bufs {
            if done {
                bufs.unregister(&self.ring);
            } else {
                std::mem::forget(bufs);
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Operations still in flight (a ring dropped without `quiesce`, or one that timed
        // out) may have the kernel write into or read from what they own until the ring's
        // teardown ends, asynchronously: leaked, not freed.
        if !self.ops.is_empty() || !self.payloads.is_empty() {
            std::mem::forget(std::mem::take(&mut self.payloads));
            std::mem::forget(std::mem::take(&mut self.ops));
        }
    }
}

/// A multishot receive into the provided-buffer ring, optionally polling first.
fn recv_entry(socket: SocketRef, key: usize, poll_first: bool) -> squeue::Entry {
    let entry = on_socket!(socket, |target| opcode::RecvMulti::new(target, BUF_GROUP)
        .build())
    .user_data(RECV | key as u64);
    if !poll_first {
        return entry;
    }
    // The crate's builder sets `ioprio` to IORING_RECV_MULTISHOT and has no setter for
    // the other flags of that field, so it is set in the entry's bytes: `ioprio` is the
    // `u16` at offset 2 of the kernel's `io_uring_sqe` (a fixed ABI).
    let mut bytes = sqe_bytes(entry);
    let ioprio = u16::from_ne_bytes([bytes[2], bytes[3]]) | IORING_RECVSEND_POLL_FIRST;
    bytes[2..4].copy_from_slice(&ioprio.to_ne_bytes());
    // SAFETY: `squeue::Entry` is a `#[repr(C)]` wrapper of exactly one `io_uring_sqe`
    // (64 bytes), and every bit pattern is a valid `io_uring_sqe` (integers and unions of
    // integers).
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(bytes) }
}

/// A submission entry's bytes, as the kernel reads them.
fn sqe_bytes(entry: squeue::Entry) -> [u8; 64] {
    // SAFETY: `squeue::Entry` is a `#[repr(C)]` wrapper of exactly one `io_uring_sqe`
    // (64 bytes, no padding), and every bit pattern is a valid `[u8; 64]`.
    unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(entry) }
}

/// The SQE for what is left of send op `op`: a plain send when the batch is one part
/// (own bytes alone, or an echo sent from its receive buffer), else a `sendmsg` gathering
/// own bytes and the parts between them (each by reference).
fn send_entry(op: &mut Op, socket: SocketRef) -> squeue::Entry {
    let Op::Send(batch) = op else {
        unreachable!("a send op")
    };
    if let Some(rest) = batch.out.single_part(batch.sent) {
        return on_socket!(socket, |target| opcode::Send::new(
            target,
            rest.as_ptr(),
            rest.len() as u32
        )
        .flags(libc::MSG_NOSIGNAL)
        .build());
    }
    let SendBatch {
        out,
        iov,
        msg,
        sent,
        ..
    } = &mut **batch;
    iov.clear();
    out.parts(*sent, |part| {
        if iov.len() < MAX_IOVECS {
            iov.push(libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            });
        }
    });
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    on_socket!(socket, |target| opcode::SendMsg::new(
        target,
        msg as *const libc::msghdr
    )
    .flags(libc::MSG_NOSIGNAL as u32)
    .build())
}

/// Bytes of buffers back from replies sent in place that a ring keeps for its slots: 512
/// of 32 KiB, so that 500 connections' 16 KiB replies in flight at once (each holding the
/// buffer it arrived in until its send completes) allocate nothing once warm. Past it,
/// given-back buffers are freed.
pub(crate) const KEPT_SPARE_BYTES: usize = 16 * 1024 * 1024;

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from for
/// multishot recv, handed back (recycled) as soon as the session consumed them.
///
/// Each buffer is its own allocation, so that a session may keep one it was handed (to
/// send a reply from it in place, see [`BufRing::received`]); its slot then takes a spare
/// (one that came back from a finished send, see [`BufRing::give_back`]) or a new one.
pub(crate) struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    /// By buffer id; empty while a session keeps the buffer that was there.
    buffers: Vec<Vec<u8>>,
    /// Whether the kernel may write into buffer `bid` (it is queued in the ring).
    queued: Vec<bool>,
    /// Buffers of `size` bytes back from sessions, for slots whose buffer was kept.
    spares: Vec<Vec<u8>>,
    count: u16,
    size: usize,
    tail: u16,
    group: u16,
    /// Registered with the kernel and not unregistered since: the kernel may write into
    /// the buffers and read the entries, so they are leaked, not freed, if dropped so.
    registered: bool,
}

/// The kernel's `struct io_uring_buf`: one provided buffer. The ring's tail shares the
/// first entry's `resv` (`struct io_uring_buf_ring`'s union), so entries are written field
/// by field (see [`BufRing::recycle`]).
#[repr(C)]
struct RawBufEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(
    std::mem::size_of::<RawBufEntry>() == std::mem::size_of::<BufRingEntry>()
        && std::mem::size_of::<RawBufEntry>() == 16
        && std::mem::offset_of!(RawBufEntry, resv) == 14
);

impl BufRing {
    fn new(ring: &IoUring, count: u16, size: usize, group: u16) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && size > 0);
        let entries_layout =
            Layout::from_size_align(count as usize * std::mem::size_of::<BufRingEntry>(), 4096)
                .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (count >= 1, asserted).
        let entries = unsafe { alloc_zeroed(entries_layout) };
        let Some(entries) = NonNull::new(entries.cast::<BufRingEntry>()) else {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        let mut bufs = BufRing {
            entries,
            entries_layout,
            buffers: (0..count).map(|_| vec![0; size]).collect(),
            queued: vec![false; count as usize],
            spares: Vec::new(),
            count,
            size,
            tail: 0,
            group,
            registered: false,
        };
        // SAFETY: the entries array is page-aligned, `count` entries long, and is not freed
        // while registered (`registered` below: `Drop` leaks it unless `unregister` took
        // it back from the kernel).
        let registered = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries.as_ptr() as u64, count, group, 0)
        };
        if let Err(e) = registered {
            // Not registered: freeing is safe.
            drop(bufs);
            return Err(e);
        }
        bufs.registered = true;
        for bid in 0..count {
            bufs.recycle(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Queues buffer `bid` for the kernel again (visible after `publish`); a slot whose
    /// buffer a session kept gets a spare, or a new buffer.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.count && !self.queued[bid as usize]);
        let buffer = &mut self.buffers[bid as usize];
        // The kernel writes up to `size` bytes at the buffer's address: a slot whose
        // buffer was taken, or left shorter by a session, gets a whole one.
        if buffer.len() < self.size {
            *buffer = self.spares.pop().unwrap_or_else(|| vec![0; self.size]);
        }
        let slot = (self.tail & (self.count - 1)) as usize;
        // The kernel writes through this address until it hands the buffer back: nothing
        // here touches the buffer's bytes, or frees it, while `queued` says so.
        let (addr, len) = (buffer.as_mut_ptr() as u64, self.size as u32);
        let entry = self.entries.as_ptr().cast::<RawBufEntry>();
        // SAFETY: `slot < count`, inside the entries allocation (`RawBufEntry` has the
        // layout of the kernel's `io_uring_buf`, asserted below). The kernel only reads
        // entries between its head and our published tail, and this slot is past it. The
        // fields are written through raw pointers, never a `&mut` to the whole entry:
        // slot 0's last two bytes are the ring's tail, which the kernel reads at any time
        // (only `publish` writes it, atomically).
        unsafe {
            let entry = entry.add(slot);
            (&raw mut (*entry).addr).write(addr);
            (&raw mut (*entry).len).write(len);
            (&raw mut (*entry).bid).write(bid);
        }
        self.queued[bid as usize] = true;
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes recycled buffers visible to the kernel.
    pub fn publish(&self) {
        let base = self.entries.as_ptr().cast::<RawBufEntry>();
        // SAFETY: the entries pointer is the ring base, so the first entry's `resv` is the
        // ring's shared tail (aligned for a `u16`), which is only ever accessed atomically
        // (here and by the kernel); the address is taken without a reference.
        let tail = unsafe { AtomicU16::from_ptr(&raw mut (*base).resv) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Buffer `bid`, which a completion says the kernel filled and handed over. Its bytes
    /// are the session's until [`BufRing::recycle`]; it may also take the buffer itself
    /// (`std::mem::take`), leaving the slot empty for `recycle` to fill.
    pub fn received(&mut self, bid: u16) -> &mut Vec<u8> {
        assert!(bid < self.count);
        self.queued[bid as usize] = false;
        &mut self.buffers[bid as usize]
    }

    /// Takes back a buffer a session kept, once the send that held it finished: it fills
    /// the next slot left empty. Other buffers (not of this ring's size) are dropped, as
    /// are those past [`KEPT_SPARE_BYTES`].
    pub fn give_back(&mut self, buffer: Vec<u8>) {
        if buffer.len() == self.size && (self.spares.len() + 1) * self.size <= KEPT_SPARE_BYTES {
            self.spares.push(buffer);
        }
    }

    fn unregister(mut self, ring: &IoUring) {
        if ring.submitter().unregister_buf_ring(self.group).is_ok() {
            self.registered = false;
        }
        // Still registered (the kernel may reference the memory): `Drop` leaks it.
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // Dropped without `unregister` (an error path, a panic) or refused by it: the
            // kernel may still write into the buffers or read the entries.
            std::mem::forget(std::mem::take(&mut self.buffers));
            return;
        }
        // SAFETY: allocated in `new` with this layout, and the kernel does not reference
        // it: never registered, or unregistered (`registered` is false). The buffers
        // drop with the struct, under the same condition.
        unsafe {
            dealloc(self.entries.as_ptr().cast(), self.entries_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op table's ownership rules end to end on a real ring: a send's buffer stays
    /// alive until its completion, accept completions arrive as owned streams, and the
    /// buffer ring hands back what the kernel received.
    #[test]
    fn send_recv_and_accept_through_the_op_table() {
        if no_io_uring() {
            return;
        }
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let mut ring = Ring::new(64).unwrap();
        let mut bufs = ring.buffers(4, 4096).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ring.accept(listener.as_raw_fd()).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut done = Vec::new();
        let mut server = None;
        while server.is_none() {
            ring.enter(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut done, usize::MAX);
            server = done.drain(..).find_map(|c| c.accepted);
        }
        let server = server.unwrap();
        let mut batch = Box::<SendBatch>::default();
        batch.out.set_bytes(b"hello");
        let socket = ring.register_socket(7, server.as_raw_fd());
        assert!(ring.slots == 0 || socket == SocketRef::Slot(7));
        let send = ring.send(socket, 7, batch).unwrap();
        ring.recv(socket, 7).unwrap();
        client.write_all(b"ping").unwrap();
        let (mut sent, mut got) = (false, None);
        while !sent || got.is_none() {
            ring.enter(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut done, usize::MAX);
            for c in done.drain(..) {
                if c.op == send {
                    assert_eq!(c.result, 5);
                    let Op::Send(batch) = ring.finish(send) else {
                        panic!("not a send")
                    };
                    assert_eq!(batch.out.own(), b"hello");
                    sent = true;
                } else if c.recv == Some(7) && c.result > 0 {
                    let bid = c.buffer.expect("a provided buffer");
                    got = Some(bufs.received(bid)[..c.result as usize].to_vec());
                    bufs.recycle(bid);
                }
            }
        }
        assert_eq!(got.as_deref(), Some(&b"ping"[..]));
        let mut echo = [0; 5];
        client.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"hello");
        ring.release_socket(socket);
        drop(server);
        ring.quiesce(Some(bufs));
    }

    /// A buffer the session keeps is its own: its slot takes another, the kernel never
    /// writes into the kept one again, and once given back it is the next slot's buffer.
    /// A loop that ends on an error drops the rest of its reaped batch unhandled: those
    /// ops must leave the table (their completions will not come again), so the exit's
    /// quiesce finds nothing in flight instead of waiting its second and leaking.
    #[test]
    fn forgotten_completions_leave_the_table_so_quiesce_is_done() {
        if no_io_uring() {
            return;
        }
        use std::os::fd::AsRawFd;
        let mut ring = Ring::new(64).unwrap();
        let bufs = ring.buffers(4, 4096).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, server) = connected(&listener);
        let socket = ring.register_socket(3, server.as_raw_fd());
        let mut batch = Box::<SendBatch>::default();
        batch.out.set_bytes(b"bye");
        let send = ring.send(socket, 3, batch).unwrap();
        let mut done = Vec::new();
        while !done.iter().any(|c: &Completion| c.op == send) {
            ring.enter(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut done, usize::MAX);
        }
        assert!(ring.op(send).is_some(), "reaped, not yet finished");
        for completion in done.drain(..) {
            ring.forget_reaped(completion);
        }
        assert!(ring.op(send).is_none());
        // Nothing left for quiesce to wait for (the send's entry used to stay: quiesce
        // then polled for a second and leaked every buffer).
        assert!(ring.ops.is_empty() && ring.receives == 0);
        ring.release_socket(socket);
        ring.quiesce(Some(bufs));
        let mut got = [0; 3];
        std::io::Read::read_exact(&mut client, &mut got).unwrap();
        assert_eq!(&got, b"bye");
    }

    #[test]
    fn a_kept_buffer_is_replaced_and_reused_once_given_back() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let Some((mut ring, listener)) = ring_with_slots() else {
            return;
        };
        let (mut client, server) = connected(&listener);
        // One buffer: every receive lands in slot 0.
        let mut bufs = ring.buffers(1, 4096).unwrap();
        let socket = SocketRef::Fd(server.as_raw_fd());
        ring.recv(socket, 3).unwrap();
        let mut receive = |ring: &mut Ring, bufs: &mut BufRing, bytes: &[u8]| -> u16 {
            client.write_all(bytes).unwrap();
            let mut done = Vec::new();
            loop {
                ring.enter(Some(Duration::from_secs(5))).unwrap();
                ring.reap(&mut done, usize::MAX);
                for c in done.drain(..) {
                    if !c.more {
                        ring.recv(socket, 3).unwrap();
                    }
                    if c.result > 0 {
                        let bid = c.buffer.unwrap();
                        assert_eq!(&bufs.received(bid)[..bytes.len()], bytes);
                        return bid;
                    }
                }
            }
        };
        let bid = receive(&mut ring, &mut bufs, b"one");
        let kept = std::mem::take(bufs.received(bid));
        bufs.recycle(bid);
        bufs.publish();
        let bid = receive(&mut ring, &mut bufs, b"two");
        assert_eq!(&kept[..3], b"one", "not written once kept");
        assert_ne!(bufs.received(bid).as_ptr(), kept.as_ptr(), "a new buffer");
        let kept_at = kept.as_ptr();
        bufs.give_back(kept);
        let second = std::mem::take(bufs.received(bid));
        bufs.recycle(bid);
        bufs.publish();
        let bid = receive(&mut ring, &mut bufs, b"three");
        assert_eq!(
            bufs.received(bid).as_ptr(),
            kept_at,
            "the given-back buffer"
        );
        assert_eq!(&second[..3], b"two");
        // Not this ring's size: dropped, not kept for a slot.
        bufs.give_back(vec![0; 16]);
        assert!(bufs.spares.is_empty());
        bufs.recycle(bid);
        drop(server);
        ring.quiesce(Some(bufs));
    }

    /// A slot whose buffer a session left shorter than the ring's size gets a whole one
    /// before the kernel is told it may write `size` bytes there.
    #[test]
    fn a_buffer_left_short_is_replaced_before_the_kernel_gets_it() {
        let Some((ring, _listener)) = ring_with_slots() else {
            return;
        };
        let mut bufs = ring.buffers(2, 4096).unwrap();
        *bufs.received(0) = vec![7; 16];
        bufs.recycle(0);
        bufs.publish();
        assert_eq!(bufs.buffers[0].len(), 4096);
        assert!(bufs.buffers[0].iter().all(|&b| b == 0), "a new buffer");
        let mut ring = ring;
        ring.quiesce(Some(bufs));
    }

    /// A payload receive appends to its buffer's spare capacity and completes once, when
    /// its whole room has arrived (`MSG_WAITALL`), handing the buffer back; a cancelled one
    /// hands it back with what did arrive; a single receive completes once, from the ring.
    #[test]
    fn payload_receives_own_their_buffer_until_their_completion() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let Some((mut ring, listener)) = ring_with_slots() else {
            return;
        };
        let (mut client, server) = connected(&listener);
        let mut bufs = ring.buffers(2, 4096).unwrap();
        let socket = SocketRef::Fd(server.as_raw_fd());
        let mut done = Vec::new();
        // The receive's completion, if one came within `wait` (a cancel's own is finished).
        let mut next = |ring: &mut Ring, wait: Duration| -> Option<Completion> {
            ring.enter(Some(wait)).unwrap();
            ring.reap(&mut done, usize::MAX);
            let mut receive = None;
            for c in done.drain(..) {
                if c.recv.is_some() {
                    assert!(receive.is_none(), "one receive, one completion");
                    receive = Some(c);
                } else {
                    ring.finish(c.op);
                }
            }
            receive
        };
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut buffer = Vec::with_capacity(100_010);
        buffer.extend_from_slice(b"0123456789");
        ring.recv_payload(socket, 3, buffer, 100_000, true).unwrap();
        client.write_all(&data[..60_000]).unwrap();
        assert!(
            next(&mut ring, Duration::from_millis(200)).is_none(),
            "not complete with 60 000 of 100 000 bytes"
        );
        client.write_all(&data[60_000..]).unwrap();
        let c = loop {
            if let Some(c) = next(&mut ring, Duration::from_secs(5)) {
                break c;
            }
        };
        assert_eq!((c.recv, c.result, c.more), (Some(3), 100_000, false));
        let payload = c.payload.expect("the buffer back");
        assert_eq!(&payload[..10], b"0123456789");
        assert!(payload[10..] == data[..], "appended after what it held");
        // Cancelled with 3 bytes in: the buffer comes back holding what arrived (the
        // kernel reports the bytes, or the cancel and none).
        ring.recv_payload(socket, 3, Vec::with_capacity(1000), 1000, true)
            .unwrap();
        client.write_all(b"abc").unwrap();
        assert!(next(&mut ring, Duration::from_millis(100)).is_none());
        ring.cancel_recv(3, true).unwrap();
        let c = loop {
            if let Some(c) = next(&mut ring, Duration::from_secs(5)) {
                break c;
            }
        };
        let payload = c.payload.expect("the buffer back");
        let taken = match c.result {
            3 => b"abc".len(),
            r => {
                assert_eq!(r, -libc::ECANCELED);
                0
            }
        };
        assert_eq!(payload, &b"abc"[..taken]);
        // One receive from the ring: one completion, not armed after it.
        ring.recv_once(socket, 3).unwrap();
        client.write_all(b"xyz").unwrap();
        let c = loop {
            if let Some(c) = next(&mut ring, Duration::from_secs(5)) {
                break c;
            }
        };
        assert!(!c.more && c.payload.is_none());
        let bid = c.buffer.expect("a provided buffer");
        let expected = [&b"abc"[taken..], b"xyz"].concat();
        assert_eq!(&bufs.received(bid)[..c.result as usize], &expected[..]);
        bufs.recycle(bid);
        drop(server);
        ring.quiesce(Some(bufs));
    }

    /// Given-back buffers are kept up to `KEPT_SPARE_BYTES`, not one more.
    #[test]
    fn given_back_buffers_are_kept_up_to_their_bound() {
        let Some((mut ring, _listener)) = ring_with_slots() else {
            return;
        };
        let mut bufs = ring.buffers(1, 4096).unwrap();
        let bound = KEPT_SPARE_BYTES / 4096;
        for _ in 0..bound {
            bufs.give_back(vec![0; 4096]);
        }
        assert_eq!(bufs.spares.len(), bound, "at the bound");
        bufs.give_back(vec![0; 4096]);
        assert_eq!(bufs.spares.len(), bound, "one past it: freed");
        ring.quiesce(Some(bufs));
    }

    /// A socket in a slot of the registered-socket table stays open, even with its
    /// descriptor closed, until the slot is released: the reason every connection's slot
    /// is released when it ends.
    #[test]
    fn a_released_slot_lets_its_socket_close() {
        use std::io::{ErrorKind, Read};
        use std::os::fd::AsRawFd;
        let Some((mut ring, listener)) = ring_with_slots() else {
            return;
        };
        let (mut client, server) = connected(&listener);
        let socket = ring.register_socket(0, server.as_raw_fd());
        assert_eq!(socket, SocketRef::Slot(0));
        // The table's last slot, then one past it: the descriptor.
        let last = ring.register_socket(SOCKET_SLOTS as usize - 1, server.as_raw_fd());
        assert_eq!(last, SocketRef::Slot(SOCKET_SLOTS - 1));
        ring.release_socket(last);
        assert_eq!(
            ring.register_socket(SOCKET_SLOTS as usize, server.as_raw_fd()),
            SocketRef::Fd(server.as_raw_fd()),
            "past the table: the descriptor"
        );
        // The slot names the socket.
        let mut batch = Box::<SendBatch>::default();
        batch.out.set_bytes(b"hi");
        let send = ring.send(socket, 0, batch).unwrap();
        let mut done = Vec::new();
        while !done.iter().any(|c: &Completion| c.op == send) {
            ring.enter(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut done, usize::MAX);
        }
        ring.finish(send);
        let mut got = [0; 2];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        // Descriptor closed, slot held: no end of stream.
        drop(server);
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // io_uring's task-work notifications may interrupt a blocking read.
        let read = |client: &mut TcpStream| loop {
            match client.read(&mut [0; 1]) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => return other,
            }
        };
        let err = read(&mut client).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err:?}"
        );
        // Released (at the next submission, which needs no wait): the socket closes.
        ring.release_socket(socket);
        ring.enter(Some(Duration::ZERO)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(read(&mut client).unwrap(), 0, "end of stream");
        ring.quiesce(None);
    }

    /// Slot updates run in submission order with the operations around them: a slot
    /// emptied and filled with another socket in the same submission, then named by a
    /// send, sends on the new socket (the backend relies on this when a key is reused).
    #[test]
    fn slot_updates_take_effect_in_submission_order() {
        use std::io::{ErrorKind, Read};
        use std::os::fd::AsRawFd;
        let Some((mut ring, listener)) = ring_with_slots() else {
            return;
        };
        let (mut first, first_server) = connected(&listener);
        let (mut second, second_server) = connected(&listener);
        let old = ring.register_socket(3, first_server.as_raw_fd());
        ring.release_socket(old);
        let new = ring.register_socket(3, second_server.as_raw_fd());
        assert_eq!(new, SocketRef::Slot(3));
        let mut batch = Box::<SendBatch>::default();
        batch.out.set_bytes(b"to the second");
        let send = ring.send(new, 3, batch).unwrap();
        let mut done = Vec::new();
        while !done.iter().any(|c: &Completion| c.op == send) {
            ring.enter(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut done, usize::MAX);
        }
        // Successful updates post no completion: the send's is the only one.
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result, 13);
        let mut got = [0; 13];
        second.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to the second");
        first
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // io_uring's task-work notifications may interrupt a blocking read.
        let err = loop {
            match first.read(&mut [0; 1]) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other.unwrap_err(),
            }
        };
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err:?}"
        );
        ring.release_socket(new);
        ring.quiesce(None);
    }

    /// Whether io_uring is missing here, so a ring test has nothing to run (the epoll
    /// backend is tested instead). With `WSD_REQUIRE_IO_URING=1` (as `.ci/run` sets) a
    /// missing io_uring fails the test instead of letting it pass without running.
    fn no_io_uring() -> bool {
        match probe() {
            Ok(_) => false,
            Err(why) if std::env::var_os("WSD_REQUIRE_IO_URING").is_some_and(|v| v == "1") => {
                panic!("WSD_REQUIRE_IO_URING=1, but io_uring is unavailable: {why}")
            }
            Err(_) => true,
        }
    }

    /// A ring with a registered-socket table and a loopback listener; `None` (the test
    /// passes vacuously) without io_uring, where the epoll backend is tested instead, or
    /// before Linux 5.19, where sockets are always named by descriptor.
    fn ring_with_slots() -> Option<(Ring, std::net::TcpListener)> {
        if no_io_uring() {
            return None;
        }
        let ring = Ring::new(64).unwrap();
        (ring.slots > 0).then(|| (ring, std::net::TcpListener::bind("127.0.0.1:0").unwrap()))
    }

    /// A connected (client, server) pair through `listener`.
    fn connected(listener: &std::net::TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (client, listener.accept().unwrap().0)
    }

    /// `count` connected (client, server) pairs over loopback, each server side with a
    /// multishot receive queued (key = its index).
    fn receiving_pairs(ring: &mut Ring, count: usize) -> Vec<(TcpStream, TcpStream)> {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut pairs = Vec::new();
        for key in 0..count {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            ring.recv(SocketRef::Fd(server.as_raw_fd()), key).unwrap();
            pairs.push((client, server));
        }
        pairs
    }

    /// Voluntary context switches of the calling thread so far.
    fn voluntary_switches() -> i64 {
        // SAFETY: `rusage` is plain old data (integers and `timeval`s), for which all zeroes
        // is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `getrusage` only writes the `rusage` it is given, which lives on this
        // stack frame for the call.
        let got = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(got, 0, "getrusage");
        usage.ru_nvcsw
    }

    /// Repeated `run_pending` calls run every pending receive (30: more than one enter
    /// runs) and return without sleeping (no voluntary context switch). The drain it
    /// replaced (a wait for 96 completions with a zero timeout) passes this too when run
    /// alone: its extra waits only showed under load (`io_uring:io_uring_cqring_wait`, see
    /// `run_pending`).
    #[test]
    fn a_drain_runs_pending_receives_without_sleeping() {
        if no_io_uring() {
            return;
        }
        use std::io::Write;
        const SOCKETS: usize = 30;
        const ROUNDS: usize = 20;
        let mut ring = Ring::new(256).unwrap();
        let mut bufs = ring.buffers(128, 4096).unwrap();
        let mut pairs = receiving_pairs(&mut ring, SOCKETS);
        ring.enter(Some(Duration::ZERO)).unwrap();
        let mut switches = 0;
        let mut received = 0;
        for _ in 0..ROUNDS {
            for (client, _) in &mut pairs {
                client.write_all(b"x").unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
            let before = voluntary_switches();
            let mut entered = 0;
            while ring.run_pending(false).unwrap() {
                entered += 1;
                assert!(
                    entered <= SOCKETS,
                    "task work still pending after {entered} enters"
                );
            }
            switches += voluntary_switches() - before;
            assert!(entered > 0, "the kernel says receives are pending");
            let mut done = Vec::new();
            ring.reap(&mut done, usize::MAX);
            for completion in &done {
                assert_eq!(completion.result, 1, "a one-byte receive");
                assert!(completion.more, "the multishot receive goes on");
                let bid = completion.buffer.unwrap();
                bufs.received(bid);
                bufs.recycle(bid);
            }
            bufs.publish();
            received += done.len();
        }
        assert_eq!(
            received,
            SOCKETS * ROUNDS,
            "every byte was received by a drain"
        );
        assert_eq!(switches, 0, "drains slept");
        drop(pairs);
        ring.quiesce(Some(bufs));
    }

    /// One turn can see every socket that has data: the kernel runs only ~20 deferred
    /// receives per wait (Linux 6.13+), and `run_pending` runs the rest without waiting.
    /// Without it, this sees 20 of the 100.
    #[test]
    fn a_wait_and_a_drain_complete_every_pending_receive() {
        if no_io_uring() {
            return;
        }
        use std::io::Write;
        const SOCKETS: usize = 100;
        let mut ring = Ring::new(1024).unwrap();
        let bufs = ring.buffers(256, 4096).unwrap();
        let mut pairs = receiving_pairs(&mut ring, SOCKETS);
        // Arm the receives, then give every socket data while the ring is not waiting.
        ring.enter(Some(Duration::ZERO)).unwrap();
        for (client, _) in &mut pairs {
            client.write_all(b"x").unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        ring.enter(Some(Duration::from_secs(5))).unwrap();
        let mut done = Vec::new();
        ring.reap(&mut done, usize::MAX);
        // Before Linux 6.13 the wait itself may have run them all.
        if done.len() < SOCKETS {
            assert!(
                ring.run_pending(false).unwrap(),
                "the kernel says receives are pending"
            );
            ring.reap(&mut done, usize::MAX);
            while ring.run_pending(false).unwrap() {
                ring.reap(&mut done, usize::MAX);
            }
        }
        assert!(!ring.run_pending(false).unwrap(), "nothing is left pending");
        let mut received: Vec<usize> = done
            .iter()
            .filter(|c| c.result == 1)
            .filter_map(|c| c.recv)
            .collect();
        received.sort_unstable();
        received.dedup();
        assert_eq!(received.len(), SOCKETS, "receives completed in one enter");
        drop(pairs);
        ring.quiesce(Some(bufs));
    }

    /// A polled-first receive is the plain multishot receive with one more `ioprio` bit,
    /// and it receives what the socket already held when it was armed.
    #[test]
    fn a_polled_first_receive_differs_only_in_its_flag_and_receives() {
        let plain = recv_entry(SocketRef::Slot(3), 3, false);
        let polled = recv_entry(SocketRef::Slot(3), 3, true);
        let (plain, polled) = (sqe_bytes(plain), sqe_bytes(polled));
        let ioprio = |e: &[u8; 64]| u16::from_ne_bytes([e[2], e[3]]);
        assert_eq!(ioprio(&plain), 2, "IORING_RECV_MULTISHOT");
        assert_eq!(ioprio(&polled), 2 | IORING_RECVSEND_POLL_FIRST);
        assert_eq!(plain[..2], polled[..2]);
        assert_eq!(plain[4..], polled[4..]);

        if no_io_uring() {
            return;
        }
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut ring = Ring::new(64).unwrap();
        let mut bufs = ring.buffers(4, 4096).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"already here").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        ring.recv_polled(SocketRef::Fd(server.as_raw_fd()), 5)
            .unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            ring.enter(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut done, usize::MAX);
        }
        let c = &done[0];
        assert_eq!((c.recv, c.result, c.more), (Some(5), 12, true));
        let bid = c.buffer.unwrap();
        assert_eq!(&bufs.received(bid)[..12], b"already here");
        bufs.recycle(bid);
        drop(server);
        ring.quiesce(Some(bufs));
    }
}
