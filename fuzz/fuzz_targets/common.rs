//! What the targets share: the handshake targets' read chunking (`Chunks`); for `stream`
//! and `deflate`, the fuzz input read as a list of operation arguments (bytes taken from
//! the front, payloads padded when the input runs short, so long payloads need no long
//! inputs), and a real opening handshake between a client and a server driver.

// Each target uses part of this.
#![allow(dead_code)]

use websocket_driver::protocol::frame::Status;
use websocket_driver::protocol::handshake::{HeadLimits, RequestParser};
use websocket_driver::{Driver, Options};

/// A client and a server driver with `options`: the client's request went through the
/// server's parser and `make_server`, and both started. The server's 101 response is its
/// pending output, not yet read by the client.
pub fn handshake(options: &Options) -> (Driver, Driver) {
    handshake_with(options, options)
}

/// [`handshake`] with the client's and the server's own options.
pub fn handshake_with(client_options: &Options, options: &Options) -> (Driver, Driver) {
    let mut client = Driver::make_client("ws://localhost/", client_options)
        .expect("make_client refused the target's options");
    assert!(client.start_connection());
    let request_bytes = client.pending_output().to_vec();
    client.consume_output(request_bytes.len());
    let mut parser = RequestParser::new(HeadLimits {
        max_size: 4096,
        max_headers: 32,
    });
    let Ok(Status::Complete(request, used)) = parser.parse(&request_bytes) else {
        panic!("the client's request does not parse");
    };
    assert_eq!(used, request_bytes.len());
    let mut server = Driver::make_server(&request, options)
        .expect("make_server refused the client's own request");
    assert!(server.start_connection());
    (client, server)
}

pub struct Input<'a> {
    pub data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// `len` bytes: taken from the input, then `pad(i)` for each byte `i` it ran short of.
    pub fn padded(&mut self, len: usize, pad: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut v = self.bytes(len).to_vec();
        let have = v.len();
        v.extend((have..len).map(pad));
        v
    }

    /// `len` bytes, padded with `fill`.
    pub fn payload(&mut self, len: usize, fill: u8) -> Vec<u8> {
        self.padded(len, |_| fill)
    }
}

/// Chunk sizes from a tiny LCG: 1..=mode bytes (so small modes drip the head byte by byte).
pub struct Chunks {
    pub mode: u8,
    pub state: u32,
}

impl Chunks {
    pub fn next(&mut self, left: usize) -> usize {
        if self.mode == 0 {
            return left;
        }
        self.state = self.state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let max = match self.mode {
            1..=127 => self.mode as usize,
            _ => (self.mode as usize - 127) * 64,
        };
        (1 + (self.state >> 16) as usize % max).min(left)
    }
}
