//! HTTP cache keys: the URL-level slot and the `Vary` selector.

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue, Uri};

use crate::key::Digest;

/// The URL-level slot: method class + scheme + authority + path and query. GET and HEAD share a
/// slot (HEAD is answered from the GET entry).
/// `host` is the request's `Host`, used when the URI has no authority (origin form), byte for
/// byte: a `Host` that is not text is a host of its own, not the empty one.
pub(crate) fn url_slot(uri: &Uri, host: Option<&HeaderValue>) -> Digest {
    url_slot_as(uri.scheme_str().unwrap_or("http"), uri, host)
}

/// [`url_slot`] as if `uri`'s scheme were `scheme`. An invalidation clears the URL under both
/// http and https: an origin-form request (HTTP/1.1) is keyed as http, whatever TLS ended in
/// front of the server, while HTTP/2 brings its `https` scheme, so one page may be stored under
/// either.
pub(crate) fn url_slot_as(scheme: &str, uri: &Uri, host: Option<&HeaderValue>) -> Digest {
    let authority = uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| host.map(|h| h.as_bytes()))
        .unwrap_or_default();
    let authority = authority_key(scheme, authority);
    // Path and query as one field, so `/a?` and `/a` stay apart (RFC 3986 section 6.2.3: an
    // empty query is not no query).
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    Digest::of_fields([
        "http".as_bytes(),
        b"GET",
        scheme.as_bytes(),
        &authority,
        target.as_bytes(),
    ])
}

/// An authority as keys compare it: lower-cased (hosts are case-insensitive) and without the
/// scheme's default port, so `A.test:80` and `a.test` are one origin for http (RFC 3986 section
/// 6.2.3). An origin-form target's scheme is taken as http, as in its key. Most authorities
/// arrive lower-case and without a port, and then cost no copy.
pub(crate) fn authority_key<'a>(scheme: &str, authority: &'a [u8]) -> Cow<'a, [u8]> {
    let default_port: &[u8] = if scheme.eq_ignore_ascii_case("https") {
        b":443"
    } else if scheme.eq_ignore_ascii_case("http") {
        b":80"
    } else {
        b""
    };
    let authority = match authority.strip_suffix(default_port) {
        Some(host) if !default_port.is_empty() => host,
        _ => authority,
    };
    if authority.iter().any(u8::is_ascii_uppercase) {
        authority.to_ascii_lowercase().into()
    } else {
        authority.into()
    }
}

/// A path without its `.` and `..` segments (RFC 3986 section 5.2.4), so `/a/../b` is `/b`;
/// `..` above the root stays at the root. Borrowed when there are none. Meant for absolute paths
/// (the merge of section 5.2.3 gives one): a relative path loses the leading segments its `..`
/// remove (`a/../b` is `b`, where 5.2.4 writes `/b`).
pub(crate) fn remove_dot_segments(path: &str) -> Cow<'_, str> {
    let dotted = path.split('/').any(|seg| seg == "." || seg == "..");
    if !dotted {
        return path.into();
    }
    let absolute = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').collect();
    let last = segs.len() - 1;
    for (i, seg) in segs.iter().enumerate() {
        if i == 0 && absolute {
            continue;
        }
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                // A dot segment that ends the path leaves a directory: `/a/b/..` is `/a/`.
                if i == last {
                    out.push("");
                }
            }
            seg => out.push(seg),
        }
    }
    let joined = out.join("/");
    if absolute {
        format!("/{joined}").into()
    } else {
        joined.into()
    }
}

/// A path with its percent-encoded unreserved characters decoded (RFC 3986 section 6.2.2.2:
/// `%7E` is `~`, `%2E` is `.`), so `/a/%2e%2e/b` reads as `/a/../b`. Other escapes stay as
/// written. Borrowed when there are none.
pub(crate) fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = path.as_bytes();
    let decoded_at = |i: usize| -> Option<u8> {
        if bytes.get(i) != Some(&b'%') {
            return None;
        }
        let (hi, lo) = (hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?);
        let b = u8::try_from(hi * 16 + lo).ok()?;
        unreserved(b).then_some(b)
    };
    if !(0..bytes.len()).any(|i| decoded_at(i).is_some()) {
        return path.into();
    }
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(b) = decoded_at(i) {
            out.push(char::from(b));
            i += 3;
        } else {
            // Not a decoded escape: copy one character (the path may hold any UTF-8 here).
            let Some(c) = path[i..].chars().next() else {
                break;
            };
            out.push(c);
            i += c.len_utf8();
        }
    }
    out.into()
}

/// A slot from a user key.
pub(crate) fn user_slot(key: &[u8]) -> Digest {
    Digest::of_fields(["http-user".as_bytes(), key])
}

/// The selector of a response's `Vary`: the header names, lower-cased, sorted, comma-joined.
/// `Ok(None)` when the response does not vary; `Err(())` for `Vary: *` (never stored).
pub(crate) fn vary_selector(headers: &HeaderMap) -> Result<Option<String>, ()> {
    let mut names: Vec<String> = Vec::new();
    for v in headers.get_all(http::header::VARY) {
        let Ok(v) = v.to_str() else { return Err(()) };
        for n in v.split(',') {
            let n = n.trim().to_ascii_lowercase();
            if n == "*" {
                return Err(());
            }
            if !n.is_empty() {
                names.push(n);
            }
        }
    }
    if names.is_empty() {
        return Ok(None);
    }
    names.sort();
    names.dedup();
    Ok(Some(names.join(",")))
}

