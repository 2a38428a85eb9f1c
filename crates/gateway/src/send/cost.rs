//! What a send costs: unique recipients and the size of the message as the provider
//! sees it. See the [module docs](super) for the size model.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::InspectError;
use super::json::{
    ADDRESS_FIELDS, ATTACHMENT_FIELDS, HEADER_FIELDS, MESSAGE_FIELDS, check_keys, fold,
};

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
    /// Unique recipients across `to`, `cc` and `bcc`; addresses are the same recipient
    /// only when equal after ASCII lowercasing.
    pub recipients: u64,
    /// Bytes of the message as the provider will see it (an upper estimate).
    pub size: u64,
    /// When the message asks to go out (`send_at`).
    pub schedule: Schedule,
}

/// What a message object says of when it goes out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    /// `send_at` in unix seconds, when it is a positive whole number; `None` when absent,
    /// null, zero or negative (Nylas sends at once).
    pub send_at: Option<u64>,
    /// Whether the object has a `send_at` key at all (even null): the gateway must not add
    /// one of its own, since Go keeps the last of duplicate keys.
    pub names_send_at: bool,
    /// Whether `use_draft` is `true` (the message is saved as a draft and sent from it).
    pub use_draft: bool,
}

/// Reads `send_at` and `use_draft` of a message object.
///
/// # Errors
/// [`InspectError::Invalid`] for a `send_at` that is not a whole number of seconds within
/// Go's `int64` (a string, a fraction, an exponent): Nylas would refuse it or read it in a
/// way the gateway cannot be sure of.
fn schedule(fields: &Map<String, Value>) -> Result<Schedule, InspectError> {
    let send_at = match fields.get("send_at") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.is_i64() => n.as_i64().and_then(|v| u64::try_from(v).ok()),
        Some(_) => {
            return Err(InspectError::Invalid(
                "the message: `send_at` must be a whole number of unix seconds".into(),
            ));
        }
    };
    Ok(Schedule {
        send_at: send_at.filter(|&v| v > 0),
        names_send_at: fields.contains_key("send_at"),
        use_draft: matches!(fields.get("use_draft"), Some(Value::Bool(true))),
    })
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

/// Characters of address lists and display-name forms, never of one bare address.
const NOT_IN_ADDRESS: [char; 11] = ['"', '<', '>', ',', ';', ':', '(', ')', '[', ']', '\\'];

/// Unique recipient addresses. Two addresses are one recipient only when they are equal
/// after ASCII lowercasing: any other difference (Unicode case such as the Kelvin sign
/// against `k`, whitespace) counts them twice, which errs on the safe side.
#[derive(Debug, Default)]
pub(crate) struct Recipients(HashSet<String>);

