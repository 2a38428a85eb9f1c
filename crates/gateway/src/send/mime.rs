//! The header section of a raw RFC 5322 message (E2): where it ends, and its
//! recipients.

use mail_parser::{Address, HeaderName, MessageParser};
use memchr::memmem;

use super::InspectError;
use super::cost::Recipients;

/// Where the header section of a message ends, as far as `buf` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderEnd {
    /// No blank line yet: read more.
    NeedMore,
    /// The header section and its blank line take `buf[..n]`.
    At(usize),
    /// The message starts with a blank line: it has no header section.
    Missing,
}

/// Finds the blank line that ends the header section (CRLF or bare LF line endings).
///
/// `from` is how much of `buf` an earlier call already searched, so that reading a
/// long header section chunk by chunk stays linear.
pub(crate) fn header_end(buf: &[u8], from: usize) -> HeaderEnd {
    if buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
        return HeaderEnd::Missing;
    }
    // A blank line that straddles the old end starts at most two bytes before it.
    let mut search = from.saturating_sub(2);
    while let Some(i) = buf
        .get(search..)
        .and_then(|rest| rest.iter().position(|b| *b == b'\n'))
    {
        let after = search + i + 1;
        match buf.get(after..) {
            Some([b'\n', ..]) => return HeaderEnd::At(after + 1),
            Some([b'\r', b'\n', ..]) => return HeaderEnd::At(after + 2),
            _ => search = after,
        }
    }
    HeaderEnd::NeedMore
}

/// The headers whose addresses receive the message: every instance of each counts.
const RECIPIENT_HEADERS: [HeaderName<'static>; 6] = [
    HeaderName::To,
    HeaderName::Cc,
    HeaderName::Bcc,
    HeaderName::ResentTo,
    HeaderName::ResentCc,
    HeaderName::ResentBcc,
];

/// Unique recipients in the To, Cc, Bcc, Resent-To, Resent-Cc and Resent-Bcc headers
/// (every occurrence of each), groups included, encoded words decoded, compared
/// after ASCII-only lowercasing.
///
/// # Errors
///
/// [`InspectError::Invalid`] when there is no header section, no recipient at all, or
/// a header section parsers could read differently (see [`check_unambiguous`]).
pub(crate) fn recipients(header_section: &[u8]) -> Result<u64, InspectError> {
    check_unambiguous(header_section)?;
    let message = MessageParser::new()
        .with_address_headers()
        .parse_headers(header_section)
        .ok_or_else(|| InspectError::Invalid("the mime message has no header section".into()))?;
    let mut set = Recipients::default();
    let headers = || {
        message
            .headers()
            .iter()
            .filter(|header| RECIPIENT_HEADERS.contains(&header.name))
    };
    for header in headers() {
        let raw = header_section
            .get(header.offset_start as usize..header.offset_end as usize)
            .unwrap_or_default();
        check_encoded_words(raw)?;
    }
    let lists = headers().filter_map(|header| header.value.as_address());
    for address in lists.flat_map(Address::iter) {
        // A mailbox without a parsable address still reaches someone (or fails at
        // the provider): count it by whatever it carries.
        match (&address.address, &address.name) {
            (Some(addr), _) if !addr.trim().is_empty() => set.add(addr),
            (_, Some(name)) => set.add(name),
            _ => {}
        }
    }
    if set.count() == 0 {
        return Err(InspectError::Invalid(
            "the mime message has no recipients".into(),
        ));
    }
    Ok(set.count())
}

/// Refuses a recipient field with an encoded word (`=?charset?q?...?=`) that holds an
/// address separator or an `@`. mail-parser decodes the word first and reads one name;
/// Go's `net/mail` reads an address list before decoding anything, and `=?utf-8?q?a@x.com,
/// b@y.com?=` is two addresses to it. A display name in an encoded word holds neither.
fn check_encoded_words(raw: &[u8]) -> Result<(), InspectError> {
    let mut rest = raw;
    while let Some(start) = memmem::find(rest, b"=?") {
        let word = &rest[start + 2..];
        let end = memmem::find(word, b"?=").unwrap_or(word.len());
        if word[..end].iter().any(|b| b"@,;:<>".contains(b)) {
            return Err(InspectError::Invalid(
                "a recipient field has an encoded word holding an address or a separator".into(),
            ));
        }
        rest = &word[(end + 2).min(word.len())..];
    }
    Ok(())
}