/// This request's variant digest for a stored selector.
pub(crate) fn variant_of(selector: &[u8], req: &HeaderMap) -> Option<Digest> {
    let sel = std::str::from_utf8(selector).ok()?;
    let mut fields: Vec<Vec<u8>> = vec![b"vary".to_vec(), selector.to_vec()];
    for name in sel.split(',') {
        if name == "*" {
            return None;
        }
        // Values joined in order; absent and empty are different.
        let mut present = false;
        let mut joined = Vec::new();
        for v in req.get_all(name) {
            if present {
                joined.push(b',');
            }
            present = true;
            joined.extend_from_slice(v.as_bytes());
        }
        fields.push(vec![present as u8]);
        fields.push(joined);
    }
    Some(Digest::of_fields(fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_compare_without_case_or_the_default_port() {
        let key = |scheme, a: &'static str| authority_key(scheme, a.as_bytes()).into_owned();
        assert_eq!(key("http", "A.Test:80"), b"a.test");
        assert_eq!(key("HTTPS", "a.test:443"), b"a.test");
        assert_eq!(key("http", "[::1]:80"), b"[::1]");
        // Another port, or another scheme's default, stays.
        for (scheme, a) in [
            ("http", "a.test:8080"),
            ("http", "a.test:443"),
            ("https", "a.test:80"),
            ("ftp", "a.test:80"),
            ("http", "a.test:"),
        ] {
            assert_eq!(key(scheme, a), a.as_bytes(), "{scheme} {a}");
        }
        let slot = |uri: &str, host: &'static str| {
            url_slot(&uri.parse().unwrap(), Some(&HeaderValue::from_static(host)))
        };
        assert_eq!(slot("/p", "a.test:80"), slot("/p", "a.test"));
        assert_eq!(slot("http://a.test:80/p", "x"), slot("/p", "A.test"));
        assert_ne!(slot("/p", "a.test:8080"), slot("/p", "a.test"));
        assert_ne!(slot("https://a.test/p", "x"), slot("/p", "a.test"));
    }

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_does() {
        // RFC 3986 section 5.2.4's two examples, and section 5.4's normal and abnormal ones
        // (merged with the base path /b/c/d;p).
        for (path, want) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("mid/content=5/../6", "mid/6"),
            ("/b/c/g", "/b/c/g"),
            ("/b/c/./g", "/b/c/g"),
            ("/b/c/g/", "/b/c/g/"),
            ("/b/c/.", "/b/c/"),
            ("/b/c/./", "/b/c/"),
            ("/b/c/..", "/b/"),
            ("/b/c/../", "/b/"),
            ("/b/c/../g", "/b/g"),
            ("/b/c/../..", "/"),
            ("/b/c/../../g", "/g"),
            ("/b/c/../../../g", "/g"),
            ("/b/c/../../../../g", "/g"),
            ("/./g", "/g"),
            ("/../g", "/g"),
            ("/b/c/g.", "/b/c/g."),
            ("/b/c/.g", "/b/c/.g"),
            ("/b/c/g..", "/b/c/g.."),
            ("/b/c/..g", "/b/c/..g"),
            ("/b/c/./../g", "/b/g"),
            ("/b/c/./g/.", "/b/c/g/"),
            ("/b/c/g/./h", "/b/c/g/h"),
            ("/b/c/g/../h", "/b/c/h"),
            ("/", "/"),
            ("", ""),
        ] {
            assert_eq!(remove_dot_segments(path), want, "{path}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept() {
        for (path, want) in [
            ("/a/%2e%2E/b", "/a/../b"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a%2Fb%20c%25", "/a%2Fb%20c%25"),
            ("/%", "/%"),
            ("/%2", "/%2"),
            ("/%zz%2e", "/%zz."),
            ("/é%2e", "/é."),
            ("/plain", "/plain"),
        ] {
            assert_eq!(decode_unreserved(path), want, "{path}");
        }
        assert!(matches!(decode_unreserved("/plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn vary_normalises_names() {
        let mut h = HeaderMap::new();
        h.append("vary", HeaderValue::from_static("Accept-Encoding, Accept"));
        h.append("vary", HeaderValue::from_static("accept"));
        assert_eq!(
            vary_selector(&h).unwrap().unwrap(),
            "accept,accept-encoding"
        );
        h.append("vary", HeaderValue::from_static("*"));
        assert!(vary_selector(&h).is_err());
    }

    #[test]
    fn variants_differ_by_value_and_presence() {
        let mut a = HeaderMap::new();
        a.insert("accept-encoding", HeaderValue::from_static("gzip"));
        let mut b = HeaderMap::new();
        b.insert("accept-encoding", HeaderValue::from_static("br"));
        let mut empty = HeaderMap::new();
        empty.insert("accept-encoding", HeaderValue::from_static(""));
        let none = HeaderMap::new();
        let sel = b"accept-encoding";
        let all = [&a, &b, &empty, &none].map(|h| variant_of(sel, h).unwrap());
        for i in 0..all.len() {
            for j in 0..i {
                assert_ne!(all[i], all[j]);
            }
        }
    }
}
