//! Multipart framing that another parser could read differently, refused.
//!
//! The gateway counts a multipart send with multer and forwards the client's bytes
//! unchanged; Nylas (a Go service) parses them again with `mime/multipart`. Where the two
//! could see different parts, the gateway would count one message and Nylas send another.
//! So the body is held to a subset of multipart that both read alike (see
//! docs/send-requests.md, "Multipart framing"):
//!
//! - [`boundary`]: the request's `Content-Type` read strictly (no duplicate or RFC 2231
//!   parameters, no escapes); the boundary is 1 to 70 of RFC 2046's bchars, and multer
//!   must read the same one.
//! - [`Framing::scan`] sees every raw byte before it is queued for forwarding: every
//!   `--boundary` must start the body or follow a CRLF inside the preceding part's data,
//!   and be followed by exactly CRLF or `--` (the end; the epilogue after it is ignored).
//!   Each part's header section is checked whole: CRLF lines only, no folding, no
//!   control characters, one `Content-Disposition`, `Content-Type` and
//!   `Content-Transfer-Encoding` at most, no transfer encoding on a `message` or `mime`
//!   part, and a `Content-Disposition` read as Go's `mime.ParseMediaType` does, within a
//!   strict subset. The name Go would read is kept for [`Framing::part`], which
//!   `check_part_name` compares with multer's.

use std::collections::VecDeque;

use memchr::memmem;

use super::InspectError;

/// RFC 2046: a boundary is 1 to 70 characters.
const MAX_BOUNDARY: usize = 70;
/// Most bytes of one part's header section.
const MAX_PART_HEADERS: usize = 16 * 1024;
/// The part names that carry what a send is counted from.
pub(crate) const COUNTED: [&str; 2] = ["message", "mime"];

fn ambiguous(what: &str) -> InspectError {
    InspectError::Invalid(format!("ambiguous multipart framing: {what}"))
}

/// The boundary of a `multipart/form-data` content type, when it cannot be read two ways.
pub(crate) fn boundary(content_type: &str) -> Result<String, InspectError> {
    let media = parse_media(content_type.as_bytes(), "the request's Content-Type")?;
    let Some((_, boundary)) = media.params.into_iter().find(|(k, _)| k == "boundary") else {
        return Err(InspectError::Invalid(
            "multipart/form-data without a boundary".into(),
        ));
    };
    let bchar = |c: u8| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c);
    if boundary.is_empty()
        || boundary.len() > MAX_BOUNDARY
        || boundary.ends_with(' ')
        || !boundary.bytes().all(bchar)
    {
        return Err(ambiguous(
            "the boundary must be 1 to 70 of RFC 2046's characters (bchars), not ending in a space",
        ));
    }
    match multer::parse_boundary(content_type) {
        Ok(theirs) if theirs == boundary => Ok(boundary),
        _ => Err(ambiguous(
            "a boundary parameter that parsers read differently",
        )),
    }
}

/// A media type (or disposition type), lowercased, and its parameters, keys lowercased.
#[derive(Debug)]
struct Media {
    kind: String,
    params: Vec<(String, String)>,
}

/// Reads a `Content-Type` or `Content-Disposition` value the way Go's
/// `mime.ParseMediaType` does, refusing whatever lies outside the subset where multer
/// (and the `mime` crate) cannot read it otherwise: RFC 2231 parameters (`*`), duplicate
/// parameters, backslashes in quoted strings, and anything Go would refuse.
fn parse_media(value: &[u8], what: &str) -> Result<Media, InspectError> {
    let bad = |problem: &str| ambiguous(&format!("{what}: {problem}"));
    let mut r = Cursor { s: value, at: 0 };
    r.skip_space();
    let mut kind = r.token().ok_or_else(|| bad("no type"))?.to_owned();
    if r.eat(b'/') {
        let sub = r.token().ok_or_else(|| bad("no subtype"))?;
        kind = format!("{kind}/{sub}");
    }
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        r.skip_space();
        if r.done() {
            break;
        }
        if !r.eat(b';') {
            return Err(bad("unreadable parameters"));
        }
        r.skip_space();
        if r.done() {
            break;
        }
        let key = r.token().ok_or_else(|| bad("unreadable parameters"))?;
        let key = key.to_ascii_lowercase();
        if key.contains('*') {
            return Err(bad("an RFC 2231 parameter (`*`)"));
        }
        r.skip_space();
        if !r.eat(b'=') {
            return Err(bad("a parameter without a value"));
        }
        r.skip_space();
        let value = r.value().map_err(bad)?;
        if params.iter().any(|(k, _)| *k == key) {
            return Err(bad("a parameter given twice"));
        }
        params.push((key, value));
    }
    Ok(Media {
        kind: kind.to_ascii_lowercase(),
        params,
    })
}

