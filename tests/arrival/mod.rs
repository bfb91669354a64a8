//! A transport for the tokio stream's tests: it hands out `input` in reads of the sizes
//! in `cuts` (cycled), returning `Pending` (and waking at once) between two reads, and
//! records what is written. Once `input` is all read it waits for good, or (`eof`) ends
//! the stream: cleanly, or (`fail`) with an error.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Arrival {
    pub input: Vec<u8>,
    pub at: usize,
    pub cuts: Vec<usize>,
    pub next_cut: usize,
    pub pending_next: bool,
    pub eof: bool,
    pub fail: bool,
    pub written: Vec<u8>,
}

impl AsyncRead for Arrival {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at == self.input.len() {
            if self.eof {
                if self.fail {
                    return Poll::Ready(Err(std::io::Error::other("transport reset")));
                }
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
        if self.pending_next {
            self.pending_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let cut = self.cuts[self.next_cut % self.cuts.len()];
        self.next_cut += 1;
        let n = cut.min(buf.remaining()).min(self.input.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        self.pending_next = true;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Arrival {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let mut n = 0;
        for b in bufs {
            self.written.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Arrival {
    /// `input` in reads of `cuts`, then waiting for good.
    pub fn new(input: Vec<u8>, cuts: Vec<usize>) -> Arrival {
        Arrival {
            input,
            at: 0,
            cuts,
            next_cut: 0,
            pending_next: false,
            eof: false,
            fail: false,
            written: Vec::new(),
        }
    }
}

/// What one poll of the stream gave: `None` pending, `Some(None)` the stream's end,
/// `Some(Some(kept))` an event, with what the test keeps of it (if anything).
pub type Polled<T> = Option<Option<Option<T>>>;

/// Polls `ws` with `poll` until the stream ends, `done` says so of what was kept, or 100
/// polls in a row neither read from the transport nor gave an event; returns what the
/// events gave.
pub fn drive<T>(
    ws: &mut websocket_driver::tokio::WebSocketStream<Arrival>,
    mut poll: impl FnMut(&mut websocket_driver::tokio::WebSocketStream<Arrival>) -> Polled<T>,
    done: impl Fn(&[T]) -> bool,
) -> Vec<T> {
    let mut kept = Vec::new();
    // Polls in a row that neither read nor gave an event (each read is one poll).
    let mut idle = 0;
    let mut read_to = 0;
    while !done(&kept) && idle < 100 {
        match poll(ws) {
            Some(Some(Some(k))) => {
                idle = 0;
                kept.push(k);
            }
            Some(Some(None)) => idle = 0,
            Some(None) => break,
            None if ws.get_ref().at != read_to => {
                read_to = ws.get_ref().at;
                idle = 0;
            }
            None => idle += 1,
        }
    }
    kept
}
