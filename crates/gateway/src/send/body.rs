//! Forwarding a send body upstream: replay what inspection read, stream the rest,
//! count the bytes and stop before the limit.
//!
//! The client's body is read through a `Tee` that keeps every raw chunk it hands to
//! the multipart parser in a queue. [`UpstreamBody`] forwards that queue and, while the
//! parser still runs, keeps driving it so that every part header of the body is seen
//! (a second `message` or `mime` part is refused). It always holds back the newest raw
//! chunk until the parser has moved past it: when the body turns out bad or too large,
//! its last bytes are never sent, so Nylas never receives a complete message.
//!
//! The `Tee` also runs every raw chunk through the framing scan (`super::framing`)
//! before it queues it: a chunk that makes the framing ambiguous is never queued, and the
//! chunk before it is the newest one, held back, so the ambiguous delimiter or part
//! header never reaches Nylas whole.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};

use axum::body::{Body, BodyDataStream};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use multer::{Field, Multipart};

use super::InspectError;
use super::cost::base64_mime_len;
use super::framing::{COUNTED, Framing};

/// How the size of a message grows with the bytes of its request body:
/// `fixed + f(total - exempt)`, where `f` is base64 inflation for attachments or the
/// identity for raw MIME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SizeModel {
    /// Size known from parsed content (headers, body, JSON attachments).
    pub(crate) fixed: u64,
    /// Request bytes already accounted in `fixed` (the `message` part's JSON).
    pub(crate) exempt: u64,
    /// Whether the remaining bytes are attachments that will be base64-encoded.
    pub(crate) inflate: bool,
}

impl SizeModel {
    /// The message size estimated from `total` request bytes.
    pub(crate) fn estimate(&self, total: u64) -> u64 {
        let rest = total.saturating_sub(self.exempt);
        let rest = if self.inflate {
            base64_mime_len(rest)
        } else {
            rest
        };
        self.fixed.saturating_add(rest)
    }
}

/// Shared record of how forwarding a body went; cheap to clone.
///
/// Check it after the upstream call fails: [`Overflow::is_over`] means the message grew
/// past the size limit while streaming (answer 413 and release the reservation, rather
/// than 502).
#[derive(Debug, Clone)]
pub struct Overflow {
    limit: Option<u64>,
    /// Whether the body is streamed (read in part before the charge, the rest metered on
    /// the way) rather than buffered whole.
    streamed: bool,
    state: Arc<OverflowState>,
}

#[derive(Debug, Default)]
struct OverflowState {
    over: AtomicBool,
    finished: AtomicBool,
    complete: AtomicBool,
    bytes: AtomicU64,
    size: AtomicU64,
    failure: OnceLock<InspectError>,
}

impl Overflow {
    pub(crate) fn new(limit: Option<u64>, streamed: bool) -> Self {
        Overflow {
            limit,
            streamed,
            state: Arc::default(),
        }
    }

    /// Whether the body is streamed: its [`size`](Self::size) is then what the meter
    /// counted on the way, which a charge made before its end can fall short of.
    pub fn is_streamed(&self) -> bool {
        self.streamed
    }

    /// True when the message grew past the limit and the body was cut short.
    pub fn is_over(&self) -> bool {
        self.state.over.load(Ordering::Acquire)
    }

    /// True when the whole client body was forwarded (all its `Content-Length`, or to its end).
    pub fn is_finished(&self) -> bool {
        self.state.finished.load(Ordering::Acquire)
    }

    /// True once the complete message has been handed to the upstream client: the whole
    /// body, or, for multipart, everything up to and including the closing boundary (what
    /// a multipart parser needs to act on the request). From then on the send may have
    /// happened whatever becomes of the rest of the body or the connection.
    pub fn is_complete(&self) -> bool {
        self.is_finished() || self.state.complete.load(Ordering::Acquire)
    }

    /// Why the body was cut short, if it was: [`InspectError::TooLarge`],
    /// [`InspectError::Invalid`] (bad multipart, a second `message` part),
    /// [`InspectError::Body`] (the client's body failed) or [`InspectError::Stalled`]
    /// (it went `[server] body_timeout` without a byte).
    pub fn failure(&self) -> Option<InspectError> {
        self.state.failure.get().cloned()
    }

