//! `/webhooks/messenger`: handshake, signatures, and what BonyChat receives for each event.

use std::time::Duration;

use serde_json::{Value, json};

use bonychat_relay::store::JobState;

use crate::helpers::{
    APP_SECRET, CHANNEL_ID, PAGE_ID, PSID, Reply, TestApp, VERIFY_TOKEN, assert_error, hub_signature, spawn_app,
    spawn_app_with,
};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/api/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// An envelope for the test Page holding `items` in one entry's `messaging`.
fn envelope(items: Value) -> Vec<u8> {
    json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1_700_000_000_000_i64, "messaging": items}]})
        .to_string()
        .into_bytes()
}

fn from_user(id: &str, mid: &str, timestamp: i64, message: Value) -> Value {
    let mut message = message;
    message["mid"] = json!(mid);
    json!({"sender": {"id": id}, "recipient": {"id": PAGE_ID}, "timestamp": timestamp, "message": message})
}

fn echo_to(id: &str, mid: &str, message: Value) -> Value {
    let mut message = message;
    message["mid"] = json!(mid);
    message["is_echo"] = json!(true);
    message["app_id"] = json!(1_517_776_481_860_111_u64);
    json!({"sender": {"id": PAGE_ID}, "recipient": {"id": id}, "timestamp": 1_700_000_000_500_i64, "message": message})
}

/// Posts a signed body and asserts Meta was answered 200.
async fn deliver(app: &TestApp, body: &[u8]) -> Value {
    let response = app.post_webhook(body).await;
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer
}

/// Everything BonyChat received once every stored job is done.
async fn settled(app: &TestApp) -> Vec<crate::helpers::Received> {
    app.settle().await;
    app.bonychat.received()
}

/// The single event of each post, with the post's contactId alongside.
async fn events(app: &TestApp) -> Vec<(String, Value)> {
    app.bonychat_posts()
        .await
        .into_iter()
        .map(|post| {
            let events = post["events"].as_array().unwrap();
            assert_eq!(events.len(), 1, "one event per post: {post}");
            (post["contactId"].as_str().unwrap().to_owned(), events[0].clone())
        })
        .collect()
}

mod handshake {
    use super::*;

    async fn handshake(app: &TestApp, query: &str) -> reqwest::Response {
        app.http.get(app.url(&format!("/webhooks/messenger{query}"))).send().await.unwrap()
    }

    #[tokio::test]
    async fn the_challenge_is_echoed_as_plain_text_for_the_right_token() {
        let app = spawn_app().await;

        let response =
            handshake(&app, &format!("?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={VERIFY_TOKEN}"))
                .await;

        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        assert_eq!(response.text().await.unwrap(), "1158201444");
        app.stop().await;
    }

    /// The challenge is caller input echoed back: no browser may sniff it into HTML. Nor any
    /// other answer of the public port, errors and unknown paths included.
    #[tokio::test]
    async fn the_challenge_and_every_other_answer_forbid_content_sniffing() {
        let app = spawn_app().await;
        let challenge = "%3Cscript%3Ealert(1)%3C%2Fscript%3E";

        let echoed =
            handshake(&app, &format!("?hub.mode=subscribe&hub.challenge={challenge}&hub.verify_token={VERIFY_TOKEN}"))
                .await;
        let others = [
            handshake(&app, "?hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong").await,
            app.http.get(app.url("/healthz")).send().await.unwrap(),
            app.http.get(app.url("/no/such/path")).send().await.unwrap(),
            app.http.post(app.url("/message")).send().await.unwrap(),
        ];

        assert_eq!(echoed.status(), 200);
        assert_eq!(echoed.headers().get("x-content-type-options").map(|v| v.as_bytes()), Some(&b"nosniff"[..]));
        assert_eq!(echoed.text().await.unwrap(), "<script>alert(1)</script>");
        for response in others {
            let nosniff = response.headers().get("x-content-type-options").map(|v| v.as_bytes());
            assert_eq!(nosniff, Some(&b"nosniff"[..]), "{} {}", response.url(), response.status());
        }
        app.stop().await;
    }

    #[tokio::test]
    async fn a_wrong_token_or_mode_is_forbidden() {
        let app = spawn_app().await;

        for query in [
            "?hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong".to_owned(),
            format!("?hub.mode=subscribe&hub.challenge=1&hub.verify_token={VERIFY_TOKEN}x"),
            format!("?hub.mode=unsubscribe&hub.challenge=1&hub.verify_token={VERIFY_TOKEN}"),
        ] {
            let response = handshake(&app, &query).await;
            let status = response.status();
            assert_error(status, &response.json().await.unwrap(), 403, "forbidden");
        }
        app.stop().await;
    }