/// Refuses a header section that another parser could split into other fields than
/// mail-parser does, so that its recipients could be counted short:
/// - a NUL byte, or a CR not followed by LF (a bare CR ends a line for some parsers,
///   Python's `email` among them, and is ordinary text for others, Go's `net/mail` and
///   mail-parser among them);
/// - a first line that starts with whitespace (a continuation of nothing: Go refuses
///   it, mail-parser reads it as a field);
/// - a line that is neither a continuation (starts with space or tab) nor
///   `name: value` with a name of printable ASCII without spaces: a line without a
///   colon makes mail-parser skip it, and a whitespace-only line right after one ends
///   mail-parser's header section early, while Go refuses the message; RFC 5322's
///   obsolete `To : ...` (space before the colon) is `To` to mail-parser but the
///   field `To ` to Go.
fn check_unambiguous(section: &[u8]) -> Result<(), InspectError> {
    let invalid = |what: &str| {
        Err(InspectError::Invalid(format!(
            "the mime header section {what}"
        )))
    };
    if section.contains(&0) {
        return invalid("contains a NUL byte");
    }
    let bare_cr = section
        .iter()
        .enumerate()
        .any(|(i, b)| *b == b'\r' && section.get(i + 1) != Some(&b'\n'));
    if bare_cr {
        return invalid("contains a CR that does not end a line");
    }
    for (i, line) in section.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match line.first() {
            None => break,
            Some(b' ' | b'\t') if i == 0 => return invalid("starts with a continuation line"),
            Some(b' ' | b'\t') => continue,
            Some(_) => {}
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return invalid("has a line that is neither a field nor a continuation");
        };
        if colon == 0 || !line[..colon].iter().all(|b| (33..=126).contains(b)) {
            return invalid("has a field name that is not printable ASCII without spaces");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_blank_line() {
        assert_eq!(header_end(b"To: a@x\r\n\r\nbody", 0), HeaderEnd::At(11));
        assert_eq!(header_end(b"To: a@x\n\nbody", 0), HeaderEnd::At(9));
        assert_eq!(
            header_end(b"To: a@x\r\nCc: b@x\r\n", 0),
            HeaderEnd::NeedMore
        );
        assert_eq!(header_end(b"To: a@x\r", 0), HeaderEnd::NeedMore);
        assert_eq!(header_end(b"", 0), HeaderEnd::NeedMore);
        assert_eq!(header_end(b"\r\nbody", 0), HeaderEnd::Missing);
        assert_eq!(header_end(b"\nbody", 0), HeaderEnd::Missing);
        // Searching on after more data arrived finds a blank line across the seam.
        let buf = b"To: a@x\r\n\r\nbody";
        for seam in 0..buf.len() {
            let first = header_end(&buf[..seam], 0);
            let at = if first == HeaderEnd::NeedMore {
                header_end(buf, seam)
            } else {
                first
            };
            assert_eq!(at, HeaderEnd::At(11), "seam {seam}");
        }
    }

    #[test]
    fn counts_groups_encoded_words_and_duplicates() {
        let headers = b"From: me@x.com\r\n\
To: \"Ann\" <ann@x.com>, =?UTF-8?B?QsOpYQ==?= <BEA@x.com>\r\n\
Cc: Team: carl@x.com, Ann <ANN@X.COM>;, dan@x.com\r\n\
Bcc: eve@x.com\r\n\
To: bea@x.com\r\n\
Subject: =?UTF-8?Q?caf=C3=A9?=\r\n\r\n";
        assert_eq!(recipients(headers).expect("recipients"), 5);
    }

    #[test]
    fn no_recipients_is_invalid() {
        let err = recipients(b"From: me@x.com\r\nSubject: hi\r\n\r\n").expect_err("no recipients");
        assert!(matches!(err, InspectError::Invalid(_)));
        assert!(matches!(
            recipients(b"To: undisclosed-recipients:;\r\n\r\n"),
            Err(InspectError::Invalid(_))
        ));
    }

    #[test]
    fn counts_resent_headers_every_instance_groups_and_encoded_words() {
        let headers = b"From: me@x.com\r\n\
To: ann@x.com\r\n\
Resent-To: bea@x.com, \"Carl\" <carl@x.com>\r\n\
Resent-Cc: Crew: dan@x.com, ANN@x.com;\r\n\
Resent-Bcc: =?UTF-8?B?RXZl?= <eve@x.com>\r\n\
resent-to: fay@x.com\r\n\
RESENT-BCC: gus@x.com\r\n\r\n";
        assert_eq!(recipients(headers).expect("recipients"), 7);
        // Resent headers alone are recipients too.
        assert_eq!(
            recipients(b"Resent-Bcc: hidden@x.com\r\n\r\n").expect("recipients"),
            1
        );
    }

    /// What mail-parser itself reads, without [`check_unambiguous`]: the cases below
    /// are refused because of these readings.
    #[test]
    fn mail_parser_readings_that_other_parsers_do_not_share() {
        let bcc = |section: &[u8]| {
            let message = MessageParser::new()
                .with_address_headers()
                .parse_headers(section)
                .expect("headers");
            message.header_values(HeaderName::Bcc).count()
        };
        // A line without a colon and a whitespace-only line end its header section:
        // the Bcc is not read (Go's net/mail refuses the line without a colon).
        assert_eq!(
            bcc(b"To: a@x.com\r\nX-Junk\r\n \r\nBcc: b@x.com\r\n\r\n"),
            0
        );
        // A form feed line ends it too, although it is no blank line.
        assert_eq!(bcc(b"To: a@x.com\r\n\x0c\r\nBcc: b@x.com\r\n\r\n"), 0);
        // So does CR CR LF, which `header_end` (like Go) does not take for a blank line.
        assert_eq!(bcc(b"To: a@x.com\r\n\r\r\nBcc: b@x.com\r\n\r\n"), 0);
        assert_eq!(
            header_end(b"To: a@x.com\r\n\r\r\nBcc: b@x.com\r\n\r\n", 0),
            HeaderEnd::At(32)
        );
        // A bare CR is text inside the Subject to mail-parser; Python's `email` splits
        // the line there and reads a Bcc field.
        assert_eq!(bcc(b"To: a@x.com\r\nSubject: hi\rBcc: b@x.com\r\n\r\n"), 0);
        // Whitespace before the colon (RFC 5322 obsolete syntax) and a leading space
        // are ignored by mail-parser; Go keys the first as `Bcc ` and refuses the second.
        assert_eq!(bcc(b"To: a@x.com\r\nBcc : b@x.com\r\n\r\n"), 1);
        assert_eq!(bcc(b" Bcc: b@x.com\r\nTo: a@x.com\r\n\r\n"), 1);
    }

    #[test]
    fn ambiguous_header_sections_are_refused() {
        let cases: [&[u8]; 10] = [
            b"To: a@x.com\r\nX-Junk\r\n \r\nBcc: b@x.com\r\n\r\n",
            b"To: a@x.com\r\n\x0c\r\nBcc: b@x.com\r\n\r\n",
            b"To: a@x.com\r\n\r\r\nBcc: b@x.com\r\n\r\n",
            b"To: a@x.com\r\nSubject: hi\rBcc: b@x.com\r\n\r\n",
            b"To: a@x.com\r",
            b"To: a@x.com\r\nBcc : b@x.com\r\n\r\n",
            b"To: a@x.com\r\nBcc\r\n : b@x.com\r\n\r\n",
            b" Bcc: b@x.com\r\nTo: a@x.com\r\n\r\n",
            b"To: a@x.com\0, b@x.com\r\n\r\n",
            b"To: a@x.com\r\n: b@x.com\r\n\r\n",
        ];
        for section in cases {
            let got = recipients(section);
            assert!(
                matches!(got, Err(InspectError::Invalid(_))),
                "{:?}: {got:?}",
                String::from_utf8_lossy(section)
            );
        }
    }

    #[test]
    fn ordinary_header_sections_pass() {
        let cases: [(&[u8], u64); 5] = [
            (b"To: a@x.com\r\n\r\n", 1),
            (b"To: a@x.com\n\n", 1),
            (b"To: a@x.com\r\n", 1),
            (
                b"To:\r\n a@x.com,\r\n\tb@x.com,\r\n \r\n c@x.com\r\n\r\n",
                3,
            ),
            (
                "Subject: café\r\nX-Unicode: ö\r\nTo: a@x.com\r\n\r\n".as_bytes(),
                1,
            ),
        ];
        for (section, want) in cases {
            let got = recipients(section)
                .unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(section)));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(section));
        }
    }
}
