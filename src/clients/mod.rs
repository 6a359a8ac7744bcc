//! Upstream clients, each behind a trait so that delivery code never builds HTTP requests.
//!
//! Implementations classify every failure as [`SendError::Transient`] (worth retrying),
//! [`SendError::Permanent`] (retrying would give the same answer) or, for JoinChat only,
//! [`SendError::Throttled`] (Meta asks the Page to slow down).

pub mod bonychat;
pub mod graph;
pub mod http;
pub mod joinchat;

use std::time::Duration;

use crate::domain::bonychat::{ContactProfile, WebhookPost};
use crate::domain::joinchat::SendRequest;

pub use crate::BoxFuture;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The upstream refused the request for good; `reason` is its own explanation, `status`
    /// the HTTP status it answered with (a JoinChat `success: false` comes with a 200).
    #[error("{reason}")]
    Permanent { reason: String, status: Option<u16> },
    /// A timeout, a connection failure, a 5xx, 408 or 429: another attempt may succeed.
    #[error("{reason}")]
    Transient {
        reason: String,
        /// The upstream's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
        /// The HTTP status it answered with, when it answered.
        status: Option<u16>,
    },
    /// JoinChat answered 429, or passed on one of Meta's rate-limit codes: the channel sends
    /// too fast. Not the message's fault, so it costs the message none of its retries.
    #[error("{reason}")]
    Throttled { reason: String, retry_after: Option<Duration>, status: Option<u16> },
}

impl SendError {
    /// The HTTP status the upstream answered with; `None` when no answer came (a timeout, a
    /// connection refused) or the failure was the relay's own (its store).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Permanent { status, .. } | Self::Transient { status, .. } | Self::Throttled { status, .. } => *status,
        }
    }
}

/// JoinChat's Send API.
pub trait JoinChatApi: Send + Sync {
    /// Sends one signed `send_message` request; `Ok` once JoinChat accepted it.
    fn send<'a>(&'a self, request: &'a SendRequest<'a>) -> BoxFuture<'a, Result<(), SendError>>;
}

/// BonyChat's Webhook URL.
pub trait BonyChatApi: Send + Sync {
    /// Posts one webhook body; `Ok` once BonyChat accepted it.
    fn post<'a>(&'a self, post: &'a WebhookPost) -> BoxFuture<'a, Result<(), SendError>>;
}

/// Public profiles of Messenger users.
pub trait ProfileLookup: Send + Sync {
    /// The profile of the user `psid`, or why it could not be had.
    fn profile<'a>(&'a self, psid: &'a str) -> BoxFuture<'a, Result<ContactProfile, LookupError>>;
}

/// Why a profile look-up failed, and where it went: what its log line tells the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct LookupError {
    /// The URL asked, its access token hidden ([`shown_url`](crate::config::shown_url)).
    pub url: String,
    /// The HTTP status the Graph API answered with, when it answered.
    pub status: Option<u16>,
    pub reason: String,
}
