//! Assembles the flat test guests in `samples/guests/*.S` into raw binaries.
//!
//! Each guest is assembled with GNU `as`, linked at its load address with `ld`
//! and flattened with `objcopy -O binary`. The load address comes from a line
//! `# build: load_address=0x...` in the source, so adding a guest needs no
//! change here. The binaries land in `OUT_DIR` (embedded by `src/samples.rs`)
//! and are also copied to `samples/guests/bin/` so the sample TOML files work
//! right after `cargo build` on a fresh clone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const LOAD_MARKER: &str = "# build: load_address=";

fn main() {
    if let Err(msg) = run() {
        eprintln!("error: building the sample guests failed: {msg}");
        exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    let guests_dir = manifest.join("../samples/guests");
    let bin_dir = guests_dir.join("bin");
    println!("cargo:rerun-if-changed={}", guests_dir.display());
    println!("cargo:rerun-if-changed=build.rs");

    let mut sources = Vec::new();
    let mut includes = Vec::new();
    let entries = fs::read_dir(&guests_dir)
        .map_err(|e| format!("cannot read {}: {e}", guests_dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read {}: {e}", guests_dir.display()))?
            .path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("S") => sources.push(path),
            Some("inc") => includes.push(path),
            _ => {}
        }
    }
    sources.sort();
    for path in includes.iter().chain(&sources) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if sources.is_empty() {
        return Err(format!("no *.S files in {}", guests_dir.display()));
    }

    for tool in ["as", "ld", "objcopy"] {
        check_tool(tool)?;
    }
    fs::create_dir_all(&bin_dir)
        .map_err(|e| format!("cannot create {}: {e}", bin_dir.display()))?;

    for src in &sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: file name is not UTF-8", src.display()))?;
        let load = load_address(src)?;
        let obj = out_dir.join(format!("{name}.o"));
        let elf = out_dir.join(format!("{name}.elf"));
        let bin = out_dir.join(format!("{name}.bin"));

        let mut as_cmd = Command::new("as");
        as_cmd
            .arg("--64")
            .arg("-I")
            .arg(&guests_dir)
            .arg("-o")
            .arg(&obj)
            .arg(src);
        run_tool(as_cmd)?;
        let mut ld_cmd = Command::new("ld");
        ld_cmd
            .args(["-m", "elf_x86_64", "-z", "noexecstack", "-e", "_start"])
            .arg(format!("-Ttext={load:#x}"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj);
        run_tool(ld_cmd)?;
        // Guests keep code, data and zero-filled areas in .text, so the flat
        // image is exactly that section, starting at the load address.
        let mut objcopy_cmd = Command::new("objcopy");
        objcopy_cmd
            .args(["-O", "binary", "-j", ".text"])
            .arg(&elf)
            .arg(&bin);
        run_tool(objcopy_cmd)?;

        let image = fs::read(&bin).map_err(|e| format!("cannot read {}: {e}", bin.display()))?;
        if image.is_empty() {
            return Err(format!("{}: assembled to an empty image", src.display()));
        }
        copy_atomically(&image, &bin_dir.join(format!("{name}.bin")))?;
    }
    Ok(())
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
}

fn load_address(src: &Path) -> Result<u64, String> {
    let text =
        fs::read_to_string(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
    for (index, line) in text.lines().enumerate() {
        if let Some(value) = line.trim().strip_prefix(LOAD_MARKER) {
            let value = value.trim();
            let parsed = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            };
            return parsed.map_err(|_| {
                format!(
                    "{}:{}: bad load address {value:?}",
                    src.display(),
                    index + 1
                )
            });
        }
    }
    Err(format!(
        "{}: missing a `{LOAD_MARKER}0x...` line",
        src.display()
    ))
}

fn check_tool(tool: &str) -> Result<(), String> {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{tool} --version` failed ({}); install GNU binutils (e.g. `apt-get install binutils`)",
            out.status
        )),
        Err(e) => Err(format!(
            "cannot run `{tool}` ({e}); the sample guests need GNU binutils (`as`, `ld`, `objcopy`): \
             install them, e.g. `apt-get install binutils`"
        )),
    }
}

fn run_tool(mut cmd: Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Concurrent builds (several profiles, or a test build next to a normal one)
/// may write the same file, so write a private temp file and rename it.
fn copy_atomically(data: &[u8], dest: &Path) -> Result<(), String> {
    if fs::read(dest).is_ok_and(|old| old == data) {
        return Ok(());
    }
    let tmp = dest.with_extension(format!("bin.tmp{}", std::process::id()));
    fs::write(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, dest).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot rename {} to {}: {e}", tmp.display(), dest.display())
    })
}
