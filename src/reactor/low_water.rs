//! A socket's receive low-water mark (`SO_RCVLOWAT`), raised while the rest of a large
//! frame is being received straight into its message's buffer.
//!
//! Over loopback, TCP delivers a large frame in segments of up to 64 KiB, and every one
//! of them woke the loop for a receive of its own; the peer's kernel paid for each
//! wake-up too (a wake-up of another CPU is its most expensive part, worst in a VM). With
//! the mark at [`LOW_WATER`], Linux signals readability (to epoll, or to a receive
//! io_uring waits on) only once that many bytes are queued, so a piece is taken every two
//! segments, while its copy still overlaps the arrival of the next piece. Waiting for
//! the whole rest of a frame loses that overlap: at 1 × 1 MiB, a mark of 128 KiB made
//! 8 % more echoes per second than none, 256 KiB 5 %, 1 MiB and 64 KiB nothing.
//!
//! The mark is never above what the frame still owes (it is raised only while at least
//! [`LOW_WATER`] bytes of it are to come, and lowered back to 1 before fewer are), so
//! what the peer must send is always enough to reach it. Lowering it signals at once if
//! bytes are already queued (the kernel checks), so nothing waits on a stale mark. Not
//! while an idle keepalive runs: that must hear of input as it arrives.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The mark while a large frame's rest is being received; see the module documentation.
pub(crate) const LOW_WATER: usize = 128 * 1024;

/// The mark for `to_come` bytes still owed by the frame being received: [`LOW_WATER`]
/// while at least that many are, else 1 (Linux's default: any byte).
pub(crate) fn low_water_for(to_come: u64) -> usize {
    if to_come >= LOW_WATER as u64 {
        LOW_WATER
    } else {
        1
    }
}

/// Sets `socket`'s `SO_RCVLOWAT` to `bytes`.
pub(crate) fn set_low_water(socket: &impl AsFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is borrowed from a live socket for the call; `value` is a
    // local `c_int` and the length passed is its size, which is what `SO_RCVLOWAT` reads.
    #[allow(unsafe_code)]
    let result = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match result {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use mio::{Events, Interest, Poll, Token};

    /// Whether `poll` reports the registered socket readable within 100 ms.
    fn readable(poll: &mut Poll, events: &mut Events) -> bool {
        poll.poll(events, Some(Duration::from_millis(100))).unwrap();
        let readable = events.iter().any(|e| e.is_readable());
        events.clear();
        readable
    }

    /// With the mark raised, fewer bytes raise no readiness; reaching it does; lowering
    /// it with bytes queued signals at once. Checked on the kernel, not assumed.
    #[test]
    fn readiness_waits_for_the_mark_and_lowering_it_signals() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (reader, _) = listener.accept().unwrap();
        reader.set_nonblocking(true).unwrap();
        let mut reader = mio::net::TcpStream::from_std(reader);
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(4);
        set_low_water(&reader, 200).unwrap();
        poll.registry()
            .register(&mut reader, Token(0), Interest::READABLE)
            .unwrap();
        assert!(!readable(&mut poll, &mut events), "nothing sent");

        writer.write_all(&[1; 100]).unwrap();
        assert!(!readable(&mut poll, &mut events), "100 bytes of 200");
        writer.write_all(&[2; 100]).unwrap();
        assert!(readable(&mut poll, &mut events), "200 bytes of 200");

        // Edge-triggered: drain, then queue less than the mark again.
        let mut buf = [0; 512];
        assert_eq!(std::io::Read::read(&mut reader, &mut buf).unwrap(), 200);
        writer.write_all(&[3; 10]).unwrap();
        assert!(!readable(&mut poll, &mut events), "10 bytes of 200");
        set_low_water(&reader, 1).unwrap();
        assert!(readable(&mut poll, &mut events), "lowered with 10 queued");
    }

    #[test]
    fn the_mark_is_raised_only_for_what_is_owed() {
        assert_eq!(low_water_for(0), 1);
        assert_eq!(low_water_for(LOW_WATER as u64 - 1), 1);
        assert_eq!(low_water_for(LOW_WATER as u64), LOW_WATER);
        assert_eq!(low_water_for(64 << 20), LOW_WATER);
    }
}
