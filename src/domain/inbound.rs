//! Messenger page webhooks (Meta's webhook envelope, as captured in `tests/api/fixtures/`) and
//! their translation into BonyChat events
//! (SPEC §4.2, §4.3).
//!
//! Parsing is tolerant, as real traffic requires: ids come as JSON strings or numbers,
//! `timestamp` may be 0 or missing, `url` may be `null`, and fields nobody documented appear.
//! What the relay does not forward is reported as [`Ignored`] so it can be logged; content is
//! never dropped silently: an attachment the relay cannot show as such becomes readable text.
//!
//! It is also as strict as BonyChat where BonyChat would refuse what it is handed: an event
//! whose contact id is not a valid `contactId` (SPEC §3.1) is ignored here, because forwarding
//! it would only fill the queue with a job retried for a day and then dead-lettered. Times out
//! of any sane range are replaced like missing ones, and insane watermarks are ignored.
//!
//! Only a [`VerifiedBody`] can be parsed: the signature check comes first by construction.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::bonychat::{BonyAttachment, BonyMessage, WebhookEvent};
use super::outbound::{CONTACT_ID_MAX, ContactId, TEXT_MAX};
use super::text::{char_len, normalize_whitespace as normalize, truncate};
use crate::signing::VerifiedBody;

/// BonyChat's limit for an `mId`.
pub const M_ID_MAX: usize = 50;

/// 2004-01-01T00:00:00Z in ms. Facebook did not exist before 2004, so an earlier event time is
/// a placeholder or a bug, not when the event happened.
pub const EARLIEST_EVENT_MILLIS: i64 = 1_072_915_200_000;

/// How far past the receipt time an event time or a watermark may lie: clocks drift, but a
/// day is beyond any drift.
pub const FUTURE_SLACK_MILLIS: i64 = 24 * 60 * 60 * 1000;

/// How much of a value taken from the body a reason shows: every reason is logged, and a
/// value can be as long as the body.
const SHOWN_MAX: usize = 60;

