//! `Cache-Status` (RFC 9211) values.

use http::header::{Entry, OccupiedEntry};
use http::{HeaderMap, HeaderValue};

use crate::engine::{StaleReason, Status};
use crate::entry::decimal;

/// The header name.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// Sets `ours` as the response's `Cache-Status`, after the members already there: RFC 9211
/// section 2 asks a cache adding its member to keep the existing value, so the whole chain of
/// caches can be read (the one nearest the origin first). Earlier lines are trimmed, and those
/// that are not [`well_formed`] (RFC 8941 Lists) are dropped (as are the empty placeholders of
/// a remembered hit), so a bad value can neither swallow ours nor make a parser drop the field.
/// The common case, no earlier cache, costs one lookup.
pub(crate) fn add(headers: &mut HeaderMap, ours: HeaderValue) {
    // `Err` only for a map already holding the most names a `HeaderMap` can (an in-process
    // origin's passed response): it goes without ours rather than panic.
    let Ok(entry) = headers.try_entry(CACHE_STATUS) else {
        return;
    };
    match entry {
        Entry::Vacant(e) => {
            e.insert(ours);
        }
        // A remembered hit's placeholder, alone: no earlier cache.
        Entry::Occupied(mut e) if e.get().is_empty() && e.iter().nth(1).is_none() => {
            e.insert(ours);
        }
        Entry::Occupied(e) => after_earlier(e, ours),
    }
}

/// Adds `; detail=<detail>` to our member (the last, which holds no comma) of a response's
/// `Cache-Status`, unless it has a detail already (RFC 9211 gives a member one).
pub(crate) fn add_detail(headers: &mut HeaderMap, detail: &str) {
    let Some(v) = headers.get(CACHE_STATUS) else {
        return;
    };
    let bytes = v.as_bytes();
    let ours = bytes.rsplit(|&b| b == b',').next().unwrap_or(bytes);
    const DETAIL: &[u8] = b"; detail=";
    if ours.windows(DETAIL.len()).any(|w| w == DETAIL) {
        return;
    }
    let mut out = Vec::with_capacity(bytes.len() + DETAIL.len() + detail.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(DETAIL);
    out.extend_from_slice(detail.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(out)) {
        headers.insert(CACHE_STATUS, v);
    }
}

/// [`add`] with earlier lines: ours after those that are well formed, in one value that replaces
/// every line of the field.
#[cold]
fn after_earlier(mut e: OccupiedEntry<'_, HeaderValue>, ours: HeaderValue) {
    let value = {
        // Each line parsed once.
        let mut chain = Vec::new();
        for v in e.iter().map(|v| v.as_bytes().trim_ascii()) {
            if well_formed(v) {
                chain.extend_from_slice(v);
                chain.extend_from_slice(b", ");
            }
        }
        if chain.is_empty() {
            ours
        } else {
            chain.extend_from_slice(ours.as_bytes());
            // Visible ASCII and spaces only: this cannot fail, and would fall back to ours.
            HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)).unwrap_or(ours)
        }
    };
    e.insert(value);
}

/// Whether one trimmed `Cache-Status` line parses as a non-empty RFC 8941 List (section 4.2.1,
/// validating only): every member a token, string, number, byte sequence or boolean, or an
/// inner list of them, each with its parameters (lowercase keys). Joined with `, `, such lines
/// and ours make a field that parses, which a strict parser drops whole otherwise.
fn well_formed(v: &[u8]) -> bool {
    Sf { s: v, i: 0 }.list()
}

/// A cursor over a Structured Field value.
struct Sf<'a> {
    s: &'a [u8],
    i: usize,
}

