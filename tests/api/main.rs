//! Integration tests: the real relay on a random port, real HTTP stand-ins for its upstreams.

mod binary;
mod config_faults;
mod contact_profiles;
mod crash;
mod database_away;
mod durable_delivery;
mod healthcheck;
mod helpers;
mod hostile_clients;
mod hostile_webhooks;
mod joinchat_answers;
mod lost_claims;
mod message_limits;
mod message_requests;
mod message_translation;
mod messenger_webhook;
mod metrics;
mod ordering_and_pacing;
mod postgres;
mod queue_safety;
mod replica_clocks;
mod replicas;
mod sandbox;
mod serving;
mod store_contract;
mod store_faults;
