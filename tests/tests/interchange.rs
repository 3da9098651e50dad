//! Export to and import from libvirt, Vagrant, OVA and Firecracker through the real
//! `vmpack` binary, each checked by that ecosystem's own tool (virt-xml-validate, virsh,
//! vagrant, virt-v2v, qemu-img). `scripts/test-all.sh` installs the tools; a missing tool
//! fails the test rather than skipping it.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Asserts that an oracle tool is installed.
#[track_caller]
fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is not installed: scripts/test-all.sh installs it (as root); this test needs it as its oracle"
    );
}

/// Runs a tool, asserts success and returns stdout + stderr.
#[track_caller]
fn tool(cwd: &Path, prog: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let mut c = Command::new(prog);
    c.current_dir(cwd).args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{prog} {args:?} failed:\n{text}");
    text
}

/// A kernel-booting VM: the Debian kernel when fetched (so the exports are real), else a
/// stand-in bzImage-shaped file; a sparse raw disk and a read-only qcow2 disk.
struct Vm {
    dir: PathBuf,
    pack: PathBuf,
    real_kernel: bool,
}

fn linux_out() -> PathBuf {
    samples_dir().join("linux/out")
}

fn make_vm(root: &Path, name: &str, vcpus: u32) -> Vm {
    make_vm_with(root, name, vcpus, "vmlinuz")
}

