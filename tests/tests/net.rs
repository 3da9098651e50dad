//! virtio-net through the real binaries, against the Rust guest `rsnet` (virtio-drivers'
//! net driver, interrupt-driven; samples/guests/rs): ping and UDP echo over a tap, a save in
//! the middle of traffic and a restore in a new process, and ten clones with their own taps
//! and MACs, each answering only its own traffic.
//!
//! All traffic stays in network namespaces the test makes (named `vmpk<pid><tag>`): taps are
//! created, addressed and brought up only inside them, never in the host's own namespace,
//! and a guard deletes every namespace (and with it its taps) when a test ends, also on
//! failure. The VMs run inside a namespace (`ip netns exec`), where their taps are; the test's
//! own sockets join a namespace from a thread (`setns`). Needs root, /dev/net/tun, `ip` and
//! KVM; without one of them each test says SKIPPED loudly and returns.

mod common;
use common::netns::*;
use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP echo (ping) to the guest, `tries` requests 1 s apart; true on a matching reply.
fn ping(tries: u16) -> bool {
    // SAFETY: plain socket(2); the fd is owned by the UdpSocket below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    // A raw socket takes sendto/recvfrom as a UDP one does: std's wrapper serves for both.
    // SAFETY: a fresh fd nobody else owns.
    let s = unsafe { UdpSocket::from_raw_fd(fd) };
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let ident = (std::process::id() & 0xffff) as u16;
    let mut buf = [0u8; 2048];
    for seq in 0..tries {
        let mut p = vec![8, 0, 0, 0];
        p.extend_from_slice(&ident.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(b"vmpack ping payload");
        let c = icmp_checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        s.send_to(&p, SocketAddr::from((GUEST, 0))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let Ok((n, _)) = s.recv_from(&mut buf) else {
                break;
            };
            // The IP header, then an echo reply with our identifier, sequence and payload.
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let r = &buf[ihl..n];
            if r.len() == p.len() && r[0] == 0 && r[4..] == p[4..] && icmp_checksum(r) == 0 {
                return true;
            }
        }
    }
    false
}

fn config(dir: &Path, tap: &str) -> PathBuf {
    let cfg = dir.join("rsnet.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"rsnet\"\nmemory_mib = 16\n\n[flat]\nimage = \"{}\"\nload_address = 0x100000\n\
             entry = 0x100000\nmode = \"long\"\n\n[[net]]\ntap = \"{tap}\"\nmac = \"02:00:00:00:00:aa\"\n",
            rs_guest("rsnet").display()
        ),
    )
    .unwrap();
    cfg
}

fn net_status(sock: &Path) -> serde_json::Value {
    let (code, body) = http(sock, "GET", "/vm", b"");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["net"][0].clone()
}

/// Boots rsnet on `tap` in `ns` with a control socket, waits until it is up.
fn boot(ns: &Netns, dir: &Path, tap: &str, sock: &Path) -> Proc {
    let cfg = config(dir, tap);
    let mut c = ns.cmd(&bin("vmboot"));
    c.args(["run", "--api-sock"]).arg(sock).arg(&cfg);
    let mut vm = Proc::spawn(c);
    vm.wait_out("ready", 1);
    vm
}

