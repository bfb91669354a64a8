//! A hosted client connection's HTTP `CONNECT` tunnel, opened through a proxy before the
//! WebSocket handshake (and TLS, for wss) runs inside it. The parsing is
//! `session::proxy`'s; this holds the connection's parts until the tunnel is open.

use crate::protocol::driver::Driver;
use crate::protocol::error::HandshakeError;
use crate::protocol::frame::Status;
use crate::session::proxy;

/// What the proxy's answer did to the tunnel.
pub(super) enum Progress {
    /// More of the proxy's answer is needed.
    Pending,
    /// A 2xx: the tunnel is open; the bytes that came after the proxy's head belong to
    /// the WebSocket server.
    Open(Vec<u8>),
    /// Not a 2xx, or not HTTP.
    Refused(HandshakeError),
}

pub(super) struct Tunnel<H> {
    request: Vec<u8>,
    written: usize,
    head: Vec<u8>,
    pub driver: Driver,
    pub handler: H,
    #[cfg(feature = "tls")]
    pub tls: Option<Box<crate::tls::TlsStream>>,
}

impl<H> Tunnel<H> {
    /// A tunnel that sends `request` (the `CONNECT` head) first.
    pub fn new(
        request: Vec<u8>,
        driver: Driver,
        handler: H,
        #[cfg(feature = "tls")] tls: Option<Box<crate::tls::TlsStream>>,
    ) -> Tunnel<H> {
        Tunnel {
            request,
            written: 0,
            head: Vec::new(),
            driver,
            handler,
            #[cfg(feature = "tls")]
            tls,
        }
    }

    /// What is left of the `CONNECT` request.
    pub fn output(&self) -> &[u8] {
        &self.request[self.written..]
    }

    /// `n` bytes of [`Tunnel::output`] were written.
    pub fn consume(&mut self, n: usize) {
        self.written += n;
    }

    /// The rest of the request as an owned buffer (completion backends).
    pub fn take_output(&mut self) -> Option<Vec<u8>> {
        let mut rest = std::mem::take(&mut self.request);
        rest.drain(..self.written);
        self.written = 0;
        (!rest.is_empty()).then_some(rest)
    }

    /// Bytes from the proxy.
    pub fn receive(&mut self, data: &[u8]) -> Progress {
        self.head.extend_from_slice(data);
        match proxy::parse_response(&self.head) {
            Ok(Status::Partial) => Progress::Pending,
            Ok(Status::Complete(_, used)) => Progress::Open(self.head.split_off(used)),
            Err(e) => Progress::Refused(e),
        }
    }
}