/// `kernel` is the file of samples/linux/out/ to pack: `vmlinuz` (bzImage) or `vmlinux`
/// (its ELF payload, which QEMU boots without the minutes of decompression this host's
/// emulated KVM needs).
fn make_vm_with(root: &Path, name: &str, vcpus: u32, kernel: &str) -> Vm {
    let dir = root.join("src");
    std::fs::create_dir_all(&dir).unwrap();
    let out = linux_out();
    let real_kernel = out.join(kernel).exists() && out.join("initrd.img").exists();
    if real_kernel {
        std::fs::copy(out.join(kernel), dir.join("vmlinuz")).unwrap();
        std::fs::copy(out.join("initrd.img"), dir.join("initrd.img")).unwrap();
    } else {
        std::fs::write(dir.join("vmlinuz"), noise(200_000, 5)).unwrap();
        std::fs::write(dir.join("initrd.img"), noise(9000, 6)).unwrap();
    }
    let mut marker = b"ROOT-DISK".to_vec();
    marker.extend(noise(300_000, 7));
    sparse_raw(
        &dir.join("root.img"),
        48 << 20,
        &[
            (0, marker),
            (30 << 20, noise(2 << 20, 8)),
            ((48 << 20) - 512, vec![0x5a; 512]),
        ],
    );
    let raw = dir.join("data.raw");
    sparse_raw(&raw, 16 << 20, &[(4096, noise(1 << 20, 9))]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        dir.join("data.qcow2").to_str().unwrap(),
    ]);
    std::fs::remove_file(&raw).unwrap();
    std::fs::write(
        dir.join("vm.toml"),
        format!(
            "name = \"{name}\"\nvcpus = {vcpus}\nmemory_mib = 256\n\n[kernel]\npath = \"vmlinuz\"\ninitrd = \"initrd.img\"\n\
             cmdline = \"console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 nokaslr\"\n\n\
             [[disk]]\npath = \"root.img\"\n\n[[disk]]\npath = \"data.qcow2\"\nformat = \"qcow2\"\nread_only = true\n"
        ),
    )
    .unwrap();
    let pack = root.join(format!("{name}.vmpack"));
    ok(&run(
        &dir,
        &["pack", "vm.toml", "-o", pack.to_str().unwrap(), "-q"],
    ));
    Vm {
        dir,
        pack,
        real_kernel,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The config a pack holds, as JSON-ish TOML text parsed by the formats crate.
fn pack_config(pack: &Path) -> vmpack_formats::config::VmConfig {
    let js: serde_json::Value =
        serde_json::from_str(&ok(&run(Path::new("/"), &["inspect", "--json", s(pack)]))).unwrap();
    vmpack_formats::config::VmConfig::parse(
        js["manifest"]["config"].as_str().unwrap(),
        Path::new("/x/vm.toml"),
    )
    .unwrap()
}

/// pack → export → import → unpack: the disks hold identical bytes (compared with
/// `qemu-img compare`, which reads any format) and the config matches field by field,
/// except what the format cannot carry (`same_name`, `same_ro`).
fn check_roundtrip(vm: &Vm, imported: &Path, work: &Path, same_name: bool, same_ro: bool) {
    let a = pack_config(&vm.pack);
    let b = pack_config(imported);
    if same_name {
        assert_eq!(a.name, b.name);
    }
    assert_eq!(a.vcpus, b.vcpus, "vcpus");
    assert_eq!(a.memory_mib, b.memory_mib, "memory_mib");
    assert_eq!(a.cpu_template, b.cpu_template, "cpu_template");
    let (ka, kb) = (a.kernel.as_ref().unwrap(), b.kernel.as_ref().unwrap());
    assert_eq!(ka.cmdline, kb.cmdline, "cmdline");
    assert_eq!(ka.initrd.is_some(), kb.initrd.is_some(), "initrd");
    assert_eq!(a.disks.len(), b.disks.len(), "disk count");
    let un = work.join(format!(
        "unpacked-{}",
        imported.file_stem().unwrap().to_string_lossy()
    ));
    ok(&run(work, &["unpack", s(imported), "-o", s(&un), "-q"]));
    for (da, db) in a.disks.iter().zip(&b.disks) {
        if same_ro {
            assert_eq!(
                da.read_only,
                db.read_only,
                "read_only of {}",
                da.path.display()
            );
        }
        let src = vm.dir.join(da.path.file_name().unwrap());
        let dst = un.join(db.path.file_name().unwrap());
        qemu_img(&["compare", s(&src), s(&dst)]);
    }
    same_file(
        &vm.dir.join("initrd.img"),
        &un.join(kb.initrd.as_ref().unwrap().file_name().unwrap()),
    );
}

fn import(work: &Path, src: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["import", s(src), "-o", s(out)];
    args.extend_from_slice(extra);
    let o = run(work, &args);
    ok(&o);
    stderr(&o)
}

// ---------------------------------------------------------------- libvirt

const LIBVIRT: &str = "qemu:///system";

/// Starts virtlogd and libvirtd (no systemd needed) unless they already answer.
fn libvirtd() {
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null").is_ok_and(|m| m.file_type().is_char_device()),
        "/dev/null on this host is not a device (something replaced it with a regular file); libvirt cannot start domains: restore it with `rm /dev/null && mknod -m 666 /dev/null c 1 3`"
    );
    need("virsh");
    need("libvirtd");
    need("virtlogd");
    let answers = || {
        Command::new("virsh")
            .args(["-c", LIBVIRT, "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if answers() {
        return;
    }
    for d in ["virtlogd", "libvirtd"] {
        // Each daemonizes itself; a second one started concurrently exits on its pid file.
        let _ = Command::new(d).arg("-d").status();
    }
    let t = Instant::now();
    while !answers() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "libvirtd did not answer within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn virsh(args: &[&str]) -> String {
    let mut a = vec!["-c", LIBVIRT];
    a.extend_from_slice(args);
    tool(Path::new("/"), "virsh", &a, &[])
}

/// Undefines (and stops) a domain when dropped, so a failing test leaves nothing behind.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        for cmd in ["destroy", "undefine"] {
            let _ = Command::new("virsh")
                .args(["-c", LIBVIRT, cmd, &self.0])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn libvirt_export_is_valid_defined_and_imports_back() {
    need("virt-xml-validate");
    libvirtd();
    let t = tempfile::tempdir().unwrap();
    let name = format!("vmpack-ic-{}", std::process::id());
    let vm = make_vm(t.path(), &name, 2);
    let out = t.path().join("lv");
    let text = ok(&run(
        t.path(),
        &["export", s(&vm.pack), "--format", "libvirt", "-o", s(&out)],
    ));
    assert!(text.contains("virsh define"), "{text}");
    let xml = std::fs::read_to_string(out.join("domain.xml")).unwrap();
    for want in [
        "<memory unit=\"MiB\">256</memory>",
        "<vcpu>2</vcpu>",
        "host-passthrough",
        "bus=\"virtio\"",
        "<readonly/>",
        "console=ttyS0",
        "<kernel>",
        "<initrd>",
        "type=\"qcow2\"",
    ] {
        assert!(xml.contains(want), "{want} missing:\n{xml}");
    }
    tool(
        t.path(),
        "virt-xml-validate",
        &[s(&out.join("domain.xml")), "domain"],
        &[],
    );
    virsh(&["define", s(&out.join("domain.xml"))]);
    let _d = Domain(name.clone());
    let info = virsh(&["dominfo", &name]);
    assert!(info.contains("CPU(s):         2"), "{info}");
    assert!(info.contains("262144 KiB"), "{info}");
    // Round trip through our own XML ...
    let back = t.path().join("back.vmpack");
    import(t.path(), &out.join("domain.xml"), &back, &["-q"]);
    check_roundtrip(&vm, &back, t.path(), true, true);
    // ... and through libvirt's rewrite of it (`virsh dumpxml` adds controllers, inputs,
    // a memballoon and more): implicit devices are not reported as dropped.
    let dumped = out.join("dumped.xml");
    std::fs::write(&dumped, virsh(&["dumpxml", &name])).unwrap();
    let back2 = t.path().join("back2.vmpack");
    let err = import(t.path(), &dumped, &back2, &["--strict"]);
    assert!(!err.contains("warning"), "{err}");
    check_roundtrip(&vm, &back2, t.path(), true, true);
}

#[test]
fn libvirt_boots_the_exported_linux() {
    if !kvm_available("the libvirt boot of the exported Linux") {
        return;
    }
    assert!(
        linux_out().join("vmlinux").exists(),
        "samples/linux/fetch-kernel.sh has not fetched the Debian kernel and extracted its vmlinux (scripts/test-all.sh runs it)"
    );
    libvirtd();
    let t = tempfile::tempdir().unwrap();
    // QEMU runs as libvirt's own user: it must reach the files.
    std::fs::set_permissions(
        t.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let name = format!("vmpack-boot-{}", std::process::id());
    let vm = make_vm_with(t.path(), &name, 1, "vmlinux");
    let out = t.path().join("lv");
    ok(&run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "libvirt",
            "-o",
            s(&out),
            "-q",
        ],
    ));
    tool(t.path(), "chmod", &["-R", "a+rX", s(&out)], &[]);
    virsh(&["define", s(&out.join("domain.xml"))]);
    let _d = Domain(name.clone());
    virsh(&["start", &name]);
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device(),
        "/dev/null is no longer a device after starting the domain"
    );
    // On this host's emulated KVM the banner of the ELF kernel appears after about 40 s
    // (a bzImage needs 3-5 minutes of decompression first); bound the wait.
    let log = out.join("serial.log");
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Linux version") {
            eprintln!("banner after {:.0} s", t0.elapsed().as_secs_f64());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(420),
            "no kernel banner in {} after 7 minutes:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------- OVA

#[test]
fn ova_export_is_read_by_qemu_img_and_virt_v2v_and_imports_back() {
    need("virt-v2v");
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "ovatest", 2);
    {
        let version = "1.0";
        let ova = t.path().join(format!("vm-{version}.ova"));
        ok(&run(
            t.path(),
            &[
                "export",
                s(&vm.pack),
                "--format",
                "ova",
                "-o",
                s(&ova),
                "-q",
            ],
        ));
        let x = t.path().join(format!("x-{version}"));
        std::fs::create_dir(&x).unwrap();
        let list = tool(&x, "tar", &["-xvf", s(&ova)], &[]);
        let names: Vec<&str> = list.lines().collect();
        assert_eq!(names[0], "ovatest.ovf", "{list}");
        assert_eq!(names.last(), Some(&"ovatest.mf"), "{list}");
        // The manifest's digests, recomputed.
        let mf = std::fs::read_to_string(x.join("ovatest.mf")).unwrap();
        assert_eq!(mf.lines().count(), names.len() - 1, "{mf}");
        for line in mf.lines() {
            let (l, digest) = line.split_once(")= ").unwrap();
            let file = l.strip_prefix("SHA256(").unwrap();
            use sha2::Digest;
            let actual = hex::encode(sha2::Sha256::digest(std::fs::read(x.join(file)).unwrap()));
            assert_eq!(actual, digest, "{file}");
        }
        for (vmdk, orig) in [("root.vmdk", "root.img"), ("data.vmdk", "data.qcow2")] {
            let info = qemu_img(&["info", s(&x.join(vmdk))]);
            assert!(info.contains("streamOptimized"), "{info}");
            let check = qemu_img(&["check", s(&x.join(vmdk))]);
            assert!(check.contains("No errors"), "{check}");
            qemu_img(&["compare", s(&vm.dir.join(orig)), s(&x.join(vmdk))]);
        }
        let v2v = tool(
            t.path(),
            "virt-v2v",
            &["-i", "ova", s(&ova), "--print-source"],
            &[],
        );
        assert!(v2v.contains("memory: 268435456 (bytes)"), "{v2v}");
        assert!(v2v.contains("nr vCPUs: 2"), "{v2v}");
        let disks = v2v
            .split("disks:")
            .nth(1)
            .unwrap()
            .split("removable media:")
            .next()
            .unwrap();
        assert_eq!(
            disks.lines().filter(|l| !l.trim().is_empty()).count(),
            2,
            "{v2v}"
        );
        let back = t.path().join(format!("back-{version}.vmpack"));
        import(t.path(), &ova, &back, &["--strict", "-q"]);
        check_roundtrip(&vm, &back, t.path(), true, true);
    }
}

