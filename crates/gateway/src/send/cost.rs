//! What a send costs: unique recipients and the size of the message as the provider
//! sees it. See the [module docs](super) for the size model.

use std::collections::HashSet;

use serde_json::Value;

use super::InspectError;

/// Fixed allowance for the header section a provider writes (Date, Message-ID, MIME
/// headers, Received lines added on the way...), before subject and addresses.
pub const HEADER_ALLOWANCE: u64 = 1024;
/// Added per address for quoting, angle brackets, a comma and folding.
pub const ADDRESS_OVERHEAD: u64 = 8;
/// Headers and boundary of one attachment's MIME part (Content-Type,
/// Content-Disposition, Content-Transfer-Encoding), before its file name.
pub const PART_HEADER_ALLOWANCE: u64 = 256;
/// Line length of base64 in MIME (RFC 2045), each line ending in CRLF.
const MIME_LINE: u64 = 76;

/// What one send costs against a quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendCost {
    /// Unique recipients across `to`, `cc` and `bcc`, compared case-insensitively after
    /// trimming.
    pub recipients: u64,
    /// Bytes of the message as the provider will see it (an upper estimate).
    pub size: u64,
}

/// Size of `n` bytes once base64-encoded for MIME: `ceil(n/3)*4`, plus CRLF per 76
/// output characters.
///
/// # Examples
///
/// ```
/// use gateway::send::base64_mime_len;
///
/// assert_eq!(base64_mime_len(3), 4 + 2);
/// assert!(base64_mime_len(16_000_000) > 20_000_000);
/// assert!(base64_mime_len(14_000_000) < 20_000_000);
/// ```
pub fn base64_mime_len(n: u64) -> u64 {
    let encoded = n.div_ceil(3).saturating_mul(4);
    encoded.saturating_add(encoded.div_ceil(MIME_LINE).saturating_mul(2))
}

/// Bytes that a base64 text decodes to: `len*3/4 - padding`, ignoring whitespace.
pub fn base64_decoded_len(encoded: &str) -> u64 {
    let bytes = encoded.as_bytes();
    let chars = bytes.iter().filter(|b| !b.is_ascii_whitespace()).count() as u64;
    let padding = bytes
        .iter()
        .rev()
        .filter(|b| !b.is_ascii_whitespace())
        .take_while(|b| **b == b'=')
        .count() as u64;
    (chars.saturating_mul(3) / 4).saturating_sub(padding.min(2))
}

/// Bytes a header text takes once written: as is when ASCII, else as RFC 2047 encoded
/// words (base64 plus `=?UTF-8?B?...?=` per 45 input bytes), bounded above by `2n + 12`.
fn header_text_len(s: &str) -> u64 {
    let n = s.len() as u64;
    if s.is_ascii() {
        n
    } else {
        n.saturating_mul(2).saturating_add(12)
    }
}

/// Unique recipient addresses, trimmed and compared case-insensitively.
#[derive(Debug, Default)]
pub(crate) struct Recipients(HashSet<String>);