    #[tokio::test]
    async fn missing_parameters_are_a_bad_request() {
        let app = spawn_app().await;

        for (query, missing) in [
            (format!("?hub.challenge=1&hub.verify_token={VERIFY_TOKEN}"), "hub.mode"),
            ("?hub.mode=subscribe&hub.challenge=1".to_owned(), "hub.verify_token"),
            (format!("?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}"), "hub.challenge"),
            (String::new(), "hub.mode"),
        ] {
            let response = handshake(&app, &query).await;
            let status = response.status();
            let message = assert_error(status, &response.json().await.unwrap(), 400, "invalid_request");
            assert_eq!(message, format!("{missing}: required"));
        }
        app.stop().await;
    }
}

mod signatures {
    use super::*;

    #[tokio::test]
    async fn a_missing_malformed_or_wrong_signature_is_refused_and_nothing_is_forwarded() {
        let app = spawn_app().await;
        let body = envelope(json!([from_user(PSID, "m1", 1, json!({"text": "hi"}))]));
        let forged = hub_signature("not-the-app-secret", &body);
        let sha1 = "sha1=da611bd448dc12acdf0cd3ab33fdb3adaee26145".to_owned();

        for signature in [None, Some("sha256=zzzz".to_owned()), Some(sha1), Some(forged)] {
            let response = app.post_webhook_with(body.clone(), signature.as_deref()).await;
            let status = response.status();
            assert_error(status, &response.json().await.unwrap(), 401, "invalid_signature");
        }
        assert!(settled(&app).await.is_empty());
        app.stop().await;
    }

    #[tokio::test]
    async fn a_signature_over_other_bytes_is_refused() {
        let app = spawn_app().await;
        let body = envelope(json!([from_user(PSID, "m1", 1, json!({"text": "hi"}))]));
        let signature = hub_signature(APP_SECRET, &body);
        // The same JSON, re-serialised with different spacing: not the signed bytes.
        let reformatted = serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&body).unwrap()).unwrap();

        let response = app.post_webhook_with(reformatted, Some(&signature)).await;

        assert_eq!(response.status(), 401);
        assert!(settled(&app).await.is_empty());
        app.stop().await;
    }

    /// SHA-256 signatures, computed independently, over the bodies B1 and B2 captured in public
    /// SDK tests (`tests/api/fixtures/`), whose SHA-1 signatures those tests publish.
    #[tokio::test]
    async fn vectors_v6_and_v7_are_accepted_and_their_message_forwarded() {
        let app = spawn_app_with(&[("JOINCHAT_PAGE_ID", "1751036168465324")]).await;

        let v6 = app
            .post_webhook_with(
                fixture("b1"),
                Some("sha256=3bf62d5bc657e3a17e55fa0095fa29964db507393b05209c260e2c845254968b"),
            )
            .await;
        let v7 = app
            .post_webhook_with(
                fixture("b2"),
                Some("sha256=7f202c12ba7dbbd1cb23d8a1b4af648fe22ea04456c0a926fcf8cb4e6da31ab4"),
            )
            .await;

        assert_eq!(v6.status(), 200);
        assert_eq!(v7.status(), 200);
        let events = events(&app).await;
        assert_eq!(events.len(), 1, "B2 carries the same mid as B1: forwarded once");
        assert_eq!(events[0].0, "982337261802700");
        assert_eq!(events[0].1["message"], json!({"type": "text", "text": "Test äëï"}));
        app.stop().await;
    }

    /// V8: B1 with its escapes decoded to UTF-8 no longer matches V6.
    #[tokio::test]
    async fn vector_v8_a_decoded_body_does_not_match() {
        let app = spawn_app_with(&[("JOINCHAT_PAGE_ID", "1751036168465324")]).await;
        let decoded = String::from_utf8(fixture("b1")).unwrap().replace(r"\u00e4\u00eb\u00ef", "äëï");

        let response = app
            .post_webhook_with(
                decoded.into_bytes(),
                Some("sha256=3bf62d5bc657e3a17e55fa0095fa29964db507393b05209c260e2c845254968b"),
            )
            .await;

        assert_eq!(response.status(), 401);
        assert!(settled(&app).await.is_empty());
        app.stop().await;
    }

    /// V1, GitHub's vector for the same scheme: it verifies, and then is no page envelope.
    #[tokio::test]
    async fn vector_v1_verifies_and_a_non_envelope_body_is_then_a_bad_request() {
        let app = spawn_app_with(&[("MESSENGER_APP_SECRET", "It's a Secret to Everybody")]).await;

        let response = app
            .post_webhook_with(
                b"Hello, World!".to_vec(),
                Some("sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"),
            )
            .await;

        let status = response.status();
        let message = assert_error(status, &response.json().await.unwrap(), 400, "invalid_payload");
        assert!(message.starts_with("body: not valid JSON"), "{message}");
        app.stop().await;
    }
}

mod bodies {
    use super::*;

