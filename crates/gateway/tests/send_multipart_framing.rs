//! Multipart framings that Go's `mime/multipart` (Nylas) and multer (the gateway) could
//! read as different parts are refused, before the ambiguous bytes are forwarded.
//!
//! Each body below is one where the two parsers disagree (or could): the gateway would
//! count one message and Nylas send another. See docs/send-requests.md, "Multipart framing".

use axum::body::Body;
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use gateway::send::{InspectError, InspectOptions, SendRoute, classify, inspect};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method};
use testkit::multipart::Multipart;

const B: &str = "b0";
/// One recipient: what the gateway would count.
const ONE: &str = r#"{"subject":"hi","to":[{"email":"ann@example.com"}]}"#;
/// Three recipients: what Nylas would send, if it read another part.
const MANY: &str = r#"{"subject":"hi","to":[{"email":"x1@example.com"},{"email":"x2@example.com"},{"email":"x3@example.com"}]}"#;
const RAW_MIME: &str =
    "From: me@example.com\r\nTo: ann@example.com\r\nSubject: hi\r\n\r\nhello\r\n";

fn route(uri: &str) -> SendRoute {
    classify(&Method::POST, &uri.parse().expect("uri")).expect("a send route")
}

fn send() -> SendRoute {
    route("/v3/grants/g1/messages/send")
}

fn send_mime() -> SendRoute {
    route("/v3/grants/g1/messages/send?type=mime")
}

fn multipart_type(boundary: &str) -> String {
    format!("multipart/form-data; boundary={boundary}")
}

fn headers(content_type: &str, content_length: Option<usize>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    if let Some(len) = content_length {
        map.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    map
}

/// The body in `chunk`-sized pieces.
fn chunked(body: &Bytes, chunk: usize) -> Body {
    let pieces: Vec<Bytes> = (0..body.len())
        .step_by(chunk)
        .map(|i| body.slice(i..(i + chunk).min(body.len())))
        .collect();
    Body::from_stream(stream::iter(pieces).map(Ok::<_, std::io::Error>))
}

/// What became of a body: refused (with what was forwarded before) or passed in full.
#[derive(Debug)]
enum Outcome {
    Refused {
        message: String,
        forwarded: usize,
        complete: bool,
    },
    Passed,
}

async fn run(route: &SendRoute, content_type: &str, body: &Bytes, chunk: usize) -> Outcome {
    let opts = InspectOptions::default();
    // With and without Content-Length alternately: neither may change the outcome.
    let length = (chunk % 2 == 1).then_some(body.len());
    let h = headers(content_type, length);
    let inspected = match inspect(route, &h, chunked(body, chunk), &opts).await {
        Ok(inspected) => inspected,
        Err(InspectError::Invalid(message)) => {
            return Outcome::Refused {
                message,
                forwarded: 0,
                complete: false,
            };
        }
        Err(other) => panic!("chunk {chunk}: not a refusal: {other:?}"),
    };
    let overflow = inspected.body.overflow();
    let mut stream = inspected.body.into_stream();
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(piece) => out.extend_from_slice(&piece),
            Err(InspectError::Invalid(message)) => {
                assert!(stream.next().await.is_none(), "nothing follows an error");
                return Outcome::Refused {
                    message,
                    forwarded: out.len(),
                    complete: overflow.is_complete(),
                };
            }
            Err(other) => panic!("chunk {chunk}: not a refusal: {other:?}"),
        }
    }
    assert_eq!(
        out,
        body.to_vec(),
        "a body that passes is forwarded unchanged"
    );
    Outcome::Passed
}

