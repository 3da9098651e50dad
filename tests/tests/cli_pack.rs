//! pack / inspect / verify / unpack through the real `vmpack` binary.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

fn check_unpacked(src: &Path, out: &Path, qcow2: bool) {
    same_file(&src.join("guests/counter.bin"), &out.join("counter.bin"));
    same_file(&src.join("data.img"), &out.join("data.img"));
    let cfg = std::fs::read_to_string(out.join("vm.toml")).unwrap();
    assert!(cfg.contains("image = \"counter.bin\""), "{cfg}");
    assert!(cfg.contains("path = \"data.img\""), "{cfg}");
    if qcow2 {
        assert!(cfg.contains("path = \"root.qcow2\""), "{cfg}");
        let info = qemu_img(&["info", out.join("root.qcow2").to_str().unwrap()]);
        assert!(info.contains("file format: qcow2"), "{info}");
        qemu_img(&["check", out.join("root.qcow2").to_str().unwrap()]);
        qemu_img(&[
            "compare",
            src.join("root.qcow2").to_str().unwrap(),
            out.join("root.qcow2").to_str().unwrap(),
        ]);
    }
    // The unpacked raw disk stays sparse: far less allocated than its 64 MiB.
    let m = std::fs::metadata(out.join("data.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 16 << 20,
        "unpacked raw disk is not sparse"
    );
    // The unpacked folder is itself a valid config for pack.
    let again = out.join("again.vmpack");
    ok(&run(
        out,
        &["pack", "vm.toml", "-o", again.to_str().unwrap(), "--quiet"],
    ));
}

#[test]
fn roundtrip_every_compression() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let qcow2 = flat_vm(&src, true);
    for (i, comp) in ["none", "deflate", "zstd"].iter().enumerate() {
        for aligned in [false, true] {
            let pack = t.path().join(format!("p-{comp}-{aligned}.vmpack"));
            let mut args = vec![
                "pack",
                "vm.toml",
                "-o",
                pack.to_str().unwrap(),
                "--compress",
                comp,
            ];
            if aligned {
                args.push("--aligned");
            }
            let out = ok(&run(&src, &args));
            assert!(out.contains("root digest"), "{out}");

            let text = ok(&run(t.path(), &["inspect", pack.to_str().unwrap()]));
            for want in [
                "boot/image",
                "disk/0",
                "manifest",
                "counter.bin",
                "data.img",
                "root digest",
            ] {
                assert!(text.contains(want), "inspect lacks {want}:\n{text}");
            }
            let js: serde_json::Value = serde_json::from_str(&ok(&run(
                t.path(),
                &["inspect", "--json", pack.to_str().unwrap()],
            )))
            .unwrap();
            assert_eq!(js["aligned"], aligned);
            assert_eq!(js["manifest"]["format"], "vmpack");
            assert_eq!(js["manifest"]["disks"][0]["virtual_size"], 64 << 20);
            assert_eq!(js["manifest"]["files"][0]["size"], FLAT_GUEST.len());
            assert!(js["manifest"]["created"].as_str().unwrap().ends_with('Z'));
            assert!(js["manifest"]["host"]["vendor"].as_str().unwrap().len() == 12);
            let disk = js["sections"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "disk/0")
                .unwrap();
            // 64 chunks of 1 MiB, of which at most 6 hold data.
            assert_eq!(disk["chunks"], 64);
            assert!(disk["zero_chunks"].as_u64().unwrap() >= 58, "{disk}");
            if *comp == "none" {
                assert!(disk["stored_bytes"].as_u64().unwrap() >= 3 << 20);
            }

            let v = ok(&run(t.path(), &["verify", pack.to_str().unwrap()]));
            assert!(v.starts_with("OK "), "{v}");
            let digest = js["root_digest"].as_str().unwrap();
            assert!(v.contains(digest), "{v}");

            let dir = t.path().join(format!("out-{i}-{aligned}"));
            ok(&run(
                t.path(),
                &[
                    "unpack",
                    pack.to_str().unwrap(),
                    "-o",
                    dir.to_str().unwrap(),
                ],
            ));
            check_unpacked(&src, &dir, qcow2);
        }
    }
}

