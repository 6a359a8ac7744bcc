//! bonychat-relay: a BonyChat Custom Channel for a Facebook Page run through JoinChat.
//!
//! BonyChat's `POST /message` is validated, translated into signed JoinChat Send API requests
//! and delivered in order per contact. The layout follows the flow of a message:
//! [`config`] → [`routes`] (HTTP) → [`domain`] (pure translation) → [`delivery`] → [`clients`]
//! (upstreams behind traits), with [`startup`] wiring them together; [`cli`] holds the
//! binary's commands, `serve` and the operator's tools.

pub mod auth;
pub mod cli;
pub mod clients;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod monitoring;
pub mod rotation;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod signing;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod traces;

/// The future a trait method returns where the trait must stay object-safe (the store, the
/// upstream clients).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
