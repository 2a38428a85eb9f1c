//! The header section of a raw RFC 5322 message (E2): where it ends, and its
//! recipients.

use mail_parser::{Address, MessageParser};

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

/// Unique recipients in the To, Cc and Bcc headers (every occurrence of each),
/// groups included, encoded words decoded, compared case-insensitively.
///
/// # Errors
///
/// [`InspectError::Invalid`] when there is no header section or no recipient at all.
pub(crate) fn recipients(header_section: &[u8]) -> Result<u64, InspectError> {
    let message = MessageParser::new()
        .with_address_headers()
        .parse_headers(header_section)
        .ok_or_else(|| InspectError::Invalid("the mime message has no header section".into()))?;
    let mut set = Recipients::default();
    let lists = message
        .all_to()
        .chain(message.all_cc())
        .chain(message.all_bcc());
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
}
