//! Reading send requests (JSON, multipart, raw MIME) and building the message Nylas
//! answers with.

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Map, Value, json};

use crate::record::is_multipart;
use crate::reply::ApiError;

/// The message fields of a send or draft request, attachments included.
pub(crate) type Fields = Map<String, Value>;

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// Nylas refuses a `Content-Type` carrying a charset (nylas-api.md); so does the fake.
fn refuse_charset(headers: &HeaderMap) -> Result<(), ApiError> {
    match content_type(headers) {
        Some(ct) if ct.to_ascii_lowercase().contains("charset") => Err(ApiError::bad_request(
            format!("unsupported Content-Type '{ct}': remove the charset parameter"),
        )),
        _ => Ok(()),
    }
}

fn json_object(bytes: &[u8], what: &str) -> Result<Fields, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::bad_request(format!(
            "{what} must be a JSON object"
        ))),
        Err(err) => Err(ApiError::bad_request(format!(
            "{what} is not valid JSON: {err}"
        ))),
    }
}

/// One multipart part, read whole.
struct Part {
    name: String,
    file_name: Option<String>,
    content_type: Option<String>,
    data: Bytes,
}

async fn multipart_parts(headers: &HeaderMap, body: Bytes) -> Result<Vec<Part>, ApiError> {
    let boundary = multer::parse_boundary(content_type(headers).unwrap_or_default())
        .map_err(|err| ApiError::bad_request(format!("invalid multipart Content-Type: {err}")))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    let malformed =
        |err: multer::Error| ApiError::bad_request(format!("malformed multipart body: {err}"));
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(ToString::to_string);
        let data = field.bytes().await.map_err(malformed)?;
        parts.push(Part {
            name,
            file_name,
            content_type,
            data,
        });
    }
    Ok(parts)
}

/// The message of an E1 (JSON) or E1m (multipart) request, or of a draft creation.
///
/// In multipart, the part named `message` is the JSON object whatever its
/// `filename` (the Python SDK sends `filename=""`); every other part is an attachment.
pub(crate) async fn parse_message(headers: &HeaderMap, body: Bytes) -> Result<Fields, ApiError> {
    refuse_charset(headers)?;
    if !is_multipart(headers) {
        let mut fields = json_object(&body, "the request body")?;
        normalize_field_attachments(&mut fields);
        return Ok(fields);
    }
    let mut message = None;
    let mut files = Vec::new();
    for part in multipart_parts(headers, body).await? {
        if part.name == "message" {
            message = Some(json_object(&part.data, "the 'message' part")?);
        } else {
            files.push(part_attachment(&part));
        }
    }
    let mut fields =
        message.ok_or_else(|| ApiError::bad_request("the multipart body has no 'message' part"))?;
    normalize_field_attachments(&mut fields);
    if let Some(Value::Array(attachments)) = fields.get_mut("attachments") {
        attachments.extend(files);
    }
    Ok(fields)
}

fn part_attachment(part: &Part) -> Value {
    // The SDKs name parts file0, file1, ... or by the attachment's content_id.
    let is_numbered = part
        .name
        .strip_prefix("file")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let mut attachment = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "filename": part.file_name.clone().filter(|f| !f.is_empty()).unwrap_or_else(|| part.name.clone()),
        "content_type": part.content_type.clone().unwrap_or_else(|| "application/octet-stream".into()),
        "size": part.data.len(),
    });
    if !is_numbered && !part.name.is_empty() {
        attachment["content_id"] = Value::String(part.name.clone());
    }
    attachment
}

/// The message of an E2 (`?type=mime`) request: the `mime` part, file or plain field,
/// parsed for its recipients and subject.
pub(crate) async fn parse_mime(headers: &HeaderMap, body: Bytes) -> Result<Fields, ApiError> {
    refuse_charset(headers)?;
    if !is_multipart(headers) {
        return Err(ApiError::bad_request(
            "a type=mime send must be multipart/form-data with a 'mime' part",
        ));
    }
    let part = multipart_parts(headers, body)
        .await?
        .into_iter()
        .find(|part| part.name == "mime")
        .ok_or_else(|| ApiError::bad_request("the multipart body has no 'mime' part"))?;
    let parsed = mail_parser::MessageParser::default()
        .parse(&part.data[..])
        .ok_or_else(|| ApiError::bad_request("the 'mime' part is not an RFC 5322 message"))?;
    let addresses = |address: Option<&mail_parser::Address<'_>>| -> Value {
        address
            .map(|list| {
                list.iter()
                    .filter_map(|addr| {
                        let email = addr.address()?;
                        let mut entry = json!({ "email": email });
                        if let Some(name) = addr.name() {
                            entry["name"] = Value::String(name.to_owned());
                        }
                        Some(entry)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut fields = Fields::new();
    fields.insert("to".into(), addresses(parsed.to()));
    fields.insert("cc".into(), addresses(parsed.cc()));
    fields.insert("bcc".into(), addresses(parsed.bcc()));
    fields.insert("from".into(), addresses(parsed.from()));
    fields.insert("reply_to".into(), addresses(parsed.reply_to()));
    fields.insert(
        "subject".into(),
        Value::String(parsed.subject().unwrap_or_default().to_owned()),
    );
    fields.insert(
        "body".into(),
        Value::String(parsed.body_text(0).unwrap_or_default().into_owned()),
    );
    fields.insert("attachments".into(), Value::Array(Vec::new()));
    fields.insert("mime_size".into(), json!(part.data.len()));
    Ok(fields)
}

fn normalize_field_attachments(fields: &mut Fields) {
    let attachments = fields
        .remove("attachments")
        .unwrap_or_else(|| Value::Array(Vec::new()));
    fields.insert("attachments".into(), normalize_attachments(attachments));
}

/// Attachment metadata as Nylas returns it: no base64 `content`, always a `size`.
pub(crate) fn normalize_attachments(attachments: Value) -> Value {
    let Value::Array(list) = attachments else {
        return Value::Array(Vec::new());
    };
    list.into_iter()
        .map(|attachment| {
            let Value::Object(mut attachment) = attachment else {
                return attachment;
            };
            let content = attachment.remove("content");
            if !attachment.get("size").is_some_and(Value::is_u64) {
                let size = content
                    .as_ref()
                    .and_then(Value::as_str)
                    .map_or(0, base64_len);
                attachment.insert("size".into(), json!(size));
            }
            Value::Object(attachment)
        })
        .collect()
}

/// The decoded length of base64 text, padded or not, whitespace ignored.
fn base64_len(text: &str) -> u64 {
    let symbols = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .count() as u64;
    symbols * 3 / 4
}

fn recipients(fields: &Fields, field: &str) -> Result<Vec<Value>, ApiError> {
    let list = match fields.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "'{field}' must be an array of {{name, email}}"
            )));
        }
    };
    for (i, entry) in list.iter().enumerate() {
        if !entry.get("email").is_some_and(Value::is_string) {
            return Err(ApiError::bad_request(format!(
                "'{field}[{i}].email' is required"
            )));
        }
    }
    Ok(list.clone())
}

