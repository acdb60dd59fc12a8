//! The load test of issue 6: our caching proxy against nginx (`proxy_cache_lock on`) and Varnish
//! (defaults), in the same run, on this machine. Prints one markdown table and the machine.
//!
//! ```sh
//! cargo bench --bench loadtest --features redis,memcached
//! ```
//!
//! It uses `<target>/release/examples/caching_proxy` (built by a `cargo build --release
//! --example caching_proxy --features redis,memcached` subprocess when missing, or always with
//! `LOADTEST_BUILD=1`), starts its own origin in process, `redis-server` and `memcached` on free
//! ports, nginx and Varnish when installed (configs generated into a temp dir, foreground, free
//! loopback ports), and `wrk` for the hit throughput when installed. Everything listens on
//! 127.0.0.1; every child is killed on exit, panic, Ctrl-C, SIGTERM or the watchdog.
//!
//! Environment: `LOADTEST_ONLY=cold1,cold2,slow,nostore,maxage1,sie,hits` runs some rows,
//! `LOADTEST_SYSTEMS=nginx,varnish,mem,redis,memcached` some columns, `LOADTEST_WRK_SECS`
//! (default 10), `LOADTEST_MAX_SECS` (watchdog, default 1800), `LOADTEST_KEEP=1` keeps the temp
//! dir (configs, logs, `/metrics` dumps).

#[allow(dead_code)]
#[path = "../tests/common/servers.rs"]
mod servers;

#[path = "loadtest/load.rs"]
mod load;
#[path = "loadtest/origin.rs"]
mod origin;
#[path = "loadtest/procs.rs"]
mod procs;
#[path = "loadtest/scenarios.rs"]
mod scenarios;

use std::time::Duration;

/// `231 ms`, `5.21 s`.
pub fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn main() {
    let max = std::env::var("LOADTEST_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800u64);
    // The watchdog: the whole run is bounded in time.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(max));
        eprintln!("loadtest: the watchdog fired after {max} s; killing every child");
        procs::kill_all_registered();
        std::process::exit(3);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.spawn(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
        eprintln!("loadtest: interrupted; killing every child");
        procs::kill_all_registered();
        std::process::exit(130);
    });
    // Every guard (children, servers, temp dir) is dropped inside `run`, on return or unwind.
    let code = rt.block_on(scenarios::run());
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}
