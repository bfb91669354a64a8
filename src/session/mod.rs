//! The sans-IO session layer, between the runtimes and [`protocol`](crate::protocol):
//! what every runtime does around a [`Driver`](crate::Driver), written once.
//!
//! - [`upgrade`]: the server's opening handshake, from a parsed request and the
//!   application's decision to a server driver or an HTTP refusal ([`answer`]).
//! - [`pongs`]: what waits for a pong, and which pings a pong answers ([`PongWaiters`]).
//! - [`timers`]: every per-connection deadline (opening and close handshake, idle
//!   keepalive, backpressure grace) as one state machine with time as an input
//!   ([`Timers`]).
//!
//! Like the protocol layer it does no IO, reads no clock, spawns nothing and has no
//! `unsafe`; it depends on [`protocol`](crate::protocol) only. The runtimes (the reactor's
//! server and client, [`blocking`](crate::blocking), the blocking client, the tokio
//! adapter) feed it what happened and do what it answers.

pub mod pongs;
pub mod proxy;
pub mod timers;
pub mod upgrade;

pub use pongs::PongWaiters;
pub use timers::{Delivery, Expired, TimerConfig, Timers};
pub use upgrade::{Answer, HttpResponse, NonUpgrade, Refusal, answer};
