//! Per-thread state reached without a panic: a thread-local `RefCell` may be borrowed further up
//! the same thread (re-entry), or already destroyed (a thread-local destructor running at thread
//! exit). The memos of the hit path then do without themselves.

use std::cell::RefCell;
use std::thread::LocalKey;

/// `f` with this thread's `T`, or `otherwise()` when it cannot be had.
pub(crate) fn with<T: 'static, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
    otherwise: impl FnOnce() -> R,
) -> R {
    match key.try_with(|cell| cell.try_borrow_mut().ok().map(|mut t| f(&mut t))) {
        Ok(Some(r)) => r,
        _ => otherwise(),
    }
}