/// Everything a webhook body carried.
#[derive(Debug, Default, PartialEq)]
pub struct Envelope {
    /// Events to act on, in Messenger's order.
    pub events: Vec<MessengerEvent>,
    /// What was acknowledged but not acted on, and why.
    pub ignored: Vec<Ignored>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored(pub String);

#[derive(Debug, Clone, PartialEq)]
pub enum MessengerEvent {
    /// A message, a postback or an echo: something to show in BonyChat.
    Message(MessageEvent),
    /// The contact's Messenger got every message sent up to `watermark`.
    Delivery { contact: String, watermark: i64, timestamp: i64 },
    /// The contact read every message sent up to `watermark`.
    Read { contact: String, watermark: i64, timestamp: i64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct MessageEvent {
    /// Sent by the Page (an echo) rather than by the contact.
    pub echo: bool,
    /// The Messenger user: the sender of a message, the recipient of an echo.
    pub contact: String,
    /// Messenger's `mid`, or a stable id derived from the event when it has none.
    pub mid: String,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
    pub contents: Vec<BonyMessage>,
    /// For echoes: the content the relay's own sends are recognised by (SPEC §4.3).
    pub fingerprint: Option<String>,
}

impl MessageEvent {
    /// The BonyChat events for this Messenger event: one per content, each with its own `mId`.
    pub fn webhook_events(&self) -> Vec<WebhookEvent> {
        self.contents
            .iter()
            .enumerate()
            .map(|(index, message)| {
                let m_id = part_m_id(&self.mid, index);
                let message = message.clone();
                if self.echo {
                    WebhookEvent::MessageEcho { m_id, timestamp: self.timestamp, message }
                } else {
                    WebhookEvent::Message { m_id, timestamp: self.timestamp, message }
                }
            })
            .collect()
    }
}

/// Why a verified body was refused: it is not a page-webhook envelope at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError(pub String);

/// Parses a webhook body for the Page `page_id`; `received_at` (ms) stands in for missing or
/// insane times, and bounds how far in the future a time may be.
pub fn parse_envelope(body: &VerifiedBody, page_id: &str, received_at: i64) -> Result<Envelope, EnvelopeError> {
    let routed = parse_routed(body, |page| (page == page_id).then_some(()), received_at)?;
    let mut ignored = routed.ignored;
    ignored.extend(
        routed.unknown_pages.iter().map(|page| Ignored(format!("entry for page {}, not {page_id}", shown(page)))),
    );
    Ok(Envelope { events: routed.events.into_iter().map(|((), event)| event).collect(), ignored })
}

/// A webhook body's events, each with where its Page routes it.
#[derive(Debug)]
pub struct Routed<K> {
    /// Events to act on, in Messenger's order, each with its Page's route.
    pub events: Vec<(K, MessengerEvent)>,
    /// What was acknowledged but not acted on, and why (unknown Pages aside).
    pub ignored: Vec<Ignored>,
    /// The Page ids of entries `route` knew nothing of, one per entry (`(missing)` when absent).
    pub unknown_pages: Vec<String>,
}

/// Parses a webhook body whose entries may be of several Pages (Meta posts every Page of an app
/// to one callback URL): each entry goes where `route` sends its Page id, and the entries of a
/// Page it does not know are counted in `unknown_pages`.
pub fn parse_routed<K: Clone>(
    body: &VerifiedBody,
    route: impl Fn(&str) -> Option<K>,
    received_at: i64,
) -> Result<Routed<K>, EnvelopeError> {
    let value: Value =
        serde_json::from_slice(body.bytes()).map_err(|e| EnvelopeError(format!("body: not valid JSON ({e})")))?;
    let root = value.as_object().ok_or_else(|| EnvelopeError("body: must be a JSON object".into()))?;
    let object = root.get("object").and_then(Value::as_str);
    let entries =
        root.get("entry").and_then(Value::as_array).ok_or_else(|| EnvelopeError("entry: required, an array".into()))?;

    let mut routed = Routed { events: Vec::new(), ignored: Vec::new(), unknown_pages: Vec::new() };
    if object != Some("page") {
        routed.ignored.push(Ignored(format!("object {} is not page", shown(object.unwrap_or("(missing)")))));
        return Ok(routed);
    }
    for entry in entries {
        let Some(entry) = entry.as_object() else {
            routed.ignored.push(Ignored("an entry that is not an object".into()));
            continue;
        };
        let entry_page = entry.get("id").and_then(id_of);
        let Some((page_id, key)) = entry_page.as_deref().and_then(|page| Some((page, route(page)?))) else {
            routed.unknown_pages.push(entry_page.unwrap_or_else(|| "(missing)".to_owned()));
            continue;
        };
        let entry_time = entry.get("time").and_then(millis_of).filter(|&t| is_event_time(t, received_at));
        let clock = Clock { received_at, fallback: entry_time.unwrap_or(received_at) };
        for channel in ["messaging", "standby"] {
            for item in entry.get(channel).and_then(Value::as_array).into_iter().flatten() {
                match item.as_object().map(|event| parse_event(event, page_id, clock)) {
                    Some(Ok(event)) => routed.events.push((key.clone(), event)),
                    Some(Err(ignored)) => routed.ignored.push(ignored),
                    None => routed.ignored.push(Ignored(format!("a {channel} item that is not an object"))),
                }
            }
        }
    }
    Ok(routed)
}

/// The times an entry's events are judged against, in ms.
#[derive(Debug, Clone, Copy)]
struct Clock {
    received_at: i64,
    /// What stands in for a missing or insane event time: the entry's time, else `received_at`.
    fallback: i64,
}

/// Whether `millis` can be when a Messenger event happened, given when it was received.
fn is_event_time(millis: i64, received_at: i64) -> bool {
    (EARLIEST_EVENT_MILLIS..=received_at.saturating_add(FUTURE_SLACK_MILLIS)).contains(&millis)
}

fn parse_event(event: &Map<String, Value>, page_id: &str, clock: Clock) -> Result<MessengerEvent, Ignored> {
    let sender = participant(event.get("sender"));
    let recipient = participant(event.get("recipient"));
    let id_without_mid = || id_of_event_without_mid(page_id, sender.as_deref(), recipient.as_deref(), event);
    let timestamp = event
        .get("timestamp")
        .and_then(millis_of)
        .filter(|&t| is_event_time(t, clock.received_at))
        .unwrap_or(clock.fallback);
    let contact = |who: Option<String>, role: &str| {
        who.ok_or_else(|| Ignored(format!("an event without a usable {role} id")))
            .and_then(|id| bonychat_contact(id, role))
    };

    if let Some(message) = event.get("message").and_then(Value::as_object) {
        let echo = message.get("is_echo").and_then(Value::as_bool) == Some(true);
        let mid = message
            .get("mid")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .map_or_else(id_without_mid, str::to_owned);
        let contact = if echo { contact(recipient, "recipient")? } else { contact(sender, "sender")? };
        let contents = message_contents(message);
        return Ok(MessengerEvent::Message(MessageEvent {
            echo,
            fingerprint: echo.then(|| echo_fingerprint(message)).flatten(),
            contact,
            mid,
            timestamp,
            contents,
        }));
    }
    if let Some(postback) = event.get("postback").and_then(Value::as_object) {
        let mid = postback
            .get("mid")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .map_or_else(id_without_mid, str::to_owned);
        let contact = contact(sender, "sender")?;
        let text = postback_text(postback);
        return Ok(MessengerEvent::Message(MessageEvent {
            echo: false,
            contact,
            mid,
            timestamp,
            contents: vec![BonyMessage::Text { text }],
            fingerprint: None,
        }));
    }
    if let Some(delivery) = event.get("delivery").and_then(Value::as_object) {
        let watermark = watermark_of(delivery, "delivery", clock)?;
        return Ok(MessengerEvent::Delivery { contact: contact(sender, "sender")?, watermark, timestamp });
    }
    if let Some(read) = event.get("read").and_then(Value::as_object) {
        let watermark = watermark_of(read, "read", clock)?;
        return Ok(MessengerEvent::Read { contact: contact(sender, "sender")?, watermark, timestamp });
    }
    let kind = event
        .keys()
        .find(|k| !matches!(k.as_str(), "sender" | "recipient" | "timestamp"))
        .map_or("(none)", String::as_str);
    Err(Ignored(format!("event kind {} is not forwarded", shown(kind))))
}

/// `value` for a reason: escaped, so a control character cannot forge a log line, and cut to
/// `SHOWN_MAX` characters after escaping, since one character can take ten escaped.
fn shown(value: &str) -> String {
    let escaped: String = value.escape_debug().take(SHOWN_MAX + 1).collect();
    truncate(&escaped, SHOWN_MAX).into_owned()
}

/// `id` when BonyChat would take it as a `contactId`. Otherwise the event is ignored: BonyChat
/// refuses the post for good, so forwarding it would only be retried for a day and dead-lettered.
fn bonychat_contact(id: String, role: &str) -> Result<String, Ignored> {
    if ContactId::parse(&id).is_ok() {
        return Ok(id);
    }
    let length = char_len(&id);
    let problem = if length > CONTACT_ID_MAX {
        format!("is {length} characters, longer than {CONTACT_ID_MAX} characters")
    } else {
        "has characters other than A-Z a-z 0-9 _ = + / @".to_owned()
    };
    Err(Ignored(format!("contact id \"{}\" of the {role} {problem}: BonyChat would refuse it", shown(&id))))
}

/// A receipt's watermark. One in the future would mark as delivered or read every message sent
/// until then, including ones not yet sent, so an insane one makes the receipt ignored.
fn watermark_of(receipt: &Map<String, Value>, kind: &str, clock: Clock) -> Result<i64, Ignored> {
    let watermark =
        receipt.get("watermark").and_then(millis_of).ok_or_else(|| Ignored(format!("a {kind} without a watermark")))?;
    let latest = clock.received_at.saturating_add(FUTURE_SLACK_MILLIS);
    if (1..=latest).contains(&watermark) {
        Ok(watermark)
    } else {
        Err(Ignored(format!(
            "a {kind} with watermark {watermark}: not a time between the epoch and a day after receipt"
        )))
    }
}

/// The id of a message or postback Meta sent without a `mid`. A redelivery must get the same id,
/// or it is forwarded twice: so it is derived only from what Meta resends unchanged (the event as
/// Meta sent it, keys sorted, with the page it came for, its sender and its recipient), never
/// from a time the relay filled in for a missing one (the entry's, or the time of receipt).
fn id_of_event_without_mid(
    page_id: &str,
    sender: Option<&str>,
    recipient: Option<&str>,
    event: &Map<String, Value>,
) -> String {
    let mut identity = String::from("event");
    for part in [Some(page_id), sender, recipient] {
        identity.push('|');
        // As JSON strings, so that no id can pass for a separator.
        canonical_json(&Value::from(part), &mut identity);
    }
    identity.push('|');
    canonical_json_object(event, &mut identity);
    derived_id(&identity)
}

/// `value` as compact JSON with the keys of every object sorted: the same event gives the same
/// text whatever order its keys came in, and whatever map type `serde_json` is built with.
fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => canonical_json_object(map, out),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        // Strings escaped, numbers as parsed: both as serde_json writes them.
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn canonical_json_object(map: &Map<String, Value>, out: &mut String) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_unstable();
    out.push('{');
    for (index, key) in keys.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).expect("strings serialize"));
        out.push(':');
        canonical_json(&map[key], out);
    }
    out.push('}');
}