impl Recipients {
    /// Adds one address, as given; an empty one is ignored.
    pub(crate) fn add(&mut self, address: &str) {
        if !address.is_empty() {
            self.0.insert(address.to_ascii_lowercase());
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.0.len() as u64
    }
}

/// [`cost_from_message_json`] of raw JSON bytes, read as strictly as a send body: an
/// object with a key twice (which Go's `encoding/json` would read as its last value) is
/// refused. For a draft read from Nylas.
///
/// # Errors
/// As [`cost_from_message_json`], and [`InspectError::Invalid`] for bytes that are not
/// JSON or hold a duplicate key.
pub fn cost_from_message_bytes(bytes: &[u8]) -> Result<SendCost, InspectError> {
    cost_from_message_json(&super::json::parse(bytes)?)
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
/// not be let through. That includes a key that Go would read as a counted field but
/// that is spelled otherwise (`"TO"`, `"Cc"`), a recipient given as a string, an
/// `email` that is not exactly one bare address (no padding is trimmed), and a custom
/// header that names recipients. See `docs/send-requests.md`.
///
/// # Examples
///
/// ```
/// use gateway::send::cost_from_message_json;
/// use serde_json::json;
///
/// let draft = json!({"data": {
///     "to": [{"email": "A@x.com"}], "cc": [{"email": "a@X.com"}], "bcc": null,
///     "attachments": [{"filename": "f", "size": 16_000_000}],
/// }});
/// let cost = cost_from_message_json(&draft).unwrap();
/// assert_eq!(cost.recipients, 1);
/// assert!(cost.size > 20_000_000);
///
/// // Nothing is trimmed: a padded address is refused, not counted as `a@x.com`.
/// let padded = json!({"to": [{"email": "A@x.com"}], "cc": [{"email": " a@X.com "}]});
/// assert!(cost_from_message_json(&padded).is_err());
/// ```
pub fn cost_from_message_json(v: &Value) -> Result<SendCost, InspectError> {
    let message = match v.get("data") {
        Some(data @ Value::Object(_)) if !is_message(v) => data,
        _ => v,
    };
    let (cost, _) = measure(message)?;
    Ok(cost)
}

fn is_message(v: &Value) -> bool {
    ["to", "cc", "bcc", "subject", "body", "attachments"]
        .iter()
        .any(|k| v.get(k).is_some())
}

/// Cost of a message object a client sends (E1, E7, the `message` part of E1m), which
/// must name at least one recipient; also returns its recipients apart, for reuse.
pub(crate) fn message_cost(message: &Value) -> Result<(SendCost, Recipients), InspectError> {
    let (cost, recipients) = measure(message)?;
    if recipients.count() == 0 {
        return Err(InspectError::Invalid(
            "the message has no recipients: `to`, `cc` and `bcc` are all empty or missing".into(),
        ));
    }
    Ok((cost, recipients))
}

/// Cost of a message object, with no lower bound on recipients.
fn measure(message: &Value) -> Result<(SendCost, Recipients), InspectError> {
    let Value::Object(fields) = message else {
        return Err(InspectError::Invalid(
            "the message must be a json object".into(),
        ));
    };
    check_keys(fields, MESSAGE_FIELDS, "the message")?;
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
    if let Some(subject) = text(fields, "subject", "the message")? {
        one_line(subject, "the message", "subject")?;
        size = size.saturating_add(header_text_len(subject));
    }
    size = size.saturating_add(custom_headers_size(fields.get("custom_headers"))?);
    if let Some(body) = text(fields, "body", "the message")? {
        // Providers may well send the body base64-encoded; assume they do.
        size = size.saturating_add(base64_mime_len(body.len() as u64));
    }
    size = size.saturating_add(attachments_size(fields.get("attachments"))?);
    Ok((
        SendCost {
            recipients: recipients.count(),
            size,
            schedule: schedule(fields)?,
        },
        recipients,
    ))
}

/// The string at `key` of `object`, if there is one (null counts as none). Any other
/// value is refused: Go would not read it as text either.
fn text<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<&'a str>, InspectError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(InspectError::Invalid(format!(
            "{what}: `{key}` must be a string"
        ))),
    }
}

/// Refuses a line break in header text: it could start a header of its own.
fn one_line(s: &str, what: &str, key: &str) -> Result<(), InspectError> {
    if s.contains(['\r', '\n']) {
        return Err(InspectError::Invalid(format!(
            "{what}: `{key}` has a line break; header text must be one line"
        )));
    }
    Ok(())
}

/// The `(email, name)` pairs of a recipient list. Lists outside `to`/`cc`/`bcc`
/// (`from`, `reply_to`) only add to the size, so a wrong shape there is not an error;
/// their objects' keys are still checked, as the size reads them.
fn addresses<'a>(
    list: Option<&'a Value>,
    key: &str,
    strict: bool,
) -> Result<Vec<(&'a str, &'a str)>, InspectError> {
    let invalid = || {
        Err(InspectError::Invalid(format!(
            "`{key}` must be an array of {{name?, email}} objects (not strings)"
        )))
    };
    let items = match list {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) if !strict => return Ok(Vec::new()),
        Some(_) => return invalid(),
    };
    let what = format!("a recipient in `{key}`");
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(entry) = item else {
            if strict {
                return invalid();
            }
            continue;
        };
        check_keys(entry, ADDRESS_FIELDS, &what)?;
        if strict {
            out.push(recipient(entry, &what)?);
        } else if let Some(Value::String(email)) = entry.get("email") {
            let name = entry.get("name").and_then(Value::as_str).unwrap_or("");
            out.push((email.as_str(), name));
        }
    }
    Ok(out)
}

