//! The hyper adapter (`--features hyper`).
#![cfg(feature = "hyper")]