/// RFC 2045 token characters, as Go's `mime` package has them.
fn is_token(c: u8) -> bool {
    c > 0x20 && c < 0x7f && !br#"()<>@,;:\"/[]?="#.contains(&c)
}

struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn done(&self) -> bool {
        self.at >= self.s.len()
    }

    fn skip_space(&mut self) {
        while matches!(self.s.get(self.at), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let found = self.s.get(self.at) == Some(&c);
        self.at += usize::from(found);
        found
    }

    /// A non-empty token (ASCII, so valid UTF-8).
    fn token(&mut self) -> Option<&'a str> {
        let rest = &self.s[self.at..];
        let len = rest
            .iter()
            .position(|c| !is_token(*c))
            .unwrap_or(rest.len());
        self.at += len;
        std::str::from_utf8(&rest[..len])
            .ok()
            .filter(|t| !t.is_empty())
    }

    /// A token or a quoted string without backslashes.
    fn value(&mut self) -> Result<String, &'static str> {
        if !self.eat(b'"') {
            return self
                .token()
                .map(str::to_owned)
                .ok_or("a parameter without a value");
        }
        let rest = &self.s[self.at..];
        let Some(end) = rest.iter().position(|c| matches!(c, b'"' | b'\\')) else {
            return Err("an unterminated quoted string");
        };
        if rest[end] == b'\\' {
            return Err("an escaped character in a quoted parameter");
        }
        self.at += end + 1;
        String::from_utf8(rest[..end].to_vec()).map_err(|_| "a parameter that is not UTF-8")
    }
}

/// What the scan learnt of one part's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartHead {
    /// The part's index, counting from 0 (as multer's `Field::index`).
    pub(crate) index: usize,
    /// The form name Go would read (`Part.FormName`), if any.
    pub(crate) name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first boundary.
    Preamble,
    /// In a part's header section; `searched` bytes of it hold no blank line.
    Headers { searched: usize },
    /// In a part's data, which starts at this offset of the body.
    Data { start: u64 },
    /// After the closing boundary: ignored by both parsers.
    Epilogue,
}

/// The delimiter scan over the raw body, chunk by chunk (see the module docs).
#[derive(Debug)]
pub(crate) struct Framing {
    /// `--boundary`.
    delimiter: Vec<u8>,
    /// Bytes not yet decided: a possible start of a delimiter and what must follow it, or
    /// a header section being read.
    buf: Vec<u8>,
    /// Body offset of `buf[0]`.
    base: u64,
    /// The two body bytes before `buf[0]`.
    before: [u8; 2],
    state: State,
    /// Parts whose headers were checked and that multer has not yielded yet.
    parts: VecDeque<PartHead>,
    next_index: usize,
}

impl Framing {
    pub(crate) fn new(boundary: &str) -> Self {
        Framing {
            delimiter: format!("--{boundary}").into_bytes(),
            buf: Vec::new(),
            base: 0,
            before: [0; 2],
            state: State::Preamble,
            parts: VecDeque::new(),
            next_index: 0,
        }
    }

    /// Checks the next raw chunk of the body. Linear: every byte is searched once, and
    /// at most a delimiter's length (or one header section) is carried over.
    pub(crate) fn scan(&mut self, chunk: &[u8]) -> Result<(), InspectError> {
        if self.state == State::Epilogue {
            return Ok(());
        }
        self.buf.extend_from_slice(chunk);
        loop {
            let progressed = match self.state {
                State::Preamble | State::Data { .. } => self.delimiter_step()?,
                State::Headers { searched } => self.headers_step(searched)?,
                State::Epilogue => {
                    self.buf = Vec::new();
                    false
                }
            };
            if !progressed {
                return Ok(());
            }
        }
    }