impl Recipients {
    /// Adds one address; empty ones are ignored.
    pub(crate) fn add(&mut self, address: &str) {
        let address = address.trim();
        if !address.is_empty() {
            self.0.insert(address.to_lowercase());
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Cost of a message object (the JSON body of E1/E7, the `message` part of E1m, or a
/// draft fetched from Nylas), or of a response envelope `{"data": {...}}` holding one.
///
/// Attachments count with the larger of their `size` and the decoded length of their
/// base64 `content`, so a draft's attachments (which have `size` but no content) count
/// too.
///
/// # Errors
///
/// [`InspectError::Invalid`] when the value is not an object or a recipient list,
/// recipient or attachment has the wrong shape: a recipient that cannot be counted must
/// not be let through.
///
/// # Examples
///
/// ```
/// use gateway::send::cost_from_message_json;
/// use serde_json::json;
///
/// let draft = json!({"data": {
///     "to": [{"email": "A@x.com"}], "cc": [{"email": " a@X.com "}], "bcc": null,
///     "attachments": [{"filename": "f", "size": 16_000_000}],
/// }});
/// let cost = cost_from_message_json(&draft).unwrap();
/// assert_eq!(cost.recipients, 1);
/// assert!(cost.size > 20_000_000);
/// ```
pub fn cost_from_message_json(v: &Value) -> Result<SendCost, InspectError> {
    let message = match v.get("data") {
        Some(data @ Value::Object(_)) if !is_message(v) => data,
        _ => v,
    };
    let (cost, _) = message_cost(message)?;
    Ok(cost)
}

fn is_message(v: &Value) -> bool {
    ["to", "cc", "bcc", "subject", "body", "attachments"]
        .iter()
        .any(|k| v.get(k).is_some())
}

/// Cost of a message object; also returns its recipient count apart, for reuse.
pub(crate) fn message_cost(message: &Value) -> Result<(SendCost, Recipients), InspectError> {
    let Value::Object(fields) = message else {
        return Err(InspectError::Invalid(
            "the message must be a json object".into(),
        ));
    };
    let mut recipients = Recipients::default();
    let mut size = HEADER_ALLOWANCE;
    for key in ["to", "cc", "bcc", "from", "reply_to"] {
        let counted = matches!(key, "to" | "cc" | "bcc");
        for (email, name) in addresses(fields.get(key), key, counted)? {
            if counted {
                recipients.add(email);
            }
            size = size
                .saturating_add(header_text_len(email))
                .saturating_add(header_text_len(name))
                .saturating_add(ADDRESS_OVERHEAD);
        }
    }
    if let Some(Value::String(subject)) = fields.get("subject") {
        size = size.saturating_add(header_text_len(subject));
    }
    if let Some(Value::Array(headers)) = fields.get("custom_headers") {
        for header in headers {
            let len = |k: &str| {
                header
                    .get(k)
                    .and_then(Value::as_str)
                    .map_or(0, header_text_len)
            };
            size = size
                .saturating_add(len("name"))
                .saturating_add(len("value"))
                .saturating_add(4);
        }
    }
    if let Some(Value::String(body)) = fields.get("body") {
        // Providers may well send the body base64-encoded; assume they do.
        size = size.saturating_add(base64_mime_len(body.len() as u64));
    }
    size = size.saturating_add(attachments_size(fields.get("attachments"))?);
    Ok((
        SendCost {
            recipients: recipients.count(),
            size,
        },
        recipients,
    ))
}

/// The `(email, name)` pairs of a recipient list. Lists outside `to`/`cc`/`bcc`
/// (`from`, `reply_to`) only add to the size, so a wrong shape there is not an error.
fn addresses<'a>(
    list: Option<&'a Value>,
    key: &str,
    strict: bool,
) -> Result<Vec<(&'a str, &'a str)>, InspectError> {
    let invalid = |what: &str| Err(InspectError::Invalid(format!("`{key}` {what}")));
    let items = match list {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) if !strict => return Ok(Vec::new()),
        Some(_) => return invalid("must be an array of {name?, email} objects"),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::String(email) => out.push((email.as_str(), "")),
            Value::Object(entry) => match entry.get("email") {
                Some(Value::String(email)) => {
                    let name = entry.get("name").and_then(Value::as_str).unwrap_or("");
                    out.push((email.as_str(), name));
                }
                _ if !strict => {}
                _ => return invalid("has a recipient without a string `email`"),
            },
            _ if !strict => {}
            _ => return invalid("must be an array of {name?, email} objects"),
        }
    }
    Ok(out)
}

/// Encoded size of the attachments of a message object.
fn attachments_size(list: Option<&Value>) -> Result<u64, InspectError> {
    let invalid = || InspectError::Invalid("`attachments` must be an array of objects".into());
    let items = match list {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid()),
    };
    let mut total = 0u64;
    for item in items {
        let Value::Object(attachment) = item else {
            return Err(invalid());
        };
        let from_content = match attachment.get("content") {
            Some(Value::String(content)) => base64_decoded_len(content),
            _ => 0,
        };
        let declared = attachment.get("size").and_then(json_size).unwrap_or(0);
        let text = |k: &str| {
            attachment
                .get(k)
                .and_then(Value::as_str)
                .map_or(0, header_text_len)
        };
        total = total
            .saturating_add(attachment_size(from_content.max(declared)))
            .saturating_add(text("filename"))
            .saturating_add(text("content_type"))
            .saturating_add(text("content_id"));
    }
    Ok(total)
}

/// Encoded size of one attachment of `n` bytes, with its part headers.
pub(crate) fn attachment_size(n: u64) -> u64 {
    base64_mime_len(n).saturating_add(PART_HEADER_ALLOWANCE)
}