/// Booted, pinged and echoed; saved while a thread keeps UDP echo traffic going; the first
/// process ends with the save. Restored in a new process on the same tap: it answers again
/// and its counters continue. Restored once more onto another tap with another MAC: the
/// guest takes the new MAC (configuration-change interrupt) and answers from it; `GET /vm`
/// shows the identity; a UDP "exit" ends it with status 0.
#[test]
fn net_ping_udp_save_restore() {
    if !can_run("virtio-net tests") {
        return;
    }
    let _ = vmpack();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = Netns::new("a");
    ns.add_tap("vmtap0");
    ns.host_side("vmtap0");
    let sock = d.join("api.sock");
    let mut vm = boot(&ns, d, "vmtap0", &sock);
    assert!(vm
        .out()
        .contains("net mac 02:00:00:00:00:aa ip 10.0.0.2 ready"));
    assert!(ns.within(|| ping(10)), "no ping answer\n{}", vm.err());
    assert!(ns.within(|| udp_echo(b"hello", 10)), "no UDP echo");
    assert_eq!(ns.guest_mac().as_deref(), Some("02:00:00:00:00:aa"));
    let before = net_status(&sock);
    assert_eq!(before["tap"], "vmtap0");
    assert_eq!(before["mac"], "02:00:00:00:00:aa");
    assert!(before["rx_frames"].as_u64().unwrap() >= 3, "{before}");

    // Traffic while the save happens: echoes before, maybe lost during, and none after
    // (the VM stopped).
    let pack = d.join("net.vmpack");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (echoed, save) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            ns.within(|| {
                let mut n = 0u32;
                for i in 0..2000u32 {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    if udp_echo(format!("during {i}").as_bytes(), 1) {
                        n += 1;
                    }
                }
                n
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut c = ns.cmd(&vmpack());
        c.args(["save", "--then", "stop", "--api-sock"])
            .arg(&sock)
            .arg("-o")
            .arg(&pack);
        let save = c.output().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (traffic.join().unwrap(), save)
    });
    assert!(
        save.status.success(),
        "{}",
        String::from_utf8_lossy(&save.stderr)
    );
    assert!(echoed > 0, "no echo while the save was on its way");
    vm.finish();
    drop(vm);

    // The same tap, reattached by name in a new process.
    let mut c = ns.cmd(&vmpack());
    c.arg("restore").arg(&pack).arg("--api-sock").arg(&sock);
    let mut vm = Proc::spawn(c);
    let deadline = Instant::now() + WAIT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket\n{}", vm.err());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ns.within(|| udp_echo(b"after restore", 10)), "{}", vm.err());
    assert!(ns.within(|| ping(10)), "no ping after restore");
    let after = net_status(&sock);
    assert_eq!(after["tap"], "vmtap0");
    assert!(
        after["rx_frames"].as_u64() > before["rx_frames"].as_u64(),
        "counters continue: {before} then {after}"
    );
    // Reset in place, twice: the tap stays attached, the counters are the pack's again
    // (fewer than after this restore's traffic), and the guest answers again each time.
    for round in 0..2 {
        let (code, body) = http(&sock, "PUT", "/vm/reset", b"");
        assert_eq!(code, 200, "reset {round}: {body}");
        let reset = net_status(&sock);
        assert_eq!(reset["tap"], "vmtap0");
        assert!(
            reset["rx_frames"].as_u64() < after["rx_frames"].as_u64(),
            "reset {round}: counters back to the pack's: {reset} after {after}"
        );
        assert!(
            ns.within(|| udp_echo(b"after reset", 10)),
            "reset {round}: no UDP echo\n{}",
            vm.err()
        );
        assert!(ns.within(|| ping(10)), "reset {round}: no ping");
    }
    assert!(ns.within(|| udp_echo(b"exit", 10)));
    assert_eq!(vm.finish(), 0, "{}", vm.err());
    assert!(vm.out().contains("net done"), "{}", vm.out());
    drop(vm);

    // Another tap and MAC, in another namespace: the guest adopts the MAC.
    let ns2 = Netns::new("b");
    ns2.add_tap("other7");
    ns2.host_side("other7");
    let mut c = ns2.cmd(&vmpack());
    c.arg("restore")
        .arg(&pack)
        .args([
            "--net-tap",
            "other7",
            "--mac",
            "02:11:22:33:44:55",
            "--api-sock",
        ])
        .arg(&sock);
    let mut vm = Proc::spawn(c);
    vm.wait_out("net mac 02:11:22:33:44:55", 1);
    assert!(ns2.within(|| ping(10)), "no ping with the new MAC");
    assert_eq!(ns2.guest_mac().as_deref(), Some("02:11:22:33:44:55"));
    let st = net_status(&sock);
    assert_eq!(
        (st["tap"].as_str(), st["mac"].as_str()),
        (Some("other7"), Some("02:11:22:33:44:55"))
    );
    // A reset puts back the pack's state, from before the guest learned the new MAC: it
    // is told of the change again and answers from the new MAC.
    let (code, body) = http(&sock, "PUT", "/vm/reset", b"");
    assert_eq!(code, 200, "{body}");
    vm.wait_out("net mac 02:11:22:33:44:55", 2);
    assert!(
        ns2.within(|| ping(10)),
        "no ping with the new MAC after a reset"
    );
    assert_eq!(ns2.guest_mac().as_deref(), Some("02:11:22:33:44:55"));
    assert!(ns2.within(|| udp_echo(b"exit", 10)));
    assert_eq!(vm.finish(), 0, "{}", vm.err());
}

