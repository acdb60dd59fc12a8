//! The Memcached backend (work in progress).
