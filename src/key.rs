//! Cache keys: a fixed-length digest of the logical key and the physical key layout.
//!
//! The layout is `<prefix>{<digest>}:<part>`. The braces are a Redis Cluster hash tag, so every
//! part of one logical entry (lease, fence counter, entry, variants) lands in one slot, and a
//! memcached pool chooses the server by the digest alone.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::entry::FORMAT_VERSION;
use crate::error::ConfigError;

/// The 128-bit digest of a logical key (a truncated SHA-256).
///
/// Every field is length-prefixed before hashing, so two different field lists can never feed
/// the same bytes to the hash. A collision-resistant hash matters here: a key collision would
/// hand one URL's content to another, so a fast non-cryptographic hash is not an option for
/// keys that come from the network.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 16]);

impl Digest {
    /// Hashes a list of fields (length-prefixed, so `["ab", "c"]` and `["a", "bc"]` differ).
    pub fn of_fields<I, F>(fields: I) -> Self
    where
        I: IntoIterator<Item = F>,
        F: AsRef<[u8]>,
    {
        let mut h = Sha256::new();
        for f in fields {
            let f = f.as_ref();
            h.update((f.len() as u64).to_le_bytes());
            h.update(f);
        }
        let full = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        Digest(out)
    }

    /// The digest of a plain application key, as used by [`Stampede::get_or_fill`](crate::Stampede::get_or_fill).
    pub fn of_key(key: impl AsRef<[u8]>) -> Self {
        Self::of_fields([b"k".as_slice(), key.as_ref()])
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Builds a digest from raw bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Digest(b)
    }

    /// Lower-case hex, 32 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The longest prefix accepted, so every physical key stays far below memcached's 250 bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// A validated key prefix, with the entry encoding version appended so two versions of the
/// crate in a rolling deploy never read each other's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// Validates `p`: at most [`MAX_PREFIX_LEN`] bytes of printable ASCII, no braces, no
    /// whitespace.
    pub fn new(p: &str) -> Result<Self, ConfigError> {
        if p.len() > MAX_PREFIX_LEN {
            return Err(ConfigError::new(format!(
                "key prefix is {} bytes; at most {MAX_PREFIX_LEN} allowed",
                p.len()
            )));
        }
        if let Some(c) = p
            .chars()
            .find(|c| !c.is_ascii_graphic() || *c == '{' || *c == '}')
        {
            return Err(ConfigError::new(format!(
                "key prefix {p:?} contains {c:?}; only printable ASCII without braces or whitespace is allowed"
            )));
        }
        Ok(Prefix(format!("{p}v{FORMAT_VERSION}:")))
    }

    /// The prefix as written in front of every key, version included.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<prefix>{<digest>}:<part>`.
    pub fn key(&self, slot: &Digest, part: &str) -> String {
        let mut s = String::with_capacity(self.0.len() + 36 + part.len());
        s.push_str(&self.0);
        s.push('{');
        s.push_str(&slot.to_hex());
        s.push_str("}:");
        s.push_str(part);
        s
    }

    /// The key of the lease.
    pub fn lease(&self, slot: &Digest) -> String {
        self.key(slot, "l")
    }

    /// The key of the fence counter.
    pub fn fence(&self, slot: &Digest) -> String {
        self.key(slot, "f")
    }

    /// The key of the entry (or the Vary head, pass marker or tombstone).
    pub fn entry(&self, slot: &Digest) -> String {
        self.key(slot, "e")
    }

    /// The key of one variant of a `Vary`ing entry.
    pub fn variant(&self, slot: &Digest, variant: &Digest) -> String {
        let mut part = String::with_capacity(34);
        part.push_str("v:");
        part.push_str(&variant.to_hex());
        self.key(slot, &part)
    }

    /// The name of the signal channel of one slot.
    pub fn channel(&self, slot: &Digest) -> String {
        self.key(slot, "s")
    }
}

impl Default for Prefix {
    fn default() -> Self {
        Prefix::new("ts:").expect("the default prefix is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed() {
        assert_ne!(
            Digest::of_fields(["ab", "c"]),
            Digest::of_fields(["a", "bc"])
        );
        assert_eq!(Digest::of_fields(["a", "b"]), Digest::of_fields(["a", "b"]));
    }

    #[test]
    fn prefix_rejects_bad_bytes() {
        assert!(Prefix::new("ok:").is_ok());
        for bad in ["a b", "a{b", "}", "a\nb", "\u{e9}"] {
            assert!(Prefix::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Prefix::new(&"x".repeat(MAX_PREFIX_LEN + 1)).is_err());
    }

    #[test]
    fn keys_share_a_hash_tag_and_fit_memcached() {
        let p = Prefix::new(&"p".repeat(MAX_PREFIX_LEN)).unwrap();
        let d = Digest::of_key("x".repeat(10_000));
        let v = p.variant(&d, &d);
        assert!(v.len() <= 250, "{}", v.len());
        assert!(v.contains(&format!("{{{}}}", d.to_hex())));
        assert!(v.bytes().all(|b| b.is_ascii_graphic()));
    }
}