/// The message object a send answers with.
///
/// # Errors
/// 400 when a recipient list is malformed or there is no recipient at all.
pub(crate) fn sent_message(
    grant_id: Option<&str>,
    default_from: &str,
    fields: &Fields,
) -> Result<Value, ApiError> {
    let to = recipients(fields, "to")?;
    let cc = recipients(fields, "cc")?;
    let bcc = recipients(fields, "bcc")?;
    if to.is_empty() && cc.is_empty() && bcc.is_empty() {
        return Err(ApiError::bad_request(
            "at least one recipient (to, cc or bcc) is required",
        ));
    }
    let from = match fields.get("from") {
        Some(Value::Array(from)) if !from.is_empty() => Value::Array(from.clone()),
        _ => json!([{ "email": default_from }]),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut data = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "object": "message",
        "thread_id": uuid::Uuid::new_v4().to_string(),
        "to": to,
        "cc": cc,
        "bcc": bcc,
        "from": from,
        "reply_to": fields.get("reply_to").cloned().unwrap_or_else(|| json!([])),
        "subject": fields.get("subject").cloned().unwrap_or_else(|| json!("")),
        "body": fields.get("body").cloned().unwrap_or_else(|| json!("")),
        "attachments": fields.get("attachments").cloned().unwrap_or_else(|| json!([])),
        "date": now,
    });
    if let Some(grant_id) = grant_id {
        data["grant_id"] = Value::String(grant_id.to_owned());
    }
    for passthrough in [
        "metadata",
        "tracking_options",
        "custom_headers",
        "mime_size",
    ] {
        if let Some(value) = fields.get(passthrough) {
            data[passthrough] = value.clone();
        }
    }
    if let Some(send_at) = fields.get("send_at").filter(|v| !v.is_null()) {
        data["send_at"] = send_at.clone();
        data["schedule_id"] = Value::String(uuid::Uuid::new_v4().to_string());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        headers
    }

    #[tokio::test]
    async fn python_style_message_part_with_empty_filename_is_the_json() {
        let body = "--b\r\n\
            Content-Disposition: form-data; name=\"message\"; filename=\"\"\r\n\
            Content-Type: application/json\r\n\r\n\
            {\"to\":[{\"email\":\"a@x.com\"}],\"subject\":\"hi\"}\r\n\
            --b\r\n\
            Content-Disposition: form-data; name=\"file0\"; filename=\"r.pdf\"\r\n\
            Content-Type: application/pdf\r\n\r\n\
            12345\r\n\
            --b--\r\n";
        let fields = parse_message(&headers("multipart/form-data; boundary=b"), body.into())
            .await
            .unwrap();
        assert_eq!(fields["subject"], "hi");
        assert_eq!(fields["attachments"][0]["filename"], "r.pdf");
        assert_eq!(fields["attachments"][0]["size"], 5);
        assert!(fields["attachments"][0].get("content_id").is_none());
    }

    #[tokio::test]
    async fn charset_in_content_type_is_refused() {
        let err = parse_message(&headers("application/json; charset=utf-8"), "{}".into())
            .await
            .unwrap_err();
        assert_eq!(err.status, 400);
    }

    #[test]
    fn base64_length_ignores_padding_and_whitespace() {
        assert_eq!(base64_len("aGVsbG8="), 5);
        assert_eq!(base64_len("aGVsbG8"), 5);
        assert_eq!(base64_len("aGVs\nbG8h"), 6);
    }

    #[test]
    fn scheduled_sends_get_a_schedule_id() {
        let fields = json!({"bcc": [{"email": "a@x.com"}], "send_at": 1_900_000_000});
        let data = sent_message(Some("g"), "me@x.com", fields.as_object().unwrap()).unwrap();
        assert!(data["schedule_id"].is_string());
        assert_eq!(data["from"][0]["email"], "me@x.com");
        let none = json!({"to": []});
        assert!(sent_message(Some("g"), "me@x.com", none.as_object().unwrap()).is_err());
    }
}
