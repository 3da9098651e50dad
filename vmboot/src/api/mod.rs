//! The control API (`docs/API.md`): the typed requests, responses and errors ([`types`]), the
//! HTTP server on a Unix socket ([`server`]), its client ([`client`], used by `vmpack save`),
//! and the VMM's side of the seam ([`VmControl`] for [`crate::VmHandle`], in `control.rs`).
//!
//! The server, the client and the CLI share the types of [`types`]: a field or an error
//! status changes in one place.

pub mod client;
mod control;
pub mod server;
pub mod types;

pub use client::{ApiClient, ClientError};
pub use server::{ApiServer, ServerOptions, VmControl, MAX_BODY_BYTES, MAX_HEADER_BYTES};
pub use types::*;
