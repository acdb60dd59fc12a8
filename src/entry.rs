//! Stored records and their versioned binary encoding.
//!
//! Every record starts with a fixed ASCII header that a backend's atomic step can read without
//! knowing the rest (a Redis Lua script, a memcached CAS loop):
//!
//! ```text
//! offset  0  "TS"        magic
//! offset  2  '1'         encoding version (also part of every key prefix)
//! offset  3  kind        'E' entry, 'V' vary head, 'P' pass marker, 'T' tombstone
//! offset  4  fence       20 ASCII digits, the writer's fencing token
//! offset 24  token       16 lower-case hex digits, the writer's lease token
//! offset 40  epoch       20 ASCII digits, the oldest fence a variant may carry and still count
//! offset 60  body        kind-specific, little-endian binary
//! ```
//!
//! Bytes that do not decode (truncated, foreign, another version) are a miss, never a panic.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::backend::Token;

/// The encoding version, also written into every key prefix.
pub const FORMAT_VERSION: u8 = 1;
/// The length of the fixed header.
pub const HEADER_LEN: usize = 60;
const MAGIC: &[u8; 2] = b"TS";

/// What kind of record is stored at an entry key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A value with its metadata.
    Entry,
    /// The head of a `Vary`ing entry: it names the selector; the values live at variant keys.
    VaryHead,
    /// The pass marker: the last fill was not cacheable, so callers go to the source in
    /// parallel until it expires.
    Pass,
    /// A fenced tombstone written by an invalidation.
    Tombstone,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Entry => b'E',
            Kind::VaryHead => b'V',
            Kind::Pass => b'P',
            Kind::Tombstone => b'T',
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'E' => Kind::Entry,
            b'V' => Kind::VaryHead,
            b'P' => Kind::Pass,
            b'T' => Kind::Tombstone,
            _ => return None,
        })
    }
}

/// The fixed header of every stored record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The record's kind.
    pub kind: Kind,
    /// The fence of the lease grant that wrote it.
    pub fence: u64,
    /// The token of the lease that wrote it.
    pub token: Token,
    /// Variants with a fence below this are void (set by invalidation).
    pub epoch: u64,
}

/// The fence in a record's header; 0 for bytes that are not a record.
pub(crate) fn record_fence(bytes: &[u8]) -> u64 {
    Header::parse(bytes).map_or(0, |h| h.fence)
}

impl Header {
    /// Reads the header; `None` for anything that is not a record of this version.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || &b[0..2] != MAGIC || b[2] != b'0' + FORMAT_VERSION {
            return None;
        }
        let kind = Kind::from_byte(b[3])?;
        let fence = parse_digits(&b[4..24])?;
        let token = Token::from_hex(&b[24..40])?;
        let epoch = parse_digits(&b[40..60])?;
        Some(Header {
            kind,
            fence,
            token,
            epoch,
        })
    }

    fn write(&self, out: &mut BytesMut) {
        out.put_slice(MAGIC);
        out.put_u8(b'0' + FORMAT_VERSION);
        out.put_u8(self.kind.byte());
        out.put_slice(format!("{:020}", self.fence).as_bytes());
        out.put_slice(&self.token.to_hex());
        out.put_slice(format!("{:020}", self.epoch).as_bytes());
    }
}

