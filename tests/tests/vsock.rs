//! virtio-vsock through the real binaries, driven from the host's Unix sockets against the
//! Rust guest (`samples/guests/rs`, `rsvsock`: echo on port 5000, key-value on 5001, via
//! the rcore-os `virtio-drivers` crate): host → guest (`CONNECT <port>` / `OK <hostport>`),
//! guest → host (`<uds_path>_<port>`), a save in the middle of traffic and a restore in a
//! new process (the guest hears the documented reset and answers again), the pack's socket
//! path never used by a restore, `GET /vm`, and clones each with its own socket.

mod common;
use common::blk::{spawn, Running};
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn config(dir: &Path, cid: u64) -> PathBuf {
    let cfg = dir.join("vsock.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"rsvsock\"\nmemory_mib = 16\nrng = true\nvmgenid = true\n\n[flat]\nimage = \"{}\"\n\
             load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n\n[vsock]\n\
             cid = {cid}\nuds_path = \"v.sock\"\n",
            rs_guest("rsvsock").display()
        ),
    )
    .unwrap();
    cfg
}

/// A host → guest connection: `CONNECT port`, then the `OK <hostport>` line.
struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
    host_port: u32,
}

fn connect(sock: &Path, port: u32) -> Conn {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("CONNECT {port} answered {line:?}"));
    Conn { r, w, host_port }
}

impl Conn {
    fn ask(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut a = String::new();
        self.r.read_line(&mut a).unwrap();
        a.trim_end().to_string()
    }

    fn echo(&mut self, data: &[u8]) {
        let mut w = self.w.try_clone().unwrap();
        let d = data.to_vec();
        let writer = std::thread::spawn(move || w.write_all(&d).unwrap());
        let mut back = vec![0u8; data.len()];
        self.r.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == data, "the echo differs");
    }
}

fn vm_info(api: &Path) -> serde_json::Value {
    let (code, body) = http(api, "GET", "/vm", b"");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}
/// Boots the rsvsock guest, sets `key` to `value` in its store over vsock, saves it to
/// `p.vmpack` and stops it: the pack, the guest's generation ID line at the save and the
/// host port of the connection that set the key (open in the pack).
fn saved_with_key(d: &Path, key: &str, value: &str) -> (PathBuf, String, u32) {
    let (r, api, sock) = boot(d);
    let mut kv = connect(&sock, 5001);
    assert_eq!(kv.ask(&format!("set {key} {value}")), "ok");
    let genid = kv.ask("genid");
    let pack = d.join("p.vmpack");
    common::blk::save(d, &api, &pack, "stop");
    let (code, _, err) = r.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");
    (pack, genid, kv.host_port)
}

fn boot(dir: &Path) -> (Running, PathBuf, PathBuf) {
    let cfg = config(dir, 3);
    let api = dir.join("api.sock");
    let r = spawn(
        &[
            "run",
            "--api-sock",
            api.to_str().unwrap(),
            cfg.to_str().unwrap(),
        ],
        dir,
    );
    r.wait_for("vsock ready\n", TIMEOUT);
    (r, api, dir.join("v.sock"))
}

