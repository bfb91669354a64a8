//! Echoes driven over raw sockets, for the allocation-counting tests: prebuilt masked
//! frames go out and the replies are read into one fixed buffer, so the test side
//! allocates nothing while the server is being counted. Needs the crate's `counting`
//! module (`tests/support/counting.rs`) next to it.

use std::io::{Read, Write};
use std::net::TcpStream;

/// Rounds of warm-up, then rounds counted.
pub const ROUNDS: usize = 200;

/// A masked binary frame of `size` bytes (payload byte i is i mod 256), as a client sends it.
pub fn masked_frame(size: usize) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82];
    match size {
        0..=125 => frame.push(0x80 | size as u8),
        126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(size as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(size as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend((0..size).map(|i| (i as u8) ^ mask[i % 4]));
    frame
}

/// The length of a server's unmasked binary frame of `size` bytes.
pub fn reply_len(size: usize) -> usize {
    size + match size {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

/// One message from each connection, then each one's echo, read whole and checked.
fn round(streams: &mut [TcpStream], frame: &[u8], reply: &mut [u8], size: usize) {
    for stream in streams.iter_mut() {
        stream.write_all(frame).unwrap();
    }
    let header = reply.len() - size;
    for stream in streams.iter_mut() {
        stream.read_exact(reply).unwrap();
        assert_eq!(reply[0], 0x82, "a binary frame comes back");
        assert_eq!(reply[1] & 0x80, 0, "server frames are not masked");
        assert!(
            reply[header..]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == i as u8)
        );
    }
}

/// Allocations in the whole process over `ROUNDS` echo rounds of `size` bytes on every
/// stream, after `ROUNDS` rounds of warm-up.
pub fn allocations_per_rounds(streams: &mut [TcpStream], size: usize) -> u64 {
    let frame = masked_frame(size);
    let mut reply = vec![0; reply_len(size)];
    for _ in 0..ROUNDS {
        round(streams, &frame, &mut reply, size);
    }
    let before = crate::counting::allocations();
    for _ in 0..ROUNDS {
        round(streams, &frame, &mut reply, size);
    }
    crate::counting::allocations() - before
}
