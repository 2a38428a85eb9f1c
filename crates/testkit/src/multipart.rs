//! `multipart/form-data` bodies built by hand, so a test controls every header of every
//! part and can write exactly what a given SDK writes.

use bytes::Bytes;

/// A multipart body under construction; [`Multipart::finish`] adds the closing delimiter.
///
/// ```
/// let (content_type, body) = testkit::multipart::Multipart::new("b0")
///     .part("message", Some(""), Some("application/json"), b"{}")
///     .finish();
/// assert_eq!(content_type, "multipart/form-data; boundary=b0");
/// assert_eq!(
///     &body[..],
///     b"--b0\r\nContent-Disposition: form-data; name=\"message\"; filename=\"\"\r\n\
///       Content-Type: application/json\r\n\r\n{}\r\n--b0--\r\n"
/// );
/// ```
#[derive(Debug, Clone)]
pub struct Multipart {
    boundary: String,
    body: Vec<u8>,
}

impl Multipart {
    /// An empty body delimited by `boundary`.
    pub fn new(boundary: &str) -> Self {
        Multipart {
            boundary: boundary.to_owned(),
            body: Vec::new(),
        }
    }

    /// Adds a part; `filename` and `content_type` are written only when given.
    pub fn part(
        mut self,
        name: &str,
        filename: Option<&str>,
        content_type: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut head = format!(
            "--{}\r\nContent-Disposition: form-data; name=\"{name}\"",
            self.boundary
        );
        if let Some(filename) = filename {
            head.push_str(&format!("; filename=\"{filename}\""));
        }
        head.push_str("\r\n");
        if let Some(content_type) = content_type {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        head.push_str("\r\n");
        self.body.reserve(head.len() + data.len() + 2);
        self.body.extend_from_slice(head.as_bytes());
        self.body.extend_from_slice(data);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    /// `multipart/form-data; boundary=BOUNDARY`.
    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The content type and the whole body.
    pub fn finish(mut self) -> (String, Bytes) {
        self.body
            .extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        (self.content_type(), Bytes::from(self.body))
    }
}
