//! Real `redis-server` and `memcached` processes on free ports, one per test, so tests run in
//! parallel and can kill, pause (SIGSTOP) or restart their own server.
//!
//! A missing binary is a test failure with a clear message, never a silent skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Memcached,
}

/// A server process owned by one test. Killed on drop.
pub struct Server {
    kind: Kind,
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

impl Server {
    /// Starts `redis-server` on a free port (no persistence).
    pub fn redis() -> Server {
        Self::start(Kind::Redis, Vec::new())
    }

    /// Starts `redis-server` with extra arguments (e.g. `--maxmemory-policy volatile-lru`).
    pub fn redis_with(extra: &[&str]) -> Server {
        Self::start(Kind::Redis, extra.iter().map(|s| s.to_string()).collect())
    }

    /// Starts `memcached` on a free port.
    pub fn memcached() -> Server {
        Self::start(Kind::Memcached, Vec::new())
    }

    /// Starts `memcached` with extra arguments (e.g. `-I 2m`).
    pub fn memcached_with(extra: &[&str]) -> Server {
        Self::start(
            Kind::Memcached,
            extra.iter().map(|s| s.to_string()).collect(),
        )
    }

    fn start(kind: Kind, extra: Vec<String>) -> Server {
        let bin = match kind {
            Kind::Redis => "redis-server",
            Kind::Memcached => "memcached",
        };
        assert!(
            which(bin),
            "`{bin}` is not on PATH. The tests start their own {bin} processes; run the README's \
             test command (`./scripts/test`), which installs it, or `apt-get install {}`.",
            if kind == Kind::Redis {
                "redis-server"
            } else {
                "memcached"
            }
        );
        let mut last_err = String::new();
        for _ in 0..5 {
            let mut s = Server {
                kind,
                port: free_port(),
                child: None,
                extra: extra.clone(),
            };
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start {bin}: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Redis => {
                let mut c = Command::new("redis-server");
                c.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                ]);
                c
            }
            Kind::Memcached => {
                let mut c = Command::new("memcached");
                c.args([
                    "-p",
                    &port,
                    "-U",
                    "0",
                    "-l",
                    "127.0.0.1",
                    "-t",
                    "2",
                    "-m",
                    "64",
                ]);
                // memcached refuses to run as root without -u.
                c.args(["-u", "root"]);
                c
            }
        };
        cmd.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "exited at start with {status} (port {port} taken?)"
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err("did not answer within 10 s".into())
    }

    /// Whether the server answers.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let (req, want): (&[u8], &[u8]) = match self.kind {
            Kind::Redis => (b"PING\r\n", b"+PONG"),
            Kind::Memcached => (b"version\r\n", b"VERSION"),
        };
        if s.write_all(req).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => buf[..n].starts_with(want),
            Err(_) => false,
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` or `memcache://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Memcached => format!("memcache://127.0.0.1:{}", self.port),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let ok = Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill {sig} {pid} failed");
        }
    }

    /// `kill -9`: every connection drops, every key is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the server hangs (connections stay open, nothing answers). Returns once every
    /// thread of it is stopped: the kernel stops each one as it next runs, so a thread busy on
    /// another core could otherwise still answer a command sent right after the signal.
    pub fn pause(&self) {
        self.signal("-STOP");
        let Some(pid) = self.pid() else { return };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(
                Instant::now() < deadline,
                "{pid} not stopped 5 s after SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)), empty.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// One counter of memcached's `stats`.
    pub fn stat(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"stats\r\n").unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while !out.ends_with(b"END\r\n") {
            let n = s.read(&mut buf).expect("stats reply");
            assert!(n > 0, "stats: connection closed");
            out.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&out);
        let prefix = format!("STAT {name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in stats"))
    }

    /// Runs one raw command line and returns the first reply bytes (for poking at the store).
    pub fn raw(&self, line: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\r\n").unwrap();
        let mut buf = vec![0u8; 65536];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A paused server would ignore SIGKILL's cleanup until continued; continue first.
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill();
    }
}

/// `MONITOR` on a raw connection: the commands clients send, in the order the server runs them.
/// Commands that a script runs are marked `[<db> lua]`; those are not round trips.
pub struct Monitor {
    reader: BufReader<TcpStream>,
}

impl Monitor {
    pub fn start(server: &Server) -> Monitor {
        let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"MONITOR\r\n").unwrap();
        let mut reader = BufReader::new(s);
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim(), "+OK");
        Monitor { reader }
    }

    /// The client commands seen up to the `ECHO <marker>` sent by `mark`, markers excluded.
    pub fn until(&mut self, marker: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("monitor line");
            assert!(n > 0, "monitor closed");
            let line = line.trim();
            if line.contains("\"ECHO\"") {
                if line.contains(&format!("\"{marker}\"")) {
                    return out;
                }
                continue;
            }
            if line.contains(" lua]") {
                continue;
            }
            // "+1700000000.123456 [0 127.0.0.1:1234] "GET" "key"": keep the command part.
            let cmd = line.split("] ").nth(1).unwrap_or(line).to_string();
            out.push(cmd);
        }
    }
}

impl Server {
    /// `ECHO <marker>`, for [`Monitor::until`] to find.
    pub fn mark(&self, marker: &str) {
        let reply = self.raw(&format!("ECHO {marker}"));
        assert!(reply.contains(marker), "{reply}");
    }
}

/// Whether every thread of process `pid` is in the stopped state (`T` in `/proc/.../stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            // The state follows the command name, which is in parentheses.
            .and_then(|st| {
                st.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    })
}
