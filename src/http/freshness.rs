//! What to do with an origin response: store it (for how long, with which stale windows), or
//! pass it. RFC 9111 through `http-cache-semantics` for storability and explicit freshness;
//! stale-while-revalidate and stale-if-error (RFC 5861) are ours.

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderValue, Request};
use http_cache_semantics::{CacheOptions, CachePolicy};

use super::key::vary_selector;
use crate::entry::Ttl;

/// The response-side `Cache-Control` directives this module needs beyond the policy crate.
#[derive(Debug, Default)]
pub(crate) struct Directives {
    pub(crate) no_cache: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) explicit_age: bool,
    pub(crate) swr: Option<Duration>,
    pub(crate) sie: Option<Duration>,
    pub(crate) no_store: bool,
    /// The freshness lifetime `s-maxage` (preferred: we are a shared cache) or `max-age` gives;
    /// `None` when neither is sent (then `Expires`, if any, decides).
    pub(crate) lifetime: Option<Duration>,
}

/// RFC 9111 section 1.2.2: a delta-seconds (`max-age`, `Age`) too large to hold is taken and
/// sent as 2^31.
pub(crate) const DELTA_SECONDS_MAX: u32 = 1 << 31;

/// A delta-seconds (RFC 9111 section 1.2.1: digits only), one too large to hold taken as
/// [`DELTA_SECONDS_MAX`]; `None` when `s` is not one.
pub(crate) fn delta_seconds(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u32>()
            .map_or(DELTA_SECONDS_MAX, |n| n.min(DELTA_SECONDS_MAX)),
    )
}

/// Every response `Cache-Control` directive, in order: the name lower-cased (RFC 9111 section
/// 5.2: names are case-insensitive, so `Private` is `private`) and the argument as sent. A byte
/// that is not ASCII (obs-text, in a quoted argument say) reads as `?`, so it hides nothing
/// else on its line.
fn cache_control(headers: &HeaderMap) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for v in headers.get_all(header::CACHE_CONTROL) {
        let text: String = v
            .as_bytes()
            .iter()
            .map(|&b| if b.is_ascii() { b as char } else { '?' })
            .collect();
        for part in text.split(',') {
            let part = part.trim();
            let (name, arg) = match part.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().to_string())),
                None => (part, None),
            };
            if !name.is_empty() {
                out.push((name.to_ascii_lowercase(), arg));
            }
        }
    }
    out
}

fn directives(cc: &[(String, Option<String>)], headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    let (mut max_age, mut s_maxage) = (None, None);
    // The first of each directive counts, as the policy crate reads them; one repeated with
    // another value makes the response must-revalidate, as there (RFC 9111 section 4.2.1:
    // invalid freshness information). Unlike there, quotes do not make a value another one
    // (`max-age=60, max-age="60"` is one value).
    let mut seen: Vec<(&str, Option<&str>)> = Vec::with_capacity(cc.len());
    for (name, arg) in cc {
        let unquoted = arg.as_deref().map(|a| a.trim_matches('"'));
        if let Some((_, first)) = seen.iter().find(|(n, _)| n == name) {
            if *first != unquoted {
                d.must_revalidate = true;
            }
            continue;
        }
        seen.push((name, unquoted));
        // Clamped: a huge number must not overflow a clock downstream, and one too large for
        // any integer is still huge (section 1.2.2), not absent.
        let secs = || {
            unquoted
                .and_then(delta_seconds)
                .map(|v| Duration::from_secs(u64::from(v)).min(Ttl::MAX))
        };
        // As the policy crate reads it: one that is not a number is 0, one with no argument
        // is not there.
        let lifetime =
            || unquoted.map(|a| Duration::from_secs(u64::from(delta_seconds(a).unwrap_or(0))));
        match name.as_str() {
            "no-cache" => d.no_cache = true,
            "no-store" => d.no_store = true,
            "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
            "max-age" => {
                d.explicit_age = true;
                max_age = lifetime();
            }
            // RFC 9111 section 5.2.2.10: for a shared cache it also carries proxy-revalidate's
            // meaning, so no stale serving past it (section 4.2.4).
            "s-maxage" => {
                d.explicit_age = true;
                d.must_revalidate = true;
                s_maxage = lifetime();
            }
            "stale-while-revalidate" => d.swr = secs(),
            "stale-if-error" => d.sie = secs(),
            _ => {}
        }
    }
    if headers.contains_key(header::EXPIRES) {
        d.explicit_age = true;
    }
    d.lifetime = s_maxage.or(max_age);
    d
}