/// The `(email, name)` of one counted recipient: one bare address, an optional name.
fn recipient<'a>(
    entry: &'a Map<String, Value>,
    what: &str,
) -> Result<(&'a str, &'a str), InspectError> {
    let Some(email) = text(entry, "email", what)? else {
        return Err(InspectError::Invalid(format!(
            "{what} has no string `email`"
        )));
    };
    check_address(email, what)?;
    let name = text(entry, "name", what)?.unwrap_or("");
    one_line(name, what, "name")?;
    Ok((email, name))
}

/// Refuses anything but one bare address, `local@domain`, in a recipient's `email`: no
/// list, display-name form, whitespace, quotes, brackets or control characters. Nothing
/// is trimmed. The message names the problem, never the address.
fn check_address(email: &str, what: &str) -> Result<(), InspectError> {
    let why = if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("whitespace or a control character")
    } else if email.contains(NOT_IN_ADDRESS) {
        Some("a character of an address list or display-name form (one of \" < > , ; : ( ) [ ] \\)")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(InspectError::Invalid(format!(
            "{what} has {why} in `email`; give exactly one bare address (local@domain) per \
             recipient, and a display name in `name`"
        )));
    }
    match email.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            Ok(())
        }
        _ => Err(InspectError::Invalid(format!(
            "{what} has an `email` that is not local@domain with exactly one `@`"
        ))),
    }
}

/// Size of the `custom_headers` of a message: an array of `{name, value}` objects, none
/// naming a recipient header.
fn custom_headers_size(list: Option<&Value>) -> Result<u64, InspectError> {
    let invalid = || {
        InspectError::Invalid("`custom_headers` must be an array of {name, value} objects".into())
    };
    let items = match list {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid()),
    };
    let what = "a `custom_headers` entry";
    let mut total = 0u64;
    for item in items {
        let Value::Object(header) = item else {
            return Err(invalid());
        };
        check_keys(header, HEADER_FIELDS, what)?;
        let Some(name) = text(header, "name", what)? else {
            return Err(invalid());
        };
        check_header_name(name)?;
        let value = text(header, "value", what)?.unwrap_or("");
        one_line(value, what, "value")?;
        total = total
            .saturating_add(header_text_len(name))
            .saturating_add(header_text_len(value))
            .saturating_add(4);
    }
    Ok(total)
}

/// Refuses a custom header that names recipients (`To`, `Cc`, `Bcc`, `Resent-*`, in any
/// case or folding, with any padding), and any name that is not a plain RFC 5322 field
/// name (printable ASCII without spaces or colons).
fn check_header_name(name: &str) -> Result<(), InspectError> {
    let folded = fold(name.trim_matches(|c: char| c.is_whitespace() || c.is_control()));
    if matches!(folded.as_str(), "to" | "cc" | "bcc") || folded.starts_with("resent-") {
        return Err(InspectError::Invalid(
            "`custom_headers` names a recipient header (To, Cc, Bcc or Resent-*); put \
             recipients in `to`, `cc` and `bcc`"
                .into(),
        ));
    }
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(InspectError::Invalid(
            "`custom_headers` has a `name` that is not a header field name (printable \
             ASCII, no spaces or colons)"
                .into(),
        ));
    }
    Ok(())
}