#[test]
fn ovf_with_vmdks_made_by_qemu_img_imports() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "qemuvmdk", 1);
    let ova = t.path().join("vm.ova");
    ok(&run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "ova",
            "-o",
            s(&ova),
            "-q",
        ],
    ));
    let x = t.path().join("x");
    std::fs::create_dir(&x).unwrap();
    tool(&x, "tar", &["-xf", s(&ova)], &[]);
    // Replace our VMDKs with QEMU's: stream-optimized for one, monolithicSparse (QEMU's
    // default subformat, uncompressed grains) for the other; drop the now stale manifest.
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&vm.dir.join("root.img")),
        s(&x.join("root.vmdk")),
    ]);
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        s(&vm.dir.join("data.qcow2")),
        s(&x.join("data.vmdk")),
    ]);
    std::fs::remove_file(x.join("qemuvmdk.mf")).unwrap();
    let back = t.path().join("back.vmpack");
    let err = import(t.path(), &x.join("qemuvmdk.ovf"), &back, &[]);
    assert!(err.contains("no .mf manifest"), "{err}");
    check_roundtrip(&vm, &back, t.path(), true, true);
}

// ---------------------------------------------------------------- Vagrant

#[test]
fn vagrant_box_is_added_by_vagrant_and_imports_back() {
    need("vagrant");
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "boxtest", 2);
    let bx = t.path().join("vm.box");
    let o = run(
        t.path(),
        &["export", s(&vm.pack), "--format", "vagrant", "-o", s(&bx)],
    );
    ok(&o);
    assert!(stderr(&o).contains("read-only"), "{}", stderr(&o));
    let home = t.path().join("vagrant-home");
    let env = [("VAGRANT_HOME", home.as_path())];
    let added = tool(
        t.path(),
        "vagrant",
        &["box", "add", "--name", "vmpack-boxtest", s(&bx)],
        &env,
    );
    assert!(
        added.contains("Successfully added box 'vmpack-boxtest'"),
        "{added}"
    );
    assert!(added.contains("'libvirt'"), "{added}");
    let list = tool(t.path(), "vagrant", &["box", "list"], &env);
    assert!(list.contains("vmpack-boxtest (libvirt"), "{list}");
    let back = t.path().join("back.vmpack");
    import(t.path(), &bx, &back, &["--strict", "-q"]);
    check_roundtrip(&vm, &back, t.path(), true, false);
}