/// `Cache-Control` as the policy crate should read it. The crate matches directive names
/// exactly, skips a line that is not UTF-8, reads an overflowing delta-seconds as 0 and refuses
/// to store `proxy-revalidate` outright. So: [`cache_control`]'s directives on one line,
/// `max-age` and `s-maxage` over [`DELTA_SECONDS_MAX`] as that, and `proxy-revalidate` left to
/// [`directives`], which applies it as must-revalidate (section 5.2.2.8: it concerns a response
/// once stale).
fn policy_cache_control(cc: &[(String, Option<String>)]) -> Option<HeaderValue> {
    let mut out = String::new();
    for (name, arg) in cc {
        if name == "proxy-revalidate" {
            continue;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(name);
        if let Some(arg) = arg {
            out.push('=');
            let huge = (name == "max-age" || name == "s-maxage")
                && delta_seconds(arg.trim_matches('"')) == Some(DELTA_SECONDS_MAX);
            if huge {
                out.push_str(&DELTA_SECONDS_MAX.to_string());
            } else {
                out.push_str(arg);
            }
        }
    }
    HeaderValue::try_from(out).ok()
}

/// The first `Age` as delta-seconds (one too large to hold is [`DELTA_SECONDS_MAX`]); `None`
/// when absent or not a number.
pub(crate) fn age_value(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| delta_seconds(s.trim()))
}

/// A header holding an HTTP-date, if it parses.
fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
}

/// The layer's defaults for responses whose origin says nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Defaults {
    pub(crate) ttl: Option<Duration>,
    pub(crate) swr: Duration,
    pub(crate) sie: Duration,
    /// How long past freshness a response with validators is kept for revalidation.
    pub(crate) revalidate: Duration,
}

/// The decision for one response.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Store {
        ttl: Ttl,
        selector: Option<String>,
    },
    /// Not cacheable by its nature: pass it (and set the pass marker).
    Pass(&'static str),
}

