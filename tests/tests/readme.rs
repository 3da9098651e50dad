//! The documentation runs as written: every ```sh block of README.md, then of
//! docs/TESTING.md, in order, in one bash session that starts at the repository's root with
//! the built vmpack and vmboot on PATH (the README's own first lines move it to a scratch
//! folder). A block fails the test when a command in it fails or when its output lacks
//! what a `# expect: REGEX` comment in it promises. A block right after a line
//! `<!-- norun: REASON -->` is skipped, by name and with its reason.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Block {
    /// `README.md:42`, the line of the opening fence.
    name: String,
    text: String,
    norun: Option<String>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn blocks(file: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    let mut out = Vec::new();
    let mut last = "";
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if line.trim_end() == "```sh" {
            let norun = last
                .trim()
                .strip_prefix("<!-- norun:")
                .and_then(|r| r.strip_suffix("-->"))
                .map(|r| r.trim().to_string());
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push(Block {
                name: format!("{file}:{}", i + 1),
                text: body,
                norun,
            });
            last = "";
        } else if !line.trim().is_empty() {
            last = line;
        }
    }
    out
}

/// What `# expect: REGEX` comments in a block promise.
fn expectations(b: &Block) -> Vec<regex::Regex> {
    b.text
        .lines()
        .filter_map(|l| l.split_once("# expect: ").map(|(_, re)| re.trim()))
        .map(|re| {
            regex::Regex::new(&format!("(?m){re}"))
                .unwrap_or_else(|e| panic!("{}: bad expectation {re}: {e}", b.name))
        })
        .collect()
}

fn root_entries() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn readme_and_testing_md_run_as_written() {
    let all: Vec<Block> = ["README.md", "docs/TESTING.md"]
        .iter()
        .flat_map(|f| blocks(f))
        .collect();
    assert!(all.len() > 10, "too few sh blocks found");
    for b in &all {
        if let Some(r) = &b.norun {
            assert!(!r.is_empty(), "{}: norun needs a reason", b.name);
        }
    }

    // What the examples use; test-all.sh installs all of it.
    if !kvm_available("readme_and_testing_md_run_as_written") {
        return;
    }
    let tools = [
        "curl",
        "cmp",
        "qemu-img",
        "docker-registry",
        "skopeo",
        "ssh-keygen",
        "virt-xml-validate",
        "vagrant",
        "virt-v2v",
    ];
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
        })
        .collect();
    let kernel = samples_dir().join("linux/out/vmlinux");
    if !missing.is_empty() || !kernel.exists() {
        eprintln!(
            "\n*** SKIPPED: readme_and_testing_md_run_as_written: missing {}{} (scripts/test-all.sh installs and fetches them) ***\n",
            missing.join(", "),
            if kernel.exists() { "" } else { " samples/linux/out/vmlinux" }
        );
        return;
    }

    let scratch = tempfile::tempdir().unwrap();
    let mut script = String::from("set -e\n");
    for (i, b) in all.iter().enumerate() {
        if let Some(r) = &b.norun {
            eprintln!("{}: not run: {r}", b.name);
            continue;
        }
        // On a line of its own even after output without a final newline.
        script.push_str(&format!("printf '\\n@@@ block {i}\\n'\n"));
        script.push_str(&b.text);
        // A block ending in `a && b` whose `a` fails does not trip `set -e`.
        script.push_str(&format!(
            "__st=$?; if [ $__st != 0 ]; then printf '\\n@@@ block {i} failed: %s\\n' $__st; exit $__st; fi\n"
        ));
    }
    script.push_str("printf '\\n@@@ end\\n'\n");
    let script_path = scratch.path().join("readme.sh");
    std::fs::write(&script_path, &script).unwrap();
    let log_path = scratch.path().join("readme.log");
    let log = std::fs::File::create(&log_path).unwrap();

    // The binaries the README's first command builds (same profile as this test).
    let bin_dir = vmpack().parent().unwrap().to_path_buf();
    vmboot_built();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let before = root_entries();
    let tmp = scratch.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("bash")
            .arg(&script_path)
            .current_dir(repo())
            .env("PATH", path)
            .env("TMPDIR", &tmp)
            .env("VMPACK_CACHE_DIR", scratch.path().join("cache"))
            .env("DOCKER_CONFIG", scratch.path().join("docker"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let pgid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Whatever a block left running in the background (a registry after a failure).
    // SAFETY: signals our own process group.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();

    let out = String::from_utf8_lossy(&std::fs::read(&log_path).unwrap()).into_owned();
    // Output of each block, by the markers the script printed.
    let mut seen = vec![None::<String>; all.len()];
    let mut current: Option<usize> = None;
    let mut failed = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("@@@ block ") {
            let n: usize = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            if rest.contains("failed") {
                failed = Some(n);
            }
            current = Some(n);
            seen[n] = Some(String::new());
            continue;
        }
        if line == "@@@ end" {
            current = None;
            continue;
        }
        if let Some(n) = current {
            let s = seen[n].as_mut().unwrap();
            s.push_str(line);
            s.push('\n');
        }
    }
    let tail = |s: &str| -> String {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    let Some(status) = status else {
        panic!(
            "the documentation's examples did not end within 30 minutes; last block {}:\n{}",
            current.map_or("?".into(), |n| all[n].name.clone()),
            tail(&out)
        );
    };
    if !status.success() || !out.contains("@@@ end") {
        let n = failed.or(current).expect("no block started");
        panic!(
            "{} failed ({status}):\n--- block ---\n{}--- its output (last lines) ---\n{}",
            all[n].name,
            all[n].text,
            tail(seen[n].as_deref().unwrap_or(""))
        );
    }
    for (i, b) in all.iter().enumerate() {
        if b.norun.is_some() {
            continue;
        }
        let text = seen[i]
            .as_deref()
            .unwrap_or_else(|| panic!("{} did not run", b.name));
        for re in expectations(b) {
            assert!(
                re.is_match(text),
                "{}: the output does not match `# expect: {}`:\n{}",
                b.name,
                re.as_str().trim_start_matches("(?m)"),
                tail(text)
            );
        }
        eprintln!("{}: ok", b.name);
    }
    assert_eq!(
        root_entries(),
        before,
        "the examples left files in the repository's root"
    );
}

fn vmboot_built() {
    bin("vmboot");
}
