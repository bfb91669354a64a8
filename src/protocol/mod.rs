//! The sans-IO protocol layer: RFC 6455 framing, handshake and the connection state
//! machine. No IO, no clock, no threads; `unsafe` only where the unmask kernel enters its
//! AVX-512 or AVX2 build after the CPU check (`mask`).

pub mod deflate;
pub mod driver;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod options;
pub mod utf8;