    /// The size limit in force, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Raw request bytes forwarded so far.
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::Acquire)
    }

    /// The message size estimated from the bytes counted so far; once
    /// [`is_finished`](Self::is_finished), the final counted size. When the body was
    /// cut for size, the estimate that went over.
    pub fn size(&self) -> u64 {
        self.state.size.load(Ordering::Acquire)
    }

    fn record(&self, bytes: u64, size: u64) {
        self.state.bytes.store(bytes, Ordering::Release);
        self.state.size.store(size, Ordering::Release);
    }

    fn fail(&self, error: InspectError) {
        if let InspectError::TooLarge { size, .. } = &error {
            let size = *size;
            self.state.size.store(size, Ordering::Release);
            self.state.over.store(true, Ordering::Release);
        }
        let _ = self.state.failure.set(error);
    }

    fn finish(&self) {
        self.state.finished.store(true, Ordering::Release);
    }

    fn complete(&self) {
        self.state.complete.store(true, Ordering::Release);
    }
}

/// The raw client body, shared between the [`Tee`] inside the parser and the driver.
#[derive(Debug)]
struct Source {
    inner: Option<BodyDataStream>,
    /// Raw chunks read but not yet forwarded, exactly as received.
    queue: VecDeque<Bytes>,
    /// Total raw bytes read from the client.
    read: u64,
    client_error: Option<InspectError>,
    /// Checks every raw chunk before it is queued.
    framing: Framing,
    /// Why the framing scan refused the body, if it did.
    refused: Option<InspectError>,
    /// Set after handing out a chunk: the next poll yields first, so the parser sees
    /// one chunk at a time instead of draining everything that is ready.
    paced: bool,
}

/// Handle on a [`Source`]; the lock is never held across an await.
#[derive(Debug, Clone)]
pub(crate) struct SharedSource(Arc<Mutex<Source>>);