/// `magnitude` in decimal, `-` first when `negative`, written at the end of `buf`.
pub(crate) fn decimal(buf: &mut [u8; 21], magnitude: u64, negative: bool) -> &[u8] {
    let mut m = magnitude;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if negative {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// A 20-digit field (zero-padded, as [`Header`] writes it); `None` for any other length, a
/// byte that is not a digit, or a value above `u64::MAX`. It is read on every lookup, so the
/// digits are taken eight at a time in one word (the SWAR method described by Lemire, "Faster
/// integer parsing", 2018) rather than one at a time.
fn parse_digits(b: &[u8]) -> Option<u64> {
    let b: &[u8; 20] = b.try_into().ok()?;
    let (head, rest) = b.split_at(4);
    let mut high = 0u64;
    for &c in head {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        high = high * 10 + u64::from(d);
    }
    let mid = eight_digits(rest[..8].try_into().ok()?)?;
    let low = eight_digits(rest[8..].try_into().ok()?)?;
    // `mid * 10^8 + low` is below 10^16; only the four high digits can overflow.
    high.checked_mul(10_000_000_000_000_000)?
        .checked_add(mid * 100_000_000 + low)
}

/// Eight ASCII digits, the first the most significant; `None` if any byte is not a digit.
fn eight_digits(b: [u8; 8]) -> Option<u64> {
    // Little-endian: the first digit is the lowest byte.
    let w = u64::from_le_bytes(b);
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Every byte is 0x30..=0x39: its high nibble is 3, and adding 6 to its low nibble does not
    // carry into the high one.
    let high_nibbles = w & (0xF0 * ONES);
    let carried = w.wrapping_add(0x06 * ONES) & (0xF0 * ONES);
    if high_nibbles | (carried >> 4) != 0x33 * ONES {
        return None;
    }
    // Combine neighbours pairwise: digits into 2-digit numbers (in 16-bit lanes), those into
    // 4-digit numbers (32-bit lanes), and those into the 8-digit value.
    let d = w & (0x0F * ONES);
    let d = (d.wrapping_mul(10 << 8 | 1) >> 8) & 0x00FF_00FF_00FF_00FF;
    let d = (d.wrapping_mul(100 << 16 | 1) >> 16) & 0x0000_FFFF_0000_FFFF;
    Some(d.wrapping_mul(10_000 << 32 | 1) >> 32)
}

/// Freshness windows of a stored value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ttl {
    /// How long the value is fresh.
    pub fresh: Duration,
    /// After it goes stale, how long it may still be served while one refresh runs (RFC 5861).
    pub stale_while_revalidate: Duration,
    /// After it goes stale, how long it may still be served when the refresh fails (RFC 5861).
    pub stale_if_error: Duration,
    /// After it goes stale, how long the store keeps it only so the next fill can revalidate it
    /// (HTTP: a conditional request with its validators). Never served on its own.
    pub revalidate: Duration,
}

impl Ttl {
    /// A value fresh for `fresh`, with no stale windows.
    pub fn fresh(fresh: Duration) -> Self {
        Ttl {
            fresh,
            ..Ttl::default()
        }
    }

    /// Sets the stale-while-revalidate window.
    pub fn with_swr(mut self, swr: Duration) -> Self {
        self.stale_while_revalidate = swr;
        self
    }

    /// Sets the stale-if-error window.
    pub fn with_sie(mut self, sie: Duration) -> Self {
        self.stale_if_error = sie;
        self
    }

    /// The longest any window may be (a year): longer ones are clamped, so an origin's
    /// `max-age=18446744073709551615` cannot overflow a clock.
    pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

    /// Every window clamped to [`Ttl::MAX`].
    pub fn clamped(self) -> Self {
        Ttl {
            fresh: self.fresh.min(Self::MAX),
            stale_while_revalidate: self.stale_while_revalidate.min(Self::MAX),
            stale_if_error: self.stale_if_error.min(Self::MAX),
            revalidate: self.revalidate.min(Self::MAX),
        }
    }

    /// Sets the revalidation window.
    pub fn with_revalidate(mut self, d: Duration) -> Self {
        self.revalidate = d;
        self
    }

    /// How long the store must keep the bytes: fresh + max(swr, sie, revalidate), or neither
    /// stale window could ever fire.
    pub fn physical(&self) -> Duration {
        self.fresh.saturating_add(
            self.stale_while_revalidate
                .max(self.stale_if_error)
                .max(self.revalidate),
        )
    }
}

/// The metadata of a stored value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Unix milliseconds when the value was produced.
    pub stored_at_ms: u64,
    /// Unix milliseconds until which the value is fresh.
    pub fresh_until_ms: u64,
    /// The stale-while-revalidate window, ms past `fresh_until_ms`.
    pub swr_ms: u64,
    /// The stale-if-error window, ms past `fresh_until_ms`.
    pub sie_ms: u64,
    /// How long the fill took, ms (the delta of XFetch).
    pub fill_ms: u32,
}

impl Meta {
    /// Builds metadata for a value produced at `now_ms`.
    pub fn new(now_ms: u64, ttl: &Ttl, fill_time: Duration) -> Self {
        Meta {
            stored_at_ms: now_ms,
            fresh_until_ms: now_ms.saturating_add(ms_u64(ttl.fresh)),
            swr_ms: ms_u64(ttl.stale_while_revalidate),
            sie_ms: ms_u64(ttl.stale_if_error),
            fill_ms: fill_time.as_millis().min(u32::MAX as u128) as u32,
        }
    }

