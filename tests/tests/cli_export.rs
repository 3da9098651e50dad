//! export and import through the real `vmpack` binary, checked with qemu-img.

mod common;

use common::*;

#[test]
fn export_raw_and_qcow2_match_sources() {
    if !have_qemu_img() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    assert!(flat_vm(&src, true));
    let pack = t.path().join("p.vmpack");
    ok(&run(
        &src,
        &["pack", "vm.toml", "-o", pack.to_str().unwrap()],
    ));
    for fmt in ["raw", "qcow2"] {
        let out = t.path().join(format!("exp-{fmt}"));
        ok(&run(
            t.path(),
            &[
                "export",
                pack.to_str().unwrap(),
                "--format",
                fmt,
                "-o",
                out.to_str().unwrap(),
            ],
        ));
        let cfg = std::fs::read_to_string(out.join("vm.toml")).unwrap();
        let (d0, d1) = if fmt == "raw" {
            ("data.img", "root.img")
        } else {
            ("data.qcow2", "root.qcow2")
        };
        assert!(cfg.contains(&format!("path = \"{d0}\"")), "{cfg}");
        assert!(cfg.contains(&format!("path = \"{d1}\"")), "{cfg}");
        assert_eq!(
            cfg.matches(&format!("format = \"{fmt}\"")).count(),
            2,
            "{cfg}"
        );
        for (orig, new) in [("data.img", d0), ("root.qcow2", d1)] {
            let new = out.join(new);
            let info = qemu_img(&["info", new.to_str().unwrap()]);
            assert!(info.contains(&format!("file format: {fmt}")), "{info}");
            if fmt == "qcow2" {
                let check = qemu_img(&["check", new.to_str().unwrap()]);
                assert!(check.contains("No errors"), "{check}");
            }
            qemu_img(&[
                "compare",
                src.join(orig).to_str().unwrap(),
                new.to_str().unwrap(),
            ]);
        }
        // The exported folder packs again.
        ok(&run(&out, &["pack", "vm.toml", "-o", "again.vmpack", "-q"]));
    }
}

#[test]
fn import_qcow2_then_export() {
    if !have_qemu_img() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    assert!(flat_vm(&src, true));
    std::fs::write(src.join("vmlinuz"), noise(300_000, 9)).unwrap();
    let pack = t.path().join("imp.vmpack");
    let out = ok(&run(
        &src,
        &[
            "import",
            "root.qcow2",
            "--memory",
            "256",
            "--vcpus",
            "2",
            "--kernel",
            "vmlinuz",
            "--cmdline",
            "console=ttyS0 root=/dev/vda",
            "-o",
            pack.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("'root'"), "{out}");
    let js: serde_json::Value = serde_json::from_str(&ok(&run(
        t.path(),
        &["inspect", "--json", pack.to_str().unwrap()],
    )))
    .unwrap();
    let m = &js["manifest"];
    assert_eq!(m["disks"][0]["format"], "qcow2");
    assert_eq!(m["disks"][0]["virtual_size"], 32 << 20);
    assert_eq!(m["files"][0]["role"], "kernel");
    let cfg = m["config"].as_str().unwrap();
    for want in [
        "name = \"root\"",
        "vcpus = 2",
        "memory_mib = 256",
        "console=ttyS0 root=/dev/vda",
    ] {
        assert!(cfg.contains(want), "{cfg}");
    }
    ok(&run(t.path(), &["verify", pack.to_str().unwrap()]));
    for fmt in ["qcow2", "raw"] {
        let dir = t.path().join(format!("e-{fmt}"));
        ok(&run(
            t.path(),
            &[
                "export",
                pack.to_str().unwrap(),
                "--format",
                fmt,
                "-o",
                dir.to_str().unwrap(),
                "-q",
            ],
        ));
        let disk = dir.join(if fmt == "raw" {
            "root.img"
        } else {
            "root.qcow2"
        });
        if fmt == "qcow2" {
            qemu_img(&["check", disk.to_str().unwrap()]);
        }
        qemu_img(&[
            "compare",
            src.join("root.qcow2").to_str().unwrap(),
            disk.to_str().unwrap(),
        ]);
        same_file(&src.join("vmlinuz"), &dir.join("vmlinuz"));
    }

    // A raw disk imports too, with a flat image as the boot source.
    let p2 = t.path().join("imp2.vmpack");
    ok(&run(
        &src,
        &[
            "import",
            "data.img",
            "--memory",
            "16",
            "--image",
            "guests/counter.bin",
            "--load-address",
            "0x1000",
            "--entry",
            "0x1000",
            "--mode",
            "real",
            "--name",
            "flat",
            "-o",
            p2.to_str().unwrap(),
            "-q",
        ],
    ));
    let dir = t.path().join("e2");
    ok(&run(
        t.path(),
        &[
            "unpack",
            p2.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
            "-q",
        ],
    ));
    same_file(&src.join("data.img"), &dir.join("data.img"));

    // No boot source: refused with what to pass.
    let err = fails(&run(
        &src,
        &["import", "root.qcow2", "--memory", "64", "-o", "x.vmpack"],
    ));
    assert!(err.contains("--kernel") && err.contains("--image"), "{err}");
    // Invalid sizes: refused by the config rules.
    let err = fails(&run(
        &src,
        &[
            "import",
            "root.qcow2",
            "--memory",
            "8",
            "--kernel",
            "vmlinuz",
            "-o",
            "x.vmpack",
        ],
    ));
    assert!(err.contains("memory_mib = 8"), "{err}");
    assert!(!src.join("x.vmpack").exists());
}