    #[tokio::test]
    async fn malformed_json_after_a_valid_signature_is_a_bad_request_and_nothing_is_forwarded() {
        let app = spawn_app().await;

        for body in [&b"{\"object\":\"page\",\"entry\":["[..], b"[]", b"{\"object\":\"page\"}", b""] {
            let response = app.post_webhook(body).await;
            let status = response.status();
            assert_error(status, &response.json().await.unwrap(), 400, "invalid_payload");
        }
        assert!(settled(&app).await.is_empty());
        app.stop().await;
    }

    #[tokio::test]
    async fn a_body_of_1_mib_is_accepted_and_one_byte_more_is_refused_with_413() {
        let app = spawn_app().await;
        let padded = |size: usize| {
            let body = envelope(json!([from_user(PSID, "m-big", 1, json!({"text": "big"}))]));
            let mut body = body;
            body.resize(size, b' ');
            body
        };

        let at_limit = app.post_webhook(padded(1024 * 1024)).await;
        let over_limit = app.post_webhook(padded(1024 * 1024 + 1)).await;

        assert_eq!(at_limit.status(), 200);
        let status = over_limit.status();
        assert_error(status, &over_limit.json().await.unwrap(), 413, "payload_too_large");
        assert_eq!(settled(&app).await.len(), 1);
        app.stop().await;
    }

    #[tokio::test]
    async fn other_objects_other_pages_and_unknown_kinds_are_acknowledged_not_forwarded() {
        let app = spawn_app().await;

        deliver(&app, br#"{"object":"instagram","entry":[{"id":"1","time":1,"messaging":[]}]}"#).await;
        deliver(&app, json!({"object": "page", "entry": [{"id": "999999", "time": 1, "messaging": [from_user(PSID, "m1", 1, json!({"text": "other page"}))]}]}).to_string().as_bytes()).await;
        deliver(&app, &fixture("d2f_optin")).await;
        deliver(&app, &envelope(json!([
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1, "reaction": {"mid": "m", "action": "react", "emoji": "👍"}},
            {"sender": {"user_ref": "ref-1"}, "recipient": {"id": PAGE_ID}, "timestamp": 1, "referral": {"ref": "x", "source": "SHORTLINK", "type": "OPEN_THREAD"}},
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1, "message_edit": {"mid": "m", "text": "edited", "num_edit": 1}}
        ]))).await;

        assert!(settled(&app).await.is_empty());
        app.stop().await;
    }
}

mod translation {
    use super::*;

    #[tokio::test]
    async fn captured_text_d2a_reaches_bonychat_byte_for_byte() {
        let app = spawn_app().await;

        deliver(&app, &fixture("d2a_text")).await;

        let posts = settled(&app).await;
        assert_eq!(posts.len(), 1);
        assert_eq!(
            posts[0].text(),
            format!(
                r#"{{"channelId":"{CHANNEL_ID}","contactId":"1066835436691078","events":[{{"type":"message","mId":"mid.1468152703527:6600c706f15a292027","timestamp":1468152703534,"message":{{"type":"text","text":"test"}}}}]}}"#
            )
        );
        app.stop().await;
    }

    #[tokio::test]
    async fn a_quick_reply_tap_is_its_text() {
        let app = spawn_app().await;

        deliver(
            &app,
            &envelope(json!([from_user(
                PSID,
                "mid.1457764197618:41d102a3e1ae206a38",
                1_458_692_752_478,
                json!({"text": "hello, world!", "quick_reply": {"payload": "DEVELOPER_DEFINED_PAYLOAD"}})
            )])),
        )
        .await;

        assert_eq!(
            events(&app).await,
            vec![(
                PSID.to_owned(),
                json!({"type": "message", "mId": "mid.1457764197618:41d102a3e1ae206a38", "timestamp": 1_458_692_752_478_i64, "message": {"type": "text", "text": "hello, world!"}})
            )]
        );
        app.stop().await;
    }