    /// Fresh at `now_ms`?
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms
    }

    /// Stale but inside its stale-while-revalidate window?
    pub fn in_swr(&self, now_ms: u64) -> bool {
        !self.is_fresh(now_ms) && now_ms < self.fresh_until_ms.saturating_add(self.swr_ms)
    }

    /// Stale but inside its stale-if-error window?
    pub fn in_sie(&self, now_ms: u64) -> bool {
        !self.is_fresh(now_ms) && now_ms < self.fresh_until_ms.saturating_add(self.sie_ms)
    }

    /// Age in whole seconds at `now_ms`.
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }

    /// Remaining freshness in ms (negative once stale).
    pub fn ttl_ms(&self, now_ms: u64) -> i64 {
        let d = i128::from(self.fresh_until_ms) - i128::from(now_ms);
        d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
}

fn ms_u64(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A value.
    Entry {
        /// Its header.
        header: Header,
        /// Its metadata.
        meta: Meta,
        /// The value bytes (shares the stored buffer).
        value: Bytes,
    },
    /// The head of a `Vary`ing entry.
    VaryHead {
        /// Its header.
        header: Header,
        /// The selector that names what the variant depends on (HTTP: the `Vary` header names).
        selector: Bytes,
    },
    /// The pass marker.
    Pass {
        /// Its header.
        header: Header,
    },
    /// A tombstone.
    Tombstone {
        /// Its header.
        header: Header,
    },
}

impl Record {
    /// The header.
    pub fn header(&self) -> &Header {
        match self {
            Record::Entry { header, .. }
            | Record::VaryHead { header, .. }
            | Record::Pass { header }
            | Record::Tombstone { header } => header,
        }
    }

    /// Encodes an entry.
    pub fn encode_entry(header: Header, meta: &Meta, value: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + 45 + value.len());
        Header {
            kind: Kind::Entry,
            ..header
        }
        .write(&mut out);
        out.put_u64_le(meta.stored_at_ms);
        out.put_u64_le(meta.fresh_until_ms);
        out.put_u64_le(meta.swr_ms);
        out.put_u64_le(meta.sie_ms);
        out.put_u32_le(meta.fill_ms);
        out.put_u64_le(value.len() as u64);
        out.put_slice(value);
        out.freeze()
    }

    /// Encodes a vary head.
    pub fn encode_vary_head(header: Header, selector: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + 8 + selector.len());
        Header {
            kind: Kind::VaryHead,
            ..header
        }
        .write(&mut out);
        out.put_u64_le(selector.len() as u64);
        out.put_slice(selector);
        out.freeze()
    }

    /// A pass marker with `fence`, for unit tests that need a record with a given fence.
    #[cfg(test)]
    pub(crate) fn pass_with_fence(fence: u64) -> Bytes {
        Self::encode_marker(Header {
            kind: Kind::Pass,
            fence,
            token: crate::backend::Token::NONE,
            epoch: 0,
        })
    }

    /// Encodes a marker (pass or tombstone): the header alone.
    pub fn encode_marker(header: Header) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN);
        header.write(&mut out);
        out.freeze()
    }

    /// Decodes stored bytes; `None` for anything malformed.
    pub fn decode(bytes: &Bytes) -> Option<Record> {
        Record::decode_owned(bytes.clone()).1
    }

    /// Decodes stored bytes it owns, so the value is `bytes` itself, advanced past the
    /// metadata, rather than a second handle on its buffer (a hot entry's buffer is shared by
    /// every thread serving it, and each handle taken or dropped is an atomic on its one
    /// contended count). Returns the header too, when only it parses.
    pub(crate) fn decode_owned(mut bytes: Bytes) -> (Option<Header>, Option<Record>) {
        let Some(header) = Header::parse(&bytes) else {
            return (None, None);
        };
        bytes.advance(HEADER_LEN);
        (Some(header), Record::decode_body(header, bytes))
    }

    fn decode_body(header: Header, mut body: Bytes) -> Option<Record> {
        match header.kind {
            Kind::Entry => {
                if body.remaining() < 44 {
                    return None;
                }
                let meta = Meta {
                    stored_at_ms: body.get_u64_le(),
                    fresh_until_ms: body.get_u64_le(),
                    swr_ms: body.get_u64_le(),
                    sie_ms: body.get_u64_le(),
                    fill_ms: body.get_u32_le(),
                };
                let value = take_exact(&mut body)?;
                Some(Record::Entry {
                    header,
                    meta,
                    value,
                })
            }
            Kind::VaryHead => {
                let selector = take_exact(&mut body)?;
                Some(Record::VaryHead { header, selector })
            }
            Kind::Pass if body.is_empty() => Some(Record::Pass { header }),
            Kind::Tombstone if body.is_empty() => Some(Record::Tombstone { header }),
            _ => None,
        }
    }
}

