//! TLS 1.3 for every DWCP stream.
//!
//! A [`Security`] says how an endpoint protects its streams: mutual X.509 certificates, a
//! pre-shared key inside TLS, or (only by explicit choice) plain text. The engine secures each
//! transport connection right after it is opened or accepted ([`Security::connect`],
//! [`Security::accept`]): the TLS handshake runs to completion within a deadline, then the DWCP
//! stream handshake (versions, capabilities, session) runs inside the TLS session with a key bound to
//! it ([`Secured::handshake_key`]), and every frame after that travels in TLS records. The resulting
//! [`TlsConn`] is an ordinary `dwcp_core::transport::Conn`, so lanes, the connection pool and the
//! QEMU tunnel use it unchanged, over TCP or any other transport. [`certs`] issues what certificate
//! mode needs. Cryptography is rustls with the aws-lc-rs provider (docs/security.md says why).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod certs;
mod security;
mod stream;

pub use security::{Secured, Security, SecurityMode, looks_like_tls};
pub use stream::TlsConn;
