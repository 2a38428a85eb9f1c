//! A deterministic, streamed attachment body for pass-through tests.
//!
//! Byte `i` of every download is `(i % 251) as u8`: 251 is prime, so the pattern
//! does not line up with power-of-two buffer sizes and a dropped, repeated or
//! reordered chunk shows.

use std::sync::OnceLock;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

/// The size of a download without `?size=`.
pub const DEFAULT_DOWNLOAD_SIZE: u64 = 5_000_000;

const PERIOD: usize = 251;
/// A whole number of periods, so every full chunk is the same bytes.
const CHUNK: usize = PERIOD * 261;

/// Byte `i` of every download.
pub fn download_byte(i: u64) -> u8 {
    // The remainder is below 251, so the cast cannot truncate.
    (i % PERIOD as u64) as u8
}

/// The first `len` bytes of every download, for comparing in tests.
pub fn download_pattern(len: usize) -> Vec<u8> {
    (0..len as u64).map(download_byte).collect()
}

fn chunk() -> Bytes {
    static CHUNK_BYTES: OnceLock<Bytes> = OnceLock::new();
    CHUNK_BYTES
        .get_or_init(|| Bytes::from(download_pattern(CHUNK)))
        .clone()
}

/// The `size` query parameter, or the default.
pub(crate) fn requested_size(query: Option<&str>) -> Result<u64, String> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("size="))
    else {
        return Ok(DEFAULT_DOWNLOAD_SIZE);
    };
    value
        .parse()
        .map_err(|_| format!("size must be a byte count, not '{value}'"))
}

/// A streamed `application/octet-stream` response of `size` pattern bytes.
pub(crate) fn response(size: u64, filename: &str) -> Response {
    let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= size {
            return None;
        }
        let left = usize::try_from(size - sent).unwrap_or(usize::MAX);
        let chunk = chunk().slice(..left.min(CHUNK));
        let next = sent + chunk.len() as u64;
        Some((Ok::<_, std::io::Error>(chunk), next))
    });
    let mut response = (StatusCode::OK, Body::from_stream(chunks)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    let disposition = format!("attachment; filename=\"{}\"", filename.replace('"', ""));
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_comes_from_the_query() {
        assert_eq!(requested_size(None), Ok(DEFAULT_DOWNLOAD_SIZE));
        assert_eq!(requested_size(Some("message_id=m&size=10")), Ok(10));
        assert!(requested_size(Some("size=ten")).is_err());
    }

    #[tokio::test]
    async fn the_streamed_body_is_the_pattern() {
        let size = CHUNK * 2 + 17;
        let body = response(size as u64, "a").into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        assert_eq!(bytes, download_pattern(size));
    }
}