/// A participant's id: `id` as a string or a number, or a chat plugin's `user_ref`.
fn participant(value: Option<&Value>) -> Option<String> {
    let value = value?;
    value.get("id").and_then(id_of).or_else(|| value.get("user_ref").and_then(id_of))
}

/// Ids arrive as strings or as JSON numbers; numbers keep their exact digits.
fn id_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// A time in milliseconds as sent: a number or a string of digits, not yet judged sane. Values
/// too small to be milliseconds after 1973 are seconds (the dashboard's test events send those).
fn millis_of(value: &Value) -> Option<i64> {
    let raw = match value {
        // `as` saturates (a u64 beyond i64 is read through f64): huge values stay huge, so
        // the range checks refuse them instead of an overflow wrapping them into range.
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    match raw {
        // Below 1e11 the product stays below 1e14: no overflow.
        seconds @ 1..100_000_000_000 => Some(seconds * 1000),
        other => Some(other),
    }
}

fn non_empty_str(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

fn text_message(text: impl AsRef<str>) -> BonyMessage {
    BonyMessage::Text { text: truncate(text.as_ref(), TEXT_MAX).into_owned() }
}

fn message_contents(message: &Map<String, Value>) -> Vec<BonyMessage> {
    let mut contents = Vec::new();
    if let Some(text) = message.get("text").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        contents.push(text_message(text));
    }
    for attachment in message.get("attachments").and_then(Value::as_array).into_iter().flatten() {
        match attachment.as_object() {
            Some(attachment) => contents.push(attachment_content(attachment)),
            None => contents.push(text_message("[attachment]")),
        }
    }
    if contents.is_empty() {
        let note = if message.get("is_unsupported").and_then(Value::as_bool) == Some(true) {
            "[a message Messenger does not support]"
        } else {
            "[an empty message]"
        };
        contents.push(text_message(note));
    }
    contents
}

fn attachment_content(attachment: &Map<String, Value>) -> BonyMessage {
    let kind = non_empty_str(attachment.get("type")).unwrap_or("unknown");
    let payload = attachment.get("payload").and_then(Value::as_object);
    let payload_field = |name: &str| payload.and_then(|p| p.get(name));
    match kind {
        "image" | "video" | "audio" | "file" | "sticker" => {
            if let Some(url) = non_empty_str(payload_field("url")).or_else(|| non_empty_str(attachment.get("url"))) {
                // Stickers are images (SPEC §4.3), whether typed `image` or `sticker`.
                let kind = if kind == "sticker" { "image" } else { kind };
                return BonyMessage::Attachment { attachment: BonyAttachment { kind: kind.into(), url: url.into() } };
            }
        }
        "location" => {
            let coordinates = payload_field("coordinates");
            let lat = coordinates.and_then(|c| c.get("lat")).and_then(Value::as_f64);
            let long = coordinates.and_then(|c| c.get("long")).and_then(Value::as_f64);
            if let (Some(latitude), Some(longitude)) = (lat, long)
                && (-90.0..=90.0).contains(&latitude)
                && (-180.0..=180.0).contains(&longitude)
            {
                return BonyMessage::Location {
                    latitude,
                    longitude,
                    address: non_empty_str(attachment.get("title")).map(|t| truncate(t, 256).into_owned()),
                };
            }
        }
        _ => {}
    }
    text_message(render_attachment(kind, attachment, payload))
}

/// A readable rendering of an attachment BonyChat cannot show as such: its title, what its
/// template says, and its link.
fn render_attachment(kind: &str, attachment: &Map<String, Value>, payload: Option<&Map<String, Value>>) -> String {
    let mut lines: Vec<String> = Vec::new();
    let field = |name: &str| non_empty_str(attachment.get(name)).or_else(|| non_empty_str(payload?.get(name)));
    let title = field("title");
    let template_type = payload.and_then(|p| non_empty_str(p.get("template_type")));
    let elements = payload.and_then(|p| p.get("elements")).and_then(Value::as_array);

    match template_type {
        Some("button") => {
            lines.extend(non_empty_str(payload.and_then(|p| p.get("text"))).or(title).map(str::to_owned));
            lines.extend(render_buttons(payload.and_then(|p| p.get("buttons"))));
        }
        Some("generic" | "list") => {
            for element in elements.into_iter().flatten() {
                let element_title = non_empty_str(element.get("title"));
                let subtitle = non_empty_str(element.get("subtitle"));
                match (element_title, subtitle) {
                    (Some(t), Some(s)) => lines.push(format!("{t} — {s}")),
                    (Some(t), None) => lines.push(t.to_owned()),
                    (None, Some(s)) => lines.push(s.to_owned()),
                    (None, None) => {}
                }
                lines
                    .extend(non_empty_str(element.get("default_action").and_then(|a| a.get("url"))).map(str::to_owned));
                lines.extend(render_buttons(element.get("buttons")));
            }
            if lines.is_empty() {
                lines.extend(title.map(str::to_owned));
            }
        }
        Some("media") => {
            lines.extend(title.map(str::to_owned));
            for element in elements.into_iter().flatten() {
                let media = non_empty_str(element.get("media_type")).unwrap_or("media");
                match non_empty_str(element.get("url")) {
                    Some(url) => lines.push(format!("[{media}] {url}")),
                    None => lines.push(format!("[{media}]")),
                }
            }
        }
        Some("receipt") => {
            let order = non_empty_str(payload.and_then(|p| p.get("order_number")));
            lines.push(order.map_or_else(|| "Receipt".to_owned(), |o| format!("Receipt {o}")));
            for element in elements.into_iter().flatten() {
                lines.extend(non_empty_str(element.get("title")).map(|t| format!("• {t}")));
            }
            let total = payload.and_then(|p| p.get("summary")).and_then(|s| s.get("total_cost"));
            if let Some(total) = total.filter(|t| t.is_number()) {
                let currency = non_empty_str(payload.and_then(|p| p.get("currency"))).unwrap_or("");
                lines.push(format!("Total: {total} {currency}").trim_end().to_owned());
            }
        }
        Some(other) => {
            lines.push(title.map_or_else(|| format!("[{other} template]"), str::to_owned));
        }
        None => {
            lines.extend(title.map(str::to_owned));
            let products =
                payload.and_then(|p| p.get("product")).and_then(|p| p.get("elements")).and_then(Value::as_array);
            for product in products.into_iter().flatten() {
                lines.extend(non_empty_str(product.get("title")).map(|t| format!("• {t}")));
            }
        }
    }
    if let Some(url) = field("url")
        && !lines.iter().any(|line| line.contains(url))
    {
        lines.push(url.to_owned());
    }
    if lines.is_empty() {
        lines.push(format!("[{kind}]"));
    }
    lines.join("\n")
}

fn render_buttons(buttons: Option<&Value>) -> Vec<String> {
    buttons
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|button| {
            let title = non_empty_str(button.get("title"))?;
            Some(match non_empty_str(button.get("url")) {
                Some(url) => format!("[{title}] {url}"),
                None => format!("[{title}]"),
            })
        })
        .collect()
}