    #[tokio::test]
    async fn each_media_attachment_is_its_own_attachment_event_and_stickers_are_images() {
        let app = spawn_app().await;
        let attachments = json!([
            {"type": "image", "payload": {"url": "https://scontent.example/photo.jpg"}},
            {"type": "video", "payload": {"url": "https://video.example/clip.mp4"}},
            {"type": "audio", "payload": {"url": "https://cdn.example/voice.aac"}},
            {"type": "file", "payload": {"url": "https://cdn.example/doc.pdf"}},
            {"type": "image", "payload": {"url": "https://scontent.example/sticker.png", "sticker_id": 369_239_263_222_822_u64}}
        ]);

        deliver(
            &app,
            &envelope(json!([from_user(
                PSID,
                "mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_c",
                1_518_479_195_308,
                json!({"attachments": attachments})
            )])),
        )
        .await;

        let events = events(&app).await;
        let got: Vec<(String, String)> = events
            .iter()
            .map(|(_, e)| {
                (
                    e["message"]["attachment"]["type"].as_str().unwrap().to_owned(),
                    e["message"]["attachment"]["url"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("image", "https://scontent.example/photo.jpg"),
                ("video", "https://video.example/clip.mp4"),
                ("audio", "https://cdn.example/voice.aac"),
                ("file", "https://cdn.example/doc.pdf"),
                ("image", "https://scontent.example/sticker.png"),
            ]
            .map(|(k, u)| (k.to_owned(), u.to_owned()))
        );
        assert!(events.iter().all(|(_, e)| e["type"] == "message" && e["message"]["type"] == "attachment"));
        let ids: std::collections::HashSet<&str> = events.iter().map(|(_, e)| e["mId"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 5, "every part has its own mId");
        assert_eq!(events[0].1["mId"], "mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_c");
        assert!(ids.iter().all(|id| id.len() <= 50));
        app.stop().await;
    }

    #[tokio::test]
    async fn a_legacy_location_d2h_becomes_a_location_with_its_title_as_address() {
        let app = spawn_app_with(&[("JOINCHAT_PAGE_ID", "123456789012345")]).await;

        deliver(&app, &fixture("d2h_location_legacy")).await;

        let events = events(&app).await;
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].1["message"],
            json!({"type": "location", "latitude": 52.0, "longitude": 4.0, "address": "My Location"})
        );
        app.stop().await;
    }

    #[tokio::test]
    async fn other_attachments_become_readable_text_never_dropped() {
        let app = spawn_app().await;
        let attachments = json!([
            {"title": "Legacy Attachment", "url": "https://www.messenger.com/", "type": "fallback", "payload": null},
            {"type": "share", "payload": {"url": "https://news.example/story", "title": "A story"}},
            {"type": "reel", "payload": {"url": "https://www.facebook.com/reel/1", "title": "Cooking"}},
            {"type": "template", "payload": {"template_type": "generic", "elements": [{"title": "Hat", "subtitle": "Blue", "buttons": [{"type": "web_url", "url": "https://shop.example/hat", "title": "Buy"}]}]}}
        ]);

        deliver(&app, &envelope(json!([from_user(PSID, "m-other", 5, json!({"attachments": attachments}))]))).await;

        let texts: Vec<String> =
            events(&app).await.iter().map(|(_, e)| e["message"]["text"].as_str().unwrap().to_owned()).collect();
        assert_eq!(
            texts,
            [
                "Legacy Attachment\nhttps://www.messenger.com/",
                "A story\nhttps://news.example/story",
                "Cooking\nhttps://www.facebook.com/reel/1",
                "Hat — Blue\n[Buy] https://shop.example/hat",
            ]
        );
        app.stop().await;
    }

    #[tokio::test]
    async fn postbacks_carry_their_payload_or_the_title_of_a_joinchat_block() {
        let app = spawn_app().await;

        deliver(&app, &fixture("d2e_postback")).await;
        deliver(&app, &envelope(json!([
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1_458_692_752_478_i64, "postback": {"mid": "m_pb1", "title": "Start over", "payload": "{\"block_id\":12}"}},
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1_458_692_752_479_i64, "postback": {"mid": "m_pb2", "title": "Yes", "payload": "Yes"}}
        ]))).await;

        let events = events(&app).await;
        let texts: Vec<&str> = events.iter().map(|(_, e)| e["message"]["text"].as_str().unwrap()).collect();
        assert_eq!(texts, ["test", "Start over", "Yes"]);
        assert!(events[0].1["mId"].as_str().unwrap().starts_with("mid_"), "a stable id for a postback without mid");
        assert_eq!(events[0].1["timestamp"], 1_468_152_897_212_i64);
        app.stop().await;
    }

    #[tokio::test]
    async fn a_page_inbox_echo_d2b_is_a_message_echo_for_the_recipient_with_the_template_as_text() {
        let app = spawn_app().await;

        deliver(&app, &fixture("d2b_echo_generic")).await;

        assert_eq!(
            events(&app).await,
            vec![(
                "1066835436691078".to_owned(),
                json!({"type": "message_echo", "mId": "mid.1468152706286:e7982eb7618034a075", "timestamp": 1_468_152_706_921_i64, "message": {"type": "text", "text": "abc\n[abecadło]"}})
            )]
        );
        app.stop().await;
    }

    #[tokio::test]
    async fn a_text_echo_with_numeric_ids_d2g_is_forwarded() {
        let app = spawn_app_with(&[("JOINCHAT_PAGE_ID", "1751036168465324")]).await;

        deliver(&app, &fixture("d2g_echo_text_numeric_ids")).await;

        let events = events(&app).await;
        assert_eq!(events[0].0, "961373540645425");
        assert_eq!(events[0].1["type"], "message_echo");
        assert_eq!(events[0].1["message"]["text"], "Test äëï");
        app.stop().await;
    }

    #[tokio::test]
    async fn deliveries_and_reads_d2c_d2d_are_acknowledged_without_posting_yet() {
        let app = spawn_app().await;

        deliver(&app, &fixture("d2c_delivery")).await;
        deliver(&app, &fixture("d2d_read")).await;

        assert!(settled(&app).await.is_empty(), "receipts come with the durable store");
        app.stop().await;
    }

    #[tokio::test]
    async fn the_timestamp_falls_back_to_the_entry_time() {
        let app = spawn_app().await;

        deliver(&app, &envelope(json!([from_user(PSID, "m-zero", 0, json!({"text": "no time"}))]))).await;

        assert_eq!(events(&app).await[0].1["timestamp"], 1_700_000_000_000_i64);
        app.stop().await;
    }
}