#[test]
fn vagrant_package_layout_imports() {
    // What `vagrant package` writes for the libvirt provider: a gzipped tar of
    // metadata.json, a Vagrantfile without memory settings, and box.img.
    let t = tempfile::tempdir().unwrap();
    let b = t.path().join("b");
    std::fs::create_dir(&b).unwrap();
    let raw = t.path().join("d.raw");
    sparse_raw(&raw, 40 << 20, &[(1 << 20, noise(500_000, 11))]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&b.join("box.img")),
    ]);
    std::fs::write(
        b.join("metadata.json"),
        "{\n  \"provider\": \"libvirt\",\n  \"format\": \"qcow2\",\n  \"virtual_size\": 1\n}\n",
    )
    .unwrap();
    std::fs::write(b.join("Vagrantfile"), "Vagrant.configure(\"2\") do |config|\n  config.vm.provider :libvirt do |libvirt|\n    libvirt.driver = \"kvm\"\n  end\nend\n").unwrap();
    let bx = t.path().join("packaged.box");
    tool(
        &b,
        "tar",
        &["czf", s(&bx), "metadata.json", "Vagrantfile", "box.img"],
        &[],
    );
    std::fs::write(t.path().join("vmlinuz"), noise(100_000, 12)).unwrap();
    let out = t.path().join("p.vmpack");
    // No kernel in the box: it boots through firmware, which vmboot does not do.
    let err = fails(&run(t.path(), &["import", s(&bx), "-o", s(&out)]));
    assert!(err.contains("--kernel"), "{err}");
    assert!(!out.exists());
    let err = import(
        t.path(),
        &bx,
        &out,
        &[
            "--kernel",
            "vmlinuz",
            "--cmdline",
            "console=ttyS0 root=/dev/vda",
        ],
    );
    assert!(err.contains("512 MiB"), "{err}");
    let c = pack_config(&out);
    assert_eq!((c.memory_mib, c.vcpus), (512, 1));
    assert_eq!(c.disks.len(), 1);
    let un = t.path().join("u");
    ok(&run(t.path(), &["unpack", s(&out), "-o", s(&un), "-q"]));
    qemu_img(&[
        "compare",
        s(&raw),
        s(&un.join(c.disks[0].path.file_name().unwrap())),
    ]);
    let err = fails(&run(
        t.path(),
        &[
            "import",
            s(&bx),
            "-o",
            s(&t.path().join("q.vmpack")),
            "--kernel",
            "vmlinuz",
            "--strict",
        ],
    ));
    assert!(err.contains("--strict"), "{err}");
}