    /// The checked headers of part `index`, once; `None` if the scan has not seen them.
    pub(crate) fn part(&mut self, index: usize) -> Option<PartHead> {
        while let Some(head) = self.parts.pop_front() {
            if head.index == index {
                return Some(head);
            }
        }
        None
    }

    /// Drops `n` decided bytes from the front of `buf`.
    fn advance(&mut self, n: usize) {
        self.before = match n {
            0 => self.before,
            1 => [self.before[1], self.buf[0]],
            _ => [self.buf[n - 2], self.buf[n - 1]],
        };
        self.buf.drain(..n);
        self.base += n as u64;
    }

    /// Finds the next delimiter in the preamble or a part's data; true if it moved on to
    /// a new state.
    fn delimiter_step(&mut self) -> Result<bool, InspectError> {
        let len = self.delimiter.len();
        let Some(at) = memmem::find(&self.buf, &self.delimiter) else {
            // Keep what could be the start of a delimiter.
            self.advance(self.buf.len().saturating_sub(len - 1));
            return Ok(false);
        };
        self.check_line_start(at)?;
        let Some(after) = self.buf.get(at + len..at + len + 2) else {
            self.advance(at);
            return Ok(false);
        };
        match after {
            b"\r\n" => {
                self.advance(at + len + 2);
                self.state = State::Headers { searched: 0 };
            }
            b"--" => {
                self.state = State::Epilogue;
                self.buf = Vec::new();
            }
            _ => {
                return Err(ambiguous(
                    "a boundary line with more than CRLF or `--` after the boundary \
                     (whitespace, a bare LF)",
                ));
            }
        }
        Ok(true)
    }

    /// A delimiter at `buf[at]` must start the body or follow a CRLF (inside the part's
    /// data, which Go would otherwise end at once while multer reads on).
    fn check_line_start(&self, at: usize) -> Result<(), InspectError> {
        let offset = self.base + at as u64;
        let before = match at {
            0 => self.before,
            1 => [self.before[1], self.buf[0]],
            _ => [self.buf[at - 2], self.buf[at - 1]],
        };
        let crlf = before == *b"\r\n";
        match self.state {
            State::Data { start } if offset < start + 2 => Err(ambiguous(
                "a part whose data begins with the boundary (an empty part needs a CRLF)",
            )),
            State::Preamble if offset == 0 => Ok(()),
            _ if crlf => Ok(()),
            _ => Err(ambiguous(
                "a boundary that does not start a CRLF-terminated line (a bare LF, or inside a line)",
            )),
        }
    }

    /// Reads a header section up to its blank line; true once it was read and checked.
    fn headers_step(&mut self, searched: usize) -> Result<bool, InspectError> {
        if self.buf.len() < 2 {
            return Ok(false);
        }
        if self.buf.starts_with(b"\r\n") {
            return Err(ambiguous("a part without headers"));
        }
        let from = searched.saturating_sub(3);
        let Some(end) = memmem::find(&self.buf[from..], b"\r\n\r\n").map(|i| i + from) else {
            if self.buf.len() > MAX_PART_HEADERS {
                return Err(ambiguous("part headers over 16 KiB"));
            }
            self.state = State::Headers {
                searched: self.buf.len(),
            };
            return Ok(false);
        };
        if end + 4 > MAX_PART_HEADERS {
            return Err(ambiguous("part headers over 16 KiB"));
        }
        let name = part_headers(&self.buf[..end + 2])?;
        self.parts.push_back(PartHead {
            index: self.next_index,
            name,
        });
        self.next_index += 1;
        self.advance(end + 4);
        self.state = State::Data { start: self.base };
        Ok(true)
    }
}

/// The headers of one part that matter, each seen at most once.
#[derive(Debug, Default)]
struct Seen<'a> {
    disposition: Option<&'a [u8]>,
    content_type: bool,
    encoding: bool,
}

