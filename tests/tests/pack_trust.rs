//! A pack is data, never authority: nothing inside a pack makes `vmpack` or `vmboot` open,
//! create or write a host path. Crafted packs (intact containers with a hostile manifest or
//! vmstate) through the real binaries: every disk comes from the pack's own sections, serial
//! output goes where the command line says, and the manifest's config is the only one used.

mod common;

use common::{bin, fails, ok, rewrite_pack, rewrite_pack_json, run, vmpack};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A counter guest (cpu_template "baseline", a 64 KiB read-only disk) saved by vmpack 0.1.0
/// as it was before the manifest became the config's only authority: its vmstate holds a
/// second copy of the config, naming the saving host's files (`/tmp/tvfix/...`). It was
/// saved after printing 71, so a restore prints 72 to 300 and exits 0.
fn old_pack() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/counter-v0.1-main.vmpack")
}

fn counter_from(first: u32) -> String {
    (first..=300).map(|i| format!("{i}\n")).collect()
}

/// `vmboot restore PACK` (or `-` with the pack on stdin), serial output on stdout.
fn restore(dir: &Path, pack: &Path, stdin: bool) -> Output {
    let mut cmd = Command::new(bin("vmboot"));
    cmd.current_dir(dir)
        .env("VMPACK_CACHE_DIR", dir.join("cache"))
        .arg("restore");
    if stdin {
        cmd.arg("-")
            .stdin(std::fs::File::open(pack).expect("opening the pack"));
    } else {
        cmd.arg(pack).stdin(Stdio::null());
    }
    cmd.output().expect("running vmboot restore")
}

/// A victim file whose content a test checks afterwards.
fn victim(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let content = common::noise(1 << 20, 99);
    std::fs::write(&p, &content).unwrap();
    (p, content)
}

#[track_caller]
fn unchanged(p: &Path, content: &[u8]) {
    assert!(
        std::fs::read(p).unwrap() == content,
        "{} was modified",
        p.display()
    );
}

/// Appends `[[disk]]` entries to a manifest's TOML config.
fn add_disk(manifest: &mut Value, path: &Path) {
    let cfg = manifest["config"].as_str().unwrap().to_string();
    manifest["config"] = json!(format!(
        "{cfg}\n[[disk]]\npath = \"{}\"\nformat = \"raw\"\n",
        path.display()
    ));
}

#[test]
fn old_packs_restore_from_their_own_sections() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The saving host's disk path named in the vmstate (/tmp/tvfix/d.img) is not needed:
    // the disk comes from the pack's `disk/0` section.
    for stdin in [false, true] {
        let o = restore(dir.path(), &old_pack(), stdin);
        assert_eq!(ok(&o), counter_from(72), "stdin: {stdin}");
    }
}

#[test]
fn a_saved_config_naming_a_host_disk_is_refused() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (victim, content) = victim(d, "victim.img");

    // Both copies of the config name the host file as a second disk, with a device state
    // for it: the manifest lists no section for it, so it is refused by name.
    let both = d.join("both.vmpack");
    rewrite_pack_json(
        &old_pack(),
        &both,
        |m| add_disk(m, &victim),
        |s| {
            s["config"]["disk"]
                .as_array_mut()
                .unwrap()
                .push(json!({"path": victim, "format": "raw", "read_only": false}));
            let dev = s["devices"]["virtio_blk"][0].clone();
            s["devices"]["virtio_blk"].as_array_mut().unwrap().push(dev);
        },
    );
    for stdin in [false, true] {
        let o = restore(d, &both, stdin);
        let err = fails(&o);
        assert!(o.stdout.is_empty(), "the guest must not run");
        assert!(
            err.contains("section 'manifest'")
                && err.contains("[[disk]] 1")
                && err.contains(&victim.display().to_string())
                && err.contains("no disk section"),
            "names the entry: {err}"
        );
    }

    // Only the vmstate's copy names it: the two copies disagree.
    let state_only = d.join("state-only.vmpack");
    rewrite_pack_json(
        &old_pack(),
        &state_only,
        |_| {},
        |s| {
            s["config"]["disk"]
                .as_array_mut()
                .unwrap()
                .push(json!({"path": victim, "format": "raw", "read_only": false}));
            let dev = s["devices"]["virtio_blk"][0].clone();
            s["devices"]["virtio_blk"].as_array_mut().unwrap().push(dev);
        },
    );
    for stdin in [false, true] {
        let o = restore(d, &state_only, stdin);
        let err = fails(&o);
        assert!(
            err.contains("section 'vmstate'")
                && err.contains("differs from the manifest's in disk"),
            "{err}"
        );
    }
    unchanged(&victim, &content);
}