// ---------------------------------------------------------------- Firecracker

#[test]
fn firecracker_export_follows_the_api_and_imports_back() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "fctest", 2);
    let out = t.path().join("fc");
    let o = run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "firecracker",
            "-o",
            s(&out),
            "--json",
        ],
    );
    let js: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert!(
        js["next"]
            .as_str()
            .unwrap()
            .contains("firecracker --no-api --config-file vm.json"),
        "{js}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vm.json")).unwrap()).unwrap();
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 256);
    assert_eq!(cfg["boot-source"]["kernel_image_path"], "vmlinux");
    assert_eq!(cfg["boot-source"]["initrd_path"], "initrd.img");
    assert!(cfg["boot-source"]["boot_args"]
        .as_str()
        .unwrap()
        .contains("console=ttyS0"));
    let drives = cfg["drives"].as_array().unwrap();
    assert_eq!(drives.len(), 2);
    assert_eq!(drives[1]["is_read_only"], true);
    for d in drives {
        // Firecracker wants raw images.
        let info = qemu_img(&["info", s(&out.join(d["path_on_host"].as_str().unwrap()))]);
        assert!(info.contains("file format: raw"), "{info}");
    }
    if vm.real_kernel {
        // The ELF payload, byte for byte what fetch-kernel.sh extracts with lz4(1).
        let elf = linux_out().join("vmlinux");
        if elf.exists() {
            same_file(&elf, &out.join("vmlinux"));
        }
        assert_eq!(
            &std::fs::read(out.join("vmlinux")).unwrap()[..4],
            b"\x7fELF"
        );
    }
    let back = t.path().join("back.vmpack");
    import(t.path(), &out.join("vm.json"), &back, &["--strict", "-q"]);
    check_roundtrip(&vm, &back, t.path(), false, true);
    // Odd vCPU counts above 1 are refused, as Firecracker would.
    let vm3 = make_vm(&t.path().join("three"), "fc3", 3);
    let err = fails(&run(
        t.path(),
        &[
            "export",
            s(&vm3.pack),
            "--format",
            "firecracker",
            "-o",
            s(&t.path().join("fc3")),
        ],
    ));
    assert!(err.contains("even number"), "{err}");
    assert!(!t.path().join("fc3").exists());
}

// ---------------------------------------------------------------- options and bad input

#[test]
fn options_for_one_format_are_refused_for_others() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "opts", 1);
    let o = run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "ova",
            "--disk-format",
            "raw",
            "-o",
            "x.ova",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--disk-format applies to --format libvirt only"),
        "{}",
        stderr(&o)
    );
    let o = run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "raw",
            "--disk-format",
            "raw",
            "-o",
            "x",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let o = run(
        t.path(),
        &[
            "import",
            s(&vm.dir.join("root.img")),
            "--memory",
            "64",
            "--kernel",
            s(&vm.dir.join("vmlinuz")),
            "--strict",
            "-o",
            "y.vmpack",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!t.path().join("x.ova").exists() && !t.path().join("y.vmpack").exists());
    // A flat guest has no counterpart in these ecosystems.
    let f = t.path().join("flat");
    flat_vm(&f, false);
    ok(&run(&f, &["pack", "vm.toml", "-o", "flat.vmpack", "-q"]));
    let err = fails(&run(
        &f,
        &["export", "flat.vmpack", "--format", "libvirt", "-o", "lv"],
    ));
    assert!(err.contains("flat image"), "{err}");
}

/// Files in `dir` (recursively), to prove a refused import wrote nothing.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            v.extend(tree(&p));
        }
        v.push(p);
    }
    v.sort();
    v
}

