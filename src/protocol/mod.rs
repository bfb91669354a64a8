//! The sans-IO protocol layer: RFC 6455 framing, handshake and the connection state
//! machine. No IO, no clock, no threads; `unsafe` nowhere (the unmask kernel is safe code).

pub mod deflate;
pub mod driver;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod options;
pub mod utf8;
