//! Getting jobs to their upstream: in order per contact, paced, retried.

pub mod immediate;
pub mod outbound;
pub mod pacing;

pub use immediate::{DeliveryFailure, ImmediateDelivery};
pub use outbound::{AttemptOutcome, OutboundJob, OutboundSender};
