//! Reading a send request's body just far enough to know what it costs.

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::HeaderMap;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use multer::{Field, Multipart};
use serde_json::Value;

use super::body::{Parser, SharedSource, SizeModel, UpstreamBody, check_part_name};
use super::cost::{Schedule, SendCost, base64_mime_len, message_cost};
use super::framing::{self, Framing};
use super::json;
use super::mime::{self, HeaderEnd};
use super::route::SendRoute;

/// Default for [`InspectOptions::json_limit`]: 4 MiB (Nylas takes 3 MB of JSON).
pub const DEFAULT_JSON_LIMIT: usize = 4 * 1024 * 1024;
/// Default for [`InspectOptions::max_head`]: 8 MiB.
pub const DEFAULT_MAX_HEAD: usize = 8 * 1024 * 1024;

/// Limits that apply while a send body is inspected and forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectOptions {
    /// Most bytes of JSON read: a JSON body, a multipart `message` part, a draft body.
    pub json_limit: usize,
    /// The provider's message size limit, if any: a message estimated larger is
    /// refused before anything is sent, or cut short while streaming.
    pub max_message_size: Option<u64>,
    /// Most raw bytes buffered before the counting information is complete (parts
    /// before the `message` part, the header section of a raw MIME message).
    pub max_head: usize,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions {
            json_limit: DEFAULT_JSON_LIMIT,
            max_message_size: None,
            max_head: DEFAULT_MAX_HEAD,
        }
    }
}

/// Why a send body was refused. Recipient limits are not checked here: this only
/// counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// The request is not a well-formed send (answer 400 `invalid_send_request`).
    #[error("invalid send request: {0}")]
    Invalid(String),
    /// The message, or its JSON, is larger than allowed (answer 413
    /// `message_too_large`). `size` is the estimate that went over (for a body
    /// still being read, a lower bound).
    #[error("message of about {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// The estimated size.
        size: u64,
        /// The limit it went over.
        limit: u64,
    },
    /// Reading the client's body failed.
    #[error("reading the request body failed: {0}")]
    Body(String),
    /// The client's body went `[server] body_timeout` without a byte (answer 408).
    #[error("the request body stalled: no byte arrived within the body timeout")]
    Stalled,
}

impl InspectError {
    /// The error for a failure of the client's body: [`InspectError::Stalled`] when it
    /// was the body idle timeout, else [`InspectError::Body`].
    pub(crate) fn from_body(error: &axum::Error) -> Self {
        if crate::body_timeout::is_stall(error) {
            InspectError::Stalled
        } else {
            InspectError::Body(error.to_string())
        }
    }
}

/// The outcome of [`inspect`]: what the send costs, and the body to forward.
#[derive(Debug)]
pub struct Inspected {
    /// What the send costs. For a draft (`draft_needs_lookup`) this is zero: take the
    /// cost from the draft itself with [`cost_from_message_json`](super::cost_from_message_json).
    pub cost: SendCost,
    /// Whether `cost.size` is the estimate for the whole message. False for a body
    /// streamed without `Content-Length` (the Node SDK): `cost.size` then covers only
    /// what was read so far, and the [`Overflow`](super::Overflow) handle of `body`
    /// tells the final size.
    pub size_known: bool,
    /// True for E3: the recipients live in the draft; `GET` the route's `path`
    /// upstream and cost the draft.
    pub draft_needs_lookup: bool,
    /// The body to forward upstream, byte for byte what the client sent.
    pub body: UpstreamBody,
}

/// Reads as much of a send body as it takes to know the send's cost.
///
/// JSON bodies and draft bodies are read in full (up to `json_limit`). Multipart bodies
/// are read only up to the `message` part (E1m, E7) or the end of the `mime` part's
/// header section (E2); the rest streams through [`Inspected::body`]. With a
/// `Content-Length` the size estimate covers the whole body and a message over
/// `max_message_size` is refused here, before anything is sent.
///
/// # Errors
///
/// [`InspectError::Invalid`] for an unsupported content type, bad JSON, a broken
/// multipart body, a missing `message` or `mime` part, a raw message without header
/// section or recipients, or counting information that does not come within
/// `max_head` bytes; [`InspectError::TooLarge`] for JSON over `json_limit` or a message
/// over `max_message_size`; [`InspectError::Body`] when the client's body fails.
pub async fn inspect(
    route: &SendRoute,
    headers: &HeaderMap,
    body: Body,
    opts: &InspectOptions,
) -> Result<Inspected, InspectError> {
    let content_type = match headers.get(CONTENT_TYPE) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| invalid("unreadable content type"))?,
        ),
        None => None,
    };
    let media = content_type.map(media_type).filter(|m| !m.is_empty());
    let content_length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let is_json = media.as_deref().is_none_or(is_json);
    let is_multipart = media.as_deref() == Some("multipart/form-data");

    match route {
        SendRoute::Draft { .. } => draft(body, is_json, content_length, opts).await,
        SendRoute::Mime { .. } if is_multipart => {
            multipart(Target::Mime, content_type, body, content_length, opts).await
        }
        SendRoute::Mime { .. } => Err(invalid("a raw mime send must be multipart/form-data")),
        SendRoute::Message { .. } | SendRoute::Domain { .. } if is_multipart => {
            multipart(Target::Message, content_type, body, content_length, opts).await
        }
        SendRoute::Message { .. } | SendRoute::Domain { .. } if is_json => {
            json(body, content_length, opts).await
        }
        SendRoute::Message { .. } | SendRoute::Domain { .. } => Err(invalid(
            "a send must be application/json or multipart/form-data",
        )),
    }
}