impl Sf<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        self.i += usize::from(hit);
        hit
    }

    /// Skips bytes while `f` holds.
    fn skip(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
    }

    fn list(&mut self) -> bool {
        self.skip(|b| b == b' ');
        if self.peek().is_none() {
            return false;
        }
        loop {
            let member = if self.peek() == Some(b'(') {
                self.inner_list()
            } else {
                self.item()
            };
            self.skip(|b| b == b' ' || b == b'\t');
            if !member {
                return false;
            }
            if self.peek().is_none() {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
            self.skip(|b| b == b' ' || b == b'\t');
            if self.peek().is_none() {
                return false;
            }
        }
    }

    fn inner_list(&mut self) -> bool {
        self.i += 1;
        loop {
            self.skip(|b| b == b' ');
            if self.eat(b')') {
                return self.params();
            }
            if !self.item() || !matches!(self.peek(), Some(b' ' | b')')) {
                return false;
            }
        }
    }

    fn item(&mut self) -> bool {
        self.bare_item() && self.params()
    }

    fn params(&mut self) -> bool {
        while self.eat(b';') {
            self.skip(|b| b == b' ');
            if !matches!(self.peek(), Some(b'a'..=b'z' | b'*')) {
                return false;
            }
            self.skip(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*'));
            if self.eat(b'=') && !self.bare_item() {
                return false;
            }
        }
        true
    }

    fn bare_item(&mut self) -> bool {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'"') => self.string(),
            Some(b'*' | b'A'..=b'Z' | b'a'..=b'z') => {
                self.skip(|b| b.is_ascii_alphanumeric() || TOKEN_PUNCT.contains(&b));
                true
            }
            // RFC 8941 section 4.2.7: base64 that decodes, its `=` padding optional.
            Some(b':') => {
                self.i += 1;
                let start = self.i;
                self.skip(|b| b.is_ascii_alphanumeric() || b"+/".contains(&b));
                let data = self.i - start;
                let pad = self.s[self.i..].iter().take_while(|&&b| b == b'=').count();
                self.i += pad;
                data % 4 != 1
                    && pad <= 2
                    && (pad == 0 || (data + pad).is_multiple_of(4))
                    && self.eat(b':')
            }
            Some(b'?') => {
                self.i += 1;
                self.eat(b'0') || self.eat(b'1')
            }
            _ => false,
        }
    }

    /// RFC 8941 section 4.2.4: an integer of 1 to 15 digits, or a decimal of 1 to 12 digits, a
    /// dot, and 1 to 3 digits.
    fn number(&mut self) -> bool {
        self.eat(b'-');
        let start = self.i;
        self.skip(|b| b.is_ascii_digit());
        let int = self.i - start;
        if !self.eat(b'.') {
            return (1..=15).contains(&int);
        }
        let start = self.i;
        self.skip(|b| b.is_ascii_digit());
        (1..=12).contains(&int) && (1..=3).contains(&(self.i - start))
    }

    fn string(&mut self) -> bool {
        self.i += 1;
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return true;
                }
                Some(b'\\') => {
                    self.i += 1;
                    if !(self.eat(b'"') || self.eat(b'\\')) {
                        return false;
                    }
                }
                Some(0x20..=0x7e) => self.i += 1,
                _ => return false,
            }
        }
    }
}

/// The bytes an sf-token may hold besides letters and digits (RFC 8941 section 3.3.4: tchar,
/// `:` and `/`).
const TOKEN_PUNCT: &[u8] = b"!#$%&'*+-.^_`|~:/";