#[test]
fn vsock_host_to_guest_and_guest_to_host() {
    if !kvm_available("vsock tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (r, api, sock) = boot(d);
    assert!(r.out.lock().unwrap().contains("vsock cid 3\n"));

    let mut echo = connect(&sock, 5000);
    echo.echo(b"hello vsock\n");
    // More than the guest's 32 KiB receive buffer and the host's 256 KiB: credit flows.
    let big: Vec<u8> = noise(600 << 10, 5);
    echo.echo(&big);

    let mut kv = connect(&sock, 5001);
    assert_ne!(kv.host_port, echo.host_port);
    assert_eq!(kv.ask("set colour blue"), "ok");
    assert_eq!(kv.ask("get colour"), "blue");
    assert_eq!(kv.ask("get size"), "none");
    let rng = kv.ask("rng");
    assert!(
        rng.len() == 68 && rng.starts_with("rng ") && rng != kv.ask("rng"),
        "{rng}"
    );
    assert_eq!(kv.ask("frobnicate"), "error");
    let genid = kv.ask("genid");

    // guest → host: the guest dials host port 7000, reaching v.sock_7000.
    let listener = UnixListener::bind(d.join("v.sock_7000")).unwrap();
    assert_eq!(kv.ask("dial 7000"), "dialing 7000");
    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut r2 = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r2.read_line(&mut line).unwrap();
    assert_eq!(line, "hello from cid 3\n");
    (&s).write_all(b"ping\n").unwrap();
    line.clear();
    r2.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");
    // Nobody on port 7001: the guest's connection is reset.
    assert_eq!(kv.ask("dial 7001"), "dialing 7001");

    // A port nobody listens on in the guest: closed without OK.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"CONNECT 4999\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    // Not a CONNECT line: closed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"HELLO\n").unwrap();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");

    let info = vm_info(&api);
    let v = &info["vsock"][0];
    assert_eq!(v["cid"], 3);
    assert_eq!(v["uds_path"], sock.to_str().unwrap());
    assert!(v["rx_bytes"].as_u64().unwrap() >= big.len() as u64);
    let g = &info["vmgenid"][0];
    assert_eq!(genid, format!("genid {}", g["id"].as_str().unwrap()));
    assert_eq!(
        (g["address"].as_u64(), g["generation"].as_u64()),
        (Some(0xef000), Some(0))
    );
    let deadline = Instant::now() + TIMEOUT;
    while !r.out.lock().unwrap().contains("closed 7001 reset") {
        assert!(Instant::now() < deadline, "{}", r.out.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(&api);
    let (code, _, err) = r.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");
    assert!(!sock.exists(), "the socket is removed when the VM ends");
}

fn stop(api: &Path) {
    let (code, body) = http(api, "PUT", "/vm/shutdown", b"");
    assert!(code < 300, "{code} {body}");
}

/// Saved (stopping the VM) while a connection is open, restored in a new process on a new
/// socket: the host end of the old connection sees end-of-file, the guest hears a reset for
/// it, and it answers new connections, with its state (the key-value store) intact. A
/// restore without --vsock-sock listens in its work folder, never at the pack's path.
#[test]
fn vsock_save_mid_traffic_restore_resets_and_answers_again() {
    if !kvm_available("vsock tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _ = vmpack();
    let (r, api, sock) = boot(d);
    let mut kv = connect(&sock, 5001);
    assert_eq!(kv.ask("set k before-save"), "ok");
    let genid = kv.ask("genid");
    assert!(genid.len() == 38 && genid.starts_with("genid "), "{genid}");
    let mut echo = connect(&sock, 5000);
    echo.echo(b"before\n");
    // Traffic in flight: the guest is echoing this while the save happens.
    echo.w.write_all(&noise(200 << 10, 9)).unwrap();
    let pack = d.join("mid.vmpack");
    common::blk::save(d, &api, &pack, "stop");
    let (code, _, err) = r.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");
    // The old host end ends (whatever part of the echo had come back).
    let mut rest = Vec::new();
    let _ = echo.r.read_to_end(&mut rest);
    assert!(rest.len() <= 200 << 10);

    let sock2 = d.join("restored.sock");
    let api2 = d.join("api2.sock");
    let r2 = Command::new(vmpack())
        .args(["restore", "--quiet", "--vsock-sock"])
        .arg(&sock2)
        .arg("--api-sock")
        .arg(&api2)
        .arg(&pack)
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r2 = common::blk::Running::from_child(r2);
    let reset = format!("closed {} reset\n", echo.host_port);
    r2.wait_for(&reset, TIMEOUT);
    r2.wait_for(&format!("closed {} reset\n", kv.host_port), TIMEOUT);
    let mut kv2 = connect(&sock2, 5001);
    assert_eq!(kv2.ask("get k"), "before-save");
    // A restore is a new generation: a fresh ID, which GET /vm shows too.
    let genid2 = kv2.ask("genid");
    assert_ne!(genid2, genid);
    let g = &vm_info(&api2)["vmgenid"][0];
    assert_eq!(genid2, format!("genid {}", g["id"].as_str().unwrap()));
    assert_eq!(g["generation"], 1);
    let mut echo2 = connect(&sock2, 5000);
    echo2.echo(b"after restore\n");
    assert_eq!(
        vm_info(&api2)["vsock"][0]["uds_path"],
        sock2.to_str().unwrap()
    );
    stop(&api2);
    let (code, _, err) = r2.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");

    // Without --vsock-sock: a socket in the restore's work folder, not the pack's v.sock.
    let api3 = d.join("api3.sock");
    let r3 = spawn(
        &[
            "restore",
            "--quiet",
            "--api-sock",
            api3.to_str().unwrap(),
            pack.to_str().unwrap(),
        ],
        d,
    );
    r3.wait_for(&reset, TIMEOUT);
    let p = PathBuf::from(
        vm_info(&api3)["vsock"][0]["uds_path"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    assert!(!sock.exists(), "the pack's socket path was bound");
    assert_eq!(p.file_name().unwrap(), "vsock.sock");
    assert!(
        p.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("vmpack-restore-"),
        "{}",
        p.display()
    );
    let mut kv3 = connect(&p, 5001);
    assert_eq!(kv3.ask("get k"), "before-save");
    let genid3 = kv3.ask("genid");
    assert!(genid3 != genid && genid3 != genid2, "{genid3}");
    stop(&api3);
    let (code, _, err) = r3.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");
    assert!(!p.exists());
}

/// Waits until `text` occurs `n` times in the VM's serial output.
fn wait_count(r: &Running, text: &str, n: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while r.out.lock().unwrap().matches(text).count() < n {
        assert!(
            Instant::now() < deadline,
            "{text:?} x{n}: {}",
            r.out.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The host end of a connection the reset closed: end of file (or ECONNRESET where bytes
/// it sent were never read), never an answer.
fn assert_closed(s: &mut impl Read) {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the host end is still open: {other:?}"),
    }
}

/// `PUT /vm/reset` of a restored VM with virtio-vsock and a generation ID: each reset gives
/// what a fresh restore of the pack gives (the guest hears a reset for the connections open
/// at the save, its key-value store is the pack's, the generation is the pack's + 1 with a
/// new ID), every host connection made since (either way) is closed, and the socket keeps
/// answering.
#[test]
fn vsock_reset_in_place_is_a_fresh_restore() {
    if !kvm_available("vsock tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _ = vmpack();
    let (pack, genid0, kv_port) = saved_with_key(d, "k", "saved");

    let sock2 = d.join("r.sock");
    let api2 = d.join("api2.sock");
    let r2 = spawn(
        &[
            "restore",
            "--quiet",
            "--vsock-sock",
            sock2.to_str().unwrap(),
            "--api-sock",
            api2.to_str().unwrap(),
            pack.to_str().unwrap(),
        ],
        d,
    );
    let saved_reset = format!("closed {kv_port} reset\n");
    let listener = UnixListener::bind(d.join("r.sock_7000")).unwrap();
    let mut ids = vec![genid0];
    for round in 1..=3 {
        // The guest hears of the connection open at the save, as after the restore.
        wait_count(&r2, &saved_reset, round);
        let mut kv2 = connect(&sock2, 5001);
        assert_eq!(kv2.ask("get k"), "saved", "round {round}");
        assert_eq!(kv2.ask("set k changed"), "ok");
        assert_eq!(kv2.ask("get k"), "changed");
        let genid = kv2.ask("genid");
        assert!(!ids.contains(&genid), "round {round}: {genid} reused");
        ids.push(genid.clone());
        let info = vm_info(&api2);
        let g = &info["vmgenid"][0];
        assert_eq!(genid, format!("genid {}", g["id"].as_str().unwrap()));
        assert_eq!(g["generation"], 1, "a restore's generation, every round");
        // guest → host, and an echo left open.
        assert_eq!(kv2.ask("dial 7000"), "dialing 7000");
        let (mut dialed, _) = listener.accept().unwrap();
        dialed.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut line = String::new();
        BufReader::new(dialed.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "hello from cid 3\n");
        let mut echo = connect(&sock2, 5000);
        echo.echo(b"before the reset\n");
        assert_eq!(vm_info(&api2)["vsock"][0]["connections"], 3);
        // A connection still in the socket's backlog at the reset goes too.
        let mut waiting = UnixStream::connect(&sock2).unwrap();
        waiting.set_read_timeout(Some(IO_TIMEOUT)).unwrap();

        let (code, body) = http(&api2, "PUT", "/vm/reset", b"");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["pages"].as_u64().unwrap() > 0, "{v}");
        for s in [&mut kv2.w, &mut echo.w, &mut dialed, &mut waiting] {
            assert_closed(s);
        }
        let info = vm_info(&api2);
        assert_eq!(info["vsock"][0]["connections"], 0, "{info}");
        assert_eq!(info["vsock"][0]["uds_path"], sock2.to_str().unwrap());
    }
    wait_count(&r2, &saved_reset, 4);
    // The guest never heard of the connections made after the restore being reset: it
    // went back to before them.
    let out = r2.out.lock().unwrap().clone();
    assert_eq!(out.matches("closed 1073741825 reset").count(), 0, "{out}");
    let mut kv3 = connect(&sock2, 5001);
    assert_eq!(kv3.ask("get k"), "saved");
    stop(&api2);
    let (code, _, err) = r2.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");
    assert!(!sock2.exists());
}

/// `vmpack restore PACK --clones 10 --vsock-sock 'v%d.sock'`: every clone listens on its
/// own socket, keeps its own state and has its own generation ID (read from the guest).
#[test]
fn vsock_clones_each_get_their_own_socket() {
    if !kvm_available("vsock tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _ = vmpack();
    let (pack, parent_id, kv_port) = saved_with_key(d, "who", "parent");

    const N: usize = 10;
    let child = Command::new(vmpack())
        .args([
            "restore",
            "--quiet",
            "--clones",
            "10",
            "--vsock-sock",
            "c%d.sock",
        ])
        .arg("--api-sock")
        .arg(d.join("capi"))
        .arg(&pack)
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let clones = common::blk::Running::from_child(child);
    for i in 0..N {
        clones.wait_for(&format!("[{i}] closed {kv_port} reset\n"), TIMEOUT);
    }
    let mut conns: Vec<Conn> = (0..N)
        .map(|i| connect(&d.join(format!("c{i}.sock")), 5001))
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.ask("get who"), "parent");
        assert_eq!(c.ask(&format!("set who clone{i}")), "ok");
    }
    let mut ids = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.ask("get who"), format!("clone{i}"));
        ids.push(c.ask("genid"));
    }
    for (i, id) in ids.iter().enumerate() {
        let info = vm_info(&d.join(format!("capi.{i}")));
        assert_eq!(
            *id,
            format!("genid {}", info["vmgenid"][0]["id"].as_str().unwrap())
        );
        assert_eq!(info["vsock"][0]["uds_path"], format!("c{i}.sock"));
        stop(&d.join(format!("capi.{i}")));
    }
    let (code, _, err) = clones.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");
    let mut distinct = ids.clone();
    distinct.push(parent_id);
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), N + 1, "generation IDs: {ids:?}");
    assert!(ids.iter().all(|g| g.len() == 38), "{ids:?}");
}

/// `vmpack test` cases with `channel = "vsock:PORT"`: the sample cases file passes against a
/// saved rsvsock VM, each case in its own clone; a port nobody listens on and a bad channel
/// are reported.
#[test]
fn vsock_vmpack_test_cases_talk_to_the_guest() {
    if !kvm_available("vsock tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _ = vmpack();
    let (r, api, _) = boot(d);
    let pack = d.join("p.vmpack");
    common::blk::save(d, &api, &pack, "stop");
    let (code, _, err) = r.finish(TIMEOUT);
    assert_eq!(code, 0, "{err}");

    let cases = samples_dir().join("rsvsock-cases.toml");
    let o = run(
        d,
        &[
            "test",
            pack.to_str().unwrap(),
            cases.to_str().unwrap(),
            "-j",
            "3",
            "--json",
        ],
    );
    let j: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(
        (j["passed"].as_u64(), j["failed"].as_u64()),
        (Some(3), Some(0)),
        "{j}"
    );
    let echo = j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "echo over vsock")
        .unwrap();
    assert_eq!(echo["output"], "hello over vsock\n");

    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        "[[case]]\nname = \"nobody\"\nchannel = \"vsock:4999\"\nsend = \"x\\n\"\nexpect = \"x\"\ntimeout_ms = 3000\n",
    )
    .unwrap();
    let o = run(d, &["test", pack.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("vsock:4999: the guest did not accept the connection"),
        "{}",
        stdout(&o)
    );
    std::fs::write(
        &bad,
        "[[case]]\nname = \"bad\"\nchannel = \"vsock:x\"\nsend = \"x\"\n",
    )
    .unwrap();
    let o = run(d, &["test", pack.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("channel \"vsock:x\": expected \"serial\" or \"vsock:PORT\""),
        "{}",
        stderr(&o)
    );
}

/// `vmpack test` over vsock with fresh clones and with `--reuse` (clones reset in place
/// between cases): each case sees only the pack's keys, never another case's, and every
/// case runs under a generation ID no other case (nor the saved VM) had, as fresh clones do.
#[test]
fn vsock_vmpack_test_cases_are_isolated_in_both_modes() {
    if !kvm_available("vsock tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _ = vmpack();
    let (_, genid0, _) = saved_with_key(d, "saved", "yes");

    let n = 6;
    let mut cases = String::from("timeout_ms = 20000\nchannel = \"vsock:5001\"\n");
    for i in 0..n {
        // The key of the case before (run earlier by the same clone with --reuse).
        let other = (i + n - 1) % n;
        cases.push_str(&format!(
            "[[case]]\nname = \"own key {i}\"\nsteps = [\n\
             {{ send = \"get k{other}\\n\", expect = \"^none\\n\" }},\n\
             {{ send = \"set k{i} v{i}\\n\", expect = \"^ok\\n\" }},\n\
             {{ send = \"get saved\\n\", expect = \"^yes\\n\" }},\n\
             {{ send = \"genid\\n\", expect = \"^genid [0-9a-f]{{32}}\\n\" }},\n]\n\
             [[case]]\nname = \"echo {i}\"\nchannel = \"vsock:5000\"\n\
             send = \"echo {i}\\n\"\nexpect = \"^echo {i}\\n$\"\n"
        ));
    }
    std::fs::write(d.join("cases.toml"), &cases).unwrap();
    for mode in [&["-j", "3"][..], &["-j", "2", "--reuse"], &["--reuse"]] {
        let mut args = vec!["test", "p.vmpack", "cases.toml", "--json"];
        args.extend(mode);
        let o = run(d, &args);
        let j: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        assert_eq!(
            (j["passed"].as_u64(), j["failed"].as_u64()),
            (Some(2 * n as u64), Some(0)),
            "{mode:?}: {j}"
        );
        let clones = j["clones"].as_u64().unwrap();
        match mode {
            ["--reuse"] => assert_eq!(clones, 1, "one clone reset between all cases: {j}"),
            [_, _, "--reuse"] => assert_eq!(clones, 2, "{j}"),
            _ => {}
        }
        let mut ids: Vec<String> = j["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| {
                let out = c["output"].as_str().unwrap();
                out.lines()
                    .find(|l| l.starts_with("genid "))
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(ids.len(), n, "{j}");
        ids.push(genid0.clone());
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            n + 1,
            "{mode:?}: a generation ID was shared: {ids:?}"
        );
    }
}

/// The host-process side of the benchmark: when `VSOCK_BENCH_ECHO` names a socket path, this
/// test binary (re-run as a child) echoes every connection to it until killed.
#[test]
#[ignore = "the echo peer of bench_vsock, started by it"]
fn bench_vsock_echo_peer() {
    let Some(path) = std::env::var_os("VSOCK_BENCH_ECHO") else {
        return;
    };
    let l = UnixListener::bind(&path).unwrap();
    for s in l.incoming() {
        let mut s = s.unwrap();
        std::thread::spawn(move || {
            let mut r = s.try_clone().unwrap();
            let _ = std::io::copy(&mut r, &mut s);
        });
    }
}

/// Echo throughput (MiB/s each way) and round trip (µs) over a stream.
fn measure(mut conn: Conn, total: usize, pings: usize) -> (f64, f64) {
    let data = noise(total, 77);
    let t = Instant::now();
    conn.echo(&data);
    let mibs = total as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let mut b = [0u8; 1];
    let t = Instant::now();
    for _ in 0..pings {
        conn.w.write_all(b"p").unwrap();
        conn.r.read_exact(&mut b).unwrap();
    }
    (mibs, t.elapsed().as_secs_f64() * 1e6 / pings as f64)
}

/// Median of `runs` clone restores of `pack`: `vmpack restore --clones N --json`
/// `milliseconds`, the clones ended right after.
fn clone_restore_ms(d: &Path, pack: &Path, n: usize, runs: usize, vsock: bool) -> f64 {
    let mut ms = Vec::new();
    for run in 0..runs {
        let api = d.join(format!("bapi{run}"));
        let mut cmd = Command::new(vmpack());
        cmd.args(["restore", "--quiet", "--json", "--serial-out", "none"])
            .args(["--clones", &n.to_string()])
            .arg("--api-sock")
            .arg(&api);
        if vsock {
            cmd.arg("--vsock-sock")
                .arg(d.join(format!("b{run}-%d.sock")));
        }
        let mut child = cmd
            .arg(pack)
            .current_dir(d)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let j: serde_json::Value = serde_json::from_str(&line).unwrap();
        ms.push(j["milliseconds"].as_f64().unwrap());
        for i in 0..n {
            let mut p = api.as_os_str().to_owned();
            p.push(format!(".{i}"));
            stop(Path::new(&p));
        }
        child.wait().unwrap();
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ms[ms.len() / 2]
}

/// The README's vsock figures: `cargo test --release -p vmpack-e2e --test vsock --
/// --ignored bench_vsock --exact --nocapture`.
#[test]
#[ignore = "a benchmark: run it explicitly"]
fn bench_vsock() {
    if !kvm_available("the vsock benchmark") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _ = vmpack();
    const TOTAL: usize = 4 << 20;
    const PINGS: usize = 500;

    // Two host processes over a Unix socket: this one and an echoing child.
    let peer_sock = d.join("peer.sock");
    let mut peer = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "bench_vsock_echo_peer"])
        .env("VSOCK_BENCH_ECHO", &peer_sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    while !peer_sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = UnixStream::connect(&peer_sock).unwrap();
    let host = measure(
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            host_port: 0,
        },
        TOTAL,
        PINGS,
    );
    let _ = peer.kill();
    let _ = peer.wait();

    let (r, api, sock) = boot(d);
    let guest = measure(connect(&sock, 5000), TOTAL, PINGS);
    let pack = d.join("with.vmpack");
    common::blk::save(d, &api, &pack, "stop");
    r.finish(TIMEOUT);

    // The same guest without [vsock] and vmgenid.
    let cfg = d.join("plain.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"rsvsock\"\nmemory_mib = 16\nrng = true\n\n[flat]\nimage = \"{}\"\n\
             load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n",
            rs_guest("rsvsock").display()
        ),
    )
    .unwrap();
    let api2 = d.join("plain-api.sock");
    let r = spawn(
        &[
            "run",
            "--api-sock",
            api2.to_str().unwrap(),
            cfg.to_str().unwrap(),
        ],
        d,
    );
    r.wait_for("no virtio-vsock device\n", TIMEOUT);
    let plain = d.join("plain.vmpack");
    common::blk::save(d, &api2, &plain, "stop");
    r.finish(TIMEOUT);

    const CLONES: usize = 10;
    let with = clone_restore_ms(d, &pack, CLONES, 5, true);
    let without = clone_restore_ms(d, &plain, CLONES, 5, false);

    println!("| path | echo throughput (MiB/s each way) | round trip (µs) |");
    println!("|---|---:|---:|");
    println!(
        "| guest (virtio-drivers) ↔ host over vsock | {:.2} | {:.0} |",
        guest.0, guest.1
    );
    println!(
        "| two host processes over a Unix socket | {:.1} | {:.1} |",
        host.0, host.1
    );
    println!(
        "| ratio host / vsock | {:.0}× | {:.0}× |",
        host.0 / guest.0,
        guest.1 / host.1
    );
    println!();
    println!("| {CLONES} clones restored at once (median of 5) | ms |");
    println!("|---|---:|");
    println!("| with vsock + generation ID | {with:.1} |");
    println!("| without | {without:.1} |");
}
