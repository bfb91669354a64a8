//! The runtime hosted on the reactor: the server ([`server`], re-exported at the crate
//! root as `websocket_driver::server`) and client connections on event loops of their
//! own ([`client::ClientReactor`]), both driving the same per-connection service.

pub(crate) mod client;
pub mod server;
