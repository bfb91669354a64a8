//! Frames of every size, pipelined, on both reactor backends: they straddle receives
//! (epoll's 64 KiB reads, io_uring's 32 KiB provided buffers) at every offset, and every
//! reply must come back whole and in order.

mod support;

use support::mixed_size_echoes;
use websocket_driver::Backend;

#[test]
fn frames_that_straddle_receives_arrive_whole_on_epoll() {
    mixed_size_echoes(Backend::Epoll);
}

#[test]
fn frames_that_straddle_receives_arrive_whole_on_io_uring() {
    if websocket_driver::reactor::io_uring_support().is_err() {
        return; // No io_uring here: the epoll backend is tested instead.
    }
    mixed_size_echoes(Backend::IoUring);
}