impl SharedSource {
    pub(crate) fn new(body: BodyDataStream, framing: Framing) -> Self {
        SharedSource(Arc::new(Mutex::new(Source {
            inner: Some(body),
            queue: VecDeque::new(),
            read: 0,
            client_error: None,
            framing,
            refused: None,
            paced: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Source> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Total raw bytes read from the client so far (all of them still buffered until
    /// the body is handed to [`UpstreamBody`]).
    pub(crate) fn read(&self) -> u64 {
        self.lock().read
    }

    /// A stream for the multipart parser that records what it reads.
    pub(crate) fn tee(&self) -> Tee {
        Tee(self.clone())
    }

    /// Maps a parser error to the framing refusal or the client's I/O error when that is
    /// what it was.
    pub(crate) fn parse_error(&self, error: &multer::Error) -> InspectError {
        let source = self.lock();
        if let Some(refused) = &source.refused {
            return refused.clone();
        }
        match &source.client_error {
            Some(error) => error.clone(),
            None => InspectError::Invalid(format!("malformed multipart body: {}", describe(error))),
        }
    }

    /// Takes the next queued chunk, leaving at least `keep` chunks queued.
    fn pop(&self, keep: usize) -> Option<Bytes> {
        let mut source = self.lock();
        if source.queue.len() > keep {
            source.queue.pop_front()
        } else {
            None
        }
    }

    fn take_inner(&self) -> Option<BodyDataStream> {
        self.lock().inner.take()
    }
}

/// Describes a multer error without echoing client data (field names at most).
fn describe(error: &multer::Error) -> &'static str {
    match error {
        multer::Error::IncompleteFieldData { .. } | multer::Error::IncompleteStream => {
            "the body ends too early"
        }
        multer::Error::IncompleteHeaders | multer::Error::ReadHeaderFailed(_) => "bad part headers",
        multer::Error::DecodeHeaderName { .. } | multer::Error::DecodeHeaderValue { .. } => {
            "bad part headers"
        }
        _ => "cannot parse",
    }
}

/// The client's body as the parser sees it: every chunk is also queued for
/// forwarding.
#[derive(Debug)]
pub(crate) struct Tee(SharedSource);

impl Stream for Tee {
    type Item = Result<Bytes, InspectError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut source = self.0.lock();
        if source.paced {
            source.paced = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(inner) = source.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                // Checked before it is queued: a refused chunk is never forwarded.
                if let Err(error) = source.framing.scan(&chunk) {
                    source.refused = Some(error.clone());
                    source.inner = None;
                    return Poll::Ready(Some(Err(error)));
                }
                if !chunk.is_empty() {
                    source.read = source.read.saturating_add(chunk.len() as u64);
                    source.queue.push_back(chunk.clone());
                    source.paced = true;
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => {
                let error = InspectError::from_body(&error);
                source.client_error = Some(error.clone());
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The multipart parser, kept running while the rest of the body streams.
pub(crate) struct Parser {
    pub(crate) multipart: Multipart<'static>,
    /// The field being read, if any; must be drained before the next one.
    pub(crate) field: Option<Field<'static>>,
}

impl Parser {
    /// Advances the parser by one chunk or one part; false once it reached the end.
    async fn step(&mut self, source: &SharedSource) -> Result<bool, Step> {
        if let Some(field) = self.field.as_mut() {
            // The data itself is not needed: its raw copy is already queued.
            if field.chunk().await.map_err(Step::Parse)?.is_none() {
                self.field = None;
            }
            return Ok(true);
        }
        match self.multipart.next_field().await.map_err(Step::Parse)? {
            Some(field) => {
                // After the counted part, no other part may carry counting information a
                // parser other than ours could read instead (a second `message` or `mime`
                // part, in any case, or a name we cannot read unambiguously).
                if let Err(e) = check_part_name(&field, None, source) {
                    return Err(Step::Refused(e));
                }
                self.field = Some(field);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Refuses a part whose name Go's `mime/multipart` would read differently from multer
/// (the framing scan read its headers as Go does: see `super::framing`), and a part
/// named like a counted one other than `counted` (the part being counted now).
///
/// Nylas's own parser is not ours: a body where the two could disagree on which part is
/// the message would be counted from one part and sent from another.
pub(crate) fn check_part_name(
    field: &Field<'_>,
    counted: Option<&str>,
    source: &SharedSource,
) -> Result<(), InspectError> {
    let head = source.lock().framing.part(field.index());
    let Some(head) = head else {
        return Err(InspectError::Invalid(
            "multipart framing that could not be checked".into(),
        ));
    };
    if head.name.as_deref() != field.name() {
        return Err(InspectError::Invalid(
            "ambiguous multipart framing: a part name that parsers read differently".into(),
        ));
    }
    match field.name() {
        Some(name)
            if COUNTED.iter().any(|c| name.eq_ignore_ascii_case(c)) && Some(name) != counted =>
        {
            Err(InspectError::Invalid(format!(
                "more than one part that could be the message (`{name}`)"
            )))
        }
        _ => Ok(()),
    }
}

enum Step {
    Parse(multer::Error),
    Refused(InspectError),
}

/// Counts forwarded bytes against the size model and the limit.
#[derive(Debug)]
struct Meter {
    model: SizeModel,
    overflow: Overflow,
    forwarded: u64,
    /// The client's `Content-Length`: a client of a sized body (hyper) stops polling
    /// once it has that many bytes, so reaching it is the end.
    expected: Option<u64>,
}

impl Meter {
    fn forward(&mut self, chunk: Bytes) -> Result<Bytes, InspectError> {
        let total = self.forwarded.saturating_add(chunk.len() as u64);
        let size = self.model.estimate(total);
        if let Some(limit) = self.overflow.limit
            && size > limit
        {
            return Err(InspectError::TooLarge { size, limit });
        }
        self.forwarded = total;
        self.overflow.record(total, size);
        if self.expected == Some(total) {
            self.overflow.finish();
        }
        Ok(chunk)
    }
}

/// Produces the forwarded chunks, one at a time.
struct Driver {
    source: SharedSource,
    parser: Option<Parser>,
    /// The client's body after the parser finished (the multipart epilogue).
    tail: Option<BodyDataStream>,
    meter: Meter,
    done: bool,
}

impl Driver {
    async fn next(&mut self) -> Option<Result<Bytes, InspectError>> {
        loop {
            if self.done {
                return None;
            }
            // Hold back the newest chunk while the parser has not moved past it.
            let keep = usize::from(self.parser.is_some());
            if let Some(chunk) = self.source.pop(keep) {
                return Some(self.meter.forward(chunk).map_err(|e| self.fail(e)));
            }
            if let Some(parser) = self.parser.as_mut() {
                match parser.step(&self.source).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.parser = None;
                        self.tail = self.source.take_inner();
                    }
                    Err(Step::Parse(error)) => {
                        let error = self.source.parse_error(&error);
                        return Some(Err(self.fail(error)));
                    }
                    Err(Step::Refused(error)) => return Some(Err(self.fail(error))),
                }
                continue;
            }
            // The parser is done and every chunk up to its closing boundary has gone out.
            self.meter.overflow.complete();
            let next = match self.tail.as_mut() {
                Some(tail) => tail.next().await,
                None => None,
            };
            match next {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    return Some(self.meter.forward(chunk).map_err(|e| self.fail(e)));
                }
                Some(Err(error)) => {
                    return Some(Err(self.fail(InspectError::from_body(&error))));
                }
                None => {
                    self.done = true;
                    self.meter.overflow.finish();
                    return None;
                }
            }
        }
    }

    fn fail(&mut self, error: InspectError) -> InspectError {
        self.done = true;
        self.meter.overflow.fail(error.clone());
        error
    }
}

/// The body to send upstream: the raw bytes read during inspection, then the rest of
/// the client's body, unchanged, counted, and cut short (with an error) once the
/// message grows past the size limit.
///
/// Turn it into a request body with [`into_body`](Self::into_body); keep an
/// [`overflow`](Self::overflow) handle first to learn afterwards why it stopped.
pub struct UpstreamBody {
    inner: Inner,
    overflow: Overflow,
    content_length: Option<u64>,
}

enum Inner {
    /// Read in full during inspection.
    Buffered(Bytes),
    /// Read in part; the driver forwards the rest.
    Streaming(Box<Driver>),
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let buffered = match &self.inner {
            Inner::Buffered(body) => Some(body.len()),
            Inner::Streaming(_) => None,
        };
        f.debug_struct("UpstreamBody")
            .field("buffered", &buffered)
            .field("content_length", &self.content_length)
            .field("overflow", &self.overflow)
            .finish()
    }
}

impl UpstreamBody {
    /// A body read in full during inspection, of the given message size.
    pub(crate) fn buffered(body: Bytes, size: u64, limit: Option<u64>) -> Self {
        let overflow = Overflow::new(limit, false);
        let len = body.len() as u64;
        overflow.record(len, size);
        overflow.finish();
        UpstreamBody {
            inner: Inner::Buffered(body),
            overflow,
            content_length: Some(len),
        }
    }

    /// A body of which `source` has been read in part, by `parser`.
    pub(crate) fn streaming(
        source: SharedSource,
        parser: Parser,
        model: SizeModel,
        limit: Option<u64>,
        content_length: Option<u64>,
    ) -> Self {
        let overflow = Overflow::new(limit, true);
        let driver = Driver {
            source,
            parser: Some(parser),
            tail: None,
            meter: Meter {
                model,
                overflow: overflow.clone(),
                forwarded: 0,
                expected: content_length,
            },
            done: false,
        };
        UpstreamBody {
            inner: Inner::Streaming(Box::new(driver)),
            overflow,
            content_length,
        }
    }

    /// A buffered body with its bytes replaced by `body` (the gateway added a field): the
    /// same size limit, the size grown by what was added. A streaming body stays as it is.
    pub(crate) fn rewritten(self, body: Bytes) -> Self {
        match self.inner {
            Inner::Buffered(old) => {
                let added = (body.len() as u64).saturating_sub(old.len() as u64);
                let size = self.overflow.size().saturating_add(added);
                UpstreamBody::buffered(body, size, self.overflow.limit())
            }
            Inner::Streaming(_) => self,
        }
    }

    /// The handle that tells, after forwarding, whether and why the body was cut.
    pub fn overflow(&self) -> Overflow {
        self.overflow.clone()
    }

    /// The body's length when known: the client's `Content-Length`, or the buffered
    /// length. Set it on the upstream request, or a streamed body goes out chunked.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// The whole body, when inspection read all of it (JSON and draft sends).
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match &self.inner {
            Inner::Buffered(body) => Some(body),
            Inner::Streaming(_) => None,
        }
    }

    /// The forwarded chunks: byte for byte the client's body, or an error in place of
    /// the next chunk once the body is cut short (the error is also recorded in the
    /// [`Overflow`] handle). Nothing follows an error.
    pub fn into_stream(self) -> BoxStream<'static, Result<Bytes, InspectError>> {
        match self.inner {
            Inner::Buffered(body) => stream::once(async move { Ok(body) }).boxed(),
            Inner::Streaming(driver) => stream::unfold(driver, |mut driver| async move {
                let item = driver.next().await?;
                Some((item, driver))
            })
            .boxed(),
        }
    }

    /// A request body: a fixed one for a buffered body, else a stream whose error aborts
    /// the upstream request.
    pub fn into_body(self) -> Body {
        match self.inner {
            Inner::Buffered(body) => Body::from(body),
            Inner::Streaming(_) => Body::from_stream(self.into_stream()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_model() {
        let multipart = SizeModel {
            fixed: 100,
            exempt: 50,
            inflate: true,
        };
        assert_eq!(multipart.estimate(20), 100);
        assert_eq!(multipart.estimate(53), 106);
        let mime = SizeModel {
            fixed: 0,
            exempt: 0,
            inflate: false,
        };
        assert_eq!(mime.estimate(1234), 1234);
    }

    #[test]
    fn overflow_records_the_first_failure() {
        let overflow = Overflow::new(Some(5), true);
        overflow.fail(InspectError::TooLarge { size: 9, limit: 5 });
        overflow.fail(InspectError::Body("later".into()));
        assert!(overflow.is_over());
        assert_eq!(overflow.size(), 9);
        assert_eq!(
            overflow.failure(),
            Some(InspectError::TooLarge { size: 9, limit: 5 })
        );
        assert!(!overflow.is_finished());
    }
}