/// `vmpack restore PACK --clones 10 --net-tap 'tap%d' --mac auto`: each clone attaches its
/// own tap (moved afterwards into a namespace of its own, where 10.0.0.1 meets the guests'
/// common 10.0.0.2) and takes its own MAC; each answers ping and UDP echo with it, ignores a
/// frame sent to another clone's MAC, and `GET /vm` shows its identity.
#[test]
fn net_ten_clones_distinct_identity() {
    if !can_run("virtio-net clone tests") {
        return;
    }
    const N: usize = 10;
    let _ = vmpack();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = Netns::new("c");
    base.add_tap("vmtap0");
    base.host_side("vmtap0");
    let sock = d.join("api.sock");
    let vm = boot(&base, d, "vmtap0", &sock);
    let pack = d.join("net.vmpack");
    let mut c = base.cmd(&vmpack());
    c.args(["save", "--then", "stop", "--api-sock"])
        .arg(&sock)
        .arg("-o")
        .arg(&pack);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(vm);

    for i in 0..N {
        base.add_tap(&format!("tap{i}"));
    }
    let csock = d.join("clone.sock");
    let mut c = base.cmd(&vmpack());
    c.arg("restore")
        .arg(&pack)
        .args([
            "--clones",
            "10",
            "--net-tap",
            "tap%d",
            "--mac",
            "auto",
            "--json",
        ])
        .arg("--api-sock")
        .arg(&csock);
    let mut clones = Proc::spawn(c);
    clones.wait_out("\"clones\"", 1);
    // Each clone's tap, attached, moves into a namespace of its own.
    let nss: Vec<Netns> = (0..N)
        .map(|i| {
            let ns = Netns::new(&format!("k{i}"));
            ip(&[
                "-n",
                &base.name,
                "link",
                "set",
                &format!("tap{i}"),
                "netns",
                &ns.name,
            ]);
            ns.host_side(&format!("tap{i}"));
            ns
        })
        .collect();
    clones.wait_out("net mac 02:76:6d:00:", N);
    let mac = |i: usize| format!("02:76:6d:00:{i:02x}:00");
    for (i, ns) in nss.iter().enumerate() {
        let msg = format!("clone {i}");
        assert!(
            ns.within(|| udp_echo(msg.as_bytes(), 10)),
            "clone {i}: no echo\n{}",
            clones.err()
        );
        assert!(ns.within(|| ping(10)), "clone {i}: no ping");
        assert_eq!(ns.guest_mac(), Some(mac(i)), "clone {i}");
        let st = net_status(&PathBuf::from(format!("{}.{i}", csock.display())));
        assert_eq!(st["tap"], format!("tap{i}"));
        assert_eq!(st["mac"], mac(i));
    }
    // Clone 0 ignores a frame for clone 1's MAC (pinned in the neighbour table), then
    // answers again for its own.
    let t0 = &nss[0];
    ip(&[
        "-n",
        &t0.name,
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        &mac(1),
        "dev",
        "tap0",
        "nud",
        "permanent",
    ]);
    assert!(
        !t0.within(|| udp_echo(b"not for me", 2)),
        "clone 0 answered a frame for clone 1's MAC"
    );
    ip(&[
        "-n",
        &t0.name,
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        &mac(0),
        "dev",
        "tap0",
        "nud",
        "permanent",
    ]);
    assert!(t0.within(|| udp_echo(b"for me", 10)));

    for ns in &nss {
        assert!(ns.within(|| udp_echo(b"exit", 10)));
    }
    assert_eq!(clones.finish(), 0, "{}", clones.err());
    assert_eq!(
        clones.out().matches("net done").count(),
        N,
        "{}",
        clones.out()
    );

    // `vmpack test`: case i's clone gets tap `casei` and MAC auto(i), and its guest says so.
    base.add_tap("case0");
    base.add_tap("case1");
    let cases = d.join("cases.toml");
    std::fs::write(
        &cases,
        "[[case]]\nname = \"first\"\nexpect = \"net mac 02:76:6d:00:00:00\\n\"\n\
         [[case]]\nname = \"second\"\nexpect = \"net mac 02:76:6d:00:01:00\\n\"\n",
    )
    .unwrap();
    let mut c = base.cmd(&vmpack());
    c.arg("test").arg(&pack).arg(&cases).args([
        "-j",
        "2",
        "--json",
        "--net-tap",
        "case%d",
        "--mac",
        "auto",
    ]);
    let o = c.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(v["passed"], 2, "{v}");
    assert!(o.status.success());
}