/// SPEC §4.3: a postback shows its payload, unless the payload is a JSON object (a JoinChat
/// block or flow reference), then its title. Standby postbacks carry no payload at all.
fn postback_text(postback: &Map<String, Value>) -> String {
    let payload = postback.get("payload").and_then(Value::as_str).filter(|p| !p.trim().is_empty());
    let title = non_empty_str(postback.get("title"));
    let payload_is_object = payload.is_some_and(|p| serde_json::from_str::<Value>(p).is_ok_and(|v| v.is_object()));
    let text = match (payload, title) {
        (Some(payload), _) if !payload_is_object => payload,
        (_, Some(title)) => title,
        (Some(payload), None) => payload,
        (None, None) => "[a button was tapped]",
    };
    truncate(text, TEXT_MAX).into_owned()
}

/// What an echo is recognised by: the text of a text message, else the `text` of a button
/// template, else the title of the first element of a generic one (SPEC §4.3).
fn echo_fingerprint(message: &Map<String, Value>) -> Option<String> {
    if let Some(text) = non_empty_str(message.get("text")) {
        return Some(normalize(text));
    }
    let attachment = message.get("attachments")?.as_array()?.first()?;
    let payload = attachment.get("payload");
    let template_text = non_empty_str(payload.and_then(|p| p.get("text")));
    let first_title = payload
        .and_then(|p| p.get("elements"))
        .and_then(Value::as_array)
        .and_then(|elements| elements.first())
        .and_then(|element| non_empty_str(element.get("title")));
    template_text.or(first_title).or_else(|| non_empty_str(attachment.get("title"))).map(normalize)
}

/// The `mId` of the content at `index` of a Messenger message (SPEC §4.3).
pub fn part_m_id(mid: &str, index: usize) -> String {
    match index {
        0 if mid.chars().count() <= M_ID_MAX => mid.to_owned(),
        0 => derived_id(mid),
        _ => derived_id(&format!("{mid}#{index}")),
    }
}