/// Makes a cache name safe as an sf-token.
pub(crate) fn sanitize_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || u8::try_from(c).is_ok_and(|b| TOKEN_PUNCT.contains(&b))
            {
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
/// stale). Built byte by byte, without `format!`: it is on every hit.
pub(crate) fn for_status(
    name: &str,
    status: Status,
    ttl: Option<i64>,
    pass_detail: Option<&str>,
) -> HeaderValue {
    let (mid, with_ttl, tail): (&str, bool, &str) = match status {
        Status::Hit => ("; hit", true, ""),
        Status::Stale(StaleReason::Revalidating) => {
            ("; hit", true, "; detail=stale-while-revalidate")
        }
        Status::Stale(StaleReason::Error) => ("; fwd=stale", true, "; detail=stale-if-error"),
        Status::Stale(StaleReason::Deadline) => ("; hit", true, "; detail=wait-timeout"),
        Status::Stored => ("; fwd=uri-miss; stored", true, ""),
        Status::NotStored => ("; fwd=uri-miss; detail=superseded", false, ""),
        Status::WriteFailed => ("; fwd=uri-miss; detail=store-write-failed", false, ""),
        Status::Collapsed => ("; fwd=uri-miss; collapsed", true, ""),
        Status::Passed => (
            "; fwd=uri-miss; detail=",
            false,
            pass_detail.unwrap_or("uncacheable"),
        ),
        Status::Bypass => ("; fwd=bypass; detail=backend-down", false, ""),
    };
    let mut digits = [0u8; 21];
    let ttl = match (with_ttl, ttl) {
        (true, Some(t)) => decimal(&mut digits, t.unsigned_abs(), t < 0),
        _ => &[],
    };
    let ttl_label: &[u8] = if ttl.is_empty() { b"" } else { b"; ttl=" };
    let parts = [
        name.as_bytes(),
        mid.as_bytes(),
        ttl_label,
        ttl,
        tail.as_bytes(),
    ];
    // Exactly sized, so the value is one allocation.
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
        .unwrap_or_else(|_| HeaderValue::from_static("tower-stampede"))
}

thread_local! {
    /// The last value [`for_status_memo`] built on this thread, with its status and TTL.
    static LAST: super::last::Last<(Status, Option<i64>)> = const { std::cell::RefCell::new(None) };
}

/// [`for_status`] with no pass detail, reusing the last value this thread built when it is the
/// same: the hits of one entry share one value until its TTL's second changes.
pub(crate) fn for_status_memo(name: &str, status: Status, ttl: Option<i64>) -> HeaderValue {
    super::last::reuse(
        &LAST,
        (status, ttl),
        |k, v| {
            // Names are tokens, without `;`: the value is this name's when the name is
            // followed by the `;` every status part starts with.
            let b = v.as_bytes();
            *k == (status, ttl)
                && b.starts_with(name.as_bytes())
                && b.get(name.len()) == Some(&b';')
        },
        || for_status(name, status, ttl, None),
    )
}

/// `fwd=bypass; detail=...` for requests the cache does not handle.
pub(crate) fn bypass(name: &str, detail: &str) -> HeaderValue {
    HeaderValue::try_from(format!("{name}; fwd=bypass; detail={detail}"))
        .unwrap_or_else(|_| HeaderValue::from_static("tower-stampede"))
}

/// A stale entry's revalidation, stored: `fwd=stale` (RFC 9211 section 2.2) with the origin's
/// status, 304 when it only freshened the entry.
pub(crate) fn revalidated(name: &str, fwd_status: u16, ttl: Option<i64>) -> HeaderValue {
    let ttl = ttl.map(|t| format!("; ttl={t}")).unwrap_or_default();
    HeaderValue::try_from(format!(
        "{name}; fwd=stale; fwd-status={fwd_status}; stored{ttl}"
    ))
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

/// `<name>; detail=<detail>`, for an answer of ours that forwarded nothing (so no `fwd`).
pub(crate) fn not_forwarded(name: &str, detail: &str) -> HeaderValue {
    HeaderValue::try_from(format!("{name}; detail={detail}"))
        .unwrap_or_else(|_| HeaderValue::from_static("tower-stampede"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_rfc_9211() {
        let v = |st, ttl, d| for_status("tower-stampede", st, ttl, d);
        assert_eq!(
            v(Status::Hit, Some(59), None),
            "tower-stampede; hit; ttl=59"
        );
        assert_eq!(v(Status::Hit, Some(0), None), "tower-stampede; hit; ttl=0");
        assert_eq!(
            v(Status::Stale(StaleReason::Error), Some(-12), None),
            "tower-stampede; fwd=stale; ttl=-12; detail=stale-if-error"
        );
        assert_eq!(
            v(Status::Stored, Some(i64::MIN), None),
            "tower-stampede; fwd=uri-miss; stored; ttl=-9223372036854775808"
        );
        assert_eq!(
            v(Status::Passed, Some(5), Some("private")),
            "tower-stampede; fwd=uri-miss; detail=private"
        );
        assert_eq!(
            v(Status::Collapsed, None, None),
            "tower-stampede; fwd=uri-miss; collapsed"
        );
        assert_eq!(
            v(Status::WriteFailed, Some(60), None),
            "tower-stampede; fwd=uri-miss; detail=store-write-failed"
        );
    }

    #[test]
    fn the_memo_answers_as_for_status_does() {
        let calls = [
            ("a", Status::Hit, Some(5)),
            ("a", Status::Hit, Some(5)),
            ("a", Status::Hit, Some(4)),
            ("a-b", Status::Hit, Some(4)),
            ("a", Status::Hit, Some(4)),
            ("b", Status::Hit, Some(4)),
            ("b", Status::Stale(StaleReason::Revalidating), Some(4)),
            ("b", Status::Stale(StaleReason::Revalidating), Some(4)),
            ("b", Status::Stored, Some(4)),
            ("b", Status::Stored, None),
        ];
        for (name, st, ttl) in calls {
            assert_eq!(
                for_status_memo(name, st, ttl),
                for_status(name, st, ttl, None)
            );
        }
    }

    #[test]
    fn a_detail_is_added_to_our_member_only_when_it_has_none() {
        let mut h = HeaderMap::new();
        add_detail(&mut h, "x");
        assert!(h.get(CACHE_STATUS).is_none());
        h.insert(
            CACHE_STATUS,
            HeaderValue::from_static("up; detail=a, me; fwd=uri-miss; stored"),
        );
        add_detail(&mut h, "dropped");
        assert_eq!(
            h[CACHE_STATUS],
            "up; detail=a, me; fwd=uri-miss; stored; detail=dropped"
        );
        add_detail(&mut h, "again");
        assert_eq!(
            h[CACHE_STATUS],
            "up; detail=a, me; fwd=uri-miss; stored; detail=dropped"
        );
    }

    #[test]
    fn only_well_formed_earlier_values_are_kept() {
        for ok in [
            "edge; hit",
            "edge; hit, cdn; fwd=miss; ttl=-3",
            r#"edge; detail="a, b \" (c""#,
            "(a b); x=1, c",
            "a,\tb",
            "*x; n=-12; d=1.5; b=?0; y=:aGk=:, ( ); e",
            "a; y=:aGk:; z=::; w=:aGVsbG8=:",
            "cdn; key=\"k\"; fwd=uri-miss; fwd-status=200; stored; ttl=123456789012345",
        ] {
            assert!(well_formed(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "edge; hit,",
            ", edge",
            "a,, b",
            r#"edge; detail="open"#,
            r#"edge; detail="esc\""#,
            "(a b",
            "a)",
            "(a, b)",
            "edge; detail=\u{e9}",
            "a\u{7f}",
            // Found by a review: each made the joined field unparsable.
            "1edge; hit",
            "edge; Hit",
            "edge ;hit",
            "edge;;hit",
            // Numbers, byte sequences, booleans, strings and inner lists out of shape.
            "a; ttl=1234567890123456",
            "a; d=1.2345",
            "a; d=1.",
            "a; n=-",
            "a; b=:abc",
            "a; b=:a:",
            "a; b=:a=b:",
            "a; b=:aGk===:",
            "a; b=?2",
            "a; s=\"x\\y\"",
            "(a\tb)",
            "(a)b",
            "a b",
            "a; =1",
        ] {
            assert!(!well_formed(bad.as_bytes()), "{bad:?}");
        }
    }
}