#[test]
fn stdout_stream_into_verify_and_unpack() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let qcow2 = flat_vm(&src, true);
    // A real pipe: pack -o - | vmpack verify -
    let mut packer = Command::new(vmpack())
        .current_dir(&src)
        .args(["pack", "vm.toml", "-o", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let verify = Command::new(vmpack())
        .args(["verify", "-"])
        .stdin(Stdio::from(packer.stdout.take().unwrap()))
        .output()
        .unwrap();
    let p = packer.wait_with_output().unwrap();
    assert!(p.status.success(), "{}", stderr(&p));
    // The summary goes to stderr when the pack goes to stdout.
    assert!(stderr(&p).contains("root digest"), "{}", stderr(&p));
    let v = ok(&verify);
    assert!(v.starts_with("OK <stdin>"), "{v}");

    // The same bytes unpack from a pipe and from a file identically.
    let bytes = run(&src, &["pack", "vm.toml", "-o", "-", "--quiet"]);
    let bytes = {
        assert!(bytes.status.success(), "{}", stderr(&bytes));
        bytes.stdout
    };
    let dir = t.path().join("from-pipe");
    ok(&run_with_stdin(
        t.path(),
        &["unpack", "-", "-o", dir.to_str().unwrap()],
        &bytes,
    ));
    check_unpacked(&src, &dir, qcow2);
    let file = t.path().join("p.vmpack");
    std::fs::write(&file, &bytes).unwrap();
    let v = ok(&run(t.path(), &["verify", file.to_str().unwrap()]));
    let vs = ok(&run_with_stdin(t.path(), &["verify", "-"], &bytes));
    let digest = |s: &str| s.rsplit(' ').next().unwrap().trim().to_string();
    assert_eq!(digest(&v), digest(&vs));
}

/// Offset of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn flipped_byte_is_named_and_truncation_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    flat_vm(&src, false);
    let pack = t.path().join("p.vmpack");
    ok(&run(
        &src,
        &[
            "pack",
            "vm.toml",
            "-o",
            pack.to_str().unwrap(),
            "--compress",
            "none",
        ],
    ));
    let good = std::fs::read(&pack).unwrap();

    // Damage the raw disk's data chunk (uncompressed, so the marker is in the file).
    let mut bad = good.clone();
    let at = find(&bad, b"RAW-DISK-MARKER:").expect("marker stored verbatim") + 1000;
    bad[at] ^= 0x40;
    let damaged = t.path().join("damaged.vmpack");
    std::fs::write(&damaged, &bad).unwrap();
    let err = fails(&run(t.path(), &["verify", damaged.to_str().unwrap()]));
    assert!(err.contains("damaged.vmpack"), "{err}");
    assert!(err.contains("section 'disk/0' chunk 1"), "{err}");
    let err = fails(&run_with_stdin(t.path(), &["verify", "-"], &bad));
    assert!(err.contains("section 'disk/0' chunk 1"), "{err}");
    // Unpacking damaged data fails and leaves no output folder.
    let out = t.path().join("out");
    fails(&run(
        t.path(),
        &[
            "unpack",
            damaged.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    ));
    assert!(!out.exists());
    fails(&run_with_stdin(
        t.path(),
        &["unpack", "-", "-o", out.to_str().unwrap()],
        &bad,
    ));
    assert!(!out.exists());

    // Truncated anywhere: refused by every reader, no panic.
    for cut in [good.len() - 1, good.len() / 2, 100, 7, 0] {
        let tr = t.path().join("trunc.vmpack");
        std::fs::write(&tr, &good[..cut]).unwrap();
        for cmd in ["verify", "inspect"] {
            let err = fails(&run(t.path(), &[cmd, tr.to_str().unwrap()]));
            assert!(err.contains("trunc.vmpack"), "{cmd} at {cut}: {err}");
        }
        fails(&run_with_stdin(t.path(), &["verify", "-"], &good[..cut]));
        fails(&run(
            t.path(),
            &["unpack", tr.to_str().unwrap(), "-o", out.to_str().unwrap()],
        ));
        assert!(!out.exists());
    }
    // Not a pack at all.
    let err = fails(&run(
        t.path(),
        &["verify", src.join("vm.toml").to_str().unwrap()],
    ));
    assert!(err.contains("vm.toml"), "{err}");
}

#[test]
fn bad_inputs_are_refused_with_location() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    flat_vm(&src, false);
    let cfg = std::fs::read_to_string(src.join("vm.toml")).unwrap();
    std::fs::write(
        src.join("bad.toml"),
        cfg.replace("memory_mib = 16\n", "memory_mib = 16\nmemroy = 3\n"),
    )
    .unwrap();
    let err = fails(&run(&src, &["pack", "bad.toml", "-o", "x.vmpack"]));
    assert!(err.contains("bad.toml:3:1"), "{err}");
    assert!(err.contains("memroy"), "{err}");
    assert!(!src.join("x.vmpack").exists());

    std::fs::write(
        src.join("missing.toml"),
        cfg.replace("data.img", "nope.img"),
    )
    .unwrap();
    let err = fails(&run(&src, &["pack", "missing.toml", "-o", "x.vmpack"]));
    assert!(err.contains("nope.img"), "{err}");
    assert!(!src.join("x.vmpack").exists());
    // No temporary left behind either.
    let leftovers: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A level outside the codec's range is a usage error (status 2), as in `save`.
    let o = run(
        &src,
        &[
            "pack",
            "vm.toml",
            "-o",
            "x.vmpack",
            "--compress",
            "deflate",
            "--level",
            "30",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--level 30"), "{}", stderr(&o));
    let o = run(
        &src,
        &["pack", "vm.toml", "-o", "x.vmpack", "--compress", "lzma"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // Unpack into a non-empty folder is refused before anything is written.
    ok(&run(
        &src,
        &["pack", "vm.toml", "-o", "x.vmpack", "--quiet"],
    ));
    let err = fails(&run(&src, &["unpack", "x.vmpack", "-o", "guests"]));
    assert!(err.contains("not empty"), "{err}");
    // An empty folder is fine.
    std::fs::create_dir(src.join("empty")).unwrap();
    ok(&run(
        &src,
        &["unpack", "x.vmpack", "-o", "empty", "--quiet"],
    ));
    assert!(src.join("empty/vm.toml").exists());
}

#[test]
fn quiet_prints_nothing() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    flat_vm(&src, true);
    for args in [
        vec!["pack", "vm.toml", "-o", "q.vmpack", "--quiet"],
        vec!["verify", "q.vmpack", "--quiet"],
        vec!["unpack", "q.vmpack", "-o", "qd", "--quiet"],
        vec!["export", "q.vmpack", "--format", "raw", "-o", "qe", "-q"],
    ] {
        let o = run(&src, &args);
        ok(&o);
        assert!(
            o.stdout.is_empty() && o.stderr.is_empty(),
            "{args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}
