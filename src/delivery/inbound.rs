//! One attempt at an inbound job: posting a BonyChat event to the Webhook URL (SPEC §4.3).

use std::sync::Arc;

use super::profiles::Profiles;
use crate::clients::{BonyChatApi, SendError};
use crate::domain::bonychat::{WebhookEvent, WebhookPost};

pub struct InboundPoster {
    bonychat: Arc<dyn BonyChatApi>,
    channel_id: String,
    profiles: Option<Profiles>,
}

/// What an attempt did besides succeeding or failing.
#[derive(Debug)]
pub struct PostOutcome {
    pub result: Result<(), SendError>,
    /// The post introduced the contact to BonyChat (it carried, or could have carried, a profile).
    pub introduced: bool,
}

impl InboundPoster {
    pub fn new(bonychat: Arc<dyn BonyChatApi>, channel_id: String, profiles: Option<Profiles>) -> Self {
        Self { bonychat, channel_id, profiles }
    }

    /// Posts `event` about `contact`; the first message of a contact BonyChat does not know yet
    /// carries its profile when look-ups are on. `None`, nothing posted, when `claim_held` no
    /// longer says so once the post is ready to leave.
    pub async fn attempt(
        &self,
        contact: &str,
        event: WebhookEvent,
        contact_introduced: bool,
        claim_held: &(dyn Fn() -> bool + Sync),
    ) -> Option<PostOutcome> {
        let introduces = self.profiles.is_some()
            && !contact_introduced
            && matches!(event, WebhookEvent::Message { .. } | WebhookEvent::MessageEcho { .. });
        let profile = match (&self.profiles, introduces) {
            (Some(profiles), true) => profiles.profile(contact).await,
            _ => None,
        };
        let post = WebhookPost {
            channel_id: self.channel_id.clone(),
            contact_id: contact.to_owned(),
            events: vec![event],
            contact: profile,
        };
        if !claim_held() {
            return None;
        }
        Some(PostOutcome { result: self.bonychat.post(&post).await, introduced: introduces })
    }
}