fn invalid(message: &str) -> InspectError {
    InspectError::Invalid(message.to_owned())
}

/// The media type of a content type, lowercased, without parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// Parses a JSON body, refusing duplicate keys (Go would read the last, serde_json's
/// `Value` hides the first); see [`super::json`].
fn parse_json(bytes: &[u8]) -> Result<Value, InspectError> {
    json::parse(bytes)
}

/// E1 / E7 as JSON: the whole message is in the body.
async fn json(
    body: Body,
    content_length: Option<u64>,
    opts: &InspectOptions,
) -> Result<Inspected, InspectError> {
    let bytes = read_limited(body, opts.json_limit, content_length).await?;
    let (cost, _) = message_cost(&parse_json(&bytes)?)?;
    check_size(cost.size, opts)?;
    Ok(Inspected {
        cost,
        size_known: true,
        draft_needs_lookup: false,
        body: UpstreamBody::buffered(bytes, cost.size, opts.max_message_size),
    })
}

/// E3: the body is empty or `{}`; the cost comes from the draft.
async fn draft(
    body: Body,
    is_json: bool,
    content_length: Option<u64>,
    opts: &InspectOptions,
) -> Result<Inspected, InspectError> {
    let bytes = read_limited(body, opts.json_limit, content_length).await?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        if !is_json {
            return Err(invalid("a draft send takes no body or a json object"));
        }
        // The draft holds the message: fields here could change what is sent unseen.
        if !matches!(parse_json(&bytes)?, Value::Object(o) if o.is_empty()) {
            return Err(invalid(
                "a draft send takes no body or `{}`; change the draft itself to change what is sent",
            ));
        }
    }
    Ok(Inspected {
        cost: SendCost::default(),
        size_known: false,
        draft_needs_lookup: true,
        body: UpstreamBody::buffered(bytes, 0, None),
    })
}

/// Reads a whole body of at most `limit` bytes.
async fn read_limited(
    body: Body,
    limit: usize,
    content_length: Option<u64>,
) -> Result<Bytes, InspectError> {
    let limit64 = limit as u64;
    if let Some(length) = content_length.filter(|l| *l > limit64) {
        return Err(InspectError::TooLarge {
            size: length,
            limit: limit64,
        });
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| InspectError::from_body(&e))?;
        let size = buf.len().saturating_add(chunk.len());
        if size > limit {
            return Err(InspectError::TooLarge {
                size: size as u64,
                limit: limit64,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn check_size(size: u64, opts: &InspectOptions) -> Result<(), InspectError> {
    match opts.max_message_size {
        Some(limit) if size > limit => Err(InspectError::TooLarge { size, limit }),
        _ => Ok(()),
    }
}

/// The part of a multipart body that carries the counting information.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// E1m / E7: the `message` part, JSON; every other part is an attachment.
    Message,
    /// E2: the `mime` part, a whole RFC 5322 message.
    Mime,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Message => "message",
            Target::Mime => "mime",
        }
    }

    /// A size estimate for `read` raw bytes before the target is known: attachment
    /// bytes inflate, raw MIME does not.
    fn head_estimate(self, read: u64) -> u64 {
        match self {
            Target::Message => base64_mime_len(read),
            Target::Mime => read,
        }
    }
}

/// E1m / E7 multipart and E2: read up to the counting information, keep the parser.
async fn multipart(
    target: Target,
    content_type: Option<&str>,
    body: Body,
    content_length: Option<u64>,
    opts: &InspectOptions,
) -> Result<Inspected, InspectError> {
    let boundary = framing::boundary(content_type.unwrap_or_default())?;
    let source = SharedSource::new(body.into_data_stream(), Framing::new(&boundary));
    let mut multipart = Multipart::new(source.tee(), boundary);
    let head = Head {
        source: &source,
        target,
        opts,
    };

    let mut field = target_part(&mut multipart, &head).await?;
    let (recipients, schedule, model, field) = match target {
        Target::Message => {
            let (cost, model) = message_part(&head, &mut field).await?;
            (cost.recipients, cost.schedule, model, None)
        }
        Target::Mime => {
            let (end, rest) = header_section(&head, field).await?;
            let recipients = mime::recipients(&end)?;
            (
                recipients,
                Schedule::default(),
                SizeModel {
                    fixed: 0,
                    exempt: 0,
                    inflate: false,
                },
                rest,
            )
        }
    };

    let read = source.read();
    let (size, size_known) = match content_length {
        Some(length) => (model.estimate(length.max(read)), true),
        None => (model.estimate(read), false),
    };
    check_size(size, opts)?;
    let parser = Parser { multipart, field };
    Ok(Inspected {
        cost: SendCost {
            recipients,
            size,
            schedule,
        },
        size_known,
        draft_needs_lookup: false,
        body: UpstreamBody::streaming(source, parser, model, opts.max_message_size, content_length),
    })
}

/// Reads parts up to the target part and returns it, unread.
async fn target_part(
    multipart: &mut Multipart<'static>,
    head: &Head<'_>,
) -> Result<Field<'static>, InspectError> {
    let target = head.target;
    loop {
        let next = multipart
            .next_field()
            .await
            .map_err(|e| head.source.parse_error(&e))?;
        head.check()?;
        let Some(mut field) = next else {
            return Err(InspectError::Invalid(format!(
                "no `{}` part",
                target.name()
            )));
        };
        if field.name() == Some(target.name()) {
            check_part_name(&field, Some(target.name()), head.source)?;
            return Ok(field);
        }
        check_part_name(&field, None, head.source)?;
        // An attachment before the counting information: its raw bytes stay queued.
        while head.chunk(&mut field).await?.is_some() {
            head.check()?;
        }
    }
}