/// Refused at every chunking, before the body was forwarded in full, with a message that
/// names `expect` and echoes no content.
async fn assert_refused(route: &SendRoute, content_type: &str, body: &str, expect: &str) {
    let body = Bytes::from(body.to_owned());
    for chunk in [1, 2, 3, 7, 64, 1 << 20] {
        match run(route, content_type, &body, chunk).await {
            Outcome::Refused {
                message,
                forwarded,
                complete,
            } => {
                assert!(
                    message.contains(expect),
                    "chunk {chunk}: {message:?} should name {expect:?}\n{body:?}"
                );
                assert!(
                    !message.contains("example.com") && !message.contains("hello"),
                    "no content echoed: {message}"
                );
                assert!(forwarded < body.len() && !complete, "chunk {chunk}");
            }
            Outcome::Passed => panic!("chunk {chunk}: passed, should be refused:\n{body:?}"),
        }
    }
}

async fn assert_passes(route: &SendRoute, content_type: &str, body: &Bytes) {
    for chunk in [1, 3, 64, 1 << 20] {
        let outcome = run(route, content_type, body, chunk).await;
        assert!(
            matches!(outcome, Outcome::Passed),
            "chunk {chunk}: {outcome:?}\n{body:?}"
        );
    }
}

/// A part: its header lines (each without CRLF) and its data, CRLF-delimited.
fn part(headers: &[&str], data: &str) -> String {
    let mut out = format!("--{B}\r\n");
    for line in headers {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(data);
    out.push_str("\r\n");
    out
}

fn close() -> String {
    format!("--{B}--\r\n")
}

fn message_part(data: &str) -> String {
    part(&[r#"Content-Disposition: form-data; name="message""#], data)
}

fn file_part(data: &str) -> String {
    part(
        &[
            r#"Content-Disposition: form-data; name="file0"; filename="a.bin""#,
            "Content-Type: application/octet-stream",
        ],
        data,
    )
}

// ---------------------------------------------------------------- the request's Content-Type

#[tokio::test]
async fn boundary_parameters_parsers_could_read_differently_are_refused() {
    let body = format!("{}{}", message_part(ONE), close());
    let refused = [
        // Go: "duplicate parameter name"; multer's `mime` takes the first.
        (
            format!("multipart/form-data; boundary={B}; boundary=zz"),
            "twice",
        ),
        (
            format!("multipart/form-data; boundary={B}; BOUNDARY=zz"),
            "twice",
        ),
        // Go decodes RFC 2231 and lets `boundary*` win; multer ignores it.
        (
            format!("multipart/form-data; boundary={B}; boundary*=utf-8''zz"),
            "RFC 2231",
        ),
        // Go keeps the backslash before a non-special character.
        (
            format!(r#"multipart/form-data; boundary="\{B}""#),
            "escaped",
        ),
    ];
    for (ct, expect) in refused {
        assert_refused(&send(), &ct, &body, expect).await;
    }
    // Outside RFC 2046's bchars, or longer than 70 characters.
    for boundary in ["b0@x", "b0[1]", "b0 ", &"b".repeat(71)] {
        let ct = format!(r#"multipart/form-data; boundary="{boundary}""#);
        let body = body.replace(&format!("--{B}"), &format!("--{boundary}"));
        assert_refused(&send(), &ct, &body, "boundary").await;
    }
    // Spellings both read alike pass: quoted, another case, 70 characters, odd bchars.
    for (ct, boundary) in [
        (
            format!(r#"multipart/form-data; boundary="{B}""#),
            B.to_owned(),
        ),
        (format!("Multipart/Form-Data; BOUNDARY={B}"), B.to_owned()),
        (multipart_type(&"b".repeat(70)), "b".repeat(70)),
        (
            r#"multipart/form-data; boundary="a'()+_,-./:=?b c""#.to_owned(),
            "a'()+_,-./:=?b c".to_owned(),
        ),
    ] {
        let body = Bytes::from(body.replace(&format!("--{B}"), &format!("--{boundary}")));
        assert_passes(&send(), &ct, &body).await;
    }
}

// ---------------------------------------------------------------- delimiter lines

#[tokio::test]
async fn delimiters_not_exactly_crlf_framed_are_refused() {
    let ct = multipart_type(B);
    let message = r#"Content-Disposition: form-data; name="message""#;
    let file = r#"Content-Disposition: form-data; name="file0"; filename="a""#;
    let cases = [
        // Whitespace after a boundary: Go and multer skip it, other parsers need not.
        format!(
            "--{B}\r\n{message}\r\n\r\n{ONE}\r\n--{B} \r\n{file}\r\n\r\nabc\r\n{}",
            close()
        ),
        format!("--{B}\t\r\n{message}\r\n\r\n{ONE}\r\n{}", close()),
        // A bare-LF delimiter line inside a part (Go in LF mode would end the part there).
        format!(
            "{}{}{}",
            message_part(ONE),
            file_part(&format!("a\n--{B}\r\nb")),
            close()
        ),
        format!(
            "{}{}{}",
            message_part(ONE),
            file_part(&format!("a\n--{B}\nb")),
            close()
        ),
        // The first boundary line ends with a bare LF: Go switches to LF framing.
        format!("--{B}\n{message}\n\n{ONE}\n--{B}--\n"),
        // A boundary inside a line, not at its start.
        format!(
            "{}{}{}",
            message_part(ONE),
            file_part(&format!("a\r\nx--{B}\r\n")),
            close()
        ),
    ];
    for body in cases {
        assert_refused(&send(), &ct, &body, "boundary").await;
    }
}

#[tokio::test]
async fn a_first_boundary_inside_the_preamble_is_refused() {
    // multer starts at the first `--b0` anywhere, Go at the first one at a line start: for
    // multer `file0` (its data holding a MANY message after a bare LF) then `message` ONE;
    // for Go a preamble, then `message` MANY and `message` ONE (the first one counts).
    let body = format!(
        "x--{B}\r\nContent-Disposition: form-data; name=\"file0\"; filename=\"a\"\r\n\r\nfiller\n{}{}{}",
        message_part(MANY),
        message_part(ONE),
        close()
    );
    assert_refused(&send(), &multipart_type(B), &body, "boundary").await;
    // A preamble with the boundary at a line start is read alike.
    let fine = Bytes::from(format!("preamble\r\n{}{}", message_part(ONE), close()));
    assert_passes(&send(), &multipart_type(B), &fine).await;
}

#[tokio::test]
async fn a_part_body_that_starts_with_the_boundary_is_refused() {
    // Go ends `file0` at once (an empty part) and reads `message` MANY next; multer reads
    // that part as `file0`'s data and counts ONE.
    let body = format!(
        "--{B}\r\nContent-Disposition: form-data; name=\"file0\"; filename=\"a\"\r\n\r\n{}{}{}",
        message_part(MANY),
        message_part(ONE),
        close()
    );
    assert_refused(&send(), &multipart_type(B), &body, "boundary").await;
}

#[tokio::test]
async fn an_ambiguous_delimiter_is_refused_before_it_is_forwarded() {
    let head = format!("{}{}", message_part(ONE), file_part(&"z".repeat(5000)));
    // `--b0` of the padded delimiter starts where `head` ends (after its CRLF).
    let bad = head.len();
    let rest = &file_part("y")[B.len() + 4..];
    let body = Bytes::from(format!("{head}--{B} \r\n{rest}{}", close()));
    assert_eq!(&body[bad - 2..bad + 5], b"\r\n--b0 ");
    for chunk in [1, 2, 5, 100, 4096] {
        match run(&send(), &multipart_type(B), &body, chunk).await {
            Outcome::Refused {
                forwarded,
                complete,
                ..
            } => assert!(
                forwarded < bad + 2 + B.len() && !complete,
                "chunk {chunk}: {forwarded} bytes went out, the boundary ends at {}",
                bad + 2 + B.len()
            ),
            Outcome::Passed => panic!("chunk {chunk}: passed"),
        }
    }
}

// ---------------------------------------------------------------- part headers

#[tokio::test]
async fn folded_and_bare_lf_part_headers_are_refused() {
    let ct = multipart_type(B);
    let cases = [
        (
            message_part(ONE).replace("\r\n\r\n", "\r\nX-Note: a\r\n b\r\n\r\n"),
            "folded",
        ),
        (
            message_part(ONE).replace("\r\n\r\n", "\r\nX-Note: a\r\n\tb\r\n\r\n"),
            "folded",
        ),
        // Go's textproto ends the headers at `\n\n`; multer reads on to `\r\n\r\n`.
        (
            format!(
                "--{B}\r\nContent-Disposition: form-data; name=\"message\"\n\n{MANY}\r\nX: y\r\n\r\n{ONE}\r\n"
            ),
            "bare",
        ),
        (
            message_part(ONE).replace("\r\n\r\n", "\r\nX-Note: a\rb\r\n\r\n"),
            "bare",
        ),
        // No header section: multer reads on to the next blank line for headers (swallowing
        // `message` MANY), Go reads `abc` as data and `message` MANY as the next part.
        (
            format!(
                "--{B}\r\n\r\nabc\r\n{}{}",
                message_part(MANY),
                message_part(ONE)
            ),
            "without headers",
        ),
    ];
    for (body, expect) in cases {
        assert_refused(&send(), &ct, &format!("{body}{}", close()), expect).await;
    }
}

#[tokio::test]
async fn duplicate_part_headers_are_refused() {
    let ct = multipart_type(B);
    // Go takes the first Content-Disposition (`file0`), multer the last (`message`).
    let swapped = part(
        &[
            r#"Content-Disposition: form-data; name="file0"; filename="a""#,
            r#"content-disposition: form-data; name="message""#,
        ],
        ONE,
    );
    let two_types = part(
        &[
            r#"Content-Disposition: form-data; name="message""#,
            "Content-Type: application/json",
            "Content-Type: text/plain",
        ],
        ONE,
    );
    let two_encodings = part(
        &[
            r#"Content-Disposition: form-data; name="file0"; filename="a""#,
            "Content-Transfer-Encoding: binary",
            "Content-Transfer-Encoding: quoted-printable",
        ],
        "abc",
    );
    for (body, expect) in [
        (format!("{swapped}{}", close()), "Content-Disposition"),
        (format!("{two_types}{}", close()), "Content-Type"),
        (
            format!("{}{two_encodings}{}", message_part(ONE), close()),
            "Content-Transfer-Encoding",
        ),
    ] {
        assert_refused(&send(), &ct, &body, expect).await;
    }
}

#[tokio::test]
async fn a_transfer_encoding_on_the_counted_part_is_refused() {
    let ct = multipart_type(B);
    // Go decodes quoted-printable: `=22` is a quote, so Go reads a second `to` (the last
    // duplicate key wins in Go) where serde reads a string.
    let qp = r#"{"to":[{"email":"ann@example.com"}],"x":"=22,=22to=22:[{=22email=22:=22x1@example.com=22},{=22email=22:=22x2@example.com=22}],=22y=22:=22"}"#;
    for (encoding, data) in [("quoted-printable", qp), ("8bit", ONE)] {
        let body = part(
            &[
                r#"Content-Disposition: form-data; name="message""#,
                &format!("Content-Transfer-Encoding: {encoding}"),
            ],
            data,
        );
        assert_refused(
            &send(),
            &ct,
            &format!("{body}{}", close()),
            "Transfer-Encoding",
        )
        .await;
    }
    let mime = part(
        &[
            r#"Content-Disposition: form-data; name="mime"; filename="m.eml""#,
            "Content-Type: message/rfc822",
            "Content-Transfer-Encoding: quoted-printable",
        ],
        RAW_MIME,
    );
    assert_refused(
        &send_mime(),
        &ct,
        &format!("{mime}{}", close()),
        "Transfer-Encoding",
    )
    .await;
    // On an attachment it is Nylas's business (Go only ever shrinks quoted-printable).
    let attachment = part(
        &[
            r#"Content-Disposition: form-data; name="file0"; filename="a""#,
            "Content-Transfer-Encoding: quoted-printable",
        ],
        "a=3Db",
    );
    let fine = Bytes::from(format!("{}{attachment}{}", message_part(ONE), close()));
    assert_passes(&send(), &ct, &fine).await;
}

#[tokio::test]
async fn part_names_parsers_could_read_differently_are_refused() {
    let ct = multipart_type(B);
    let disposition = |value: &str| part(&[&format!("Content-Disposition: {value}")], ONE);
    let cases = [
        // multer finds `name=` inside the quoted file name; Go reads `name="x"`.
        (
            format!(
                "{}{}",
                disposition(r#"form-data; filename="; name=message x"; name="file0""#),
                part(
                    &[r#"Content-Disposition: form-data; filename="; name=x y"; name="message""#],
                    MANY
                )
            ),
            "part name",
        ),
        // A second `name` parameter: Go refuses the header (no name), multer takes one.
        (
            disposition(r#"form-data; name="message"; name="file0""#),
            "twice",
        ),
        (disposition(r#"form-data; name="message"; NAME=x"#), "twice"),
        // Spellings multer does not read as Go does.
        (disposition(r#"form-data; NAME="message""#), "part name"),
        (disposition(r#"form-data; Name=message"#), "part name"),
        (
            disposition("form-data; name*0=mess; name*1=age"),
            "RFC 2231",
        ),
        (disposition("form-data; name*=utf-8''message"), "RFC 2231"),
        (
            format!(
                "{}{}",
                disposition(r#"form-data; name="mess\"age""#),
                message_part(ONE)
            ),
            "escaped",
        ),
        (disposition(r#"form-data; name="message\\""#), "escaped"),
        // Go only takes a name from `form-data`.
        (disposition(r#"attachment; name="message""#), "part name"),
        (
            format!(
                "{}{}",
                disposition("form-data; name=message/x"),
                message_part(ONE)
            ),
            "Content-Disposition",
        ),
    ];
    for (body, expect) in cases {
        assert_refused(&send(), &ct, &format!("{body}{}", close()), expect).await;
    }
}

// ---------------------------------------------------------------- what passes

#[tokio::test]
async fn sdk_shapes_still_pass() {
    let python = Multipart::new("c0a5e8b2f7d94b1e9f3a6d2c8e4b7a15")
        .part(
            "message",
            Some(""),
            Some("application/json"),
            ONE.as_bytes(),
        )
        .part(
            "file0",
            Some("r.pdf"),
            Some("application/pdf"),
            &[0x2d; 3000],
        )
        .finish();
    let node = Multipart::new("----formdata-undici-062417369542")
        .part("message", None, None, ONE.as_bytes())
        .part(
            "file0",
            Some("big.bin"),
            Some("application/octet-stream"),
            b"--",
        )
        .finish();
    let python_mime = Multipart::new("9f3a6d2c8e4b7a15")
        .part(
            "mime",
            Some("message.eml"),
            Some("message/rfc822"),
            RAW_MIME.as_bytes(),
        )
        .finish();
    let go_mime = Multipart::new("go-cli-boundary-0001")
        .part("mime", None, None, RAW_MIME.as_bytes())
        .finish();
    for (route, (ct, body)) in [
        (send(), python),
        (send(), node),
        (send_mime(), python_mime),
        (send_mime(), go_mime),
    ] {
        assert_passes(&route, &ct, &body).await;
    }
    // An epilogue after the closing boundary is ignored by both parsers.
    let epilogue = Bytes::from(format!(
        "{}{}--{B}\r\nx\n--{B} ",
        message_part(ONE),
        close()
    ));
    assert_passes(&send(), &multipart_type(B), &epilogue).await;
}
