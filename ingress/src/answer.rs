//! ferry's own short answers (refusals, errors, redirects): a plain-text
//! line naming the status, and nothing about the backends. One place for
//! the proxy, the access checks and client-certificate refusals.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// The status line as the body (`404 not found\n`); static for the usual
/// ones, none for 204.
pub fn status(status: StatusCode) -> Response<Option<Bytes>> {
    let text = match status {
        StatusCode::NO_CONTENT => None,
        StatusCode::BAD_REQUEST => Some(Bytes::from_static(b"400 bad request\n")),
        StatusCode::PERMANENT_REDIRECT => Some(Bytes::from_static(b"308 permanent redirect\n")),
        StatusCode::PAYLOAD_TOO_LARGE => Some(Bytes::from_static(b"413 request entity too large\n")),
        StatusCode::NOT_FOUND => Some(Bytes::from_static(b"404 not found\n")),
        StatusCode::METHOD_NOT_ALLOWED => Some(Bytes::from_static(b"405 method not allowed\n")),
        StatusCode::REQUEST_TIMEOUT => Some(Bytes::from_static(b"408 request timeout\n")),
        StatusCode::SERVICE_UNAVAILABLE => Some(Bytes::from_static(b"503 service unavailable\n")),
        StatusCode::GATEWAY_TIMEOUT => Some(Bytes::from_static(b"504 gateway timeout\n")),
        StatusCode::BAD_GATEWAY => Some(Bytes::from_static(b"502 bad gateway\n")),
        other => Some(Bytes::from(format!(
            "{} {}\n",
            other.as_u16(),
            other.canonical_reason().unwrap_or("").to_ascii_lowercase()
        ))),
    };
    build(status, text)
}

/// `status` with its own text.
pub fn text(status: StatusCode, text: &'static str) -> Response<Option<Bytes>> {
    build(status, Some(Bytes::from_static(text.as_bytes())))
}

/// A redirect with `code` to `location`.
pub fn redirect(code: StatusCode, location: HeaderValue) -> Response<Option<Bytes>> {
    let mut r = self::status(code);
    r.headers_mut().insert(header::LOCATION, location);
    r
}

fn build(status: StatusCode, text: Option<Bytes>) -> Response<Option<Bytes>> {
    let typed = text.is_some();
    let mut r = Response::new(text);
    *r.status_mut() = status;
    if typed {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    r
}
