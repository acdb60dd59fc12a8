//! A buffered HTTP response as stored in an entry's value.
//!
//! Layout (little-endian): status u16, origin age u32 (seconds, from the origin's `Age`), header
//! count u16, then per header name length u16, name, value length u32, value; the body is the
//! rest, so serving it is a zero-copy slice of the stored buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::freshness::age_value;
use crate::entry::decimal;

/// A stored response.
#[derive(Clone, Debug)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) origin_age: u32,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Headers that describe one connection or one transfer, never a stored response.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn skip_on_store(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || name == header::AGE
        || name == header::CONTENT_LENGTH
        || name == header::SET_COOKIE
}

/// A header value holding `n` in decimal, in one exact-size allocation (`HeaderValue::from(u64)`
/// makes two).
pub(crate) fn header_int(n: u64) -> HeaderValue {
    let mut buf = [0u8; 21];
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(decimal(&mut buf, n, false)))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The most header lines a stored response may have. Far above what any HTTP server sends
/// (hyper's client takes 100 by default), and far enough below what a `HeaderMap` holds
/// (24,576 names; it panics past that) that serving can add its own without a check.
pub(crate) const MAX_HEADERS: usize = 8192;

impl StoredResponse {
    /// `None` when the response would be stored with more than [`MAX_HEADERS`] header lines
    /// (ours included): it is not stored.
    pub(crate) fn new(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Option<Self> {
        if headers.len() > MAX_HEADERS {
            return None;
        }
        let origin_age = age_value(headers).unwrap_or(0);
        // Headers named in `Connection` are hop-by-hop too (RFC 9110 section 7.6.1).
        let named: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        let mut kept = HeaderMap::with_capacity(headers.len() + 1);
        for (n, v) in headers {
            if !skip_on_store(n) && !named.iter().any(|c| c == n.as_str()) {
                kept.append(n.clone(), v.clone());
            }
        }
        // Our own Content-Length, from the body we hold (the origin's may have described a
        // transfer): stored, so serving a hit slices it instead of formatting it.
        if status != StatusCode::NO_CONTENT && !status.is_informational() {
            kept.insert(header::CONTENT_LENGTH, header_int(body.len() as u64));
        }
        if kept.len() > MAX_HEADERS {
            return None;
        }
        Some(StoredResponse {
            status,
            origin_age,
            headers: kept,
            body,
        })
    }

    pub(crate) fn encode(&self) -> Bytes {
        let hdr_len: usize = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum();
        let mut out = BytesMut::with_capacity(8 + hdr_len + self.body.len());
        out.put_u16_le(self.status.as_u16());
        out.put_u32_le(self.origin_age);
        // At most MAX_HEADERS (see `new`), so the count fits.
        out.put_u16_le(self.headers.len() as u16);
        for (n, v) in self.headers.iter() {
            out.put_u16_le(n.as_str().len() as u16);
            out.put_slice(n.as_str().as_bytes());
            out.put_u32_le(v.len() as u32);
            out.put_slice(v.as_bytes());
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// `None` for anything malformed.
    pub(crate) fn decode(b: &Bytes) -> Option<Self> {
        let mut buf = b.clone();
        if buf.remaining() < 8 {
            return None;
        }
        let status = StatusCode::from_u16(buf.get_u16_le()).ok()?;
        // Only a final response is ever stored.
        if status.is_informational() {
            return None;
        }
        let origin_age = buf.get_u32_le();
        let count = buf.get_u16_le() as usize;
        // More than `new` stores: and a `HeaderMap` panics past 24,576 names.
        if count > MAX_HEADERS {
            return None;
        }
        // Room for what serving adds (Age, Cache-Status, Content-Length) without regrowing; the
        // count is the record's claim, so no more than its bytes can hold (a header takes at
        // least 7).
        let mut headers = HeaderMap::with_capacity(count.min(buf.remaining() / 7) + 3);
        for _ in 0..count {
            if buf.remaining() < 2 {
                return None;
            }
            let nl = buf.get_u16_le() as usize;
            if buf.remaining() < nl + 4 {
                return None;
            }
            let name = HeaderName::from_bytes(&buf[..nl]).ok()?;
            buf.advance(nl);
            let vl = buf.get_u32_le() as usize;
            if buf.remaining() < vl {
                return None;
            }
            let value = HeaderValue::from_maybe_shared(buf.split_to(vl)).ok()?;
            headers.append(name, value);
        }
        // What `new` writes: no framing of a transfer, and a Content-Length that is the body's.
        // A record that says otherwise would have hyper frame the body wrongly.
        if headers.contains_key(header::TRANSFER_ENCODING) {
            return None;
        }
        let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
        if let Some(len) = lengths.next() {
            let mut digits = [0u8; 21];
            if len.as_bytes() != decimal(&mut digits, buf.len() as u64, false)
                || lengths.next().is_some()
            {
                return None;
            }
        }
        Some(StoredResponse {
            status,
            origin_age,
            headers,
            body: buf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_drops_per_connection_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(header::AGE, HeaderValue::from_static("7"));
        let s = StoredResponse::new(StatusCode::OK, &h, Bytes::from_static(b"body")).unwrap();
        let d = StoredResponse::decode(&s.encode()).unwrap();
        assert_eq!(d.status, StatusCode::OK);
        assert_eq!(d.origin_age, 7);
        assert_eq!(&d.body[..], b"body");
        assert!(d.headers.get(header::CONNECTION).is_none());
        assert_eq!(d.headers.get(header::VARY).unwrap(), "accept-encoding");
        assert_eq!(d.headers.get(header::CONTENT_LENGTH).unwrap(), "4");
    }

    #[test]
    fn an_origin_age_too_large_is_2_pow_31() {
        for (age, want) in [
            ("5000000000", 1 << 31),
            ("2147483649", 1 << 31),
            ("12", 12),
            ("x", 0),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::AGE, HeaderValue::from_static(age));
            let s = StoredResponse::new(StatusCode::OK, &h, Bytes::new()).unwrap();
            assert_eq!(s.origin_age, want, "{age}");
        }
    }

    /// A `HeaderMap` panics past 24,576 names (and `with_capacity` past about that): a record
    /// that claims and holds that many, from a foreign writer or a damaged store, panicked the
    /// request serving it. Such records, and anything over what is stored, are unreadable.
    #[test]
    fn a_record_with_more_headers_than_are_stored_is_unreadable_not_a_panic() {
        let names: Vec<String> = (0..30_000).map(|i| format!("x{i}")).collect();
        for n in [MAX_HEADERS + 1, 24_574, 30_000] {
            let hs: Vec<(&str, &str)> = names[..n].iter().map(|k| (k.as_str(), "")).collect();
            assert!(
                StoredResponse::decode(&record(200, n as u16, &hs, b"")).is_none(),
                "{n}"
            );
        }
        let hs: Vec<(&str, &str)> = names[..MAX_HEADERS - 1]
            .iter()
            .map(|k| (k.as_str(), ""))
            .collect();
        let d = StoredResponse::decode(&record(200, hs.len() as u16, &hs, b"")).unwrap();
        assert_eq!(d.headers.len(), MAX_HEADERS - 1);
    }

    /// What cannot be stored whole is not stored: before, more than 65,535 header lines were
    /// cut to that many in the record, and more than 24,576 names panicked the fill.
    #[test]
    fn a_response_with_more_headers_than_are_stored_is_not_stored() {
        let mut h = HeaderMap::new();
        for i in 0..MAX_HEADERS - 1 {
            h.append(
                HeaderName::try_from(format!("x{}", i % 100)).unwrap(),
                HeaderValue::from(i),
            );
        }
        let s = StoredResponse::new(StatusCode::OK, &h, Bytes::new()).unwrap();
        let d = StoredResponse::decode(&s.encode()).unwrap();
        // Every line, and the Content-Length of ours.
        assert_eq!(d.headers.len(), MAX_HEADERS);
        h.append("x-one-more", HeaderValue::from_static("1"));
        assert!(StoredResponse::new(StatusCode::OK, &h, Bytes::new()).is_none());
    }

    #[test]
    fn header_int_is_decimal() {
        for n in [0, 7, 10, 1080, u64::MAX] {
            assert_eq!(header_int(n), HeaderValue::from(n));
        }
    }

    /// A record as `encode` lays it out, from raw parts.
    fn record(status: u16, count: u16, headers: &[(&str, &str)], body: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u16_le(status);
        out.put_u32_le(0);
        out.put_u16_le(count);
        for (n, v) in headers {
            out.put_u16_le(n.len() as u16);
            out.put_slice(n.as_bytes());
            out.put_u32_le(v.len() as u32);
            out.put_slice(v.as_bytes());
        }
        out.put_slice(body);
        out.freeze()
    }

    #[test]
    fn a_record_claiming_more_headers_than_it_holds_is_none_not_a_panic() {
        for count in [32_766, 40_000, u16::MAX] {
            let b = record(200, count, &[("content-length", "3")], b"abc");
            assert!(StoredResponse::decode(&b).is_none(), "{count}");
        }
        assert!(
            StoredResponse::decode(&record(200, 1, &[("content-length", "3")], b"abc")).is_some()
        );
    }

    #[test]
    fn a_record_whose_framing_disagrees_with_its_body_is_none() {
        let ok = [("content-length", "3")];
        assert!(StoredResponse::decode(&record(200, 1, &ok, b"abc")).is_some());
        assert!(StoredResponse::decode(&record(204, 0, &[], b"")).is_some());
        for (status, h, body) in [
            (200, &[("content-length", "9")][..], &b"abc"[..]),
            (200, &[("content-length", "03")][..], b"abc"),
            (
                200,
                &[("content-length", "3"), ("content-length", "3")][..],
                b"abc",
            ),
            (
                200,
                &[("content-length", "3"), ("transfer-encoding", "chunked")][..],
                b"abc",
            ),
            (103, &[][..], b""),
            (100, &[("content-length", "3")][..], b"abc"),
        ] {
            let b = record(status, h.len() as u16, h, body);
            assert!(StoredResponse::decode(&b).is_none(), "{status} {h:?}");
        }
    }

    #[test]
    fn garbage_is_none() {
        for b in [&b""[..], b"\x00\x00", b"\xc8\x00\x00\x00\x00\x00\x05\x00"] {
            assert!(StoredResponse::decode(&Bytes::copy_from_slice(b)).is_none());
        }
    }
}
