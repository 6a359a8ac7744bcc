//! Getting jobs to their upstream: in order per contact, paced, retried.

pub mod contact_locks;
pub mod dedup;
pub mod echoes;
pub mod immediate;
pub mod inbound;
pub mod outbound;
pub mod pacing;
pub mod profiles;

pub use echoes::EchoLedger;
pub use immediate::{DeliveryFailure, ImmediateDelivery};
pub use inbound::{ForwardReport, InboundForwarder};
pub use outbound::{AttemptOutcome, OutboundJob, OutboundSender};
pub use profiles::Profiles;