fn raw_header(name: &str, size: u64, kind: u8, link: &str) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// A tar assembled by hand (tar tools refuse to write some of these names).
fn raw_tar(members: &[(&str, Vec<u8>, u8, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (name, data, kind, link) in members {
        v.extend(raw_header(name, data.len() as u64, *kind, link));
        v.extend_from_slice(data);
        v.resize(v.len().div_ceil(512) * 512, 0);
    }
    v.resize(v.len() + 1024, 0);
    v
}

#[test]
fn hostile_inputs_are_refused_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "hostile", 1);
    let ova = t.path().join("good.ova");
    ok(&run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "ova",
            "-o",
            s(&ova),
            "-q",
        ],
    ));
    let x = t.path().join("x");
    std::fs::create_dir(&x).unwrap();
    tool(&x, "tar", &["-xf", s(&ova)], &[]);
    let member = |n: &str| std::fs::read(x.join(n)).unwrap();
    let ovf = member("hostile.ovf");
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let before = tree(t.path());
    let refuse = |name: &str, bytes: Vec<u8>, want: &str| {
        let p = work.join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = work.join("out.vmpack");
        let err = fails(&run(&work, &["import", s(&p), "-o", s(&out)]));
        assert!(err.contains(want), "{name}: expected '{want}' in:\n{err}");
        assert!(err.starts_with("vmpack: "), "{err}");
        assert!(!out.exists(), "{name}: output written");
        std::fs::remove_file(&p).unwrap();
        let now: Vec<_> = tree(&work);
        assert!(now.is_empty(), "{name}: left {now:?}");
    };
    // Tar path traversal and absolute names.
    refuse(
        "trav.ova",
        raw_tar(&[
            ("hostile.ovf", ovf.clone(), b'0', ""),
            ("../../evil", b"x".to_vec(), b'0', ""),
        ]),
        "not a plain file name",
    );
    refuse(
        "abs.ova",
        raw_tar(&[
            ("hostile.ovf", ovf.clone(), b'0', ""),
            ("/tmp/evil", b"x".to_vec(), b'0', ""),
        ]),
        "not a plain file name",
    );
    // A manifest that lies about a disk.
    let mut root = member("root.vmdk");
    let mf = String::from_utf8(member("hostile.mf")).unwrap();
    let n = root.len();
    root[n / 2] ^= 0xff;
    let members = |root: Vec<u8>, mf: String| {
        raw_tar(&[
            ("hostile.ovf", ovf.clone(), b'0', ""),
            ("root.vmdk", root, b'0', ""),
            ("data.vmdk", member("data.vmdk"), b'0', ""),
            ("vmlinuz", member("vmlinuz"), b'0', ""),
            ("initrd.img", member("initrd.img"), b'0', ""),
            ("hostile.mf", mf.into_bytes(), b'0', ""),
        ])
    };
    refuse(
        "lie.ova",
        members(root.clone(), mf.clone()),
        "SHA256(root.vmdk)",
    );
    // A VMDK whose grain table points outside the file (manifest updated to match, so the
    // VMDK reader itself must catch it).
    let mut bad = member("root.vmdk");
    let len = bad.len();
    let gd = u64::from_le_bytes(bad[len - 1024 + 56..len - 1024 + 64].try_into().unwrap()) as usize
        * 512;
    bad[gd..gd + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    let digest = |b: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b))
    };
    let old = digest(&member("root.vmdk"));
    refuse(
        "gt.ova",
        members(bad.clone(), mf.replace(&old, &digest(&bad))),
        "outside the file",
    );
    // A lying OVF capacity.
    let ovf_text = String::from_utf8(ovf.clone()).unwrap();
    let lying = ovf_text.replacen(
        &format!("ovf:capacity=\"{}\"", 48 << 20),
        &format!("ovf:capacity=\"{}\"", 64 << 20),
        1,
    );
    assert_ne!(lying, ovf_text);
    let mf2 = mf.replace(&digest(&ovf), &digest(lying.as_bytes()));
    let t2 = raw_tar(&[
        ("hostile.ovf", lying.into_bytes(), b'0', ""),
        ("root.vmdk", member("root.vmdk"), b'0', ""),
        ("data.vmdk", member("data.vmdk"), b'0', ""),
        ("vmlinuz", member("vmlinuz"), b'0', ""),
        ("initrd.img", member("initrd.img"), b'0', ""),
        ("hostile.mf", mf2.into_bytes(), b'0', ""),
    ]);
    refuse("cap.ova", t2, "the VMDK says");
    // A .box with a symlink member.
    refuse(
        "link.box",
        raw_tar(&[
            (
                "metadata.json",
                b"{\"provider\":\"libvirt\"}".to_vec(),
                b'0',
                "",
            ),
            ("box.img", vec![], b'2', "/etc/shadow"),
        ]),
        "symbolic link",
    );
    // libvirt XML naming host devices or files outside its folder.
    let dom = |dev: &str| {
        format!("<domain type='kvm'><name>h</name><memory unit='MiB'>64</memory><os><type>hvm</type><kernel>vmlinuz</kernel></os><devices>{dev}</devices></domain>").into_bytes()
    };
    std::fs::write(work.join("vmlinuz"), b"k").unwrap();
    let refuse_xml = |dev: &str, want: &str| {
        let p = work.join("d.xml");
        std::fs::write(&p, dom(dev)).unwrap();
        let err = fails(&run(&work, &["import", s(&p), "-o", "out.vmpack"]));
        assert!(err.contains(want), "{dev}: {err}");
        assert!(!work.join("out.vmpack").exists());
    };
    refuse_xml("<disk type='block' device='disk'><source dev='/dev/vda'/><target dev='vda' bus='virtio'/></disk>", "/dev/vda");
    refuse_xml(
        "<disk type='file' device='disk'><source file='/etc/passwd'/><target dev='vda'/></disk>",
        "outside the folder",
    );
    refuse_xml("<disk type='file' device='disk'><source file='../src/root.img'/><target dev='vda'/></disk>", "outside the folder");
    refuse_xml("<hostdev mode='subsystem' type='usb'/>", "hostdev");
    std::fs::remove_file(work.join("vmlinuz")).unwrap();
    std::fs::remove_file(work.join("d.xml")).unwrap();
    assert_eq!(
        tree(t.path()),
        before,
        "nothing may appear outside the output"
    );
}