/// Reads the `message` part's JSON, within `json_limit`; returns its recipients and the
/// size model of the message (the JSON counted as parsed, the other parts inflated).
async fn message_part(
    head: &Head<'_>,
    field: &mut Field<'static>,
) -> Result<(SendCost, SizeModel), InspectError> {
    let opts = head.opts;
    let mut json = BytesMut::new();
    while let Some(chunk) = head.chunk(field).await? {
        let size = json.len().saturating_add(chunk.len());
        if size > opts.json_limit {
            return Err(InspectError::TooLarge {
                size: size as u64,
                limit: opts.json_limit as u64,
            });
        }
        json.extend_from_slice(&chunk);
        head.check()?;
    }
    let (cost, _) = message_cost(&parse_json(&json)?)?;
    let model = SizeModel {
        fixed: cost.size,
        exempt: json.len() as u64,
        inflate: true,
    };
    Ok((cost, model))
}

/// Reading the head of a multipart body, within `max_head` and the size limit.
struct Head<'a> {
    source: &'a SharedSource,
    target: Target,
    opts: &'a InspectOptions,
}

impl Head<'_> {
    async fn chunk(&self, field: &mut Field<'static>) -> Result<Option<Bytes>, InspectError> {
        field.chunk().await.map_err(|e| self.source.parse_error(&e))
    }

    fn check(&self) -> Result<(), InspectError> {
        let read = self.source.read();
        check_size(self.target.head_estimate(read), self.opts)?;
        if read > self.opts.max_head as u64 {
            return Err(InspectError::Invalid(format!(
                "the `{}` part must come within the first {} bytes",
                self.target.name(),
                self.opts.max_head
            )));
        }
        Ok(())
    }
}

/// Reads the `mime` part up to the end of its header section; returns the section
/// and the field, if it has more to read.
async fn header_section(
    head: &Head<'_>,
    mut field: Field<'static>,
) -> Result<(Bytes, Option<Field<'static>>), InspectError> {
    let mut buf = BytesMut::new();
    loop {
        let searched = buf.len();
        let Some(chunk) = head.chunk(&mut field).await? else {
            // The whole message is a header section (no body).
            return match mime::header_end(&buf, searched) {
                _ if buf.is_empty() => Err(invalid("the mime part is empty")),
                HeaderEnd::Missing => Err(invalid("the mime message has no header section")),
                HeaderEnd::At(end) => Ok((buf.freeze().slice(..end), None)),
                HeaderEnd::NeedMore => Ok((buf.freeze(), None)),
            };
        };
        buf.extend_from_slice(&chunk);
        head.check()?;
        match mime::header_end(&buf, searched) {
            HeaderEnd::NeedMore => {}
            HeaderEnd::Missing => return Err(invalid("the mime message has no header section")),
            HeaderEnd::At(end) => return Ok((buf.freeze().slice(..end), Some(field))),
        }
    }
}