/// A length-prefixed field that must end the buffer exactly.
fn take_exact(body: &mut Bytes) -> Option<Bytes> {
    if body.remaining() < 8 {
        return None;
    }
    let len = body.get_u64_le();
    if len != body.remaining() as u64 {
        return None;
    }
    Some(std::mem::take(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            kind: Kind::Entry,
            fence: 42,
            token: Token::from_u64(0xdead_beef),
            epoch: 7,
        }
    }

    #[test]
    fn entry_round_trips() {
        let meta = Meta::new(
            1000,
            &Ttl::fresh(Duration::from_secs(1)),
            Duration::from_millis(5),
        );
        let b = Record::encode_entry(header(), &meta, b"hello");
        match Record::decode(&b).unwrap() {
            Record::Entry {
                header: h,
                meta: m,
                value,
            } => {
                assert_eq!(h, header());
                assert_eq!(m, meta);
                assert_eq!(&value[..], b"hello");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncation_is_a_miss() {
        let meta = Meta::new(1000, &Ttl::fresh(Duration::from_secs(1)), Duration::ZERO);
        let b = Record::encode_entry(header(), &meta, b"hello");
        for n in 0..b.len() {
            assert!(
                Record::decode(&b.slice(..n)).is_none(),
                "prefix {n} decoded"
            );
        }
        let mut longer = b.to_vec();
        longer.push(0);
        assert!(Record::decode(&Bytes::from(longer)).is_none());
    }

    #[test]
    fn twenty_digit_fields_parse_exactly() {
        let max = format!("{:020}", u64::MAX);
        assert_eq!(parse_digits(max.as_bytes()), Some(u64::MAX));
        assert_eq!(parse_digits(b"18446744073709551616"), None, "u64::MAX + 1");
        assert_eq!(parse_digits(b"99999999999999999999"), None);
        assert_eq!(parse_digits(b"00000000000000000042"), Some(42));
        assert_eq!(parse_digits(b"0000000000000000004x"), None);
        assert_eq!(parse_digits(b"x0000000000000000004"), None);
        assert_eq!(parse_digits(b"000000000000000000042"), None, "21 digits");
        assert_eq!(parse_digits(b"1844674407370955161"), None, "19 digits");
        for v in [0, 9, 10, 1 << 40, u64::MAX / 10, u64::MAX - 1] {
            assert_eq!(parse_digits(format!("{v:020}").as_bytes()), Some(v), "{v}");
        }
        // Every digit position carries its own weight, and any non-digit byte at any
        // position (just below '0', just above '9', and far off) is refused.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let text = format!("{x:020}");
            assert_eq!(parse_digits(text.as_bytes()), Some(x), "{text}");
        }
        for pos in 0..20 {
            for bad in [b'/', b':', b' ', 0, 0x80, 0xFF, b'a', 0x30 + 0x10] {
                let mut t = *b"12345678901234567890";
                t[pos] = bad;
                assert_eq!(parse_digits(&t), None, "{bad:#x} at {pos}");
            }
        }
    }

    #[test]
    fn an_owned_decode_keeps_the_header_of_an_undecodable_body() {
        let meta = Meta::new(1000, &Ttl::fresh(Duration::from_secs(1)), Duration::ZERO);
        let b = Record::encode_entry(header(), &meta, b"hello");
        let (h, r) = Record::decode_owned(b.slice(..b.len() - 1));
        assert_eq!(h, Some(header()));
        assert!(r.is_none());
        let (h, r) = Record::decode_owned(b.clone());
        assert_eq!(h, Some(header()));
        assert!(matches!(r, Some(Record::Entry { value, .. }) if &value[..] == b"hello"));
        assert_eq!(Record::decode_owned(b.slice(..10)), (None, None));
    }

    #[test]
    fn other_versions_are_a_miss() {
        let b = Record::encode_marker(Header {
            kind: Kind::Pass,
            ..header()
        });
        assert!(Record::decode(&b).is_some());
        let mut v = b.to_vec();
        v[2] = b'2';
        assert!(Record::decode(&Bytes::from(v)).is_none());
    }
}
