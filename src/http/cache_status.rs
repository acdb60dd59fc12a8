//! `Cache-Status` (RFC 9211) values.

use http::HeaderValue;

use crate::engine::{StaleReason, Status};

/// The header name.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// Makes a cache name safe as an sf-token.
pub(crate) fn sanitize_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    match s.chars().next() {
        Some(c) if c.is_ascii_alphabetic() || c == '*' => s,
        _ => format!("c{s}"),
    }
}

/// The value for a served entry. `ttl` is the remaining freshness in seconds (negative once
/// stale).
pub(crate) fn for_status(
    name: &str,
    status: Status,
    ttl: Option<i64>,
    pass_detail: Option<&str>,
) -> HeaderValue {
    let ttl = ttl.map(|t| format!("; ttl={t}")).unwrap_or_default();
    let v = match status {
        Status::Hit => format!("{name}; hit{ttl}"),
        Status::Stale(StaleReason::Revalidating) => {
            format!("{name}; hit{ttl}; detail=stale-while-revalidate")
        }
        Status::Stale(StaleReason::Error) => {
            format!("{name}; fwd=stale{ttl}; detail=stale-if-error")
        }
        Status::Stale(StaleReason::Deadline) => format!("{name}; hit{ttl}; detail=wait-timeout"),
        Status::Stored => format!("{name}; fwd=uri-miss; stored{ttl}"),
        Status::NotStored => format!("{name}; fwd=uri-miss; detail=superseded"),
        Status::Collapsed => format!("{name}; fwd=uri-miss; collapsed{ttl}"),
        Status::Passed => format!(
            "{name}; fwd=uri-miss; detail={}",
            pass_detail.unwrap_or("uncacheable")
        ),
        Status::Bypass => format!("{name}; fwd=bypass; detail=backend-down"),
    };
    HeaderValue::try_from(v).unwrap_or_else(|_| HeaderValue::from_static("tower-stampede"))
}

/// `fwd=bypass; detail=...` for requests the cache does not handle.
pub(crate) fn bypass(name: &str, detail: &str) -> HeaderValue {
    HeaderValue::try_from(format!("{name}; fwd=bypass; detail={detail}"))
        .unwrap_or_else(|_| HeaderValue::from_static("tower-stampede"))
}

/// For error responses the cache generated or relayed.
pub(crate) fn error(name: &str, fwd_status: Option<u16>, detail: &str) -> HeaderValue {
    let fs = fwd_status
        .map(|s| format!("; fwd-status={s}"))
        .unwrap_or_default();
    HeaderValue::try_from(format!("{name}; fwd=uri-miss{fs}; detail={detail}"))
        .unwrap_or_else(|_| HeaderValue::from_static("tower-stampede"))
}
