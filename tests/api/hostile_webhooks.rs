//! `/webhooks/messenger` with input BonyChat would refuse or misread: the relay acknowledges it
//! to Meta and forwards only what BonyChat can take, with times it can believe.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use bonychat_relay::store::JobState;

use crate::helpers::{PAGE_ID, PSID, spawn_app};

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis().try_into().unwrap()
}

fn text_from(sender: &str, mid: &str, timestamp: i64) -> Value {
    json!({"sender": {"id": sender}, "recipient": {"id": PAGE_ID}, "timestamp": timestamp,
           "message": {"mid": mid, "text": format!("text of {mid}")}})
}

#[tokio::test]
async fn refused_contact_ids_are_dropped_and_insane_times_replaced_while_meta_gets_200() {
    let app = spawn_app().await;
    let year_3000 = 32_503_680_000_000_i64;
    let too_long = "1".repeat(51);
    let body = json!({"object": "page", "entry": [
        {"id": PAGE_ID, "time": 1_700_000_000_000_i64, "messaging": [
            text_from(PSID, "m_valid", 1_700_000_000_100),
            text_from(&too_long, "m_long_sender", 1_700_000_000_200),
            text_from("2222222222222222", "m_far_future", year_3000),
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1_700_000_000_300_i64,
             "read": {"watermark": year_3000}}
        ]},
        // An entry whose own time is insane too: the receipt time is all that is left.
        {"id": PAGE_ID, "time": year_3000, "messaging": [text_from("3333333333333333", "m_no_sane_time", -1)]}
    ]});

    let before = now_millis();
    let response = app.post_webhook(body.to_string()).await;
    let after = now_millis();

    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["received"], 3, "{answer}");
    assert_eq!(answer["queued"], 3, "{answer}");
    assert_eq!(answer["receipts"], 0, "the far-future watermark is not acted on: {answer}");

    let mut got: Vec<(String, String, i64)> = app
        .bonychat_posts()
        .await
        .iter()
        .flat_map(|post| {
            let contact = post["contactId"].as_str().unwrap().to_owned();
            post["events"].as_array().unwrap().iter().map(move |event| {
                (contact.clone(), event["mId"].as_str().unwrap().to_owned(), event["timestamp"].as_i64().unwrap())
            })
        })
        .collect();
    got.sort_by(|a, b| a.1.cmp(&b.1));
    let [far_future, no_sane_time, valid] = got.as_slice() else { panic!("{got:?}") };
    assert_eq!(valid, &(PSID.to_owned(), "m_valid".to_owned(), 1_700_000_000_100));
    assert_eq!(far_future, &("2222222222222222".to_owned(), "m_far_future".to_owned(), 1_700_000_000_000));
    assert_eq!((no_sane_time.0.as_str(), no_sane_time.1.as_str()), ("3333333333333333", "m_no_sane_time"));
    assert!((before..=after).contains(&no_sane_time.2), "receipt time expected, got {}", no_sane_time.2);

    assert!(app.jobs(JobState::Dead).await.is_empty(), "nothing BonyChat refused was queued");
    app.stop().await;
}
