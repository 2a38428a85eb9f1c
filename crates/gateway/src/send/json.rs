//! Reading JSON the way Nylas's Go service does, or refusing where the readings could
//! differ.
//!
//! Go's `encoding/json` binds an object key to a struct field case-insensitively, with
//! Unicode simple folding (`"TO"`, `"Cc"`, `"attachmentſ"` with a long s, `"bcK"`...
//! all bind), and keeps the last of duplicate keys. A `serde_json::Value` keeps such
//! keys apart (and the last duplicate only), so the gateway could count `to` while Nylas
//! sends to `TO`. [`parse`] therefore refuses duplicate keys in any object, and
//! [`check_keys`] refuses a key that folds onto a field name without being spelled
//! exactly.
//!
//! Duplicates are caught by a [`DeserializeSeed`] that builds the `Value` itself while
//! serde_json tokenizes: the same parser, depth limit and number handling as
//! `serde_json::from_slice`, one pass, and no tokenizer of our own.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;
use serde_json::{Map, Value};

use super::InspectError;

/// Keys of a message object that must be spelled exactly (see [`check_keys`]): what the
/// cost reads, and the other fields that change what Nylas sends.
pub(crate) const MESSAGE_FIELDS: &[&str] = &[
    "to",
    "cc",
    "bcc",
    "from",
    "reply_to",
    "subject",
    "body",
    "attachments",
    "custom_headers",
    "send_at",
    "use_draft",
    "template",
    "tracking_options",
    "metadata",
    "reply_to_message_id",
    "is_plaintext",
];
/// Keys of a recipient object in `to`, `cc`, `bcc`, `from` and `reply_to`.
pub(crate) const ADDRESS_FIELDS: &[&str] = &["email", "name"];
/// Keys of an attachment object.
pub(crate) const ATTACHMENT_FIELDS: &[&str] = &[
    "filename",
    "content_type",
    "content",
    "size",
    "content_id",
    "is_inline",
];
/// Keys of a `custom_headers` entry.
pub(crate) const HEADER_FIELDS: &[&str] = &["name", "value"];

/// Whether `key` may be named in an error message: a field name of the Nylas message
/// object or one of its parts. Any other key is user data (metadata, template variables).
fn nameable(key: &str) -> bool {
    [
        MESSAGE_FIELDS,
        ADDRESS_FIELDS,
        ATTACHMENT_FIELDS,
        HEADER_FIELDS,
    ]
    .iter()
    .any(|fields| fields.contains(&key))
}

/// Parses JSON into a [`Value`], refusing a duplicate key in any object.
///
/// # Errors
///
/// [`InspectError::Invalid`] for bad JSON or a duplicate key.
pub(crate) fn parse(bytes: &[u8]) -> Result<Value, InspectError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = NoDuplicates.deserialize(&mut de).map_err(invalid_json)?;
    de.end().map_err(invalid_json)?;
    Ok(value)
}

fn invalid_json(e: serde_json::Error) -> InspectError {
    match e.classify() {
        // Only our own errors are data errors: the visitor takes any value.
        Category::Data => InspectError::Invalid(e.to_string()),
        _ => InspectError::Invalid(format!("bad json: {e}")),
    }
}

fn duplicate(key: &str) -> String {
    let key = if nameable(key) {
        format!("`{key}`")
    } else {
        "an object key".to_owned()
    };
    format!(
        "{key} appears twice in one json object (Nylas would read only the last); send each key once"
    )
}

/// Builds a [`Value`] like serde_json does, but fails on a duplicate object key.
struct NoDuplicates;

impl<'de> DeserializeSeed<'de> for NoDuplicates {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(NoDuplicates)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(duplicate(&key)));
            }
            let value = map.next_value_seed(NoDuplicates)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// `s` case-folded for comparing with an ASCII field name, as Go compares keys.
