//! The last header value a thread built, reused while what it was built from is the same: hits
//! of one entry share their `Age` and `Cache-Status` values until the second changes.

use std::cell::RefCell;
use std::thread::LocalKey;

use http::HeaderValue;

/// One thread's last value and the key it was built for.
pub(crate) type Last<K> = RefCell<Option<(K, HeaderValue)>>;

/// The value held in `last` when `same` accepts its key and value, else `build()`, which is then
/// held for `key`. During thread teardown it builds without holding anything.
pub(crate) fn reuse<K: 'static>(
    last: &'static LocalKey<Last<K>>,
    key: K,
    same: impl FnOnce(&K, &HeaderValue) -> bool,
    build: impl Fn() -> HeaderValue,
) -> HeaderValue {
    last.try_with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return build();
        };
        if let Some((k, v)) = &*last {
            if same(k, v) {
                return v.clone();
            }
        }
        let v = build();
        *last = Some((key, v.clone()));
        v
    })
    .unwrap_or_else(|_| build())
}
