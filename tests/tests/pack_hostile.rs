//! Hostile packs that are intact containers: sizes that claim far more than the file holds,
//! names made to collide or to inject terminal escapes, and restores short of memory. Each
//! is refused (or handled) by the real binaries with a message, never a panic, and at a
//! cost bounded by the file's size.

mod common;

use common::{bin, fails, flat_vm, ok, run, vmpack};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vmpack_formats::pack::{Compression, PackReader, PackWriter, SectionSource, WriteOptions};

const TIB: u64 = 1 << 40;
const CHUNK: u32 = 64 << 20;

/// `len` bytes that are all zero: the writer stores them as zero chunks without reading.
struct Zeros(u64);

impl SectionSource for Zeros {
    fn len(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn data_ranges(&self) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        Ok(Vec::new())
    }
}

/// Rewrites `src` into `dst`: section `big` becomes `size` bytes of 64 MiB zero chunks, and
/// `manifest` edits the manifest (JSON).
fn inflate(src: &Path, dst: &Path, big: &str, size: u64, manifest: impl Fn(&mut Value)) {
    let r = PackReader::open(src).unwrap();
    let out = std::fs::File::create(dst).unwrap();
    let mut w = PackWriter::new(
        out,
        WriteOptions {
            aligned: false,
            compression: Compression::None,
            ..Default::default()
        },
    )
    .unwrap();
    for s in r.sections() {
        let mut meta = s.meta.clone();
        if s.name == big {
            if meta.get("virtual_size").is_some() {
                meta["virtual_size"] = size.into();
            }
            w.add_section_with(
                s.kind,
                &s.name,
                meta,
                &Zeros(size),
                CHUNK,
                Compression::None,
                &(),
            )
            .unwrap();
            continue;
        }
        let mut bytes = r.read_section(s.id, 1 << 30).unwrap();
        if s.name == "manifest" {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            manifest(&mut v);
            bytes = serde_json::to_vec(&v).unwrap();
        }
        w.add_section_with(
            s.kind,
            &s.name,
            meta,
            &bytes,
            s.chunk_size,
            Compression::None,
            &(),
        )
        .unwrap();
    }
    w.finish().unwrap();
}

fn old_pack() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/counter-v0.1-main.vmpack")
}

/// A disk of 1 TiB in 16384 zero chunks, in a pack of under 3 MB: every chunk is checked
/// (its frame header against the index), none is materialised, by `verify FILE` and
/// `verify -`.
#[test]
fn a_terabyte_of_zero_chunks_is_verified_by_its_headers() {
    let t = tempfile::tempdir().unwrap();
    flat_vm(t.path(), false);
    ok(&run(t.path(), &["pack", "vm.toml", "-o", "small.vmpack"]));
    let big = t.path().join("big.vmpack");
    inflate(&t.path().join("small.vmpack"), &big, "disk/0", TIB, |m| {
        m["disks"][0]["virtual_size"] = TIB.into();
    });
    assert!(std::fs::metadata(&big).unwrap().len() < 3 << 20);
    let zero = TIB / CHUNK as u64;
    let o = ok(&run(t.path(), &["verify", "big.vmpack"]));
    assert!(o.starts_with("OK big.vmpack:"), "{o}");
    assert!(o.contains(" zero)"), "{o}");
    let zeros: u64 = o
        .split(" zero)")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(zeros >= zero, "{o}");
    let o = Command::new(vmpack())
        .args(["verify", "-"])
        .stdin(std::fs::File::open(&big).unwrap())
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(out.contains(&format!("({zeros} zero)")), "{out}");
    // One flipped byte in a zero chunk's frame header is still found.
    let mut bytes = std::fs::read(&big).unwrap();
    let r = PackReader::open(&big).unwrap();
    let s = r.section("disk/0").unwrap();
    let c = &r.chunks(s.id)[777];
    bytes[c.frame_offset() as usize + 20] ^= 1;
    std::fs::write(t.path().join("flip.vmpack"), &bytes).unwrap();
    let err = fails(&run(t.path(), &["verify", "flip.vmpack"]));
    assert!(
        err.contains("section 'disk/0'") && err.contains("chunk 777"),
        "{err}"
    );
}