#[test]
fn terabyte_vmdk_without_data_imports_sparse() {
    // A 1 TiB stream-optimized disk with no data: made by QEMU from a sparse file, the OVF
    // written by hand, both in an OVA. Importing must neither allocate nor write a terabyte.
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("big.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&t.path().join("big.vmdk")),
    ]);
    std::fs::remove_file(&raw).unwrap();
    let ovf = format!(
        "<?xml version=\"1.0\"?>\n<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\" xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\">\n\
         <References><File ovf:id=\"f1\" ovf:href=\"big.vmdk\"/></References>\n\
         <DiskSection><Info>d</Info><Disk ovf:diskId=\"d1\" ovf:fileRef=\"f1\" ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte * 2^30\"/></DiskSection>\n\
         <VirtualSystem ovf:id=\"big\"><Info>v</Info><Name>big</Name><VirtualHardwareSection><Info>h</Info>\n\
         <Item><rasd:ElementName>cpu</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>\n\
         <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ElementName>mem</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>64</rasd:VirtualQuantity></Item>\n\
         <Item><rasd:ElementName>disk</rasd:ElementName><rasd:HostResource>ovf:/disk/d1</rasd:HostResource><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>\n\
         </VirtualHardwareSection></VirtualSystem></Envelope>\n",
        1024
    );
    std::fs::write(t.path().join("big.ovf"), ovf).unwrap();
    std::fs::write(t.path().join("vmlinuz"), noise(50_000, 3)).unwrap();
    // As an OVA: the disk is decoded from inside the archive.
    tool(
        t.path(),
        "tar",
        &["cf", "big.ova", "big.ovf", "big.vmdk"],
        &[],
    );
    std::fs::remove_file(t.path().join("big.vmdk")).unwrap();
    let p = t.path().join("big.vmpack");
    let js: serde_json::Value = serde_json::from_str(&ok(&run(
        t.path(),
        &[
            "import",
            "big.ova",
            "--kernel",
            "vmlinuz",
            "--json",
            "-o",
            s(&p),
        ],
    )))
    .unwrap();
    assert_eq!(js["disks"][0]["virtual_size"], 1u64 << 40);
    // No data, only the index of its zero chunks (about 160 bytes per MiB).
    assert!(
        std::fs::metadata(&p).unwrap().len() < 256 << 20,
        "the pack stores no data"
    );
    let un = t.path().join("u");
    ok(&run(
        t.path(),
        &["export", s(&p), "--format", "raw", "-o", s(&un), "-q"],
    ));
    let img = un.join("big.img");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 1 << 40);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 1 << 20,
        "the unpacked disk is sparse"
    );
}