#[test]
fn the_vmstate_copy_of_the_config_must_equal_the_manifests() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("renamed.vmpack");
    rewrite_pack_json(
        &old_pack(),
        &renamed,
        |_| {},
        |s| s["config"]["name"] = json!("someone-else"),
    );
    let err = fails(&restore(dir.path(), &renamed, false));
    assert!(
        err.contains(
            "renamed.vmpack: section 'vmstate': its config differs from the manifest's in name"
        ),
        "{err}"
    );
}

/// The files a process has open, from /proc.
fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn host_paths_in_the_vmstate_are_never_opened() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (victim, content) = victim(d, "victim.img");
    // The vmstate's copy points disk 0 at a host file; paths aside the copies agree, so the
    // pack restores, with disk 0 from its own section.
    let pack = d.join("pointed.vmpack");
    rewrite_pack_json(
        &old_pack(),
        &pack,
        |_| {},
        |s| s["config"]["disk"][0]["path"] = json!(victim),
    );
    let sock = d.join("vm.sock");
    let mut child = Command::new(bin("vmboot"))
        .current_dir(d)
        .env("VMPACK_CACHE_DIR", d.join("cache"))
        .args(["restore", "--serial-out", "none", "--api-sock"])
        .arg(&sock)
        .arg(&pack)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let files = open_files(child.id());
    let _ = Command::new(vmpack())
        .args(["save", "--then", "stop", "-o", "/dev/null", "--api-sock"])
        .arg(&sock)
        .output();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        sock.exists() || !files.is_empty(),
        "vmboot did not start: {out:?}"
    );
    assert!(
        !files.contains(&victim),
        "vmboot opened {}: {files:?}",
        victim.display()
    );
    unchanged(&victim, &content);
}

#[test]
fn new_saves_hold_one_config() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Restore the old pack, save it again: the vmstate of the new pack has no config.
    let sock = d.join("vm.sock");
    let mut child = Command::new(bin("vmboot"))
        .current_dir(d)
        .env("VMPACK_CACHE_DIR", d.join("cache"))
        .args(["restore", "--serial-out", "none", "--api-sock"])
        .arg(&sock)
        .arg(old_pack())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = d.join("again.vmpack");
    ok(&run(
        d,
        &[
            "save",
            "--then",
            "stop",
            "--api-sock",
            sock.to_str().unwrap(),
            "-o",
            again.to_str().unwrap(),
        ],
    ));
    assert!(child.wait().unwrap().success());
    let r = vmpack_formats::pack::PackReader::open(&again).unwrap();
    let s = r.section("vmstate").unwrap();
    let state: Value = serde_json::from_slice(&r.read_section(s.id, 64 << 20).unwrap()).unwrap();
    assert!(state.get("config").is_none(), "the vmstate holds a config");
    assert!(state.get("vcpus").is_some());
    // It restores, and the disk is still the pack's own.
    let o = restore(d, &again, false);
    let text = ok(&o);
    assert!(text.ends_with("299\n300\n"), "{text}");
}

/// A real-mode guest: prints "hi\n" on COM1 and exits with status 0.
const HI_GUEST: &[u8] = &[
    0xba, 0xf8, 0x03, // mov $0x3f8, %dx
    0xb0, b'h', 0xee, // mov $'h', %al; out %al, (%dx)
    0xb0, b'i', 0xee, // mov $'i', %al; out %al, (%dx)
    0xb0, b'\n', 0xee, // mov $'\n', %al; out %al, (%dx)
    0xb0, 0x00, 0xe6, 0xf4, // mov $0, %al; out %al, $0xf4
    0xf4, // hlt
];

