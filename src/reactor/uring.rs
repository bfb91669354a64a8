//! The io_uring backend: multishot accept, multishot recv into a provided-buffer ring,
//! one send in flight per connection, everything submitted with one `io_uring_enter` per
//! loop turn.
//!
//! Ownership rules (the tokio-uring / monoio model): every buffer the kernel may touch is
//! owned by an entry of `ops` (send buffers, by value) or by the loop itself (the buffer
//! ring, the wake buffer) until its completion is reaped. A connection that closes cancels
//! its operations and stays in the slab, holding its socket, until the last of them
//! completes; only then is the socket closed and the slab key reused. At exit the loop
//! cancels everything, reaps, and unregisters the buffer ring before freeing it.
//!
//! This module and the unmask kernel are the only places `unsafe` is allowed.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io::{self, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use slab::Slab;

use super::timer::{Deadline, Entry, Wheel};
use super::{
    CloseRequest, Envelope, Inbox, Io, LoopConfig, LoopStats, Remote, Service, Waker, channel,
};

const LINGER: Duration = Duration::from_secs(2);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const RING_ENTRIES: u32 = 4096;
const BUF_GROUP: u16 = 0;
const BUF_COUNT: u16 = 256;
/// 32 KiB: a 16 KiB message with its header fits one buffer, so it is parsed in place
/// instead of being reassembled from two receives. 256 × 32 KiB = 8 MiB per loop, touched
/// as the kernel uses them.
const BUF_SIZE: usize = 32 * 1024;

