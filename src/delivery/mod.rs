//! Getting stored jobs to their upstream: in order per contact, paced, retried, dead-lettered.

pub mod breaker;
pub mod channels;
pub mod hold;
pub mod inbound;
pub mod outbound;
pub mod pacing;
pub mod profiles;
pub mod rate;
pub mod retry;
pub mod worker;

pub use inbound::InboundPoster;
pub use outbound::{OutboundSender, new_outbound_job};
pub use profiles::Profiles;
pub use retry::RetrySchedule;
pub use worker::{FirstAttempt, Retries, Worker};
