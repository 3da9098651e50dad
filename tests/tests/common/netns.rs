//! Network namespaces, taps and collected-output processes for the virtio-net tests
//! (tests/tests/net.rs, tests/tests/clones.rs). Taps are made only inside namespaces named
//! `vmpk<pid><tag>`, deleted (with their taps) when a `Netns` drops.

use super::kvm_available;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const HOST_CIDR: &str = "10.0.0.1/24";
pub const WAIT: Duration = Duration::from_secs(60);

pub fn can_run(what: &str) -> bool {
    if !kvm_available(what) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tun = Path::new("/dev/net/tun").exists();
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(root && tun && ip) {
        eprintln!(
            "\n*** SKIPPED: {what} needs root, /dev/net/tun and iproute2's `ip` (root {root}, tun {tun}, ip {ip}) ***\n"
        );
        return false;
    }
    true
}

pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace of this test, deleted (with its taps) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vmpk{}{tag}", std::process::id());
        // A leftover of a crashed earlier run with the same pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A tap in this namespace, down and without an address.
    pub fn add_tap(&self, tap: &str) {
        ip(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
    }

    /// The host side of the guest's link: 10.0.0.1/24 on `tap`, up.
    pub fn host_side(&self, tap: &str) {
        ip(&["-n", &self.name, "addr", "add", HOST_CIDR, "dev", tap]);
        ip(&["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// `f` run on a thread that joined this namespace (sockets it makes live there).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on this thread only, with an fd of a network namespace.
                let r = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in the namespace")
        })
    }

    /// The MAC this namespace's neighbour table holds for the guest, if any.
    pub fn guest_mac(&self) -> Option<String> {
        let o = Command::new("ip")
            .args(["-n", &self.name, "neigh", "show", &GUEST.to_string()])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut words = text.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_string)
    }

    pub fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A process whose output is collected as it comes; killed on drop.
pub struct Proc {
    pub child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning");
        let collect = |r: Box<dyn std::io::Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut b = b.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
            buf
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Proc { child, out, err }
    }

    pub fn out(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn err(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until stdout holds `n` lines containing `what`.
    pub fn wait_out(&mut self, what: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.out().matches(what).count() < n {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "ended ({st}) before printing {what:?}\nstdout:\n{}\nstderr:\n{}",
                    self.out(),
                    self.err()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} within {WAIT:?}\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit status.
    pub fn finish(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "still running after {WAIT:?}\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// UDP echo: sends `msg` to the guest's port 7 until it comes back (at most `tries`
/// times, 1 s apart); true if it did.
pub fn udp_echo(msg: &[u8], tries: u32) -> bool {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let to = SocketAddr::from((GUEST, 7));
    let mut buf = [0u8; 2048];
    for _ in 0..tries {
        s.send_to(msg, to).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match s.recv_from(&mut buf) {
                Ok((n, from)) if from == to && &buf[..n] == msg => return true,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    false
}

/// Restores 10 clones of `pack` inside `ns` (`vmpack restore --clones 10 --json`, plus
/// `extra`) and returns the restore time the JSON line reports, in milliseconds.
pub fn clones_ms(ns: &Netns, pack: &Path, extra: &[&str]) -> f64 {
    let mut c = ns.cmd(&super::vmpack());
    c.arg("restore")
        .arg(pack)
        .args(["--clones", "10", "--json", "--serial-out", "none"])
        .args(extra);
    let mut p = Proc::spawn(c);
    p.wait_out("\"clones\"", 1);
    let out = p.out();
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    p.finish();
    v["milliseconds"].as_f64().unwrap()
}
