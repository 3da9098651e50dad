//! A clone's four identities at once (issue 12), through the real binaries, against the
//! Rust guest `rsclone` (samples/rsclone.toml: rsvsock's vsock services and rsnet's network
//! responder in one guest): `vmpack restore PACK --clones 10 --net-tap 'tap%d' --mac auto
//! --vsock-sock DIR/v%d.sock` gives every clone its own tap, MAC, vsock socket and VM
//! generation ID, and each answers only its own traffic. Taps live only in network
//! namespaces of the test (common/netns.rs). Needs root, /dev/net/tun, `ip` and KVM;
//! without one of them it says SKIPPED loudly and returns.

mod common;
use common::netns::*;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use std::time::Duration;

const N: usize = 10;

/// rsclone's config in `dir`: with `devices`, a tap `vmtap0`, a vsock device, virtio-rng
/// and a generation ID; without, the same guest alone (it idles).
fn config(dir: &Path, devices: bool) -> PathBuf {
    let cfg = dir.join("rsclone.toml");
    let mut t = format!(
        "name = \"rsclone\"\nmemory_mib = 16\n\n[flat]\nimage = \"{}\"\nload_address = 0x100000\n\
         entry = 0x100000\nmode = \"long\"\n",
        rs_guest("rsclone").display()
    );
    if devices {
        t = t.replace(
            "memory_mib = 16\n",
            "memory_mib = 16\nrng = true\nvmgenid = true\n",
        );
        t.push_str(&format!(
            "\n[[net]]\ntap = \"vmtap0\"\nmac = \"02:00:00:00:00:aa\"\n\n[vsock]\ncid = 3\n\
             uds_path = \"{}\"\n",
            dir.join("v.sock").display()
        ));
    }
    std::fs::write(&cfg, t).unwrap();
    cfg
}

/// Boots rsclone in `ns`, waits for `ready`, saves it with `--then stop` into `pack`.
fn boot_and_save(ns: &Netns, dir: &Path, devices: bool, ready: &str, pack: &Path) {
    let cfg = config(dir, devices);
    let sock = dir.join("api.sock");
    let mut c = ns.cmd(&bin("vmboot"));
    c.args(["run", "--api-sock"]).arg(&sock).arg(&cfg);
    let mut vm = Proc::spawn(c);
    vm.wait_out(ready, 1);
    let mut c = ns.cmd(&vmpack());
    c.args(["save", "--then", "stop", "--api-sock"])
        .arg(&sock)
        .arg("-o")
        .arg(pack);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    vm.finish();
}

/// A host → guest vsock connection to `port` (`CONNECT port` / `OK <hostport>`).
fn connect(sock: &Path, port: u32) -> (BufReader<UnixStream>, UnixStream) {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "CONNECT {port} answered {line:?}");
    (r, w)
}

fn mac(i: usize) -> String {
    format!("02:76:6d:00:{i:02x}:00")
}

/// Pins the guest's address in `ns`'s neighbour table to `mac`, so frames go to that MAC.
fn pin(ns: &Netns, tap: &str, mac: &str) {
    ip(&[
        "-n",
        &ns.name,
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        mac,
        "dev",
        tap,
        "nud",
        "permanent",
    ]);
}