pub(crate) fn decide(
    req: &Request<()>,
    res: &http::response::Parts,
    defaults: &Defaults,
) -> Decision {
    // More than a record holds; and a map that full may have no room for the normalized
    // `Cache-Control` below (a `HeaderMap` panics past 24,576 names).
    if res.headers.len() > super::stored::MAX_HEADERS {
        return Decision::Pass("too-many-headers");
    }
    if res.headers.contains_key(header::SET_COOKIE) {
        return Decision::Pass("set-cookie");
    }
    let selector = match vary_selector(&res.headers) {
        Ok(s) => s,
        Err(()) => return Decision::Pass("vary-star"),
    };
    let cc = cache_control(&res.headers);
    let d = directives(&cc, &res.headers);
    if d.no_store {
        return Decision::Pass("no-store");
    }
    if d.no_cache {
        return Decision::Pass("no-cache");
    }
    let now = SystemTime::now();
    let opts = CacheOptions {
        shared: true,
        cache_heuristic: 0.0,
        immutable_min_time_to_live: Duration::ZERO,
        ignore_cargo_cult: false,
    };
    let normalized = res
        .headers
        .contains_key(header::CACHE_CONTROL)
        .then(|| policy_cache_control(&cc))
        .flatten();
    let age = age_value(&res.headers);
    // The crate reads an `Age` too large for a u64 as 0 (fresh); RFC 9111 section 1.2.2 says
    // 2^31 (long stale).
    let age_fix = (age == Some(DELTA_SECONDS_MAX)).then(|| HeaderValue::from(DELTA_SECONDS_MAX));
    let policy = if normalized.is_none() && age_fix.is_none() {
        CachePolicy::new_options(req, res, now, opts)
    } else {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = res.status;
        parts.version = res.version;
        parts.headers = res.headers.clone();
        if let Some(cc) = normalized {
            parts.headers.insert(header::CACHE_CONTROL, cc);
        }
        if let Some(age) = age_fix {
            parts.headers.insert(header::AGE, age);
        }
        CachePolicy::new_options(req, &parts, now, opts)
    };
    if !policy.is_storable() {
        return Decision::Pass("not-storable");
    }
    // How long the response has been stale already when it arrives: its stale windows
    // (RFC 5861) count from when it stopped being fresh, not from now.
    let mut late = Duration::ZERO;
    let age = Duration::from_secs(u64::from(age.unwrap_or(0)));
    let fresh = if d.explicit_age {
        let mut fresh = policy.time_to_live(now);
        match d.lifetime {
            Some(lifetime) => late = age.saturating_sub(lifetime),
            // `Expires` decides. Its lifetime counts from `Date`, and the age includes the
            // apparent age `now - Date` (RFC 9111 section 4.2.3), which the crate leaves out:
            // an `Expires` already past by our clock was stored fresh for `Expires - Date`.
            // With the apparent age, what is left is at most `Expires - now`.
            // An `Age` past the lifetime makes it late as well.
            None => {
                if let Some(expires) = http_date(&res.headers, header::EXPIRES) {
                    fresh = fresh.min(expires.duration_since(now).unwrap_or_default());
                    let date = http_date(&res.headers, header::DATE).unwrap_or(now);
                    let lifetime = expires.duration_since(date).unwrap_or_default();
                    late = now
                        .duration_since(expires)
                        .unwrap_or_default()
                        .max(age.saturating_sub(lifetime));
                }
            }
        }
        fresh
    } else {
        match defaults.ttl {
            Some(t) => t,
            // The origin says nothing and no TTL is configured: never a silent guess.
            None => return Decision::Pass("no-ttl"),
        }
    };
    let (mut swr, mut sie) = (d.swr.unwrap_or(defaults.swr), d.sie.unwrap_or(defaults.sie));
    if d.must_revalidate {
        swr = Duration::ZERO;
        sie = Duration::ZERO;
    }
    swr = swr.saturating_sub(late);
    sie = sie.saturating_sub(late);
    let mut ttl = Ttl::fresh(fresh.min(Ttl::MAX)).with_swr(swr).with_sie(sie);
    if ttl.fresh.is_zero() && swr.is_zero() && sie.is_zero() {
        return Decision::Pass("expired");
    }
    if res.headers.contains_key(header::ETAG) || res.headers.contains_key(header::LAST_MODIFIED) {
        ttl = ttl.with_revalidate(defaults.revalidate);
    }
    Decision::Store { ttl, selector }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Response, StatusCode};

    fn res(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut b = Response::builder().status(StatusCode::from_u16(status).unwrap());
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn req() -> Request<()> {
        Request::get("http://example.com/x").body(()).unwrap()
    }

    fn defaults(ttl: Option<u64>) -> Defaults {
        Defaults {
            ttl: ttl.map(Duration::from_secs),
            swr: Duration::from_secs(5),
            sie: Duration::from_secs(7),
            revalidate: Duration::ZERO,
        }
    }

    #[test]
    fn origin_max_age_and_rfc5861_windows() {
        let r = res(
            200,
            &[(
                "cache-control",
                "public, max-age=60, stale-while-revalidate=30, stale-if-error=600",
            )],
        );
        match decide(&req(), &r, &defaults(None)) {
            Decision::Store { ttl, selector } => {
                assert_eq!(ttl.fresh, Duration::from_secs(60));
                assert_eq!(ttl.stale_while_revalidate, Duration::from_secs(30));
                assert_eq!(ttl.stale_if_error, Duration::from_secs(600));
                assert_eq!(selector, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn configured_ttl_only_when_the_origin_says_nothing() {
        assert_eq!(
            decide(&req(), &res(200, &[]), &defaults(None)),
            Decision::Pass("no-ttl")
        );
        match decide(&req(), &res(200, &[]), &defaults(Some(10))) {
            Decision::Store { ttl, .. } => {
                assert_eq!(ttl.fresh, Duration::from_secs(10));
                assert_eq!(ttl.stale_while_revalidate, Duration::from_secs(5));
            }
            other => panic!("{other:?}"),
        }
        // An explicit max-age=0 is not "says nothing".
        let r = res(200, &[("cache-control", "max-age=0")]);
        assert!(
            matches!(decide(&req(), &r, &defaults(Some(10))), Decision::Store { ttl, .. } if ttl.fresh.is_zero())
        );
    }

    #[test]
    fn private_set_cookie_no_store_vary_star_pass() {
        for (h, why) in [
            ([("cache-control", "private, max-age=60")], "not-storable"),
            ([("set-cookie", "a=b")], "set-cookie"),
            ([("cache-control", "no-store")], "no-store"),
            ([("vary", "*")], "vary-star"),
            ([("cache-control", "no-cache")], "no-cache"),
            ([("cache-control", "no-cache, no-store")], "no-store"),
        ] {
            match decide(&req(), &res(200, &h), &defaults(Some(10))) {
                Decision::Pass(got) => assert_eq!(got, why, "{h:?}"),
                other => panic!("{h:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn directive_names_are_case_insensitive_and_obs_text_hides_nothing() {
        for (cc, why) in [
            ("max-age=60, Private", "not-storable"),
            ("PRIVATE", "not-storable"),
            ("No-Store", "no-store"),
            ("private, max-age=60, ext=\"caf\u{e9}\"", "not-storable"),
        ] {
            match decide(
                &req(),
                &res(200, &[("cache-control", cc)]),
                &defaults(Some(10)),
            ) {
                Decision::Pass(got) => assert_eq!(got, why, "{cc}"),
                other => panic!("{cc}: {other:?}"),
            }
        }
        // Bytes that are not UTF-8 (obs-text), as an origin may send them.
        for raw in [
            &b"private, max-age=60, ext=\"caf\xe9\""[..],
            b"no-store, ext=\"\xe9\"",
        ] {
            let mut r = res(200, &[]);
            r.headers
                .insert("cache-control", HeaderValue::from_bytes(raw).unwrap());
            assert!(
                matches!(decide(&req(), &r, &defaults(Some(10))), Decision::Pass(_)),
                "{raw:?}"
            );
        }
        for (cc, fresh) in [("Max-Age=60", 60), ("max-age=0, S-MAXAGE=60", 60)] {
            match decide(&req(), &res(200, &[("cache-control", cc)]), &defaults(None)) {
                Decision::Store { ttl, .. } => {
                    assert_eq!(ttl.fresh, Duration::from_secs(fresh), "{cc}")
                }
                other => panic!("{cc}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_overflowing_max_age_is_2_pow_31_and_proxy_revalidate_is_must_revalidate() {
        let r = res(200, &[("cache-control", "max-age=99999999999999999999999")]);
        match decide(&req(), &r, &defaults(None)) {
            Decision::Store { ttl, .. } => {
                assert_eq!(ttl.fresh, Duration::from_secs(1 << 31).min(Ttl::MAX))
            }
            other => panic!("{other:?}"),
        }
        let r = res(
            200,
            &[(
                "cache-control",
                "max-age=60, proxy-revalidate, stale-if-error=600",
            )],
        );
        match decide(&req(), &r, &defaults(None)) {
            Decision::Store { ttl, .. } => {
                assert_eq!(ttl.fresh, Duration::from_secs(60));
                assert!(ttl.stale_if_error.is_zero() && ttl.stale_while_revalidate.is_zero());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn s_maxage_disables_stale_as_proxy_revalidate_does() {
        let r = res(
            200,
            &[(
                "cache-control",
                "s-maxage=60, stale-while-revalidate=600, stale-if-error=600",
            )],
        );
        match decide(&req(), &r, &defaults(None)) {
            Decision::Store { ttl, .. } => {
                assert_eq!(ttl.fresh, Duration::from_secs(60));
                assert!(ttl.stale_if_error.is_zero() && ttl.stale_while_revalidate.is_zero());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn must_revalidate_disables_stale() {
        let r = res(
            200,
            &[(
                "cache-control",
                "max-age=60, must-revalidate, stale-if-error=600",
            )],
        );
        match decide(&req(), &r, &defaults(None)) {
            Decision::Store { ttl, .. } => {
                assert!(ttl.stale_if_error.is_zero() && ttl.stale_while_revalidate.is_zero())
            }
            other => panic!("{other:?}"),
        }
    }

    /// An HTTP-date `offset_secs` from `now`, which a test takes once for all its dates (two
    /// calls could straddle a second).
    fn http_date_at(now: SystemTime, offset_secs: i64) -> String {
        let t = if offset_secs >= 0 {
            now + Duration::from_secs(offset_secs.unsigned_abs())
        } else {
            now - Duration::from_secs(offset_secs.unsigned_abs())
        };
        httpdate::fmt_http_date(t)
    }

    fn fresh_of(d: Decision) -> Ttl {
        match d {
            Decision::Store { ttl, .. } => ttl,
            other => panic!("{other:?}"),
        }
    }

    /// RFC 9111 section 4.2.3: the age includes the apparent age `now - Date`, so an `Expires`
    /// already past by our clock is not fresh however far after `Date` it is, and what is left
    /// of one still ahead is at most `Expires - now`.
    #[test]
    fn expires_counts_the_apparent_age() {
        let now = SystemTime::now();
        let (date, past) = (http_date_at(now, -3600), http_date_at(now, -1800));
        let r = res(200, &[("date", &date), ("expires", &past)]);
        // Stale for half an hour already: past the default windows too.
        assert_eq!(
            decide(&req(), &r, &defaults(None)),
            Decision::Pass("expired")
        );

        let (date, ahead) = (http_date_at(now, -100), http_date_at(now, 50));
        let r = res(200, &[("date", &date), ("expires", &ahead)]);
        let ttl = fresh_of(decide(&req(), &r, &defaults(None)));
        assert!(
            ttl.fresh <= Duration::from_secs(50) && ttl.fresh >= Duration::from_secs(45),
            "{:?}",
            ttl.fresh
        );

        // A `Date` ahead of our clock (the origin's clock is fast): `Expires - Date` decides.
        let (date, ahead) = (http_date_at(now, 3600), http_date_at(now, 3660));
        let r = res(200, &[("date", &date), ("expires", &ahead)]);
        let ttl = fresh_of(decide(&req(), &r, &defaults(None)));
        assert!(ttl.fresh <= Duration::from_secs(60) && ttl.fresh >= Duration::from_secs(58));
    }

    /// An `Age` too large for any integer is 2^31 seconds (RFC 9111 section 1.2.2), not 0: the
    /// response is long stale, also past its stale windows.
    #[test]
    fn an_overflowing_age_is_long_stale() {
        for age in [
            "99999999999999999999999",
            "18446744073709551616",
            "2147483648",
        ] {
            let r = res(
                200,
                &[
                    ("cache-control", "max-age=60, stale-if-error=600"),
                    ("age", age),
                ],
            );
            assert_eq!(
                decide(&req(), &r, &defaults(None)),
                Decision::Pass("expired"),
                "age {age}"
            );
        }
    }

    /// The RFC 5861 windows count from when the response stopped being fresh: one that arrives
    /// 10 s past its max-age has 10 s less of each.
    #[test]
    fn stale_windows_count_from_the_end_of_freshness() {
        let r = res(
            200,
            &[
                (
                    "cache-control",
                    "max-age=60, stale-while-revalidate=30, stale-if-error=600",
                ),
                ("age", "70"),
            ],
        );
        let ttl = fresh_of(decide(&req(), &r, &defaults(None)));
        assert_eq!(ttl.fresh, Duration::ZERO);
        assert_eq!(ttl.stale_while_revalidate, Duration::from_secs(20));
        assert_eq!(ttl.stale_if_error, Duration::from_secs(590));
    }

    /// A stale window too large for any integer is the longest window, not the layer's
    /// default.
    #[test]
    fn an_overflowing_stale_window_is_the_longest() {
        let r = res(
            200,
            &[(
                "cache-control",
                "max-age=60, stale-while-revalidate=99999999999999999999999, \
                 stale-if-error=18446744073709551616",
            )],
        );
        let ttl = fresh_of(decide(&req(), &r, &defaults(None)));
        assert_eq!(ttl.stale_while_revalidate, Ttl::MAX);
        assert_eq!(ttl.stale_if_error, Ttl::MAX);
    }

    /// Late is the larger of "past Expires by our clock" and "Age past the lifetime".
    #[test]
    fn an_age_past_an_expires_lifetime_is_late_too() {
        let now = SystemTime::now();
        let (date, expires) = (http_date_at(now, 0), http_date_at(now, 60));
        let r = res(
            200,
            &[
                ("date", &date),
                ("expires", &expires),
                ("age", "100"),
                ("cache-control", "stale-if-error=600"),
            ],
        );
        let ttl = fresh_of(decide(&req(), &r, &defaults(None)));
        assert_eq!(ttl.fresh, Duration::ZERO);
        assert_eq!(ttl.stale_if_error, Duration::from_secs(560));
    }

    /// The first `max-age` counts, as the policy crate reads it, and one repeated with another
    /// value makes the response must-revalidate (no stale windows) as there; one with no
    /// argument is not there, and `Expires` decides.
    #[test]
    fn the_first_max_age_counts_and_a_bare_one_does_not() {
        // A conflicting repeat makes it must-revalidate (no stale window); a quoted repeat of
        // the same value does not.
        for (cc, swr) in [
            ("max-age=60, max-age=0, stale-while-revalidate=100", 0),
            (
                "max-age=60, max-age=\"60\", stale-while-revalidate=100",
                100,
            ),
        ] {
            let r = res(200, &[("cache-control", cc), ("age", "30")]);
            let ttl = fresh_of(decide(&req(), &r, &defaults(None)));
            assert_eq!(ttl.fresh, Duration::from_secs(30), "{cc}");
            assert_eq!(ttl.stale_while_revalidate, Duration::from_secs(swr), "{cc}");
        }

        let now = SystemTime::now();
        let (date, expires) = (http_date_at(now, -10), http_date_at(now, 50));
        let r = res(
            200,
            &[
                ("cache-control", "max-age, stale-while-revalidate=100"),
                ("date", &date),
                ("expires", &expires),
                ("age", "70"),
            ],
        );
        // Expires decides: 60 s of lifetime, an Age of 70 is 10 s late.
        let ttl = fresh_of(decide(&req(), &r, &defaults(None)));
        assert_eq!(ttl.fresh, Duration::ZERO);
        assert_eq!(ttl.stale_while_revalidate, Duration::from_secs(90));
    }
}
