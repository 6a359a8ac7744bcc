//! The relay's pure core: parsing, validation and translation between the two protocols.
//!
//! Nothing here performs I/O or knows about axum, reqwest or the store; everything is a
//! function from values to values, unit- and property-tested on its own.

pub mod bonychat;
pub mod channel;
pub mod inbound;
pub mod joinchat;
pub mod outbound;
pub mod split;
pub mod text;