/// Ten clones of one saved rsclone VM, each with its own tap (moved into a namespace of its
/// own), MAC, vsock socket and generation ID: for every clone i, UDP echo through tap i is
/// answered from MAC i, a frame to the next clone's MAC is ignored, vsock echo through
/// socket i works, and the generation ID the guest reads equals `GET /vm`'s; all ten IDs
/// differ from each other and from the parent's. Clone 0 reset in place keeps its tap, MAC
/// and socket and gets an eleventh ID.
#[test]
fn clones_ten_with_all_four_identities() {
    if !can_run("the four-identity clone test") {
        return;
    }
    let _ = vmpack();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = Netns::new("q");
    base.add_tap("vmtap0");
    base.host_side("vmtap0");
    let pack = d.join("clone.vmpack");
    boot_and_save(&base, d, true, "vsock ready", &pack);

    for i in 0..N {
        base.add_tap(&format!("tap{i}"));
    }
    let csock = d.join("capi");
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
        .arg("--vsock-sock")
        .arg(d.join("v%d.sock"))
        .arg("--api-sock")
        .arg(&csock);
    let mut clones = Proc::spawn(c);
    clones.wait_out("\"clones\"", 1);
    let nss: Vec<Netns> = (0..N)
        .map(|i| {
            let ns = Netns::new(&format!("q{i}"));
            let tap = format!("tap{i}");
            ip(&["-n", &base.name, "link", "set", &tap, "netns", &ns.name]);
            ns.host_side(&tap);
            ns
        })
        .collect();
    clones.wait_out("net mac 02:76:6d:00:", N);

    let mut ids = Vec::new();
    for (i, ns) in nss.iter().enumerate() {
        let tap = format!("tap{i}");
        let msg = format!("clone {i}");
        assert!(
            ns.within(|| udp_echo(msg.as_bytes(), 10)),
            "clone {i}: no UDP echo\n{}",
            clones.err()
        );
        assert_eq!(ns.guest_mac(), Some(mac(i)), "clone {i}: replied from");
        pin(ns, &tap, &mac((i + 1) % N));
        assert!(
            !ns.within(|| udp_echo(b"not for me", 2)),
            "clone {i} answered a frame for clone {}'s MAC",
            (i + 1) % N
        );
        pin(ns, &tap, &mac(i));
        assert!(ns.within(|| udp_echo(b"for me", 10)), "clone {i}");

        let vs = d.join(format!("v{i}.sock"));
        let (mut r, mut w) = connect(&vs, 5000);
        let data = format!("vsock echo of clone {i}\n").repeat(50);
        w.write_all(data.as_bytes()).unwrap();
        let mut back = vec![0u8; data.len()];
        r.read_exact(&mut back).unwrap();
        assert!(back == data.as_bytes(), "clone {i}: the vsock echo differs");
        let (mut r, mut w) = connect(&vs, 5001);
        w.write_all(b"genid\n").unwrap();
        let mut id = String::new();
        r.read_line(&mut id).unwrap();
        let api = PathBuf::from(format!("{}.{i}", csock.display()));
        let (code, body) = http(&api, "GET", "/vm", b"");
        assert_eq!(code, 200, "{body}");
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            id.trim_end(),
            format!("genid {}", info["vmgenid"][0]["id"].as_str().unwrap()),
            "clone {i}"
        );
        assert_eq!(info["net"][0]["tap"], tap);
        assert_eq!(info["net"][0]["mac"], mac(i));
        assert_eq!(
            info["vsock"][0]["uds_path"],
            vs.to_str().unwrap(),
            "clone {i}"
        );
        ids.push(id.trim_end().to_string());
    }
    // A clone reset in place keeps its own tap, MAC and socket, as it was restored with,
    // and gets a generation ID no clone had, as a fresh clone would.
    let (ns, vs) = (&nss[0], d.join("v0.sock"));
    let api = PathBuf::from(format!("{}.0", csock.display()));
    let (_r, _w) = connect(&vs, 5001);
    let (code, body) = http(&api, "PUT", "/vm/reset", b"");
    assert_eq!(code, 200, "{body}");
    let (mut r, mut w) = connect(&vs, 5001);
    w.write_all(b"genid\n").unwrap();
    let mut id = String::new();
    r.read_line(&mut id).unwrap();
    assert!(
        ns.within(|| udp_echo(b"after the reset", 10)),
        "clone 0 after its reset"
    );
    assert_eq!(ns.guest_mac(), Some(mac(0)), "clone 0 after its reset");
    let (code, body) = http(&api, "GET", "/vm", b"");
    assert_eq!(code, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        id.trim_end(),
        format!("genid {}", info["vmgenid"][0]["id"].as_str().unwrap())
    );
    assert_eq!(info["vmgenid"][0]["generation"], 1);
    assert_eq!(
        (&info["net"][0]["mac"], &info["vsock"][0]["uds_path"]),
        (
            &serde_json::json!(mac(0)),
            &serde_json::json!(vs.to_str().unwrap())
        )
    );
    ids.push(id.trim_end().to_string());
    for i in 0..N {
        let api = PathBuf::from(format!("{}.{i}", csock.display()));
        let (code, body) = http(&api, "PUT", "/vm/shutdown", b"");
        assert!(code < 300, "{code} {body}");
    }
    assert_eq!(clones.finish(), 0, "{}", clones.err());
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), N + 1, "generation IDs: {ids:?}");
    assert!(ids.iter().all(|g| g.len() == 38), "{ids:?}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The clone benchmark of issue 12 (README, "Performance"): restoring 10 clones of rsclone
/// with a network device, a vsock device, virtio-rng and a generation ID (each clone its own
/// tap, MAC, socket and ID) against 10 clones of the same guest without them; median of 5.
/// Run: `cargo test --release -p vmpack-e2e --test clones -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: run it explicitly"]
fn clones_bench() {
    if !can_run("the four-identity clone benchmark") {
        return;
    }
    let _ = vmpack();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = Netns::new("qb");
    ns.add_tap("vmtap0");
    ns.host_side("vmtap0");
    let with = d.join("with.vmpack");
    boot_and_save(&ns, d, true, "vsock ready", &with);
    let bare_dir = d.join("bare");
    std::fs::create_dir(&bare_dir).unwrap();
    let without = d.join("without.vmpack");
    boot_and_save(&ns, &bare_dir, false, "no virtio-vsock device", &without);
    for i in 0..N {
        ns.add_tap(&format!("tap{i}"));
    }
    let vs = d.join("b%d.sock");
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..5 {
        a.push(clones_ms(
            &ns,
            &with,
            &[
                "--net-tap",
                "tap%d",
                "--mac",
                "auto",
                "--vsock-sock",
                vs.to_str().unwrap(),
            ],
        ));
        b.push(clones_ms(&ns, &without, &[]));
    }
    let (a, b) = (median(a), median(b));
    println!(
        "clones_bench: 10 clones with net+vsock+rng+vmgenid {a:.1} ms, without {b:.1} ms (median of 5)"
    );
}