fn json_size(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        // Saturating float-to-int conversion; NaN and negatives give nothing.
        v.as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .map(|f| f.ceil() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_lengths() {
        assert_eq!(base64_mime_len(0), 0);
        assert_eq!(base64_mime_len(1), 6);
        assert_eq!(base64_mime_len(57), 76 + 2);
        assert_eq!(base64_mime_len(58), 80 + 4);
        assert_eq!(base64_decoded_len(""), 0);
        assert_eq!(base64_decoded_len("QQ=="), 1);
        assert_eq!(base64_decoded_len("QUI="), 2);
        assert_eq!(base64_decoded_len("QUJD"), 3);
        assert_eq!(base64_decoded_len("QUJDRA"), 4);
        assert_eq!(base64_decoded_len("QUJD\r\nRA==\r\n"), 4);
        assert_eq!(base64_decoded_len("QQ"), 1);
    }

    #[test]
    fn recipients_are_unique_across_lists() {
        let v = json!({
            "to": [{"name": "A", "email": "a@x.com"}, {"email": "B@x.com"}],
            "cc": [{"email": "  A@X.COM "}, {"email": "c@x.com"}],
            "bcc": [{"email": "b@x.com"}, {"email": "Ü@x.com"}, {"email": "ü@X.com"}],
            "reply_to": [{"email": "r@x.com"}],
            "from": [{"email": "f@x.com"}],
        });
        assert_eq!(cost_from_message_json(&v).expect("cost").recipients, 4);
    }

    #[test]
    fn missing_and_null_lists_are_empty() {
        let cost = cost_from_message_json(&json!({"to": null, "subject": "s"})).expect("cost");
        assert_eq!(cost.recipients, 0);
        assert_eq!(cost.size, HEADER_ALLOWANCE + 1);
    }

    #[test]
    fn wrong_shapes_are_invalid() {
        for v in [
            json!([]),
            json!({"to": "a@x.com"}),
            json!({"cc": [{"name": "no email"}]}),
            json!({"bcc": [{"email": 5}]}),
            json!({"to": [7]}),
            json!({"attachments": {}}),
            json!({"attachments": ["x"]}),
        ] {
            assert!(
                matches!(cost_from_message_json(&v), Err(InspectError::Invalid(_))),
                "{v}"
            );
        }
        // `from` and `reply_to` are not counted, so their shape is Nylas's business.
        assert!(cost_from_message_json(&json!({"reply_to": "x", "from": [1]})).is_ok());
    }

    #[test]
    fn attachment_size_takes_the_larger_of_content_and_size() {
        let with = |a: Value| {
            cost_from_message_json(&json!({ "attachments": [a] }))
                .expect("cost")
                .size
        };
        let base = HEADER_ALLOWANCE + PART_HEADER_ALLOWANCE;
        assert_eq!(with(json!({"content": "QUJD"})), base + 6);
        assert_eq!(
            with(json!({"content": "QUJD", "size": 300})),
            base + base64_mime_len(300)
        );
        assert_eq!(
            with(json!({"content": "QUJDQUJD", "size": 1})),
            base + base64_mime_len(6)
        );
        assert_eq!(with(json!({"size": 2.5})), base + base64_mime_len(3));
        assert_eq!(with(json!({"size": -4})), base);
    }

    #[test]
    fn sixteen_megabytes_do_not_fit_in_twenty_fourteen_do() {
        let limit = 20_000_000;
        let size = |n: u64| {
            cost_from_message_json(&json!({"attachments": [{"size": n}]}))
                .expect("cost")
                .size
        };
        assert!(size(16_000_000) > limit);
        assert!(size(14_000_000) <= limit);
    }

    #[test]
    fn draft_envelope_is_unwrapped() {
        let v = json!({"request_id": "r", "data": {"to": [{"email": "a@x.com"}], "body": "hi"}});
        let cost = cost_from_message_json(&v).expect("cost");
        assert_eq!(cost.recipients, 1);
        assert_eq!(
            cost.size,
            HEADER_ALLOWANCE + 7 + ADDRESS_OVERHEAD + base64_mime_len(2)
        );
    }

    #[test]
    fn non_ascii_header_text_is_inflated() {
        assert_eq!(header_text_len("abc"), 3);
        assert_eq!(header_text_len("é"), 2 * 2 + 12);
    }
}
