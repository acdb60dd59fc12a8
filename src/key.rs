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
        // The framed input is built once; a hot key's digest is then found in this thread's
        // memo by comparing those bytes, and hashed only when it is not there. One `update` over
        // the framed bytes is the same hash as one per piece. The scratch buffer is taken out
        // of the memo while the caller's fields are read, so a field that computes a digest
        // itself finds the memo free (with an empty buffer of its own).
        let mut input = crate::local::with(&MEMO, |m| std::mem::take(&mut m.input), Vec::new);
        input.clear();
        for f in fields {
            let f = f.as_ref();
            input.extend_from_slice(&(f.len() as u64).to_le_bytes());
            input.extend_from_slice(f);
        }
        // No memo (this thread's is gone, in a thread-local destructor): hash directly.
        let d = crate::local::with(&MEMO, |m| m.digest(&input), || Digest::hash(&input));
        if input.len() <= MEMO_INPUT_MAX {
            crate::local::with(&MEMO, |m| m.input = input, || ());
        }
        d
    }

    fn hash(input: &[u8]) -> Digest {
        let full = Sha256::digest(input);
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
        self.push_hex(&mut s);
        s
    }

    /// Appends the lower-case hex form to `s` (a key is built with no string of its own for
    /// the digest).
    fn push_hex(&self, s: &mut String) {
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Inputs longer than this are hashed and not kept (nor is the scratch buffer kept this large).
const MEMO_INPUT_MAX: usize = 512;
/// Digests kept per thread.
const MEMO_SLOTS: usize = 4;

thread_local! {
    static MEMO: std::cell::RefCell<Memo> = std::cell::RefCell::new(Memo::default());
}

/// The last few digests this thread computed, by their framed input: the same URL is hashed
/// again on every request for it, and SHA-256 is most of the cost of a key.
#[derive(Default)]
struct Memo {
    /// The scratch buffer `of_fields` frames its fields in, kept between calls.
    input: Vec<u8>,
    /// Up to `MEMO_SLOTS`, replaced in turn.
    kept: Vec<(Vec<u8>, Digest)>,
    next: usize,
}

impl Memo {
    fn digest(&mut self, input: &[u8]) -> Digest {
        if let Some((_, d)) = self.kept.iter().find(|(k, _)| k == input) {
            return *d;
        }
        let d = Digest::hash(input);
        if input.len() <= MEMO_INPUT_MAX {
            if self.kept.len() < MEMO_SLOTS {
                self.kept.push((input.to_vec(), d));
            } else {
                let (k, kd) = &mut self.kept[self.next];
                k.clear();
                k.extend_from_slice(input);
                *kd = d;
                self.next = (self.next + 1) % MEMO_SLOTS;
            }
        }
        d
    }
}

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
        self.key_with(slot, part, None)
    }

    /// `<prefix>{<slot>}:<part>[<variant in hex>]`, in one allocation.
    fn key_with(&self, slot: &Digest, part: &str, variant: Option<&Digest>) -> String {
        let mut s = String::with_capacity(self.0.len() + 36 + part.len() + 32);
        s.push_str(&self.0);
        s.push('{');
        slot.push_hex(&mut s);
        s.push_str("}:");
        s.push_str(part);
        if let Some(v) = variant {
            v.push_hex(&mut s);
        }
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
        self.key_with(slot, "v:", Some(variant))
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

    /// SHA-256 of the framed fields, computed directly: what `of_fields` must return whether
    /// or not its memo holds the input.
    fn reference(fields: &[&[u8]]) -> Digest {
        let mut h = Sha256::new();
        for f in fields {
            h.update((f.len() as u64).to_le_bytes());
            h.update(f);
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize()[..16]);
        Digest(out)
    }

    #[test]
    fn the_memo_never_changes_a_digest() {
        let long = vec![b'x'; MEMO_INPUT_MAX + 1];
        let near = vec![b'x'; MEMO_INPUT_MAX - 8];
        let inputs: Vec<Vec<&[u8]>> = vec![
            vec![],
            vec![b""],
            vec![b"a", b"bc"],
            vec![b"ab", b"c"],
            vec![b"GET", b"/one"],
            vec![b"GET", b"/two"],
            vec![b"GET", b"/thr"],
            vec![b"GET", b"/fou"],
            vec![b"GET", b"/fiv"],
            vec![&long],
            vec![&near],
            vec![&long, b"y"],
        ];
        // Every input again and again, in an order that cycles more inputs than the memo keeps
        // and repeats some back to back; and the same in a fresh thread, so all start cold.
        let check = |inputs: &[Vec<&[u8]>]| {
            for round in 0..3 {
                for (i, f) in inputs.iter().enumerate() {
                    for _ in 0..=(i + round) % 3 {
                        assert_eq!(
                            Digest::of_fields(f.iter()),
                            reference(f),
                            "{i} in round {round}"
                        );
                    }
                }
            }
        };
        check(&inputs);
        std::thread::scope(|s| {
            s.spawn(|| check(&inputs));
        });
    }

    #[test]
    fn a_digest_of_digests_and_a_digest_in_a_thread_exit_are_right() {
        // Fields that compute digests while `of_fields` reads them.
        let parts = ["a", "b", "c"];
        let inner: Vec<Vec<u8>> = parts
            .iter()
            .map(|p| Digest::of_key(p).as_bytes().to_vec())
            .collect();
        let want = reference(&inner.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for _ in 0..2 {
            let got =
                Digest::of_fields(parts.iter().map(|p| Digest::of_key(p).as_bytes().to_vec()));
            assert_eq!(got, want);
        }
        // A digest computed by a thread-local's destructor, after this thread's memo may be
        // gone (destructors run in reverse order of first use here, so the memo goes first).
        struct OnExit(std::sync::mpsc::Sender<Digest>);
        impl Drop for OnExit {
            fn drop(&mut self) {
                let _ = self.0.send(Digest::of_key("at exit"));
            }
        }
        thread_local! {
            static ON_EXIT: std::cell::RefCell<Option<OnExit>> = const { std::cell::RefCell::new(None) };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            ON_EXIT.with_borrow_mut(|o| *o = Some(OnExit(tx)));
            let _ = Digest::of_key("warm the memo");
        })
        .join()
        .expect("the thread exits without a panic");
        assert_eq!(rx.recv().unwrap(), reference(&[b"k", b"at exit"]));
    }

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
    fn the_key_layout() {
        let p = Prefix::new("app:").unwrap();
        let (d, v) = (Digest::of_key("a"), Digest::of_key("b"));
        let (dh, vh) = (d.to_hex(), v.to_hex());
        assert_eq!(dh.len(), 32);
        assert!(dh
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let pre = format!("app:v{FORMAT_VERSION}:");
        assert_eq!(p.lease(&d), format!("{pre}{{{dh}}}:l"));
        assert_eq!(p.entry(&d), format!("{pre}{{{dh}}}:e"));
        assert_eq!(p.variant(&d, &v), format!("{pre}{{{dh}}}:v:{vh}"));
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