/// Checks a header section (CRLF-terminated lines, without the blank line); returns the
/// form name Go would read.
fn part_headers(section: &[u8]) -> Result<Option<String>, InspectError> {
    let mut seen = Seen::default();
    // Each line keeps its CR; the section ends with a CRLF, so drop only its last LF.
    let lines = section[..section.len() - 1].split(|c| *c == b'\n');
    for line in lines {
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err(ambiguous("a bare LF in part headers"));
        };
        header_line(line, &mut seen)?;
    }
    let name = match seen.disposition {
        Some(value) => {
            let media = parse_media(value, "a part's Content-Disposition")?;
            let name = media.params.into_iter().find(|(k, _)| k == "name");
            name.filter(|_| media.kind == "form-data").map(|(_, v)| v)
        }
        None => None,
    };
    let counted = name
        .as_deref()
        .is_some_and(|n| COUNTED.iter().any(|c| n.eq_ignore_ascii_case(c)));
    if counted && seen.encoding {
        return Err(ambiguous(
            "a Content-Transfer-Encoding on the `message` or `mime` part",
        ));
    }
    Ok(name)
}

/// Checks one header line (without its CRLF) and records it in `seen`.
fn header_line<'a>(line: &'a [u8], seen: &mut Seen<'a>) -> Result<(), InspectError> {
    if line.contains(&b'\r') {
        return Err(ambiguous("a bare CR in part headers"));
    }
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(ambiguous("a folded part header (obsolete line folding)"));
    }
    if line
        .iter()
        .any(|c| (*c < 0x20 && *c != b'\t') || *c == 0x7f)
    {
        return Err(ambiguous("a control character in part headers"));
    }
    let Some(colon) = line.iter().position(|c| *c == b':') else {
        return Err(ambiguous("a part header line without a colon"));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|c| is_token(*c)) {
        return Err(ambiguous("a part header name that is not a token"));
    }
    let twice = |header: &str| ambiguous(&format!("more than one {header} header in a part"));
    if name.eq_ignore_ascii_case(b"content-disposition") {
        if seen.disposition.is_some() {
            return Err(twice("Content-Disposition"));
        }
        seen.disposition = Some(value.trim_ascii());
    } else if name.eq_ignore_ascii_case(b"content-type") {
        if seen.content_type {
            return Err(twice("Content-Type"));
        }
        seen.content_type = true;
    } else if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
        if seen.encoding {
            return Err(twice("Content-Transfer-Encoding"));
        }
        seen.encoding = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8], chunk: usize) -> Result<Vec<PartHead>, InspectError> {
        let mut framing = Framing::new("b0");
        for piece in body.chunks(chunk) {
            framing.scan(piece)?;
        }
        Ok(framing.parts.into_iter().collect())
    }

    #[test]
    fn scan_reads_part_names_at_any_chunking() {
        let body = b"pre\r\n--b0\r\nContent-Disposition: form-data; name=message\r\n\r\n{}\r\n\
            --b0\r\nContent-Disposition: attachment; name=\"x\"\r\n\r\n--b\r\n\r\n--b0--\r\n--b0 x";
        for chunk in [1, 2, 3, 5, 8, 1000] {
            let parts = scan_all(body, chunk).expect("fine");
            let names: Vec<_> = parts.iter().map(|p| p.name.as_deref()).collect();
            assert_eq!(names, [Some("message"), None], "chunk {chunk}");
        }
    }

    #[test]
    fn media_parameters() {
        let m = parse_media(b"Form-Data ; NAME = \"a b\";filename=x.txt;", "t").expect("ok");
        assert_eq!(m.kind, "form-data");
        assert_eq!(
            m.params,
            [
                ("name".into(), "a b".into()),
                ("filename".into(), "x.txt".into())
            ]
        );
        for bad in [
            &b"form-data; name"[..],
            b"form-data; name=",
            b"form-data x",
            b"a; b=\"c",
        ] {
            assert!(parse_media(bad, "t").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\"").ok(),
            Some("a b".into())
        );
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("multipart/form-data; boundary=\"\"").is_err());
    }
}
