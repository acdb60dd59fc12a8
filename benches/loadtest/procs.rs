//! Child processes (our proxy, nginx, Varnish) with Drop guards, their generated configs, and the
//! proxy binary (built if missing).
//!
//! Every child runs in its own process group, so nginx's workers and Varnish's cache process go
//! with their parent. The live groups are also in a registry, so Ctrl-C, SIGTERM and the watchdog
//! can kill them before exiting (destructors do not run on `process::exit`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// (pid, whether it leads its own process group) of every live child.
static LIVE: Mutex<Vec<(u32, bool)>> = Mutex::new(Vec::new());

pub fn register(pid: u32, group: bool) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((pid, group));
}

pub fn unregister(pid: u32) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(p, _)| *p != pid);
}

fn signal(pid: u32, group: bool, sig: &str) -> bool {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    Command::new("kill")
        .args([sig, "--", &target])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// SIGKILL to every registered child (for the signal handlers and the watchdog).
pub fn kill_all_registered() {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (pid, group) in live {
        signal(pid, group, "-CONT");
        signal(pid, group, "-KILL");
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A directory removed on drop (unless `LOADTEST_KEEP` is set).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "tower-stampede-loadtest-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("LOADTEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process in its own process group, with its output in a log file. Stopped on drop:
/// SIGTERM to the group, up to 3 s to exit, then SIGKILL to the group.
pub struct Proc {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, port: u16, log: PathBuf) -> Result<Proc, String> {
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {name} ({:?}): {e}", cmd.get_program()))?;
        register(child.id(), true);
        let mut p = Proc {
            name: name.to_string(),
            port,
            log,
            child,
        };
        p.wait_ready(Duration::from_secs(60))?;
        Ok(p)
    }

    /// Until an HTTP request to the port gets any answer.
    fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if http_answers(self.port) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited at start with {status}; its log:\n{}",
                    self.name,
                    self.log_tail(2000)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not answer on port {} within {within:?}; its log:\n{}",
                    self.name,
                    self.port,
                    self.log_tail(2000)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self, max: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = s.len().saturating_sub(max);
        let start = (start..s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        s[start..].to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        signal(pid, true, "-TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Workers or a cache process left behind (the group id stays reserved while they live).
        signal(pid, true, "-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
        unregister(pid);
    }
}

/// A raw `GET /__ready` that gets any HTTP answer within a second.
fn http_answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /__ready HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 5 && buf.starts_with(b"HTTP/"))
}

pub fn which(bin: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|c| c.is_file())
    });
    on_path.or_else(|| fallbacks.iter().map(PathBuf::from).find(|p| p.is_file()))
}

/// The first line of `bin args` (stdout or stderr), for the report.
pub fn version_of(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// nginx in the foreground (`daemon off`), its own prefix, cache and temp dirs under `dir`:
/// `proxy_cache_lock on` with the default lock timeout (5 s) and lock age, everything else at
/// its defaults except: upstream keep-alive (as our proxy and Varnish have), `access_log off`
/// unless `access_log` (our proxy logs requests only at debug; Debian's default config logs every
/// request in the combined format, which costs nginx about a third of its hit throughput here),
/// `worker_processes auto` (Debian's default config; 2 here) and an `X-Cache-Status` header for
/// the diagnostics.
pub fn nginx(
    bin: &Path,
    dir: &Path,
    name: &str,
    origin: SocketAddr,
    access_log: bool,
) -> Result<Proc, String> {
    let root = dir.join(name);
    for sub in ["cache", "tmp", "logs"] {
        std::fs::create_dir_all(root.join(sub)).map_err(|e| e.to_string())?;
    }
    let port = free_port();
    let r = root.display();
    let access = if access_log {
        format!("{r}/logs/access.log combined")
    } else {
        "off".to_string()
    };
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 16384;
pid {r}/nginx.pid;
error_log {r}/logs/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log {access};
    client_body_temp_path {r}/tmp/client_body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;
    proxy_cache_path {r}/cache levels=1:2 keys_zone=loadtest:16m max_size=256m inactive=10m use_temp_path=off;
    upstream origin {{
        server {origin};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache loadtest;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"#
    );
    let conf_path = root.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&root)
        .arg("-e")
        .arg(root.join("logs/error.log"))
        .arg("-c")
        .arg(&conf_path);
    Proc::spawn(name, cmd, port, root.join("stdout.log"))
}

/// varnishd in the foreground (`-F`) with its built-in VCL (`-b`), default storage and
/// parameters; its working dir under `dir`; no jail (`-j none`, so it runs the same as root or
/// not) and no management port (`-T none`).
pub fn varnish(bin: &Path, dir: &Path, name: &str, origin: SocketAddr) -> Result<Proc, String> {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg("-F")
        .args(["-j", "none"])
        .arg("-n")
        .arg(root.join("work"))
        .args(["-a", &format!("127.0.0.1:{port}")])
        .args(["-b", &origin.to_string()])
        .args(["-T", "none"]);
    Proc::spawn(name, cmd, port, root.join("varnishd.log"))
}

/// Our caching proxy with `store`, its defaults otherwise, and an admin port (`/metrics`).
pub fn ours(
    bin: &Path,
    dir: &Path,
    name: &str,
    origin: SocketAddr,
    store: &str,
    extra: &[&str],
) -> Result<(Proc, u16), String> {
    let port = free_port();
    let admin = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &format!("http://{origin}")])
        .args(["--store", store])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .env("RUST_LOG", "warn");
    let p = Proc::spawn(name, cmd, port, dir.join(format!("{name}.log")))?;
    Ok((p, admin))
}

/// The target dir: `CARGO_TARGET_DIR` if set (relative to the package), else `target/`.
pub fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let p = PathBuf::from(d);
            if p.is_relative() {
                manifest.join(p)
            } else {
                p
            }
        }
        _ => manifest.join("target"),
    }
}

/// `<target>/release/examples/caching_proxy`, built with `cargo build --release --example
/// caching_proxy --features redis,memcached` when missing (or always with `LOADTEST_BUILD=1`,
/// which makes sure the binary matches the sources).
pub fn proxy_bin() -> Result<PathBuf, String> {
    let target = target_dir();
    let bin = target
        .join("release")
        .join("examples")
        .join("caching_proxy");
    let force = std::env::var_os("LOADTEST_BUILD").is_some_and(|v| v == "1");
    if bin.is_file() && !force {
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building the proxy: cargo build --release --example caching_proxy --features redis,memcached (CARGO_TARGET_DIR={})",
        target.display()
    );
    let mut child = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--example",
            "caching_proxy",
            "--features",
            "redis,memcached",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn cargo: {e}"))?;
    register(child.id(), false);
    // Bounded: a release build on 2 busy cores takes minutes, never an hour.
    let deadline = Instant::now() + Duration::from_secs(3600);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    unregister(child.id());
    match status {
        Some(s) if s.success() && bin.is_file() => Ok(bin),
        Some(s) if bin.is_file() => {
            eprintln!(
                "warning: the build failed ({s}); using the existing {}",
                bin.display()
            );
            Ok(bin)
        }
        Some(s) => Err(format!(
            "cargo build failed ({s}) and {} is missing",
            bin.display()
        )),
        None => Err("cargo build did not finish within an hour".into()),
    }
}

/// A file's text, for the report's diagnostics.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
