//! Bytes that do not decode are a miss, never a panic: property tests over random input.

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tower_stampede::backend::memory::MemoryBackend;
use tower_stampede::entry::{Header, Record};
use tower_stampede::{Digest, Fill, Stampede, Status, Ttl};

proptest! {
    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let b = Bytes::from(bytes);
        let _ = Header::parse(&b);
        let _ = Record::decode(&b);
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(
        kind in prop::sample::select(vec![b'E', b'V', b'P', b'T', b'x']),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut v = format!("TS1{}{:020}{}{:020}", kind as char, 7, "0123456789abcdef", 0).into_bytes();
        v.extend_from_slice(&tail);
        let b = Bytes::from(v);
        prop_assert!(Header::parse(&b).is_some() || kind == b'x');
        let _ = Record::decode(&b);
    }

    #[test]
    fn random_bytes_in_the_store_read_as_a_miss(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async move {
            let mem = MemoryBackend::default();
            let e = Stampede::new(mem.clone());
            mem.put_raw(&Digest::of_key("k"), Bytes::from(bytes), Duration::from_secs(60));
            let s = e
                .get_or_fill("k", || async {
                    Ok::<_, std::io::Error>(Fill::store("fresh", Ttl::fresh(Duration::from_secs(60))))
                })
                .await
                .unwrap();
            assert_eq!(&s.value[..], b"fresh");
            assert_eq!(s.status, Status::Stored);
        });
    }
}