/// A VM at rest packed from `extra_toml` added to a flat config of `image`.
fn packed(dir: &Path, name: &str, image: &[u8], extra_toml: &str) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("guest.bin"), image).unwrap();
    std::fs::write(
        src.join("vm.toml"),
        format!(
            "name = \"{name}\"\nmemory_mib = 16\n\n[flat]\nimage = \"guest.bin\"\n\
             load_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n{extra_toml}"
        ),
    )
    .unwrap();
    let pack = dir.join(format!("{name}.vmpack"));
    ok(&run(
        dir,
        &[
            "pack",
            src.join("vm.toml").to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
        ],
    ));
    pack
}

#[test]
fn a_packed_serial_path_is_never_written() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pack = packed(
        d,
        "hi",
        HI_GUEST,
        "\n[serial]\noutput = \"file\"\npath = \"serial.log\"\n",
    );
    let target = d.join("elsewhere/victim.log");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, "before\n").unwrap();
    let crafted = d.join("crafted.vmpack");
    for path in [
        None,
        Some(target.display().to_string()),
        Some("elsewhere/../elsewhere/victim.log".to_string()),
    ] {
        let run_this = match &path {
            None => &pack,
            Some(p) => {
                rewrite_pack_json(
                    &pack,
                    &crafted,
                    |m| {
                        let cfg = m["config"].as_str().unwrap().replace("serial.log", p);
                        m["config"] = json!(cfg);
                    },
                    |_| {},
                );
                &crafted
            }
        };
        let o = run(d, &["run", run_this.to_str().unwrap()]);
        let out = ok(&o);
        assert_eq!(out, "hi\n", "serial output goes to stdout ({path:?})");
        assert!(
            common::stderr(&o).contains("the packed config's [serial] file is ignored"),
            "{}",
            common::stderr(&o)
        );
    }
    assert!(
        !d.join("serial.log").exists(),
        "serial.log next to the pack"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "before\n");

    // The command line chooses a file.
    let chosen = d.join("chosen.log");
    let o = run(
        d,
        &[
            "run",
            pack.to_str().unwrap(),
            "--serial-out",
            chosen.to_str().unwrap(),
        ],
    );
    assert_eq!(ok(&o), "");
    assert_eq!(std::fs::read_to_string(&chosen).unwrap(), "hi\n");
}

#[test]
fn a_packed_config_cannot_add_a_host_disk() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (victim, content) = victim(d, "victim.img");
    // The blk guest writes its disk 0: with a host file there, it would overwrite it.
    let blk = std::fs::read(common::samples_dir().join("guests/bin/blk.bin")).unwrap();
    let src = d.join("blk-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("blk.bin"), &blk).unwrap();
    common::sparse_raw(&src.join("own.img"), 1 << 20, &[]);
    std::fs::write(
        src.join("vm.toml"),
        "name = \"blk\"\nmemory_mib = 16\n\n[flat]\nimage = \"blk.bin\"\n\
         load_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n\n\
         [[disk]]\npath = \"own.img\"\nformat = \"raw\"\n",
    )
    .unwrap();
    let pack = d.join("blk.vmpack");
    ok(&run(
        d,
        &[
            "pack",
            src.join("vm.toml").to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
        ],
    ));

    // A second [[disk]] that the manifest does not list.
    let extra = d.join("extra.vmpack");
    rewrite_pack_json(&pack, &extra, |m| add_disk(m, &victim), |_| {});
    let err = fails(&run(d, &["run", extra.to_str().unwrap()]));
    assert!(
        err.contains("extra.vmpack: section 'manifest'")
            && err.contains("[[disk]] 1")
            && err.contains(&victim.display().to_string()),
        "{err}"
    );

    // The only disk replaced by a host file (relative to the pack's folder), its section
    // gone.
    let sub = d.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let replaced = sub.join("replaced.vmpack");
    rewrite_pack(&pack, &replaced, |name, data| match name {
        "disk/0" => None,
        "manifest" => {
            let mut m: Value = serde_json::from_slice(&data).unwrap();
            m["disks"] = json!([]);
            let cfg = m["config"]
                .as_str()
                .unwrap()
                .replace("own.img", "../victim.img");
            m["config"] = json!(cfg);
            Some(serde_json::to_vec(&m).unwrap())
        }
        _ => Some(data),
    });
    let err = fails(&run(d, &["run", replaced.to_str().unwrap()]));
    assert!(
        err.contains("[[disk]] 0") && err.contains("no disk section"),
        "{err}"
    );
    unchanged(&victim, &content);
}