/// Encoded size of the attachments of a message object.
fn attachments_size(list: Option<&Value>) -> Result<u64, InspectError> {
    let invalid = || InspectError::Invalid("`attachments` must be an array of objects".into());
    let items = match list {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid()),
    };
    let what = "an attachment";
    let mut total = 0u64;
    for item in items {
        let Value::Object(attachment) = item else {
            return Err(invalid());
        };
        check_keys(attachment, ATTACHMENT_FIELDS, what)?;
        let from_content = text(attachment, "content", what)?.map_or(0, base64_decoded_len);
        let declared = match attachment.get("size") {
            None | Some(Value::Null) => 0,
            Some(size @ Value::Number(_)) => json_size(size).unwrap_or(0),
            Some(_) => {
                return Err(InspectError::Invalid(
                    "an attachment: `size` must be a number".into(),
                ));
            }
        };
        total = total.saturating_add(attachment_size(from_content.max(declared)));
        for key in ["filename", "content_type", "content_id"] {
            let len = text(attachment, key, what)?.map_or(0, header_text_len);
            total = total.saturating_add(len);
        }
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
        // Only ASCII case is ignored: `Ü` and `ü` are two recipients.
        let v = json!({
            "to": [{"name": "A", "email": "a@x.com"}, {"email": "B@x.com"}],
            "cc": [{"email": "A@X.COM"}, {"email": "c@x.com"}],
            "bcc": [{"email": "b@x.com"}, {"email": "Ü@x.com"}, {"email": "ü@X.com"}],
            "reply_to": [{"email": "r@x.com"}],
            "from": [{"email": "f@x.com"}],
        });
        assert_eq!(cost_from_message_json(&v).expect("cost").recipients, 5);
    }

    fn refusal(v: &Value) -> String {
        match cost_from_message_json(v) {
            Err(InspectError::Invalid(m)) => m,
            other => panic!("{v}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn only_ascii_case_is_folded_when_deduplicating() {
        let mut set = Recipients::default();
        for address in [
            "k@x.com",
            "K@X.COM",
            "\u{212a}@x.com",
            "\u{17f}@x.com",
            "s@x.com",
        ] {
            set.add(address);
        }
        // k, Kelvin-k, long-s, s: the Kelvin sign and long s are other mailboxes.
        assert_eq!(set.count(), 4);
        set.add("");
        set.add(" k@x.com");
        assert_eq!(set.count(), 5, "nothing is trimmed");
        let v = json!({"to": [{"email": "k@x.com"}], "cc": [{"email": "\u{212a}@x.com"}]});
        assert_eq!(cost_from_message_json(&v).expect("cost").recipients, 2);
    }

    #[test]
    fn folded_keys_are_refused_at_every_level() {
        let to = json!([{"email": "a@x.com"}]);
        for v in [
            json!({"to": to, "TO": [{"email": "b@x.com"}]}),
            json!({"to": to, "Cc": [{"email": "b@x.com"}]}),
            json!({"to": to, "bcC": [{"email": "b@x.com"}]}),
            json!({"to": to, "attachment\u{17f}": [{"size": 9_000_000}]}),
            json!({"to": to, "Subject": "s"}),
            json!({"to": to, "Custom_Headers": []}),
            json!({"to": to, "trac\u{212a}ing_options": {}}),
            json!({"to": [{"email": "a@x.com", "EMAIL": "b@x.com"}]}),
            json!({"to": [{"email": "a@x.com", "Name": "N"}]}),
            json!({"to": to, "from": [{"Email": "f@x.com"}]}),
            json!({"to": to, "reply_to": [{"email": "r@x.com", "nAme": "R"}]}),
            json!({"to": to, "attachments": [{"size": 1, "\u{17f}ize": 9_000_000}]}),
            json!({"to": to, "attachments": [{"Content": "QUJD"}]}),
            json!({"to": to, "attachments": [{"fileName": "f"}]}),
            json!({"to": to, "custom_headers": [{"name": "X-A", "Value": "v"}]}),
            json!({"to": to, "custom_headers": [{"NAME": "Bcc", "name": "X-A"}]}),
        ] {
            let m = refusal(&v);
            assert!(m.contains("has a key that Nylas reads as"), "{v}: {m}");
        }
        // Keys that fold onto no field are Nylas's business.
        let v = json!({"to": to, "X-Extra": 1, "Metadata2": {}});
        assert!(cost_from_message_json(&v).is_ok());
    }

    #[test]
    fn a_recipient_is_one_bare_address() {
        for email in [
            " a@x.com",
            "a@x.com ",
            "a@x.com\t",
            "a@x.com\u{a0}",
            "a@x.com, b@y.com",
            "a@x.com;b@y.com",
            "Ann <a@x.com>",
            "<a@x.com>",
            "\"a\"@x.com",
            "a@x.com\r\nb@y.com",
            "a\u{0}@x.com",
            "g:a@x.com;",
            "a@x.com(c)",
            "a\\@x.com",
            "a@[1.2.3.4]",
            "",
            "ax.com",
            "@x.com",
            "a@",
            "a@b@x.com",
        ] {
            let v = json!({"bcc": [{"email": email}]});
            let m = refusal(&v);
            assert!(email.is_empty() || !m.contains(email), "{m}");
            assert!(m.contains("`bcc`"), "{m}");
        }
        for v in [
            json!({"to": ["a@x.com"]}),
            json!({"cc": [{"email": ["a@x.com"]}]}),
            json!({"to": [{"email": "a@x.com", "name": 5}]}),
            json!({"to": [{"email": "a@x.com", "name": "A\r\nBcc: b@y.com"}]}),
        ] {
            refusal(&v);
        }
        let ok = json!({"to": [{"email": "o'brien+tag@sub.x.com", "name": "Smith, Ann"}]});
        assert_eq!(cost_from_message_json(&ok).expect("cost").recipients, 1);
    }

    #[test]
    fn custom_headers_must_not_name_recipients() {
        for name in [
            "To",
            "to",
            "CC",
            "bcc",
            " Bcc",
            "Bcc ",
            "\tCc\r\n",
            "Resent-To",
            "RESENT-BCC",
            "resent-cc",
            "Resent-Sender",
            "Re\u{17f}ent-To",
            "B\u{200b}cc",
            "X-A: b\r\nBcc",
            "X A",
            "",
        ] {
            let v = json!({"to": [{"email": "a@x.com"}],
                "custom_headers": [{"name": name, "value": "b@y.com"}]});
            let m = refusal(&v);
            assert!(
                m.contains("`custom_headers`") && !m.contains("b@y.com"),
                "{name:?}: {m}"
            );
        }
        for headers in [
            json!({"X-A": "1"}),
            json!(["X-A: 1"]),
            json!([{"value": "1"}]),
            json!([{"name": "X-A", "value": "1\r\nBcc: b@y.com"}]),
        ] {
            refusal(&json!({"to": [{"email": "a@x.com"}], "custom_headers": headers}));
        }
        let ok = json!({"to": [{"email": "a@x.com"}],
            "custom_headers": [{"name": "X-Tosser", "value": "1"}, {"name": "Resent", "value": "2"}]});
        assert!(cost_from_message_json(&ok).is_ok());
    }

    #[test]
    fn text_fields_must_be_strings() {
        for v in [
            json!({"to": [{"email": "a@x.com"}], "subject": ["s"]}),
            json!({"to": [{"email": "a@x.com"}], "subject": "a\r\nBcc: b@y.com"}),
            json!({"to": [{"email": "a@x.com"}], "body": {"html": "x"}}),
            json!({"to": [{"email": "a@x.com"}], "attachments": [{"content": 5}]}),
            json!({"to": [{"email": "a@x.com"}], "attachments": [{"size": "9000000"}]}),
            json!({"to": [{"email": "a@x.com"}], "attachments": [{"filename": 1}]}),
        ] {
            refusal(&v);
        }
    }

    #[test]
    fn a_send_needs_a_recipient() {
        for v in [
            json!({"subject": "s"}),
            json!({"to": [], "cc": null, "bcc": []}),
            json!({"reply_to": [{"email": "r@x.com"}], "from": [{"email": "f@x.com"}]}),
        ] {
            let Err(InspectError::Invalid(m)) = message_cost(&v) else {
                panic!("{v}");
            };
            assert!(m.contains("no recipients"), "{m}");
        }
        let (cost, _) = message_cost(&json!({"bcc": [{"email": "a@x.com"}]})).expect("cost");
        assert_eq!(cost.recipients, 1);
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