/// The webhook samples of Meta's Messenger Platform documentation, echoes included, with
/// their placeholders filled in (`<PSID>`, `<PAGE_ID>`, …) and their JSON mended where the
/// documentation's is invalid (trailing commas, `<APPID>`, `...`).
mod documentation_samples {
    use super::*;

    const PSID_PLACEHOLDER: &str = "1254459154682919";

    fn item(json_text: &str) -> Value {
        serde_json::from_str(&json_text.replace("<PSID>", PSID_PLACEHOLDER).replace("<PAGE_ID>", PAGE_ID)).unwrap()
    }

    /// Sends one sample and returns what BonyChat got: (contactId, event) pairs.
    async fn translate(item: Value) -> Vec<(String, Value)> {
        let app = spawn_app().await;
        deliver(&app, &envelope(json!([item]))).await;
        let got = events(&app).await;
        app.stop().await;
        got
    }

    #[tokio::test]
    async fn d1a_text_with_quick_reply() {
        let got = translate(item(r#"{"sender":{"id":"<PSID>"},"recipient":{"id":"<PAGE_ID>"},"timestamp":1458692752478,"message":{"mid":"mid.1457764197618:41d102a3e1ae206a38","text":"hello, world!","quick_reply":{"payload":"<DEVELOPER_DEFINED_PAYLOAD>"}}}"#)).await;
        assert_eq!(
            got,
            vec![(
                PSID_PLACEHOLDER.to_owned(),
                json!({"type": "message", "mId": "mid.1457764197618:41d102a3e1ae206a38", "timestamp": 1_458_692_752_478_i64, "message": {"type": "text", "text": "hello, world!"}})
            )]
        );
    }

    #[tokio::test]
    async fn d1b_reply() {
        let got = translate(item(r#"{"sender":{"id":"<PSID>"},"recipient":{"id":"<PAGE_ID>"},"timestamp":1458692752478,"message":{"mid":"m_1457764197618:41d102a3e1ae206a38","text":"hello, world!","reply_to":{"mid":"m_1fTq8oLumEyIp3Q2MR-aY7IfLZDamVrALniheU","is_self_reply":false}}}"#)).await;
        assert_eq!(got[0].1["mId"], "m_1457764197618:41d102a3e1ae206a38");
        assert_eq!(got[0].1["message"]["text"], "hello, world!");
    }

    #[tokio::test]
    async fn d1c_attachment() {
        let got = translate(item(r#"{"sender":{"id":"<PSID>"},"recipient":{"id":"<PAGE_ID>"},"timestamp":1518479195308,"message":{"mid":"mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_c","attachments":[{"type":"image","payload":{"url":"https://scontent.example/attachment.jpg"}}]}}"#)).await;
        assert_eq!(
            got[0].1["message"],
            json!({"type": "attachment", "attachment": {"type": "image", "url": "https://scontent.example/attachment.jpg"}})
        );
    }

    #[tokio::test]
    async fn d1d_echo_in_both_documented_versions() {
        // The current page: sender = Page, recipient = user.
        let current = translate(item(r#"{"sender":{"id":"<PAGE_ID>"},"recipient":{"id":"<PSID>"},"timestamp":1457764197627,"message":{"is_echo":true,"app_id":1517776481860111,"metadata":"<DEVELOPER_DEFINED_METADATA_STRING>","mid":"mid.1457764197618:41d102a3e1ae206a38","text":"hello, world!"}}"#)).await;
        assert_eq!(
            current,
            vec![(
                PSID_PLACEHOLDER.to_owned(),
                json!({"type": "message_echo", "mId": "mid.1457764197618:41d102a3e1ae206a38", "timestamp": 1_457_764_197_627_i64, "message": {"type": "text", "text": "hello, world!"}})
            )]
        );
        // The older page labels the ids differently; the echo still belongs to its recipient.
        let older = translate(item(r#"{"sender":{"id":"<PSID>"},"recipient":{"id":"1066835436691078"},"timestamp":1457764197627,"message":{"is_echo":true,"app_id":1517776481860111,"mid":"mid.1457764197618:41d102a3e1ae206a38","text":"hello, world!"}}"#)).await;
        assert_eq!(older[0].0, "1066835436691078");
    }

    #[tokio::test]
    async fn d1f_d1g_delivery_and_read_post_nothing_yet() {
        assert!(translate(item(r#"{"sender":{"id":"<PSID>"},"recipient":{"id":"<PAGE_ID>"},"delivery":{"mids":["mid.1458668856218:ed81099e15d3f4f233"],"watermark":1458668856253}}"#)).await.is_empty());
        assert!(translate(item(r#"{"sender":{"id":"<PSID>"},"recipient":{"id":"<PAGE_ID>"},"timestamp":1458668856463,"read":{"watermark":1458668856253}}"#)).await.is_empty());
    }

    #[tokio::test]
    async fn d1h_postback_from_a_chat_plugin_user() {
        // The sample's placeholder has dashes, which BonyChat refuses in a contactId (the event
        // would be ignored); a user_ref of the characters it takes is forwarded.
        let got = translate(item(r#"{"sender":{"user_ref":"USER_REF_ID"},"recipient":{"id":"PAGE-ID"},"timestamp":1458692752478,"postback":{"mid":"m_1457764197618:41d102a3e1ae206a38","title":"TITLE-FOR-THE-CTA","payload":"USER-DEFINED-PAYLOAD","referral":{"ref":"USER-DEFINED-REFERRAL-PARAM","source":"SHORT-URL","type":"OPEN_THREAD"}}}"#)).await;
        assert_eq!(
            got,
            vec![(
                "USER_REF_ID".to_owned(),
                json!({"type": "message", "mId": "m_1457764197618:41d102a3e1ae206a38", "timestamp": 1_458_692_752_478_i64, "message": {"type": "text", "text": "USER-DEFINED-PAYLOAD"}})
            )]
        );
    }

    #[tokio::test]
    async fn d1j_referral_is_not_forwarded() {
        assert!(translate(item(r#"{"sender":{"id":"<PSID>"},"recipient":{"id":"<PAGE_ID>"},"timestamp":1458692752478,"referral":{"ref":"REF_DATA","source":"SHORTLINK","type":"OPEN_THREAD"}}"#)).await.is_empty());
    }

    #[tokio::test]
    async fn seed_001_echoes_of_images_buttons_fallbacks_and_products() {
        let echo = |attachments: &str| {
            item(&format!(
                r#"{{"sender":{{"id":"<PAGE_ID>"}},"recipient":{{"id":"<PSID>"}},"timestamp":1458696618268,"message":{{"is_echo":true,"app_id":1517776481860111,"metadata":"<DEVELOPER_DEFINED_METADATA_STRING>","mid":"mid.1458696618141:b4ef9d19ec21086067","attachments":{attachments}}}}}"#
            ))
        };
        let image =
            translate(echo(r#"[{"type":"image","payload":{"url":"https://scontent.example/echo.jpg"}}]"#)).await;
        assert_eq!(image[0].1["type"], "message_echo");
        assert_eq!(
            image[0].1["message"],
            json!({"type": "attachment", "attachment": {"type": "image", "url": "https://scontent.example/echo.jpg"}})
        );

        let button = translate(echo(r#"[{"type":"template","payload":{"template_type":"button","buttons":[{"type":"web_url","url":"https:\/\/www.messenger.com\/","title":"Visit Messenger"}]}}]"#)).await;
        assert_eq!(button[0].1["message"]["text"], "[Visit Messenger] https://www.messenger.com/");

        let fallback = translate(echo(
            r#"[{"title":"Legacy Attachment","url":"https:\/\/www.messenger.com\/","type":"fallback","payload":null}]"#,
        ))
        .await;
        assert_eq!(
            fallback[0].1["message"]["text"],
            "Legacy Attachment
https://www.messenger.com/"
        );

        let product = translate(echo(r#"[{"type":"template","payload":{"product":{"elements":[{"id":"<PRODUCT_ID>","retailer_id":"<EXTERNAL_ID>","image_url":"https://fb.cdn.com/sdsd","title":"Some product title","subtitle":"40"}]}}}]"#)).await;
        assert_eq!(product[0].1["message"]["text"], "• Some product title");
    }
}

mod batches {
    use super::*;

    #[tokio::test]
    async fn every_event_of_every_entry_and_standby_is_forwarded_in_order_per_contact() {
        let app = spawn_app().await;
        let alice = "1111111111111111";
        let bob = "2222222222222222";
        let body = json!({"object": "page", "entry": [
            {"id": PAGE_ID, "time": 1, "messaging": [
                from_user(alice, "a1", 10, json!({"text": "alice 1"})),
                from_user(bob, "b1", 11, json!({"text": "bob 1"})),
                from_user(alice, "a2", 12, json!({"text": "alice 2"}))
            ]},
            {"id": PAGE_ID, "time": 2, "messaging": [
                from_user(bob, "b2", 13, json!({"text": "bob 2"}))
            ], "standby": [
                from_user(alice, "a3", 14, json!({"text": "alice 3 (standby)"}))
            ]}
        ]});

        let answer = deliver(&app, body.to_string().as_bytes()).await;

        assert_eq!(answer["received"], 5);
        assert_eq!(answer["queued"], 5);
        let events = events(&app).await;
        let texts_of = |who: &str| -> Vec<String> {
            events
                .iter()
                .filter(|(c, _)| c == who)
                .map(|(_, e)| e["message"]["text"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(texts_of(alice), ["alice 1", "alice 2", "alice 3 (standby)"]);
        assert_eq!(texts_of(bob), ["bob 1", "bob 2"]);
        app.stop().await;
    }

    #[tokio::test]
    async fn a_redelivered_batch_is_forwarded_once() {
        let app = spawn_app().await;
        let body = envelope(json!([
            from_user(PSID, "m_r1", 1, json!({"text": "one"})),
            from_user(
                PSID,
                "m_r2",
                2,
                json!({"attachments": [{"type": "image", "payload": {"url": "https://x.example/1.png"}}, {"type": "image", "payload": {"url": "https://x.example/2.png"}}]})
            )
        ]));

        deliver(&app, &body).await;
        let again = deliver(&app, &body).await;

        assert_eq!(again["queued"], 0);
        assert_eq!(again["duplicates"], 3);
        assert_eq!(settled(&app).await.len(), 3);
        app.stop().await;
    }

    /// Events Meta sends without a `mid` and without a time (a postback, a message) in an entry
    /// without a time: the relay stands in the time of receipt, which differs at a redelivery;
    /// their identity must not, or the redelivery is forwarded a second time.
    #[tokio::test]
    async fn a_redelivered_batch_of_events_without_mid_or_time_is_forwarded_once() {
        let app = spawn_app().await;
        let body = json!({"object": "page", "entry": [{"id": PAGE_ID, "messaging": [
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "postback": {"title": "Yes", "payload": "YES_PLEASE"}},
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "message": {"text": "sent without a mid"}}
        ]}]})
        .to_string()
        .into_bytes();

        let first = deliver(&app, &body).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = deliver(&app, &body).await;
        let forwarded = events(&app).await;

        assert_eq!(first["queued"], 2, "{first}");
        assert_eq!((again["queued"].clone(), again["duplicates"].clone()), (json!(0), json!(2)), "{again}");
        let texts: Vec<&str> = forwarded.iter().map(|(_, event)| event["message"]["text"].as_str().unwrap()).collect();
        assert_eq!(texts, ["YES_PLEASE", "sent without a mid"], "each forwarded once");
        app.stop().await;
    }

    #[tokio::test]
    async fn meta_is_answered_once_the_batch_is_stored_even_while_bonychat_hangs() {
        let app = spawn_app().await;
        app.bonychat.script([Reply::status(200, "").after(Duration::from_secs(5))]);

        let started = std::time::Instant::now();
        let response = app.post_webhook(envelope(json!([from_user(PSID, "m_h", 1, json!({"text": "slow"}))]))).await;

        assert_eq!(response.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(1), "answered in {:?}", started.elapsed());
        // BONYCHAT_TIMEOUT_MS is 1 s in tests: the hanging post counts as failed and is retried.
        let posts = settled(&app).await;
        assert_eq!(posts.len(), 2);
        assert!(posts.iter().all(|p| p.json()["events"][0]["mId"] == "m_h"));
        app.stop().await;
    }

    #[tokio::test]
    async fn a_bonychat_failure_is_retried_and_later_events_never_overtake_it() {
        let app = spawn_app().await;
        app.bonychat.script([Reply::status(200, ""), Reply::status(503, "busy"), Reply::status(502, "")]);
        let body = envelope(json!([
            from_user(PSID, "m_f1", 1, json!({"text": "first"})),
            from_user(PSID, "m_f2", 2, json!({"text": "second"})),
            from_user(PSID, "m_f3", 3, json!({"text": "third"}))
        ]));

        deliver(&app, &body).await;

        let texts: Vec<String> = settled(&app)
            .await
            .iter()
            .map(|r| r.json()["events"][0]["message"]["text"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(texts, ["first", "second", "second", "second", "third"]);
        app.stop().await;
    }

    #[tokio::test]
    async fn an_event_bonychat_refuses_for_good_is_dead_lettered_and_does_not_block_the_others() {
        let app = spawn_app().await;
        app.bonychat.script([Reply::status(400, r#"{"error":{"message":"bad contact"}}"#)]);
        let body = envelope(json!([
            from_user(PSID, "m_p1", 1, json!({"text": "refused"})),
            from_user(PSID, "m_p2", 2, json!({"text": "accepted"}))
        ]));

        deliver(&app, &body).await;
        deliver(&app, &body).await;

        assert_eq!(settled(&app).await.len(), 2, "not retried, and the next one went through");
        let dead = app.jobs(JobState::Dead).await;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].m_id, "m_p1");
        assert_eq!(dead[0].last_error.as_deref(), Some("bad contact"));
        app.stop().await;
    }

    #[tokio::test]
    async fn a_duplicate_webhook_after_a_restart_is_not_forwarded_again() {
        let app = spawn_app().await;
        let body = envelope(json!([from_user(PSID, "m_restart", 1, json!({"text": "before the restart"}))]));
        deliver(&app, &body).await;
        app.settle().await;

        let app = app.restart().await;
        let again = deliver(&app, &body).await;

        assert_eq!(again["duplicates"], 1);
        assert_eq!(settled(&app).await.len(), 1);
        app.stop().await;
    }
}

mod echoes {
    use super::*;

    async fn send_from_bonychat(app: &TestApp, message: Value) {
        let (status, _) = app.send(PSID, message).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn the_echo_of_the_relay_s_own_send_is_dropped_and_a_page_inbox_echo_is_forwarded() {
        let app = spawn_app().await;
        send_from_bonychat(&app, json!({"type": "text", "text": "Your order has shipped."})).await;

        let answer = deliver(
            &app,
            &envelope(json!([
                echo_to(PSID, "m_own", json!({"text": "Your order has shipped."})),
                echo_to(PSID, "m_inbox", json!({"text": "Typed in the Page inbox"}))
            ])),
        )
        .await;

        assert_eq!(answer["own_echoes"], 1);
        let events = events(&app).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1["type"], "message_echo");
        assert_eq!(events[0].1["message"]["text"], "Typed in the Page inbox");
        app.stop().await;
    }

    #[tokio::test]
    async fn echoes_of_templates_the_relay_sent_are_recognised_too() {
        let app = spawn_app().await;
        send_from_bonychat(&app, json!({"type": "attachment", "attachment": {"type": "image", "url": "https://cdn.example/cat.jpg", "description": "Our cat"}})).await;
        send_from_bonychat(&app, json!({"type": "quick_reply", "title": "Pick one", "replies": ["A", "B"]})).await;

        deliver(&app, &envelope(json!([
            echo_to(PSID, "m_e1", json!({"attachments": [{"title": "Our cat", "url": null, "type": "template", "payload": {"template_type": "generic", "elements": [{"title": "Our cat", "image_url": "https://cdn.example/cat.jpg"}]}}]})),
            echo_to(PSID, "m_e2", json!({"attachments": [{"type": "template", "payload": {"template_type": "button", "text": "Pick one", "buttons": [{"type": "postback", "title": "A", "payload": "A"}]}}]}))
        ]))).await;

        assert!(settled(&app).await.is_empty());
        app.stop().await;
    }

    #[tokio::test]
    async fn a_dropped_own_echo_stays_dropped_when_meta_redelivers_it() {
        let app = spawn_app().await;
        send_from_bonychat(&app, json!({"type": "text", "text": "Once"})).await;
        let body = envelope(json!([echo_to(PSID, "m_once", json!({"text": "Once"}))]));

        deliver(&app, &body).await;
        deliver(&app, &body).await;

        assert!(settled(&app).await.is_empty());
        app.stop().await;
    }

    #[tokio::test]
    async fn the_same_text_typed_in_the_inbox_for_another_contact_is_forwarded() {
        let app = spawn_app().await;
        send_from_bonychat(&app, json!({"type": "text", "text": "Thanks!"})).await;

        deliver(&app, &envelope(json!([echo_to("3333333333333333", "m_other", json!({"text": "Thanks!"}))]))).await;

        assert_eq!(events(&app).await.len(), 1);
        app.stop().await;
    }

    #[tokio::test]
    async fn an_echo_on_standby_d1e_is_rendered_as_text() {
        let app = spawn_app().await;
        let body = json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1_570_053_170_926_i64, "standby": [
            {"sender": {"id": PAGE_ID}, "recipient": {"id": PSID}, "timestamp": 1_570_053_170_673_i64, "message": {
                "mid": "qT7ywaKpO9kkQR7Gv-nM8LIfLZDamVrALniheUYEDdHJXjDXEAyaS1xxONzb2Iv-DFzmTihfWJV012P5pK0AhQ",
                "is_echo": true, "app_id": 1_517_776_481_860_111_u64,
                "attachments": [{"title": "", "url": "https://www.facebook.com/commerce/update/", "type": "template",
                    "payload": {"template_type": "media", "elements": [{"media_type": "image", "attachment_id": 2_457_235_337_685_388_u64}]}}]}}
        ]}]});

        deliver(&app, body.to_string().as_bytes()).await;

        let events = events(&app).await;
        assert_eq!(events[0].0, PSID);
        assert_eq!(events[0].1["type"], "message_echo");
        assert_eq!(events[0].1["message"]["text"], "[image]\nhttps://www.facebook.com/commerce/update/");
        let m_id = events[0].1["mId"].as_str().unwrap();
        assert!(m_id.len() <= 50 && m_id.starts_with("mid_"), "a long mid is replaced: {m_id}");
        app.stop().await;
    }
}
