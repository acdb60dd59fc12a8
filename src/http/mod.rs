//! The HTTP layer: a Tower middleware that caches responses and stops stampedes.
//!
//! A well-mannered shared cache (RFC 9111): storability and freshness through
//! `http-cache-semantics`, stale-while-revalidate and stale-if-error (RFC 5861), `Vary`,
//! `Cache-Status` (RFC 9211) on every response, a correct `Age`, and fills that are normalised
//! (no conditional headers, no `Range`, HEAD becomes GET) so one client's request shape is never
//! handed to another.
//!
//! Privacy: a response that is `private`, carries `Set-Cookie`, or answers a request with
//! `Authorization` is never stored and never handed to another request. Requests with
//! `Authorization` bypass the cache; requests with `Cookie` bypass it when a
//! [`default_ttl`](StampedeLayer::default_ttl) is configured (see [`CookiePolicy`]).
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_stampede::http::StampedeLayer;
//!
//! let app: Router = Router::new()
//!     .route("/slow", get(|| async { "expensive" }))
//!     .layer(StampedeLayer::in_memory().default_ttl(Duration::from_secs(30)));
//! ```

mod body;
mod cache_status;
mod freshness;
mod key;
mod last;
mod layer;
mod service;
mod stored;

pub use body::ResponseBody;
pub use cache_status::CACHE_STATUS;
pub use layer::{CookiePolicy, KeyFn, StampedeLayer};
pub use service::{NotForwarded, ResponseFuture, StampedeService};
