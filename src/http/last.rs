//! The last header value a thread built, reused while what it was built from is the same: hits
//! of one entry share their `Age` and `Cache-Status` values until the second changes.

use std::cell::RefCell;
use std::thread::LocalKey;

use http::HeaderValue;

/// One thread's last value and the key it was built for.
pub(crate) type Last<K> = RefCell<Option<(K, HeaderValue)>>;

/// The value held in `last` when `same` accepts its key and value, else `build()`, which is then
/// held for `key`. Without the thread's state (thread teardown) it builds and holds nothing.
pub(crate) fn reuse<K: 'static>(
    last: &'static LocalKey<Last<K>>,
    key: K,
    same: impl FnOnce(&K, &HeaderValue) -> bool,
    build: impl Fn() -> HeaderValue,
) -> HeaderValue {
    crate::local::with(
        last,
        |last| {
            if let Some((k, v)) = &*last {
                if same(k, v) {
                    return v.clone();
                }
            }
            let v = build();
            *last = Some((key, v.clone()));
            v
        },
        &build,
    )
}
