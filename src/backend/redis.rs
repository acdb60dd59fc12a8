//! The Redis backend (work in progress).