/// Builds a ring with the fastest setup the kernel accepts: SINGLE_ISSUER + DEFER_TASKRUN,
/// else COOP_TASKRUN, else plain.
fn build_ring(entries: u32) -> io::Result<(IoUring, &'static str)> {
    type Configure = fn(&mut io_uring::Builder);
    let attempts: [(&'static str, Configure); 3] = [
        ("single_issuer+defer_taskrun", |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("coop_taskrun", |b| {
            b.setup_coop_taskrun();
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
    let (ring, setup) = build_ring(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
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

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from for
/// multishot recv, handed back (recycled) as soon as the driver consumed them.
struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    memory: NonNull<u8>,
    memory_layout: Layout,
    count: u16,
    size: usize,
    tail: u16,
    group: u16,
}

impl BufRing {
    fn new(ring: &IoUring, count: u16, size: usize, group: u16) -> io::Result<BufRing> {
        assert!(count.is_power_of_two());
        let entries_layout =
            Layout::from_size_align(count as usize * std::mem::size_of::<BufRingEntry>(), 4096)
                .map_err(io::Error::other)?;
        let memory_layout =
            Layout::from_size_align(count as usize * size, 64).map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size (count >= 1, size >= 1).
        let (entries, memory) =
            unsafe { (alloc_zeroed(entries_layout), alloc_zeroed(memory_layout)) };
        let (Some(entries), Some(memory)) = (
            NonNull::new(entries.cast::<BufRingEntry>()),
            NonNull::new(memory),
        ) else {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        let mut bufs = BufRing {
            entries,
            entries_layout,
            memory,
            memory_layout,
            count,
            size,
            tail: 0,
            group,
        };
        // SAFETY: the entries array is page-aligned, `count` entries long, and lives until
        // `unregister` (called before it is freed, in Drop of the loop).
        let registered = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries.as_ptr() as u64, count, group, 0)
        };
        if let Err(e) = registered {
            // Not registered: freeing is safe.
            drop(bufs);
            return Err(e);
        }
        for bid in 0..count {
            bufs.recycle(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Queues buffer `bid` for the kernel again (visible after `publish`).
    fn recycle(&mut self, bid: u16) {
        let slot = (self.tail & (self.count - 1)) as usize;
        // SAFETY: `slot < count`, inside the entries allocation; the kernel only reads
        // entries between its head and our published tail, and this slot is past it.
        let entry = unsafe { &mut *self.entries.as_ptr().add(slot) };
        // SAFETY: `bid < count`, so the offset is inside the memory allocation.
        entry.set_addr(unsafe { self.memory.as_ptr().add(bid as usize * self.size) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes recycled buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the entries pointer is the ring base, so `tail` points at the ring's
        // shared tail field, which is only ever accessed atomically.
        let tail =
            unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.entries.as_ptr()) as *mut u16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled and handed over.
    fn buffer(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(bid < self.count && len <= self.size);
        // SAFETY: in bounds (asserted); the kernel wrote these bytes and will not touch
        // this buffer again until it is recycled, which needs `&mut self` again.
        unsafe {
            std::slice::from_raw_parts_mut(self.memory.as_ptr().add(bid as usize * self.size), len)
        }
    }

    fn unregister(self, ring: &IoUring) {
        if ring.submitter().unregister_buf_ring(self.group).is_ok() {
            drop(self);
        } else {
            // The kernel may still reference the memory: leak it rather than free it.
            std::mem::forget(self);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; only reached once the kernel no
        // longer references them (never registered, unregistered, or after ring teardown).
        unsafe {
            dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            dealloc(self.memory.as_ptr(), self.memory_layout);
        }
    }
}

/// An operation the kernel holds, with everything it points into.
enum Op {
    Accept,
    Wake,
    Recv {
        key: usize,
    },
    Send {
        key: usize,
        buf: Vec<u8>,
        offset: usize,
    },
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    /// Our FIN is sent; waiting for the peer's (or LINGER).
    Lingering,
    /// Closed for the service; waiting for in-flight operations before closing the socket.
    Closing,
}

struct Conn<T> {
    stream: TcpStream,
    session: Option<T>,
    generation: u32,
    deadline: Deadline,
    close_requested: bool,
    phase: Phase,
    recv_op: Option<usize>,
    send_op: Option<usize>,
    /// Output was produced while a send was in flight: report `drained` when caught up.
    backlogged: bool,
}

/// Parts made before the loop's thread starts (the ring itself is built on that thread,
/// because SINGLE_ISSUER ties it to its creator).
pub(crate) struct Prepared<C> {
    inbox: Inbox<C>,
    wake_reader: std::io::PipeReader,
    pub remote: Remote<C>,
}

pub(crate) fn prepare<C>() -> io::Result<Prepared<C>> {
    let (wake_reader, writer) = std::io::pipe()?;
    let (remote, inbox) = channel(Waker::Pipe(Arc::new(writer)));
    Ok(Prepared {
        inbox,
        wake_reader,
        remote,
    })
}

pub(crate) struct UringLoop<S: Service> {
    // Declared first so it is dropped first: the ring's teardown ends the kernel's use of
    // everything below.
    ring: IoUring,
    bufs: Option<BufRing>,
    listener: Option<TcpListener>,
    accept_op: Option<usize>,
    conns: Slab<Conn<S::Session>>,
    ops: Slab<Op>,
    service: S,
    wheel: Wheel,
    inbox: Inbox<S::Command>,
    remote: Remote<S::Command>,
    wake_reader: std::io::PipeReader,
    wake_buf: Box<[u8; 64]>,
    config: LoopConfig,
    stats: Arc<LoopStats>,
    next_generation: u32,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    due: Vec<Entry>,
    completions: Vec<(u64, i32, u32)>,
    dirty: Vec<usize>,
    rearm_recv: Vec<usize>,
    spare: Vec<Vec<u8>>,
}

impl<S: Service> UringLoop<S> {
    pub fn new(
        prepared: Prepared<S::Command>,
        listener: Option<TcpListener>,
        service: S,
        config: LoopConfig,
        stats: Arc<LoopStats>,
    ) -> io::Result<Self> {
        let (ring, _) = build_ring(RING_ENTRIES)?;
        let bufs = BufRing::new(&ring, BUF_COUNT, BUF_SIZE, BUF_GROUP)?;
        if let Some(listener) = &listener {
            listener.set_nonblocking(false)?;
        }
        Ok(UringLoop {
            ring,
            bufs: Some(bufs),
            listener,
            accept_op: None,
            conns: Slab::with_capacity(1024),
            ops: Slab::with_capacity(1024),
            service,
            wheel: Wheel::new(Instant::now()),
            inbox: prepared.inbox,
            remote: prepared.remote,
            wake_reader: prepared.wake_reader,
            wake_buf: Box::new([0; 64]),
            config,
            stats,
            next_generation: 0,
            accept_paused_until: None,
            shutdown_deadline: None,
            due: Vec::new(),
            completions: Vec::new(),
            dirty: Vec::new(),
            rearm_recv: Vec::new(),
            spare: Vec::new(),
        })
    }

    /// Queues an SQE; when the submission queue is full, hands it to the kernel first.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points to is owned by its `ops` entry (send
            // buffers) or by the loop (wake buffer, buffer ring) and outlives the operation:
            // ops are only removed when their final completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        let fd = listener.as_raw_fd();
        let op = self.ops.insert(Op::Accept);
        self.accept_op = Some(op);
        self.push(
            opcode::AcceptMulti::new(Fd(fd))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(op as u64),
        )
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let op = self.ops.insert(Op::Wake);
        let fd = self.wake_reader.as_raw_fd();
        let buf = self.wake_buf.as_mut_ptr();
        self.push(
            opcode::Read::new(Fd(fd), buf, 64)
                .build()
                .user_data(op as u64),
        )
    }

    fn arm_recv(&mut self, key: usize) -> io::Result<()> {
        let Some(conn) = self.conns.get(key) else {
            return Ok(());
        };
        if conn.recv_op.is_some() || conn.phase == Phase::Closing {
            return Ok(());
        }
        let fd = conn.stream.as_raw_fd();
        let op = self.ops.insert(Op::Recv { key });
        self.conns[key].recv_op = Some(op);
        self.push(
            opcode::RecvMulti::new(Fd(fd), BUF_GROUP)
                .build()
                .user_data(op as u64),
        )
    }

    fn submit_send(&mut self, op: usize, fd: RawFd) -> io::Result<()> {
        let Op::Send { buf, offset, .. } = &self.ops[op] else {
            unreachable!("a send op")
        };
        let (ptr, len) = (buf[*offset..].as_ptr(), (buf.len() - *offset) as u32);
        self.push(
            opcode::Send::new(Fd(fd), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(op as u64),
        )
    }

    /// Runs until a shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        self.arm_accept()?;
        self.arm_wake()?;
        let result = self.turns();
        self.quiesce();
        result
    }

    fn turns(&mut self) -> io::Result<()> {
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
            let entered = match timeout {
                Some(t) => {
                    let ts = Timespec::from(t);
                    self.ring
                        .submitter()
                        .submit_with_args(1, &SubmitArgs::new().timespec(&ts))
                }
                None => self.ring.submit_and_wait(1),
            };
            if let Err(e) = entered {
                match e.raw_os_error() {
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                    _ => return Err(e),
                }
            }
            let mut completions = std::mem::take(&mut self.completions);
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for (user_data, result, flags) in completions.drain(..) {
                self.complete(user_data as usize, result, flags)?;
            }
            self.completions = completions;
            if let Some(bufs) = &self.bufs {
                bufs.publish();
            }
            for key in std::mem::take(&mut self.rearm_recv) {
                self.arm_recv(key)?;
            }
            let dirty = std::mem::take(&mut self.dirty);
            for &key in &dirty {
                self.flush(key)?;
            }
            self.dirty = dirty;
            self.dirty.clear();
            let now = Instant::now();
            self.expire_timers(now)?;
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
                self.arm_accept()?;
            }
            if let Some(deadline) = self.shutdown_deadline {
                if now >= deadline {
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        self.close_now(key)?;
                    }
                }
                if self.conns.is_empty() {
                    return Ok(());
                }
            }
        }
    }

    fn complete(&mut self, op: usize, result: i32, flags: u32) -> io::Result<()> {
        let more = cqueue::more(flags);
        match self.ops.get(op) {
            None => Ok(()),
            Some(Op::Cancel) => {
                self.ops.remove(op);
                Ok(())
            }
            Some(Op::Wake) => {
                self.ops.remove(op);
                self.drain_remote()?;
                if result >= 0 || result == -libc::EINTR {
                    self.arm_wake()?;
                }
                Ok(())
            }
            Some(Op::Accept) => {
                if !more {
                    self.ops.remove(op);
                    self.accept_op = None;
                }
                if result >= 0 {
                    // SAFETY: the kernel just created this descriptor for us; nothing else
                    // owns it.
                    let stream = unsafe { TcpStream::from_raw_fd(result) };
                    self.admit(stream)?;
                    if !more && self.listener.is_some() {
                        self.arm_accept()?;
                    }
                } else if !more && self.listener.is_some() && result != -libc::ECANCELED {
                    // EMFILE, ENFILE, ENOBUFS…: retry on a timer instead of spinning.
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                }
                Ok(())
            }
            Some(&Op::Recv { key }) => {
                if !more {
                    self.ops.remove(op);
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.recv_op = None;
                    }
                }
                if result > 0 {
                    let bid = cqueue::buffer_select(flags)
                        .expect("multishot recv always selects a buffer");
                    self.received(key, bid, result as usize);
                    if !more {
                        self.rearm_recv.push(key);
                    }
                } else if result == -libc::ENOBUFS {
                    // The buffer ring ran dry within one batch; buffers are recycled by the
                    // end of this turn, so re-arm then.
                    self.rearm_recv.push(key);
                } else if result != -libc::ECANCELED {
                    // 0 = EOF; negative = error.
                    self.close_now(key)?;
                }
                self.finish_if_idle(key);
                Ok(())
            }
            Some(&Op::Send { key, .. }) => {
                let Op::Send { buf, offset, .. } = &mut self.ops[op] else {
                    unreachable!()
                };
                let before = *offset;
                if result > 0 {
                    *offset += result as usize;
                }
                let (done, total) = (*offset, buf.len());
                let active = self
                    .conns
                    .get(key)
                    .is_some_and(|c| c.phase != Phase::Closing);
                if result > 0 {
                    LoopStats::add(&self.stats.bytes_out, result as u64);
                    if active {
                        self.report_sent(key, done - before);
                    }
                    if done < total && active {
                        // Short send: the rest goes from the same buffer, same op.
                        let fd = self.conns[key].stream.as_raw_fd();
                        return self.submit_send(op, fd);
                    }
                }
                let Op::Send { buf, .. } = self.ops.remove(op) else {
                    unreachable!()
                };
                if active && done < total {
                    // Failed: whatever was not sent is gone with the connection.
                    self.report_sent(key, total - done);
                }
                if self.spare.len() < 64 && buf.capacity() <= 256 * 1024 {
                    self.spare.push(buf);
                }
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.send_op = None;
                }
                if result <= 0 && result != -libc::ECANCELED && active {
                    self.close_now(key)?;
                } else if active {
                    self.dirty.push(key);
                }
                self.finish_if_idle(key);
                Ok(())
            }
        }
    }

    fn report_sent(&mut self, key: usize, n: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let generation = conn.generation;
        let Some(session) = conn.session.as_mut() else {
            return;
        };
        let mut io = Io::new(Instant::now(), key, generation, &self.remote);
        self.service.sent(session, &mut io, n);
        let (deadline, close) = (io.deadline, io.close);
        self.apply(key, deadline, close);
    }

    fn received(&mut self, key: usize, bid: u16, len: usize) {
        LoopStats::add(&self.stats.bytes_in, len as u64);
        let bufs = self
            .bufs
            .as_mut()
            .expect("buffer ring lives as long as the loop");
        if let Some(conn) = self.conns.get_mut(key)
            && conn.phase == Phase::Active
            && let Some(session) = conn.session.as_mut()
        {
            let data = bufs.buffer(bid, len);
            let mut io = Io::new(Instant::now(), key, conn.generation, &self.remote);
            self.service.read(session, &mut io, data);
            let (deadline, close) = (io.deadline, io.close);
            bufs.recycle(bid);
            if self.apply(key, deadline, close) {
                self.dirty.push(key);
            }
        } else {
            bufs.recycle(bid);
        }
    }

    fn admit(&mut self, stream: TcpStream) -> io::Result<()> {
        let Ok(peer) = stream.peer_addr() else {
            return Ok(());
        };
        self.register(stream, peer, None)
    }

    /// Starts an outgoing connection: a non-blocking connect; the kernel's recv and send
    /// on the socket wait for it to complete.
    fn connect(&mut self, addr: std::net::SocketAddr, command: S::Command) -> io::Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        let started = (|| {
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
            Ok(stream) => self.register(stream, addr, Some(command)),
            Err(e) => {
                let mut io = Io::new(Instant::now(), usize::MAX, 0, &self.remote);
                self.service.connect_failed(&mut io, command, e);
                Ok(())
            }
        }
    }

    /// Adds a socket to the loop: accepted (`command` is `None`, subject to
    /// `max_connections`) or outgoing.
    fn register(
        &mut self,
        mut stream: TcpStream,
        peer: std::net::SocketAddr,
        command: Option<S::Command>,
    ) -> io::Result<()> {
        let connections = &self.config.connections;
        if connections.fetch_add(1, Ordering::AcqRel) >= self.config.max_connections
            && command.is_none()
        {
            connections.fetch_sub(1, Ordering::AcqRel);
            LoopStats::add(&self.stats.connections_refused, 1);
            // A fresh socket's send buffer takes a short response whole.
            let _ = stream.write(&self.service.over_capacity());
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        let _ = stream.set_nodelay(true);
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let key = self.conns.insert(Conn {
            stream,
            session: None,
            generation,
            deadline: Deadline::default(),
            close_requested: false,
            phase: Phase::Active,
            recv_op: None,
            send_op: None,
            backlogged: false,
        });
        let mut io = Io::new(Instant::now(), key, generation, &self.remote);
        let session = match command {
            None => self.service.open(&mut io, peer),
            Some(command) => self.service.connected(&mut io, peer, command),
        };
        let (deadline, close) = (io.deadline, io.close);
        self.conns[key].session = Some(session);
        self.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        LoopStats::add(&self.stats.connections_total, 1);
        if self.apply(key, deadline, close) {
            self.arm_recv(key)?;
            // An outgoing connection has its upgrade request to send.
            self.dirty.push(key);
        }
        Ok(())
    }

    /// Applies what a service call asked for. Returns false if the connection is closing.
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
                // Errors here only concern pushing the cancel; the loop reports them later.
                let _ = self.close_now(key);
                false
            }
            CloseRequest::AfterFlush => {
                conn.close_requested = true;
                true
            }
        }
    }

    /// Starts a send of everything the session has queued, if none is in flight.
    fn flush(&mut self, key: usize) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if conn.phase == Phase::Closing {
            return Ok(());
        }
        let Some(session) = conn.session.as_mut() else {
            return Ok(());
        };
        if conn.send_op.is_some() {
            if !self.service.output(session).is_empty() {
                conn.backlogged = true;
            }
            return Ok(());
        }
        let spare = self.spare.pop().unwrap_or_default();
        let mut io = Io::new(Instant::now(), key, conn.generation, &self.remote);
        let taken = self.service.take_output(session, &mut io, spare);
        let (deadline, close) = (io.deadline, io.close);
        let fd = conn.stream.as_raw_fd();
        match taken {
            Some(buf) => {
                let op = self.ops.insert(Op::Send {
                    key,
                    buf,
                    offset: 0,
                });
                self.conns[key].send_op = Some(op);
                self.submit_send(op, fd)?;
                self.apply(key, deadline, close);
            }
            None => {
                if !self.apply(key, deadline, close) {
                    return Ok(());
                }
                let conn = &mut self.conns[key];
                if conn.backlogged {
                    conn.backlogged = false;
                    let generation = conn.generation;
                    if let Some(session) = conn.session.as_mut() {
                        let mut io = Io::new(Instant::now(), key, generation, &self.remote);
                        self.service.drained(session, &mut io);
                        let (deadline, close) = (io.deadline, io.close);
                        if self.apply(key, deadline, close) {
                            self.dirty.push(key);
                        }
                        return Ok(());
                    }
                }
                let conn = &mut self.conns[key];
                if conn.close_requested && conn.phase == Phase::Active {
                    // The server closes TCP first, then lingers for the peer's FIN.
                    let _ = conn.stream.shutdown(Shutdown::Write);
                    conn.phase = Phase::Lingering;
                    self.apply(key, Some(Some(Instant::now() + LINGER)), CloseRequest::Keep);
                }
            }
        }
        Ok(())
    }

    /// Ends the connection for the service now; the socket closes once no operation
    /// references it.
    fn close_now(&mut self, key: usize) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if conn.phase == Phase::Closing {
            return Ok(());
        }
        conn.phase = Phase::Closing;
        conn.deadline.clear();
        let generation = conn.generation;
        let session = conn.session.take();
        // Make in-flight sends fail fast and recvs end.
        let _ = conn.stream.shutdown(Shutdown::Both);
        let recv_op = conn.recv_op;
        self.config.connections.fetch_sub(1, Ordering::AcqRel);
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        if let Some(session) = session {
            let mut io = Io::new(Instant::now(), key, generation, &self.remote);
            self.service.closed(session, &mut io);
        }
        if let Some(recv) = recv_op {
            let cancel = self.ops.insert(Op::Cancel);
            self.push(
                opcode::AsyncCancel::new(recv as u64)
                    .build()
                    .user_data(cancel as u64),
            )?;
        }
        self.finish_if_idle(key);
        Ok(())
    }

    /// Frees a closing connection (and closes its socket) once no operation refers to it.
    fn finish_if_idle(&mut self, key: usize) {
        if let Some(conn) = self.conns.get(key)
            && conn.phase == Phase::Closing
            && conn.recv_op.is_none()
            && conn.send_op.is_none()
        {
            self.conns.remove(key);
        }
    }

    fn expire_timers(&mut self, now: Instant) -> io::Result<()> {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(now, &mut due);
        for entry in due.drain(..) {
            let Some(conn) = self.conns.get_mut(entry.key) else {
                continue;
            };
            if conn.phase == Phase::Closing || !self.wheel.fires(entry, &mut conn.deadline, now) {
                continue;
            }
            if conn.phase == Phase::Lingering {
                self.close_now(entry.key)?;
                continue;
            }
            let generation = conn.generation;
            let Some(session) = conn.session.as_mut() else {
                continue;
            };
            let mut io = Io::new(now, entry.key, generation, &self.remote);
            self.service.timeout(session, &mut io);
            let (deadline, close) = (io.deadline, io.close);
            if self.apply(entry.key, deadline, close) {
                self.flush(entry.key)?;
            }
        }
        self.due = due;
        Ok(())
    }

    fn drain_remote(&mut self) -> io::Result<()> {
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
                    let Some(session) = conn.session.as_mut() else {
                        continue;
                    };
                    let mut io = Io::new(Instant::now(), key, generation, &self.remote);
                    self.service.command(session, &mut io, command);
                    let (deadline, close) = (io.deadline, io.close);
                    if self.apply(key, deadline, close) {
                        self.dirty.push(key);
                    }
                }
                Envelope::Connect { addr, command } => self.connect(addr, command)?,
                Envelope::Shutdown { deadline } => self.begin_shutdown(deadline)?,
            }
        }
        Ok(())
    }

    fn begin_shutdown(&mut self, deadline: Instant) -> io::Result<()> {
        if let Some(op) = self.accept_op.take() {
            let cancel = self.ops.insert(Op::Cancel);
            self.push(
                opcode::AsyncCancel::new(op as u64)
                    .build()
                    .user_data(cancel as u64),
            )?;
        }
        self.listener = None;
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
            let generation = conn.generation;
            let Some(session) = conn.session.as_mut() else {
                continue;
            };
            let mut io = Io::new(Instant::now(), key, generation, &self.remote);
            self.service.shutdown(session, &mut io);
            let (deadline, close) = (io.deadline, io.close);
            if self.apply(key, deadline, close) {
                self.dirty.push(key);
            }
        }
        Ok(())
    }

    /// Cancels every operation, reaps their completions and unregisters the buffer ring,
    /// so no kernel reference to loop memory outlives the loop.
    fn quiesce(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let _ = self.close_now(key);
        }
        let _ = self.ring.submit();
        let _ = self.ring.submitter().register_sync_cancel(
            Some(Timespec::from(Duration::from_secs(1))),
            CancelBuilder::any(),
        );
        // Reap until every op has completed (bounded: sync cancel already waited).
        for _ in 0..100 {
            let pending: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (user_data, _, flags) in pending {
                if !cqueue::more(flags) && self.ops.contains(user_data as usize) {
                    self.ops.remove(user_data as usize);
                }
            }
            if self.ops.is_empty() {
                break;
            }
            let ts = Timespec::from(Duration::from_millis(10));
            let _ = self
                .ring
                .submitter()
                .submit_with_args(1, &SubmitArgs::new().timespec(&ts));
        }
        if let Some(bufs) = self.bufs.take() {
            if self.ops.is_empty() {
                bufs.unregister(&self.ring);
            } else {
                std::mem::forget(bufs);
            }
        }
    }
}