/// A stable id of at most 50 characters: the same input always gives the same id.
pub fn derived_id(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("mid_{}", &hex[..M_ID_MAX - 4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;
    use serde_json::json;

    const PAGE: &str = "510249619162304";

    fn events_of(envelope: Value) -> Envelope {
        events_at(envelope, 42_000_000_000_000)
    }

    fn events_at(envelope: Value, received_at: i64) -> Envelope {
        let body = crate::signing::tests_support::verified(envelope.to_string().as_bytes());
        parse_envelope(&body, PAGE, received_at).unwrap()
    }

    fn one_entry(items: Value) -> Value {
        json!({"object": "page", "entry": [{"id": PAGE, "time": 1_468_152_703_635_i64, "messaging": items}]})
    }

    fn single_message(item: Value) -> MessageEvent {
        let envelope = events_of(one_entry(json!([item])));
        match envelope.events.as_slice() {
            [MessengerEvent::Message(message)] => message.clone(),
            other => panic!("expected one message, got {other:?} (ignored: {:?})", envelope.ignored),
        }
    }

    fn user(message: Value) -> Value {
        json!({"sender": {"id": "1066835436691078"}, "recipient": {"id": PAGE}, "timestamp": 1_468_152_703_534_i64, "message": message})
    }

    #[test]
    fn a_text_message_keeps_its_mid_sender_and_time() {
        let message =
            single_message(user(json!({"mid": "mid.1468152703527:6600c706f15a292027", "seq": 414, "text": "test"})));
        assert_eq!(message.contact, "1066835436691078");
        assert!(!message.echo);
        assert_eq!(message.timestamp, 1_468_152_703_534);
        assert_eq!(
            message.webhook_events(),
            vec![WebhookEvent::Message {
                m_id: "mid.1468152703527:6600c706f15a292027".into(),
                timestamp: 1_468_152_703_534,
                message: BonyMessage::Text { text: "test".into() }
            }]
        );
    }

    #[test]
    fn numeric_ids_keep_every_digit() {
        let envelope = json!({"object": "page", "entry": [{"id": 510_249_619_162_304_u64, "time": 1, "messaging": [
            {"sender": {"id": 98_233_726_180_270_012_u64}, "recipient": {"id": 510_249_619_162_304_u64}, "timestamp": 5, "message": {"mid": "m1", "text": "x"}}
        ]}]});
        let Envelope { events, .. } = events_of(envelope);
        let [MessengerEvent::Message(message)] = events.as_slice() else { panic!() };
        assert_eq!(message.contact, "98233726180270012");
    }

    #[test]
    fn missing_or_zero_timestamps_fall_back_to_the_entry_time_then_the_receipt_time() {
        let zero = single_message(json!({"sender": {"id": "1"}, "timestamp": 0, "message": {"mid": "m", "text": "x"}}));
        assert_eq!(zero.timestamp, 1_468_152_703_635);
        let no_time = json!({"object": "page", "entry": [{"id": PAGE, "messaging": [{"sender": {"id": "1"}, "message": {"mid": "m", "text": "x"}}]}]});
        let Envelope { events, .. } = events_of(no_time);
        let [MessengerEvent::Message(message)] = events.as_slice() else { panic!() };
        assert_eq!(message.timestamp, 42_000_000_000_000);
        let seconds = single_message(
            json!({"sender": {"id": "1"}, "timestamp": "1527459824", "message": {"mid": "m", "text": "x"}}),
        );
        assert_eq!(seconds.timestamp, 1_527_459_824_000);
    }

    #[test]
    fn each_attachment_is_its_own_event_with_a_stable_m_id() {
        let message = single_message(user(json!({"mid": "mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_c", "attachments": [
            {"type": "image", "payload": {"url": "https://scontent.example/1.jpg"}},
            {"type": "video", "payload": {"url": "https://video.example/2.mp4"}},
            {"type": "image", "payload": {"url": "https://scontent.example/sticker.png", "sticker_id": 369_239_263_222_822_u64}},
            {"type": "audio", "payload": {"url": "https://cdn.example/3.aac"}},
            {"type": "file", "payload": {"url": "https://cdn.example/4.pdf"}}
        ]})));
        let events = message.webhook_events();
        let ids: Vec<&str> = events.iter().map(WebhookEvent::m_id).collect();
        assert_eq!(ids[0], "mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_c");
        assert_eq!(ids[1], derived_id("mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_c#1"));
        assert!(ids.iter().all(|id| id.len() <= M_ID_MAX));
        assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 5, "distinct ids");
        let kinds: Vec<String> = message
            .contents
            .iter()
            .map(|c| match c {
                BonyMessage::Attachment { attachment } => attachment.kind.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["image", "video", "image", "audio", "file"]);
        assert_eq!(message.webhook_events(), events, "the same input gives the same ids");
    }

    #[test]
    fn texts_longer_than_bonychat_takes_are_cut_to_7000_characters() {
        let long = "é".repeat(TEXT_MAX + 500);
        let message = single_message(user(json!({"mid": "m", "text": long})));
        let [BonyMessage::Text { text }] = message.contents.as_slice() else { panic!() };
        assert_eq!(text.chars().count(), TEXT_MAX);
        assert!(text.ends_with('…'));
    }

    #[test]
    fn a_message_without_a_mid_gets_the_same_derived_id_every_time() {
        let item = json!({"sender": {"id": "7"}, "recipient": {"id": PAGE}, "timestamp": 1_468_152_703_534_i64, "message": {"text": "no mid"}});
        let first = single_message(item.clone()).mid;
        assert!(first.starts_with("mid_") && first.len() == M_ID_MAX);
        assert_eq!(first, single_message(item).mid);
        assert_eq!(
            first,
            derived_id(&format!(
                r#"event|"{PAGE}"|"7"|"{PAGE}"|{{"message":{{"text":"no mid"}},"recipient":{{"id":"{PAGE}"}},"sender":{{"id":"7"}},"timestamp":1468152703534}}"#
            )),
            "a documented, stable input"
        );
    }

    /// Meta redelivers a webhook it got no 200 for, unchanged; what the relay fills in for a
    /// missing time (the time of receipt) is not. An event without a `mid` must get the same id
    /// both times, or the store cannot tell the redelivery and it is forwarded twice.
    #[test]
    fn an_event_without_a_mid_or_a_time_gets_the_same_id_whenever_it_is_received() {
        let body = |items: Value| json!({"object": "page", "entry": [{"id": PAGE, "messaging": items}]});
        let items = json!([
            {"sender": {"id": "1066835436691078"}, "recipient": {"id": PAGE}, "postback": {"title": "Yes", "payload": "YES"}},
            {"sender": {"id": "1066835436691078"}, "recipient": {"id": PAGE}, "message": {"text": "no mid, no time"}}
        ]);
        let ids = |received_at: i64| -> Vec<(String, i64)> {
            events_at(body(items.clone()), received_at)
                .events
                .iter()
                .map(|event| match event {
                    MessengerEvent::Message(message) => (message.mid.clone(), message.timestamp),
                    other => panic!("{other:?}"),
                })
                .collect()
        };

        let first = ids(1_700_000_000_000);
        let redelivered = ids(1_700_000_001_234);

        assert_eq!(first.len(), 2);
        assert_ne!(first[0].1, redelivered[0].1, "the times are the receipts', and differ");
        assert_eq!(first[0].0, redelivered[0].0, "the postback keeps its id");
        assert_eq!(first[1].0, redelivered[1].0, "the message keeps its id");
        assert_ne!(first[0].0, first[1].0);
        for (id, _) in &first {
            assert!(id.starts_with("mid_") && id.len() <= M_ID_MAX, "{id}");
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'), "{id}");
        }
    }

    #[test]
    fn the_id_of_an_event_without_a_mid_follows_what_meta_sent_not_how_it_was_written() {
        let postback = |item: &str| {
            let body = format!(r#"{{"object":"page","entry":[{{"id":"{PAGE}","messaging":[{item}]}}]}}"#);
            let body = crate::signing::tests_support::verified(body.as_bytes());
            let envelope = parse_envelope(&body, PAGE, 1_700_000_000_000).unwrap();
            let [MessengerEvent::Message(message)] = envelope.events.as_slice() else { panic!("{envelope:?}") };
            message.mid.clone()
        };
        let id = postback(r#"{"sender":{"id":"1"},"recipient":{"id":"2"},"postback":{"title":"Yes","payload":"YES"}}"#);

        let reordered =
            postback(r#"{"postback":{"payload":"YES","title":"Yes"}, "recipient":{"id":"2"},"sender":{"id":"1"}}"#);
        let other_payload =
            postback(r#"{"sender":{"id":"1"},"recipient":{"id":"2"},"postback":{"title":"Yes","payload":"NO"}}"#);
        let other_sender =
            postback(r#"{"sender":{"id":"3"},"recipient":{"id":"2"},"postback":{"title":"Yes","payload":"YES"}}"#);
        let with_time = postback(
            r#"{"sender":{"id":"1"},"recipient":{"id":"2"},"timestamp":1699999999999,"postback":{"title":"Yes","payload":"YES"}}"#,
        );
        let with_mid = postback(
            r#"{"sender":{"id":"1"},"recipient":{"id":"2"},"postback":{"mid":"m_1","title":"Yes","payload":"YES"}}"#,
        );

        assert_eq!(id, reordered, "key order and spacing are not part of the event");
        for other in [&other_payload, &other_sender, &with_time] {
            assert_ne!(&id, other, "a different event, a different id");
        }
        assert_eq!(with_mid, "m_1", "a mid is kept as it is");
    }

    #[test]
    fn long_mids_are_replaced_by_a_derived_id() {
        let long = "qT7ywaKpO9kkQR7Gv-nM8LIfLZDamVrALniheUYEDdHJXjDXEAyaS1xxONzb2Iv-DFzmTihfWJV012P5pK0AhQ";
        let id = part_m_id(long, 0);
        assert_eq!(id.len(), M_ID_MAX);
        assert_eq!(id, part_m_id(long, 0));
        assert_ne!(id, part_m_id(long, 1));
        assert_eq!(part_m_id("m_short", 0), "m_short");
    }

    #[test]
    fn a_legacy_location_keeps_its_coordinates_and_title() {
        let message = single_message(user(json!({"mid": "m", "attachments": [
            {"title": "My Location", "url": "https://www.facebook.com/l.php?u=https", "type": "location", "payload": {"coordinates": {"lat": 52, "long": 4}}}
        ]})));
        assert_eq!(
            message.contents,
            vec![BonyMessage::Location { latitude: 52.0, longitude: 4.0, address: Some("My Location".into()) }]
        );
    }

    #[test]
    fn other_attachments_become_readable_text() {
        let message = single_message(user(json!({"mid": "m", "attachments": [
            {"title": "Legacy Attachment", "url": "https://www.messenger.com/", "type": "fallback", "payload": null},
            {"type": "share", "payload": {"url": "https://news.example/story", "title": "A story"}},
            {"type": "ig_reel", "payload": {"url": "https://instagram.example/reel/1", "title": "Dance"}},
            {"type": "template", "payload": {"template_type": "button", "text": "Next?", "buttons": [{"type": "web_url", "url": "https://www.messenger.com/", "title": "Visit Messenger"}, {"type": "postback", "title": "Stop", "payload": "STOP"}]}},
            {"type": "fallback"},
            {"type": "image", "payload": {"url": null}}
        ]})));
        let texts: Vec<&str> = message
            .contents
            .iter()
            .map(|c| match c {
                BonyMessage::Text { text } => text.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            texts,
            [
                "Legacy Attachment\nhttps://www.messenger.com/",
                "A story\nhttps://news.example/story",
                "Dance\nhttps://instagram.example/reel/1",
                "Next?\n[Visit Messenger] https://www.messenger.com/\n[Stop]",
                "[fallback]",
                "[image]",
            ]
        );
    }

    #[test]
    fn postbacks_show_their_payload_unless_it_is_a_joinchat_block() {
        let postback = |postback: Value| {
            single_message(json!({"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": 1_458_692_752_478_i64, "postback": postback})).contents
        };
        assert_eq!(
            postback(json!({"mid": "m1", "title": "Yes", "payload": "Yes please"})),
            vec![BonyMessage::Text { text: "Yes please".into() }]
        );
        assert_eq!(
            postback(json!({"mid": "m2", "title": "Start", "payload": "{\"block_id\":1}"})),
            vec![BonyMessage::Text { text: "Start".into() }]
        );
        assert_eq!(
            postback(json!({"mid": "m3", "title": "From standby"})),
            vec![BonyMessage::Text { text: "From standby".into() }]
        );
        assert_eq!(postback(json!({"payload": "test"})), vec![BonyMessage::Text { text: "test".into() }]);
    }

    #[test]
    fn a_postback_without_a_mid_gets_a_stable_derived_one() {
        let item = json!({"sender": {"id": "1066835436691078"}, "recipient": {"id": PAGE}, "timestamp": 1_468_152_897_212_i64, "postback": {"payload": "test"}});
        let first = single_message(item.clone());
        let again = single_message(item);
        assert!(first.mid.starts_with("mid_"));
        assert_eq!(first.mid, again.mid);
    }

    #[test]
    fn echoes_belong_to_the_recipient_and_carry_a_fingerprint() {
        let echo = single_message(
            json!({"sender": {"id": PAGE}, "recipient": {"id": "1066835436691078"}, "timestamp": 1_468_152_706_921_i64,
            "message": {"is_echo": true, "app_id": 1_708_188_056_130_407_u64, "mid": "mid.1468152706286:e7982eb7618034a075", "seq": 415,
                "attachments": [{"title": "abc", "url": null, "type": "template", "payload": {"template_type": "generic", "sharable": false,
                    "elements": [{"title": "abc", "buttons": [{"type": "postback", "url": null, "title": "abecadło", "payload": "test"}]}]}}]}}),
        );
        assert!(echo.echo);
        assert_eq!(echo.contact, "1066835436691078");
        assert_eq!(echo.fingerprint.as_deref(), Some("abc"));
        assert_eq!(echo.contents, vec![BonyMessage::Text { text: "abc\n[abecadło]".into() }]);
        assert!(matches!(echo.webhook_events()[0], WebhookEvent::MessageEcho { .. }));

        let text_echo = single_message(
            json!({"sender": {"id": PAGE}, "recipient": {"id": "7"}, "message": {"is_echo": true, "mid": "m", "text": "Hello\n  World "}}),
        );
        assert_eq!(text_echo.fingerprint.as_deref(), Some("Hello World"));
    }

    #[test]
    fn deliveries_reads_and_other_events_are_told_apart() {
        let envelope = events_of(one_entry(json!([
            {"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": 0, "delivery": {"mids": ["mid.1"], "watermark": 1_468_152_706_921_i64, "seq": 416}},
            {"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": 1_468_152_897_070_i64, "read": {"watermark": 1_468_152_706_921_i64, "seq": 417}},
            {"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": 1, "optin": {"ref": "test"}},
            {"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": 1, "reaction": {"mid": "m", "action": "react", "emoji": "❤"}}
        ])));
        assert_eq!(
            envelope.events,
            vec![
                MessengerEvent::Delivery {
                    contact: "1".into(),
                    watermark: 1_468_152_706_921,
                    timestamp: 1_468_152_703_635,
                },
                MessengerEvent::Read {
                    contact: "1".into(),
                    watermark: 1_468_152_706_921,
                    timestamp: 1_468_152_897_070,
                },
            ]
        );
        assert_eq!(
            envelope.ignored,
            vec![
                Ignored("event kind optin is not forwarded".into()),
                Ignored("event kind reaction is not forwarded".into())
            ]
        );
    }

    #[test]
    fn other_pages_and_objects_are_ignored_with_a_reason() {
        let other_page = json!({"object": "page", "entry": [{"id": "999", "time": 1, "messaging": [user(json!({"mid": "m", "text": "x"}))]}]});
        let envelope = events_of(other_page);
        assert!(envelope.events.is_empty());
        assert_eq!(envelope.ignored, vec![Ignored(format!("entry for page 999, not {PAGE}"))]);

        let instagram = events_of(json!({"object": "instagram", "entry": []}));
        assert_eq!(instagram.ignored, vec![Ignored("object instagram is not page".into())]);
    }

    /// Caught by an invariant of the `envelope` fuzz target: an object, page id or event kind as
    /// long as the body was copied into the logged reason in full.
    #[test]
    fn reasons_show_at_most_the_start_of_what_the_body_holds() {
        let long = "k".repeat(100_000);
        let envelope = events_of(json!({"object": "page", "entry": [
            {"id": long, "messaging": [user(json!({"mid": "m", "text": "x"}))]},
            {"id": PAGE, "messaging": [{"sender": {"id": "1"}, long.clone(): {}}]}
        ]}));
        let other = events_of(json!({"object": long, "entry": []}));
        let reasons: Vec<&str> = envelope.ignored.iter().chain(&other.ignored).map(|Ignored(r)| r.as_str()).collect();
        assert_eq!(reasons.len(), 3);
        for reason in reasons {
            assert!(
                reason.chars().count() < 100 && reason.contains(&format!("{}…", "k".repeat(SHOWN_MAX - 1))),
                "{reason}"
            );
        }
    }

    /// Found by `cargo fuzz run envelope` (crash-59db5072): a sender id of `22`, 43 DEL
    /// characters and `22` was cut to 60 characters before escaping, and each DEL took 7.
    #[test]
    fn reasons_are_cut_after_escaping() {
        let envelope = at_now(json!([
            text_from(json!(format!("22{}22", "\u{7f}".repeat(43))), json!(NOW)),
            text_from(json!("\u{10ffff}".repeat(1000)), json!(NOW)),
            {"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": NOW, "\n\r\u{1b}".repeat(100): {}},
        ]));
        assert_eq!(envelope.ignored.len(), 3);
        for Ignored(reason) in &envelope.ignored {
            assert!(reason.chars().count() <= 200, "{reason}");
            assert!(!reason.chars().any(char::is_control), "{reason:?}");
        }
        assert!(envelope.ignored[0].0.starts_with(r#"contact id "22\u{7f}\u{7f}"#), "{:?}", envelope.ignored[0]);
    }

    #[test]
    fn standby_events_are_read_like_messaging_ones() {
        let envelope = events_of(json!({"object": "page", "entry": [{"id": PAGE, "time": 1_570_053_170_926_i64,
            "messaging": [user(json!({"mid": "a", "text": "first"}))],
            "standby": [user(json!({"mid": "b", "text": "second"}))]}]}));
        let mids: Vec<&str> = envelope
            .events
            .iter()
            .map(|e| match e {
                MessengerEvent::Message(m) => m.mid.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(mids, ["a", "b"]);
    }

    /// A receipt time for the rules that look at the future: 2025-11-24T16:00:00Z.
    const NOW: i64 = 1_764_000_000_000;
    const ENTRY_TIME: i64 = 1_763_999_999_000;

    fn at_now(items: Value) -> Envelope {
        events_at(json!({"object": "page", "entry": [{"id": PAGE, "time": ENTRY_TIME, "messaging": items}]}), NOW)
    }

    fn text_from(sender: Value, timestamp: Value) -> Value {
        json!({"sender": {"id": sender}, "recipient": {"id": PAGE}, "timestamp": timestamp, "message": {"mid": "m", "text": "x"}})
    }

    fn timestamps(envelope: &Envelope) -> Vec<i64> {
        envelope
            .events
            .iter()
            .map(|event| match event {
                MessengerEvent::Message(m) => m.timestamp,
                MessengerEvent::Delivery { timestamp, .. } | MessengerEvent::Read { timestamp, .. } => *timestamp,
            })
            .collect()
    }

    #[test]
    fn a_sender_id_longer_than_50_characters_is_ignored_and_shown_shortened() {
        let fifty = "1".repeat(50);
        let envelope =
            at_now(json!([text_from(json!(fifty), json!(NOW)), text_from(json!("1".repeat(51)), json!(NOW))]));
        assert_eq!(envelope.events.len(), 1, "50 characters is still a contactId");
        assert_eq!(
            envelope.ignored,
            vec![Ignored(format!(
                "contact id {:?} of the sender is 51 characters, longer than 50 characters: BonyChat would refuse it",
                "1".repeat(51)
            ))]
        );

        let huge = at_now(json!([text_from(json!("x".repeat(100_000)), json!(NOW))]));
        let [Ignored(reason)] = huge.ignored.as_slice() else { panic!("{huge:?}") };
        assert!(reason.len() < 200, "an unbounded id is not echoed in full: {reason}");
        assert!(reason.contains("is 100000 characters") && reason.contains("x…\""), "{reason}");
    }

    #[test]
    fn ids_with_characters_bonychat_refuses_are_ignored() {
        let envelope = at_now(json!([
            text_from(json!("dash-id"), json!(NOW)),
            text_from(json!("new\nline"), json!(NOW)),
            text_from(json!(-5), json!(NOW)),
            {"sender": {"user_ref": "USER-REF-ID"}, "recipient": {"id": PAGE}, "timestamp": NOW, "postback": {"payload": "p"}},
            text_from(json!("abc_DEF=+/@09"), json!(NOW)),
            text_from(json!("+60177872890"), json!(NOW)),
        ]));
        let contacts: Vec<&str> = envelope
            .events
            .iter()
            .map(|e| match e {
                MessengerEvent::Message(m) => m.contact.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(contacts, ["abc_DEF=+/@09", "+60177872890"]);
        let suffix = "has characters other than A-Z a-z 0-9 _ = + / @: BonyChat would refuse it";
        assert_eq!(
            envelope.ignored,
            vec![
                Ignored(format!("contact id \"dash-id\" of the sender {suffix}")),
                Ignored(format!("contact id \"new\\nline\" of the sender {suffix}")),
                Ignored(format!("contact id \"-5\" of the sender {suffix}")),
                Ignored(format!("contact id \"USER-REF-ID\" of the sender {suffix}")),
            ]
        );
    }

    #[test]
    fn echoes_are_judged_by_their_recipient_and_receipts_by_their_sender() {
        let long = "9".repeat(51);
        let envelope = at_now(json!([
            {"sender": {"id": PAGE}, "recipient": {"id": long}, "timestamp": NOW, "message": {"is_echo": true, "mid": "e1", "text": "x"}},
            {"sender": {"id": long}, "recipient": {"id": "7"}, "timestamp": NOW, "message": {"is_echo": true, "mid": "e2", "text": "x"}},
            {"sender": {"id": long}, "recipient": {"id": PAGE}, "timestamp": NOW, "delivery": {"watermark": NOW}},
            {"sender": {"id": "a b"}, "recipient": {"id": PAGE}, "timestamp": NOW, "read": {"watermark": NOW}},
        ]));
        let [MessengerEvent::Message(echo)] = envelope.events.as_slice() else { panic!("{envelope:?}") };
        assert_eq!((echo.mid.as_str(), echo.contact.as_str()), ("e2", "7"), "the sender of an echo is the Page");
        let roles: Vec<bool> = envelope.ignored.iter().map(|Ignored(r)| r.contains("of the recipient")).collect();
        assert_eq!(roles, [true, false, false]);
        assert!(envelope.ignored.iter().all(|Ignored(r)| r.ends_with("BonyChat would refuse it")));
    }

    #[test]
    fn insane_timestamps_fall_back_like_missing_ones() {
        let a_day = FUTURE_SLACK_MILLIS;
        let insane = [
            json!(NOW + a_day + 1),
            json!(EARLIEST_EVENT_MILLIS - 1),
            json!(-1),
            json!(5),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1e300),
            json!(-1e300),
            json!("99999999999999999999999"),
            json!("-1468152703534"),
            json!(true),
        ];
        let items: Vec<Value> = insane.iter().map(|t| text_from(json!("1"), t.clone())).collect();
        let envelope = at_now(Value::Array(items));
        assert!(envelope.ignored.is_empty(), "{:?}", envelope.ignored);
        assert_eq!(timestamps(&envelope), vec![ENTRY_TIME; insane.len()]);

        let sane = [json!(NOW + a_day), json!(EARLIEST_EVENT_MILLIS), json!(1_468_152_703_534.9), json!("1527459824")];
        let items: Vec<Value> = sane.iter().map(|t| text_from(json!("1"), t.clone())).collect();
        assert_eq!(
            timestamps(&at_now(Value::Array(items))),
            [NOW + a_day, EARLIEST_EVENT_MILLIS, 1_468_152_703_534, 1_527_459_824_000]
        );
    }

    #[test]
    fn an_insane_entry_time_gives_way_to_the_receipt_time() {
        for entry_time in [json!(NOW + FUTURE_SLACK_MILLIS + 1), json!(1), json!(u64::MAX), json!(-7)] {
            let envelope = events_at(
                json!({"object": "page", "entry": [{"id": PAGE, "time": entry_time, "messaging": [text_from(json!("1"), json!(0))]}]}),
                NOW,
            );
            assert_eq!(timestamps(&envelope), [NOW], "entry time {entry_time}");
        }
    }

    #[test]
    fn receipts_with_an_insane_watermark_are_ignored() {
        let receipt = |kind: &str, watermark: Value| json!({"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": NOW, kind: {"watermark": watermark}});
        let envelope = at_now(json!([
            receipt("delivery", json!(NOW + FUTURE_SLACK_MILLIS + 1)),
            receipt("read", json!(0)),
            receipt("read", json!(-1_468_152_706_921_i64)),
            receipt("delivery", json!(i64::MAX)),
            receipt("read", json!(u64::MAX)),
            receipt("delivery", json!(1e300)),
            receipt("read", json!(NOW + FUTURE_SLACK_MILLIS)),
            receipt("delivery", json!(1_468_152_706_921_i64)),
        ]));
        assert_eq!(
            envelope.events,
            vec![
                MessengerEvent::Read { contact: "1".into(), watermark: NOW + FUTURE_SLACK_MILLIS, timestamp: NOW },
                MessengerEvent::Delivery { contact: "1".into(), watermark: 1_468_152_706_921, timestamp: NOW },
            ]
        );
        let far = NOW + FUTURE_SLACK_MILLIS + 1;
        let not_sane = ": not a time between the epoch and a day after receipt";
        assert_eq!(
            envelope.ignored,
            vec![
                Ignored(format!("a delivery with watermark {far}{not_sane}")),
                Ignored(format!("a read with watermark 0{not_sane}")),
                Ignored(format!("a read with watermark -1468152706921{not_sane}")),
                Ignored(format!("a delivery with watermark {}{not_sane}", i64::MAX)),
                Ignored(format!("a read with watermark {}{not_sane}", i64::MAX)),
                Ignored(format!("a delivery with watermark {}{not_sane}", i64::MAX)),
            ]
        );
    }

    proptest::proptest! {
        /// Extreme times, including a receipt time at the ends of i64, neither panic nor overflow
        /// into range: what is forwarded is sane or the receipt time.
        #[test]
        fn extreme_times_never_panic_and_forwarded_times_are_sane(
            timestamp in proptest::prop_oneof![
                proptest::prelude::any::<i64>().prop_map(|n| json!(n)),
                proptest::prelude::any::<u64>().prop_map(|n| json!(n)),
                proptest::prelude::any::<f64>().prop_map(|n| json!(n)),
                proptest::prelude::any::<i64>().prop_map(|n| json!(n.to_string())),
            ],
            watermark in proptest::prelude::any::<i64>(),
            entry_time in proptest::prelude::any::<i64>(),
            received_at in proptest::prop_oneof![proptest::prelude::any::<i64>(), proptest::strategy::Just(i64::MAX), proptest::strategy::Just(NOW)],
        ) {
            let items = json!([
                {"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": timestamp, "message": {"mid": "m", "text": "x"}},
                {"sender": {"id": "1"}, "recipient": {"id": PAGE}, "timestamp": timestamp, "read": {"watermark": watermark}},
            ]);
            let envelope = events_at(json!({"object": "page", "entry": [{"id": PAGE, "time": entry_time, "messaging": items}]}), received_at);
            for event in &envelope.events {
                let (timestamp, watermark) = match event {
                    MessengerEvent::Message(m) => (m.timestamp, None),
                    MessengerEvent::Read { timestamp, watermark, .. } | MessengerEvent::Delivery { timestamp, watermark, .. } => (*timestamp, Some(*watermark)),
                };
                proptest::prop_assert!(timestamp == received_at || is_event_time(timestamp, received_at), "{timestamp}");
                if let Some(watermark) = watermark {
                    proptest::prop_assert!(watermark > 0 && watermark <= received_at.saturating_add(FUTURE_SLACK_MILLIS));
                }
            }
        }

        /// Whatever a verified body holds, parsing it gives a value, never a panic.
        #[test]
        fn any_body_is_parsed_without_a_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let body = crate::signing::tests_support::verified(&body);
            let _ = parse_envelope(&body, PAGE, 0);
        }

        #[test]
        fn envelope_shaped_json_is_parsed_without_a_panic(
            ids in proptest::collection::vec(proptest::prelude::any::<i64>(), 3),
            text in "\\PC{0,40}",
            kind in proptest::sample::select(vec!["message", "postback", "delivery", "read", "optin", "reaction"]),
            attachment in proptest::sample::select(vec!["image", "location", "template", "fallback", "sticker", "share", ""]),
        ) {
            let event = json!({
                "sender": {"id": ids[0]}, "recipient": {"id": PAGE}, "timestamp": ids[1],
                kind: {"mid": text, "text": text, "watermark": ids[2], "payload": text, "title": text, "is_echo": ids[2] % 2 == 0,
                       "attachments": [{"type": attachment, "title": text, "url": null,
                                        "payload": {"url": text, "coordinates": {"lat": ids[1], "long": text}, "template_type": text, "elements": [{"title": text}]}}]}
            });
            let body = json!({"object": "page", "entry": [{"id": PAGE, "time": ids[2], "messaging": [event.clone()], "standby": [event]}]});
            let envelope = parse_envelope(&crate::signing::tests_support::verified(body.to_string().as_bytes()), PAGE, 1).unwrap();
            for event in envelope.events {
                if let MessengerEvent::Message(message) = event {
                    proptest::prop_assert!(message.webhook_events().iter().all(|e| e.m_id().chars().count() <= M_ID_MAX));
                }
            }
        }
    }

    #[test]
    fn bodies_that_are_not_envelopes_are_refused() {
        let refuse = |body: &[u8]| {
            let body = crate::signing::tests_support::verified(body);
            parse_envelope(&body, PAGE, 0).unwrap_err()
        };
        assert!(refuse(b"{oops").0.starts_with("body: not valid JSON"));
        assert_eq!(refuse(b"[]").0, "body: must be a JSON object");
        assert_eq!(refuse(br#"{"object":"page"}"#).0, "entry: required, an array");
    }
}
