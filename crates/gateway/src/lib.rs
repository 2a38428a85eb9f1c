//! send-gateway: a proxy in front of the Nylas v3 API that lets a send through only when the
//! sending grant stays inside its provider's limits.
//!
//! # Layout
//! - [`send`]: which requests send mail, and what a send costs.

pub mod send;