/// Not a test on its own: the host-side echo server of `net_bench`'s baseline, run in a
/// second process (this test binary again, with `VMPACK_NET_BENCH_ECHO` set to a socket
/// path). Without the variable it does nothing.
#[test]
#[ignore]
fn net_bench_unix_echo_server() {
    let Some(path) = std::env::var_os("VMPACK_NET_BENCH_ECHO") else {
        return;
    };
    let s = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        if &buf[..n] == b"exit" {
            break;
        }
        if let Some(p) = from.as_pathname() {
            let _ = s.send_to(&buf[..n], p);
        }
    }
}

/// Echo figures through `send`/`recv` closures: the median round trip of a 64-byte
/// datagram (µs), and the payload echoed per second (MB/s) with up to `WINDOW` 1400-byte
/// datagrams in flight, over `secs` seconds.
fn echo_figures(
    send: &mut dyn FnMut(&[u8]),
    recv: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
    secs: f64,
) -> (f64, f64) {
    const WINDOW: usize = 4;
    let mut buf = [0u8; 2048];
    let mut rtts = Vec::new();
    for i in 0..200u32 {
        let msg = format!("{i:064}");
        let t = Instant::now();
        send(msg.as_bytes());
        while let Some(n) = recv(&mut buf) {
            if &buf[..n] == msg.as_bytes() {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
                break;
            }
        }
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN);
    let payload = [0x5au8; 1400];
    let t = Instant::now();
    let mut echoed = 0usize;
    while t.elapsed().as_secs_f64() < secs {
        for _ in 0..WINDOW {
            send(&payload);
        }
        for _ in 0..WINDOW {
            match recv(&mut buf) {
                Some(n) => echoed += n,
                None => break,
            }
        }
    }
    (median, echoed as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// The network benchmark (README, "Performance"): UDP echo between the host and the Rust
/// guest over virtio-net and a tap, against the same echo between two host processes over
/// a Unix datagram socket; and restoring 10 clones with a virtio-net device (each its own
/// tap and MAC) against 10 clones of the same guest without one. Run:
/// `cargo test --release -p vmpack-e2e --test net -- --ignored net_bench --nocapture`.
#[test]
#[ignore]
fn net_bench() {
    if !can_run("the virtio-net benchmark") {
        return;
    }
    let _ = vmpack();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = Netns::new("bench");
    ns.add_tap("vmtap0");
    ns.host_side("vmtap0");
    let sock = d.join("api.sock");
    let vm = boot(&ns, d, "vmtap0", &sock);
    let (guest_lat, guest_tput) = ns.within(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.connect(SocketAddr::from((GUEST, 7))).unwrap();
        echo_figures(
            &mut |m| {
                let _ = s.send(m);
            },
            &mut |b| s.recv(b).ok(),
            3.0,
        )
    });

    let server_path = d.join("echo.sock");
    let mut server = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "net_bench_unix_echo_server",
            "--quiet",
        ])
        .env("VMPACK_NET_BENCH_ECHO", &server_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !server_path.exists() {
        assert!(Instant::now() < deadline, "echo server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let c = std::os::unix::net::UnixDatagram::bind(d.join("client.sock")).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    c.connect(&server_path).unwrap();
    let (unix_lat, unix_tput) = echo_figures(
        &mut |m| {
            let _ = c.send(m);
        },
        &mut |b| c.recv(b).ok(),
        3.0,
    );
    let _ = c.send(b"exit");
    let _ = server.wait();

    // Clone restores: the same guest saved with and without its network.
    let with = d.join("with-net.vmpack");
    let mut c = ns.cmd(&vmpack());
    c.args(["save", "--then", "stop", "--api-sock"])
        .arg(&sock)
        .arg("-o")
        .arg(&with);
    assert!(c.output().unwrap().status.success());
    drop(vm);
    let bare_cfg = d.join("bare.toml");
    let text = std::fs::read_to_string(config(d, "vmtap0")).unwrap();
    std::fs::write(&bare_cfg, text.split("[[net]]").next().unwrap()).unwrap();
    let mut c = ns.cmd(&bin("vmboot"));
    c.args(["run", "--api-sock"]).arg(&sock).arg(&bare_cfg);
    let mut bare_vm = Proc::spawn(c);
    bare_vm.wait_out("idling", 1);
    let without = d.join("without-net.vmpack");
    let mut c = ns.cmd(&vmpack());
    c.args(["save", "--then", "stop", "--api-sock"])
        .arg(&sock)
        .arg("-o")
        .arg(&without);
    assert!(c.output().unwrap().status.success());
    drop(bare_vm);
    for i in 0..10 {
        ns.add_tap(&format!("tap{i}"));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let net_ms = median(
        (0..3)
            .map(|_| clones_ms(&ns, &with, &["--net-tap", "tap%d", "--mac", "auto"]))
            .collect(),
    );
    let bare_ms = median((0..3).map(|_| clones_ms(&ns, &without, &[])).collect());

    eprintln!("\nvirtio-net benchmark (UDP echo, one 64-byte datagram for latency, 1400-byte datagrams 4 in flight for throughput)");
    eprintln!("| path | median round trip | echoed payload |");
    eprintln!("|---|---|---|");
    eprintln!(
        "| host ↔ Rust guest, virtio-net over a tap | {guest_lat:.0} µs | {guest_tput:.2} MB/s |"
    );
    eprintln!("| host process ↔ host process, Unix datagram socket | {unix_lat:.0} µs | {unix_tput:.2} MB/s |");
    eprintln!(
        "| ratio (guest / host) | {:.1}× the time | {:.3}× the throughput |",
        guest_lat / unix_lat,
        guest_tput / unix_tput
    );
    eprintln!(
        "\n10 clones restored (median of 3, `vmpack restore --clones 10 --json` milliseconds):"
    );
    eprintln!("| clones of | milliseconds |");
    eprintln!("|---|---|");
    eprintln!("| rsnet with virtio-net, `--net-tap 'tap%d' --mac auto` | {net_ms:.1} |");
    eprintln!("| the same guest without a network device | {bare_ms:.1} |");
    assert!(guest_tput > 0.0 && unix_tput > 0.0);
}
