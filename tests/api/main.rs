//! Integration tests: the real relay on a random port, real HTTP stand-ins for its upstreams.

mod binary;
mod contact_profiles;
mod crash;
mod durable_delivery;
mod helpers;
mod hostile_webhooks;
mod joinchat_answers;
mod message_limits;
mod message_requests;
mod message_translation;
mod messenger_webhook;
mod ordering_and_pacing;
mod serving;
mod store_contract;