#[test]
fn a_packed_config_cannot_name_a_host_boot_file() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pack = packed(d, "hi", HI_GUEST, "");
    let host = d.join("host.bin");
    std::fs::write(&host, HI_GUEST).unwrap();
    let crafted = d.join("crafted.vmpack");
    rewrite_pack(&pack, &crafted, |name, data| match name {
        "boot/image" => None,
        "manifest" => {
            let mut m: Value = serde_json::from_slice(&data).unwrap();
            m["files"] = json!([]);
            let cfg = m["config"]
                .as_str()
                .unwrap()
                .replace("guest.bin", host.to_str().unwrap());
            m["config"] = json!(cfg);
            Some(serde_json::to_vec(&m).unwrap())
        }
        _ => Some(data),
    });
    let err = fails(&run(d, &["run", crafted.to_str().unwrap()]));
    assert!(
        err.contains("section 'manifest'") && err.contains(&format!("image '{}'", host.display())),
        "{err}"
    );
}

#[test]
fn a_vmstate_with_a_short_kvm_structure_is_refused() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // kvm-bindings would zero-pad the missing bytes of the local APIC.
    let short = dir.path().join("short-lapic.vmpack");
    rewrite_pack_json(
        &old_pack(),
        &short,
        |_| {},
        |s| {
            s["vcpus"][0]["lapic"]
                .as_array_mut()
                .unwrap()
                .truncate(1000);
        },
    );
    for stdin in [false, true] {
        let err = fails(&restore(dir.path(), &short, stdin));
        assert!(
            err.contains("section 'vmstate'")
                && err.contains("lapic: 1000 bytes where kvm_lapic_state has 1024"),
            "{err}"
        );
    }
}

#[test]
fn a_restored_queue_larger_than_the_device_allows_is_refused() {
    if !common::kvm_available("pack trust tests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let huge = d.join("huge-queue.vmpack");
    rewrite_pack_json(
        &old_pack(),
        &huge,
        |_| {},
        |s| {
            let q = &mut s["devices"]["virtio_blk"][0]["transport"]["queues"][0];
            q["max_size"] = json!(32768);
            q["size"] = json!(32768);
        },
    );
    let err = fails(&restore(d, &huge, false));
    assert!(
        err.contains("virtqueue 0: maximum size 32768 where the device's is 256"),
        "{err}"
    );
    // The device's own maximum, but a queue size above it.
    rewrite_pack_json(
        &old_pack(),
        &huge,
        |_| {},
        |s| s["devices"]["virtio_blk"][0]["transport"]["queues"][0]["size"] = json!(512),
    );
    let err = fails(&restore(d, &huge, false));
    assert!(err.contains("virtqueue 0: size 512"), "{err}");
    // Features the device never offered (VIRTIO_RING_F_INDIRECT_DESC, bit 28).
    rewrite_pack_json(
        &old_pack(),
        &huge,
        |_| {},
        |s| {
            let t = &mut s["devices"]["virtio_blk"][0]["transport"];
            t["acked_features"] = json!((1u64 << 32) | (1 << 28));
        },
    );
    let err = fails(&restore(d, &huge, false));
    assert!(err.contains("never offered (0x10000000)"), "{err}");
}
