//! lsvfs key server: releases volume KEKs to enrolled hosts over TLS.
//!
//! Layers, bottom-up:
//! - [`protocol`]: wire types, the signed byte layout, HPKE sealing and
//!   request validation; shared by the client and the server, no I/O.
//! - [`client`] (feature `client`): blocking HTTPS client for the host side.
//! - [`storage`] (feature `server`): the redb database; KEKs encrypted at rest
//!   under the master key; group-committed writes.
//! - [`admin`] (feature `server`): the admin socket protocol, its server
//!   side and its client side.
//! - [`server`] (feature `server`): configuration, the HTTPS routes, startup.
//! - [`secret`]: locked, dump-excluded memory for keys, and process
//!   hardening; used by every lsvfs process that holds key material.
//!
//! docs/PROTOCOL.md specifies the wire protocol byte by byte.

#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "client")]
pub mod client;
pub mod logging;
pub mod protocol;
pub mod secret;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod storage;