/// A saved VM of 16 MiB whose memory section claims 1 TiB: refused by `verify`, by
/// `vmboot restore FILE` and by `vmboot restore -` before any chunk of it is read, naming
/// the section and (for a file) its offset.
#[test]
fn a_memory_section_larger_than_the_vms_memory_is_refused_before_reading() {
    let t = tempfile::tempdir().unwrap();
    let big = t.path().join("mem.vmpack");
    inflate(&old_pack(), &big, "memory/0", TIB, |m| {
        m["memory"][0]["size"] = TIB.into();
    });
    let off = {
        let r = PackReader::open(&big).unwrap();
        r.section_offset(r.section("memory/0").unwrap().id).unwrap()
    };
    let expect = format!(
        "section 'memory/0': file offset {off}: memory region 0x0+0x10000000000 ({TIB} bytes) does not fit in the VM's memory (memory_mib = 16"
    );
    let err = fails(&run(t.path(), &["verify", "mem.vmpack"]));
    assert!(err.contains(&expect), "{err}");
    let o = Command::new(bin("vmboot"))
        .current_dir(t.path())
        .env("VMPACK_CACHE_DIR", t.path().join("cache"))
        .args(["restore", "mem.vmpack"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = fails(&o);
    assert!(err.contains(&expect), "{err}");
    let o = Command::new(bin("vmboot"))
        .current_dir(t.path())
        .env("VMPACK_CACHE_DIR", t.path().join("cache"))
        .args(["restore", "-"])
        .stdin(std::fs::File::open(&big).unwrap())
        .output()
        .unwrap();
    let err = fails(&o);
    assert!(
        err.contains("section 'memory/0': memory region 0x0+0x10000000000"),
        "{err}"
    );
    // A stream whose section is larger than its manifest entry: refused at the section.
    let lie = t.path().join("lie.vmpack");
    inflate(&old_pack(), &lie, "memory/0", TIB, |_| {});
    let o = Command::new(bin("vmboot"))
        .current_dir(t.path())
        .env("VMPACK_CACHE_DIR", t.path().join("cache"))
        .args(["restore", "-"])
        .stdin(std::fs::File::open(&lie).unwrap())
        .output()
        .unwrap();
    let err = fails(&o);
    assert!(err.contains("section 'memory/0'"), "{err}");
}

/// Rewrites `src` into `dst` with `edit` applied to its manifest (JSON).
fn edit_manifest(src: &Path, dst: &Path, edit: impl Fn(&mut Value)) {
    common::rewrite_pack_json(src, dst, edit, |_| {});
}

#[track_caller]
fn no_raw_controls(what: &str, bytes: &[u8]) {
    let s = String::from_utf8_lossy(bytes);
    assert!(
        !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
        "{what} holds a raw control character: {s:?}"
    );
}

/// Unpack writes `vm.toml`, `vmstate.bin` and `memory-N.raw` itself: a pack whose boot file
/// takes one of those names is refused (it would be overwritten by the memory dump), and a
/// config's file of that name is packed under another name.
#[test]
fn generated_names_are_reserved() {
    let t = tempfile::tempdir().unwrap();
    for name in ["memory-0.raw", "vmstate.bin", "vm.toml"] {
        let bad = t.path().join("bad.vmpack");
        edit_manifest(&old_pack(), &bad, |m| m["files"][0]["name"] = name.into());
        let out = t.path().join("out");
        let err = fails(&run(
            t.path(),
            &["unpack", "bad.vmpack", "-o", out.to_str().unwrap()],
        ));
        assert!(
            err.contains(&format!(
                "section 'manifest': file name '{name}' is reserved"
            )),
            "{err}"
        );
        assert!(!out.exists());
        let err = fails(&run(t.path(), &["verify", "bad.vmpack"]));
        assert!(err.contains("is reserved"), "{err}");
    }
    // Packing a guest image that happens to be called memory-0.raw: it gets another name.
    let src = t.path().join("src");
    flat_vm(&src, false);
    std::fs::rename(src.join("guests/counter.bin"), src.join("memory-0.raw")).unwrap();
    let cfg = std::fs::read_to_string(src.join("vm.toml"))
        .unwrap()
        .replace("guests/counter.bin", "memory-0.raw");
    std::fs::write(src.join("vm.toml"), cfg).unwrap();
    ok(&run(&src, &["pack", "vm.toml", "-o", "p.vmpack"]));
    ok(&run(&src, &["unpack", "p.vmpack", "-o", "u"]));
    assert!(!src.join("u/memory-0.raw").exists());
    assert_eq!(
        std::fs::read(src.join("u/image")).unwrap(),
        common::FLAT_GUEST
    );
}

/// Names with control characters: refused when packing, refused on read, and whatever a
/// pack holds reaches the terminal escaped (inspect's text and JSON, every error message).
#[test]
fn control_characters_in_names_are_refused_and_never_printed_raw() {
    let t = tempfile::tempdir().unwrap();
    // At pack time.
    let src = t.path().join("src");
    flat_vm(&src, false);
    let evil = "g\u{1b}]0;owned\u{7}.bin";
    std::fs::copy(src.join("guests/counter.bin"), src.join(evil)).unwrap();
    let cfg = std::fs::read_to_string(src.join("vm.toml"))
        .unwrap()
        .replace("guests/counter.bin", "g\\u001b]0;owned\\u0007.bin");
    std::fs::write(src.join("evil.toml"), cfg).unwrap();
    let o = run(&src, &["pack", "evil.toml", "-o", "e.vmpack"]);
    let err = fails(&o);
    no_raw_controls("pack's message", &o.stderr);
    assert!(
        err.contains("g\\u{1b}]0;owned\\u{7}.bin: the file name contains control characters"),
        "{err}"
    );
    assert!(!src.join("e.vmpack").exists());

    // On read: a boot file name, the VM name in the config, a C1 control in a field.
    let bad = t.path().join("bad.vmpack");
    edit_manifest(&old_pack(), &bad, |m| {
        m["files"][0]["name"] = "evil\u{1b}[2J.bin".into();
        m["tool"] = "vmpack\u{9b}31m".into();
        m["config"] = m["config"]
            .as_str()
            .unwrap()
            .replace("name = \"counter\"", "name = \"x\u{1b}[31m\"")
            .into();
    });
    let out = t.path().join("out");
    let o = run(
        t.path(),
        &["unpack", "bad.vmpack", "-o", out.to_str().unwrap()],
    );
    let err = fails(&o);
    no_raw_controls("unpack's message", &o.stderr);
    assert!(
        err.contains("file name 'evil\\u{1b}[2J.bin' contains control characters"),
        "{err}"
    );
    assert!(!out.exists());
    for args in [
        &["inspect", "bad.vmpack"][..],
        &["inspect", "bad.vmpack", "--json"],
    ] {
        let o = run(t.path(), args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        no_raw_controls("inspect's output", &o.stdout);
        no_raw_controls("inspect's message", &o.stderr);
        assert!(String::from_utf8_lossy(&o.stderr).contains("contains control characters"));
    }
    // A manifest that is valid but carries controls in free text: shown escaped.
    let text = t.path().join("text.vmpack");
    edit_manifest(&old_pack(), &text, |m| {
        m["tool"] = "vmpack\u{9b}31m\u{1b}[5m".into();
    });
    let o = run(t.path(), &["inspect", "text.vmpack"]);
    let shown = ok(&o);
    no_raw_controls("inspect's text", &o.stdout);
    assert!(shown.contains("vmpack\\u{9b}31m\\u{1b}[5m"), "{shown}");
    let o = run(t.path(), &["inspect", "text.vmpack", "--json"]);
    let shown = ok(&o);
    no_raw_controls("inspect's JSON", &o.stdout);
    let v: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["manifest"]["tool"], "vmpack\u{9b}31m\u{1b}[5m");
}

/// Runs `vmpack ARGS` under `ulimit -v KIB` (in a `sh -c` wrapper); returns the exit status
/// (128+N for a signal) and stderr.
fn vmpack_under_ulimit(
    kib: u64,
    args: &str,
    input: Option<&Path>,
    dir: &Path,
) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -v {kib}; exec '{}' {args}",
            vmpack().display()
        ))
        .current_dir(dir)
        .env("VMPACK_CACHE_DIR", dir.join("cache"))
        // With RUST_BACKTRACE set, std's panic hook symbolises a backtrace under its
        // backtrace lock; an allocation failing there calls the alloc error hook, which
        // takes that lock again: the process hangs instead of aborting.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdout(Stdio::null());
    match input {
        Some(p) => cmd.stdin(std::fs::File::open(p).unwrap()),
        None => cmd.stdin(Stdio::null()),
    };
    let o = cmd.output().unwrap();
    let code = o.status.code().or(o.status.signal().map(|s| 128 + s));
    (code, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `vmpack restore` (file and stdin), `verify` and `unpack` under every `ulimit -v` from the
/// lowest at which vmpack starts up to the first that succeeds: a clean `vmpack:` error
/// (status 1) or success, never a panic, a failed thread spawn, a null codec context or an
/// abort on a chunk-sized allocation (`--memory lazy`: none in the fault path).
#[test]
fn vmpack_short_of_memory_fails_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let pack = old_pack();
    let floor = (4..256u64)
        .map(|m| m * 1024)
        .find(|&k| vmpack_under_ulimit(k, "--version", None, t.path()).0 == Some(0))
        .expect("vmpack never starts under ulimit -v");
    let kvm = common::kvm_available("low-memory vmpack restore");
    // A pack with real work for the worker threads and codecs: zstd chunks of a 64 MiB disk.
    let src = t.path().join("src");
    flat_vm(&src, false);
    ok(&run(
        &src,
        &["pack", "vm.toml", "-o", "z.vmpack", "--compress", "zstd"],
    ));
    let z = src.join("z.vmpack");
    let zp = z.display().to_string();
    let p = pack.display().to_string();
    let mut cases: Vec<(String, Option<&Path>)> = vec![
        (format!("verify '{zp}'"), None),
        (format!("unpack '{zp}' -o out"), None),
        ("verify -".to_string(), Some(z.as_path())),
    ];
    if kvm {
        cases.push((
            format!("restore '{p}' --serial-out none --verify always"),
            None,
        ));
        cases.push((
            "restore - --serial-out none".to_string(),
            Some(pack.as_path()),
        ));
        // Guest RAM filled at fault time (userfaultfd): the fault path's buffers are made
        // before the guest runs, so no chunk-sized allocation can fail in a fault.
        cases.push((
            format!("restore '{p}' --serial-out none --memory lazy"),
            None,
        ));
    }
    const STEP: u64 = 2048;
    for (args, input) in cases {
        let mut kib = floor;
        let mut failures = 0;
        loop {
            let _ = std::fs::remove_dir_all(t.path().join("out"));
            let (code, err) = vmpack_under_ulimit(kib, &args, input, t.path());
            // A thread whose stack was mapped can still find no room for the signal stack
            // std maps at its start (std panics, then aborts), or for glibc's thread-local
            // bookkeeping (glibc aborts), before any vmpack code runs in the thread. Like
            // the allocator's abort below, that is not a failure of a thread or codec of
            // ours, and no output is left behind.
            let std_bootstrap = err.contains("failed to allocate an alternative stack")
                || err.contains("Fatal glibc error: failed to register TLS destructor");
            assert!(
                std_bootstrap
                    || !err.contains("panicked")
                        && !err.contains("failed to spawn thread")
                        && !err.contains("null pointer when creating new context"),
                "ulimit -v {kib}: vmpack {args}: {err}"
            );
            match code {
                Some(0) => break,
                Some(1) => {
                    assert!(
                        err.lines().any(|l| l.starts_with("vmpack: ")),
                        "{kib}: {err}"
                    );
                    failures += 1;
                }
                // The global allocator aborts on a failed small allocation, and a stack
                // that cannot grow is a SIGSEGV: neither is a thread or codec failure.
                Some(134) if err.contains("memory allocation of") => {
                    let bytes: u64 = err
                        .split("memory allocation of ")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    assert!(
                        bytes < 64 << 10 || !args.contains("--memory lazy"),
                        "ulimit -v {kib}: vmpack {args}: a chunk-sized allocation aborted: {err}"
                    );
                }
                Some(139) => {}
                Some(101 | 134) if std_bootstrap => {}
                other => panic!("ulimit -v {kib}: vmpack {args}: status {other:?}: {err}"),
            }
            kib += STEP;
            assert!(
                kib < floor + (512 << 10),
                "vmpack {args}: no run succeeded below {kib} KiB"
            );
        }
        eprintln!("vmpack {args}: {failures} clean failures between {floor} and {kib} KiB");
    }
}