///
/// Each char is upper-cased, then lower-cased: this reaches every ASCII letter Unicode
/// simple folding reaches (`ſ` U+017F gives `s`, the Kelvin sign U+212A gives `k`), and
/// a few more through full case mapping (`ﬁ` gives `fi`): those are refused too, which
/// errs on the safe side.
pub(crate) fn fold(s: &str) -> String {
    s.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// Refuses a key of `object` that Go would bind to one of `fields` (lowercase ASCII)
/// without being spelled exactly so. `what` names the object in the message.
///
/// # Errors
///
/// [`InspectError::Invalid`] naming the field, not the key.
pub(crate) fn check_keys(
    object: &Map<String, Value>,
    fields: &[&str],
    what: &str,
) -> Result<(), InspectError> {
    for key in object.keys() {
        if fields.contains(&key.as_str()) {
            continue;
        }
        let folded = fold(key);
        if let Some(field) = fields.iter().find(|f| **f == folded) {
            return Err(InspectError::Invalid(format!(
                "{what} has a key that Nylas reads as `{field}` but that is not spelled \
                 `{field}`; spell field names exactly, in lowercase"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(r: Result<Value, InspectError>) -> String {
        match r {
            Err(InspectError::Invalid(m)) => m,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn serde_json_alone_keeps_the_last_duplicate() {
        // Why `parse` exists: a plain `Value` hides the first `to`.
        let v: Value = serde_json::from_str(r#"{"to":[1],"to":[2,3]}"#).expect("json");
        assert_eq!(v, json!({"to": [2, 3]}));
    }

    #[test]
    fn parses_like_serde_json() {
        let text = r#"{"a":[1,-2,3.5,true,null,"x\u00e9"],"b":{"c":{}},"n":18446744073709551615}"#;
        let expected: Value = serde_json::from_str(text).expect("json");
        assert_eq!(parse(text.as_bytes()).expect("parse"), expected);
    }

    #[test]
    fn refuses_duplicate_keys_at_any_depth() {
        let m = message(parse(br#"{"to":[],"to":[{"email":"a@x.com"}]}"#));
        assert!(m.contains("`to` appears twice"), "{m}");
        let m = message(parse(br#"{"to":[{"email":"a@x.com","email":"b@x.com"}]}"#));
        assert!(m.contains("`email` appears twice"), "{m}");
        // An escaped key is the same key.
        assert!(parse(br#"{"bcc":[],"\u0062cc":[]}"#).is_err());
        // User data is not echoed.
        let m = message(parse(br#"{"metadata":{"secret":1,"secret":2}}"#));
        assert!(m.contains("an object key") && !m.contains("secret"), "{m}");
    }

    #[test]
    fn bad_json_is_invalid() {
        for text in ["", "{", "[1,2", "{} x", r#"{"a":1,}"#] {
            let m = message(parse(text.as_bytes()));
            assert!(m.starts_with("bad json"), "{text:?}: {m}");
        }
    }

    #[test]
    fn folds_as_go_does() {
        assert_eq!(fold("TO"), "to");
        assert_eq!(fold("attachment\u{17f}"), "attachments");
        assert_eq!(fold("bc\u{212a}"), "bck");
        assert_eq!(fold("Reply_To"), "reply_to");
        assert_eq!(fold("\u{fb01}lename"), "filename");
    }

    #[test]
    fn check_keys_refuses_folded_spellings_only() {
        let fields = ["to", "attachments", "bcc"];
        let ok = json!({"to": [], "attachments": [], "other": 1, "OTHER": 2});
        assert!(check_keys(ok.as_object().expect("object"), &fields, "the message").is_ok());
        for key in ["TO", "tO", "Attachments", "attachment\u{17f}", "BCC"] {
            let mut object = Map::new();
            object.insert(key.to_owned(), json!([]));
            let err = check_keys(&object, &fields, "the message").expect_err(key);
            let InspectError::Invalid(m) = err else {
                panic!("{key}")
            };
            assert!(m.starts_with("the message has a key"), "{m}");
        }
    }
}