#[test]
fn saved_pack_exports_its_cold_definition() {
    if !kvm_available("the export of a saved pack") {
        return;
    }
    let elf = linux_out().join("vmlinux");
    assert!(
        elf.exists(),
        "samples/linux/fetch-kernel.sh has not extracted {}",
        elf.display()
    );
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm_with(t.path(), "saved", 1, "vmlinux");
    let sock = t.path().join("api.sock");
    let mut child = Command::new(bin("vmboot"))
        .args([
            "run",
            s(&vm.dir.join("vm.toml")),
            "--api-sock",
            s(&sock),
            "--serial-out",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no control socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let saved = t.path().join("saved.vmpack");
    ok(&run(
        t.path(),
        &[
            "save",
            "--api-sock",
            s(&sock),
            "-o",
            s(&saved),
            "--then",
            "stop",
            "-q",
        ],
    ));
    let _ = child.wait();
    let out = t.path().join("fc");
    let o = run(
        t.path(),
        &[
            "export",
            s(&saved),
            "--format",
            "firecracker",
            "-o",
            s(&out),
        ],
    );
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("saved run state") && err.contains("stays behind"),
        "{err}"
    );
    assert!(err.contains("no other VMM can resume"), "{err}");
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["data.img", "initrd.img", "root.img", "vm.json", "vmlinux"]
    );
    qemu_img(&[
        "compare",
        s(&vm.dir.join("root.img")),
        s(&out.join("root.img")),
    ]);
    same_file(&elf, &out.join("vmlinux"));
}

#[test]
fn an_imported_domain_boots_under_vmboot() {
    if !kvm_available("the boot of an imported libvirt domain") {
        return;
    }
    let elf = linux_out().join("vmlinux");
    assert!(
        elf.exists(),
        "samples/linux/fetch-kernel.sh has not extracted {}",
        elf.display()
    );
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm_with(t.path(), "reboot", 1, "vmlinux");
    let lv = t.path().join("lv");
    ok(&run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "libvirt",
            "-o",
            s(&lv),
            "-q",
        ],
    ));
    let imported = t.path().join("imported.vmpack");
    import(
        t.path(),
        &lv.join("domain.xml"),
        &imported,
        &["--strict", "-q"],
    );
    let serial = t.path().join("serial.log");
    let mut child = Command::new(vmpack())
        .current_dir(t.path())
        .args(["run", s(&imported), "--serial-out", s(&serial), "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let found = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains("Linux version") {
            break true;
        }
        if child.try_wait().unwrap().is_some() || t0.elapsed() > Duration::from_secs(300) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found,
        "no kernel banner from the imported pack:\n{}",
        std::fs::read_to_string(&serial).unwrap_or_default()
    );
}

#[test]
fn writing_to_a_device_keeps_the_device() {
    // Outputs are renamed into place; a device target must be written in place instead, or
    // `-o /dev/null` run as root replaces the host's /dev/null with a regular file (which
    // then breaks libvirt's domain start, among everything else). A private node, so the
    // test does not depend on (or damage) the host's /dev/null.
    use std::os::unix::fs::FileTypeExt;
    let t = tempfile::tempdir().unwrap();
    let null = t.path().join("null");
    tool(
        t.path(),
        "mknod",
        &["-m", "666", s(&null), "c", "1", "3"],
        &[],
    );
    let is_dev = || {
        std::fs::metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device()
    };
    flat_vm(t.path(), false);
    ok(&run(t.path(), &["pack", "vm.toml", "-o", s(&null), "-q"]));
    assert!(is_dev(), "pack -o DEVICE replaced the device");
    let vm = make_vm(&t.path().join("k"), "devnull", 1);
    let err = fails(&run(
        t.path(),
        &["export", s(&vm.pack), "--format", "ova", "-o", s(&null)],
    ));
    assert!(err.contains("not a regular file"), "{err}");
    assert!(is_dev());
}

#[test]
fn virtualbox_provider_box_imports_through_its_ovf() {
    // A VirtualBox-provider box: metadata.json, box.ovf and its VMDK, as `vagrant package`
    // writes for VirtualBox (here the OVF and VMDK come from an OVA export).
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "vbox", 2);
    let ova = t.path().join("vm.ova");
    ok(&run(
        t.path(),
        &[
            "export",
            s(&vm.pack),
            "--format",
            "ova",
            "-o",
            s(&ova),
            "-q",
        ],
    ));
    let b = t.path().join("b");
    std::fs::create_dir(&b).unwrap();
    tool(&b, "tar", &["-xf", s(&ova)], &[]);
    std::fs::rename(b.join("vbox.ovf"), b.join("box.ovf")).unwrap();
    std::fs::remove_file(b.join("vbox.mf")).unwrap();
    std::fs::write(b.join("metadata.json"), "{\"provider\": \"virtualbox\"}\n").unwrap();
    let bx = t.path().join("vbox.box");
    tool(
        &b,
        "tar",
        &[
            "czf",
            s(&bx),
            "metadata.json",
            "box.ovf",
            "root.vmdk",
            "data.vmdk",
            "vmlinuz",
            "initrd.img",
        ],
        &[],
    );
    let back = t.path().join("back.vmpack");
    import(t.path(), &bx, &back, &["-q"]);
    check_roundtrip(&vm, &back, t.path(), true, true);
}
