//! What the kernel says of a TCP socket's output delivery (`TCP_INFO`), asked at an idle
//! deadline so that a peer slowly reading a long download is not taken for a silent one
//! (see [`Delivery`]).

use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;

use crate::session::Delivery;

/// How the output of `socket` is being delivered, for the idle keepalive: the kernel's view
/// (see [`delivery`]), with `ours_waiting` (output still in our own buffers, which waits for
/// the peer as much as the kernel's does) added to its backlog. `None` where the kernel
/// cannot tell.
pub(crate) fn delivery_with_ours(socket: BorrowedFd<'_>, ours_waiting: bool) -> Option<Delivery> {
    delivery(socket).ok().map(|kernel| Delivery {
        backlog: kernel.backlog || ours_waiting,
        ..kernel
    })
}

/// Elsewhere the kernel is not asked: only input counts as life there.
#[cfg(not(target_os = "linux"))]
pub(crate) fn delivery(_socket: BorrowedFd<'_>) -> io::Result<Delivery> {
    Err(io::ErrorKind::Unsupported.into())
}

/// The socket's delivery state: bytes the peer acknowledged in all, and whether the kernel
/// still holds output of ours (unsent, or unacknowledged). Our own buffers are the
/// caller's to add to [`Delivery::backlog`].
#[cfg(target_os = "linux")]
pub(crate) fn delivery(socket: BorrowedFd<'_>) -> io::Result<Delivery> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed from a live socket for the call; `info` is a
    // zeroed local `tcp_info` and `len` its size, so the kernel writes at most that many
    // bytes into it (an older kernel writes fewer and leaves the rest zero).
    #[allow(unsafe_code)]
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: every field of `tcp_info` is an integer, so the zeroed value, however much
    // of it the kernel overwrote, is a valid one.
    #[allow(unsafe_code)]
    let info = unsafe { info.assume_init() };
    Ok(Delivery {
        acked: info.tcpi_bytes_acked,
        backlog: info.tcpi_unacked > 0 || info.tcpi_notsent_bytes > 0,
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// Polls the sender's delivery until `check` holds (2 s at most).
    fn until(stream: &TcpStream, check: impl Fn(&Delivery) -> bool) -> Delivery {
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let d = delivery(stream.as_fd()).unwrap();
            if check(&d) || Instant::now() > end {
                return d;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn counts_what_the_peer_acknowledged_and_what_waits() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        socket2::SockRef::from(&receiver)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        let fresh = delivery(sender.as_fd()).unwrap();
        assert!(!fresh.backlog, "nothing sent, nothing waits: {fresh:?}");
        // A small write is acknowledged in full and leaves nothing waiting.
        (&sender).write_all(&[1; 1000]).unwrap();
        let small = until(&sender, |d| !d.backlog);
        assert_eq!(small.acked, fresh.acked + 1000, "{small:?}");
        // More than the receiver's buffer takes: some waits, and the count stops.
        sender.set_nonblocking(true).unwrap();
        let mut sent = 1000u64;
        while let Ok(n) = (&sender).write(&[2; 64 * 1024]) {
            sent += n as u64;
        }
        std::thread::sleep(Duration::from_millis(100));
        let stalled = delivery(sender.as_fd()).unwrap();
        assert!(stalled.backlog, "{stalled:?}");
        assert!(stalled.acked < fresh.acked + sent, "{stalled:?} of {sent}");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(delivery(sender.as_fd()).unwrap().acked, stalled.acked);
        // The receiver reads: the count moves.
        let mut buf = vec![0; 64 * 1024];
        let mut read = 0;
        while read < 32 * 1024 {
            read += receiver.read(&mut buf).unwrap();
        }
        let moved = until(&sender, |d| d.acked > stalled.acked);
        assert!(moved.acked > stalled.acked, "{moved:?} after {stalled:?}");
    }
}
