//! Packs through a real OCI registry (Debian's `docker-registry`, the CNCF distribution
//! registry) on 127.0.0.1, through the real binaries: push, pull, `cmp`; skopeo reads the
//! manifest; the chunk cache; split manifests; basic auth; a registry killed mid-push and
//! mid-pull; a blob altered in the registry's storage; SSH signatures checked both ways with
//! `ssh-keygen`; the dedupe of a second save. All traffic stays on loopback and every wait
//! is bounded.

mod common;

use common::*;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str, what: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("\n*** SKIPPED: {tool} not found (scripts/test-all.sh installs it); {what} did not run ***\n");
    }
    found
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `docker-registry` on 127.0.0.1 with its storage in a temp folder; killed on drop.
struct Registry {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    fn start(dir: &Path, htpasswd: Option<&Path>) -> Registry {
        let auth = match htpasswd {
            Some(p) => format!(
                "auth: {{htpasswd: {{realm: vmpack-test, path: {}}}}}\n",
                p.display()
            ),
            None => String::new(),
        };
        Registry::start_with(dir, "", &auth)
    }

    /// A registry whose config's `http` map gets `http_extra` (e.g. `tls: {...}`) and whose
    /// config gets the top-level lines `extra` (e.g. `auth: {...}`).
    fn start_with(dir: &Path, http_extra: &str, extra: &str) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(
            dir.join("config.yml"),
            format!(
                "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: 127.0.0.1:{port}{http_extra}}}\n{extra}",
                store.display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            child: None,
            port,
            dir: dir.to_path_buf(),
        };
        r.restart();
        r
    }

    /// (Re)starts the registry on the same port and storage.
    fn restart(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        self.child = Some(child);
        let port = self.port;
        wait_for("the registry to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The data files of the blobs the registry stores.
    fn blob_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let base = self.dir.join("store/docker/registry/v2/blobs/sha256");
        for d in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            for b in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let data = b.path().join("data");
                if data.exists() {
                    out.push(data);
                }
            }
        }
        out
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// vmpack with its cache in `dir/cache`.
fn vm(dir: &Path, args: &[&str]) -> Output {
    vm_env(dir, args, &[])
}

fn vm_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(vmpack());
    c.current_dir(dir)
        .env("VMPACK_CACHE_DIR", dir.join("cache"))
        .env("DOCKER_CONFIG", dir.join("docker"))
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn vm_stdin(dir: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(vmpack())
        .current_dir(dir)
        .env("VMPACK_CACHE_DIR", dir.join("cache"))
        .env("DOCKER_CONFIG", dir.join("docker"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A packed VM at rest with a raw disk of `mib` MiB: random in its first three quarters,
/// zeros after (1 MiB chunks, uncompressible, so one blob per MiB).
fn make_pack(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    let sub = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&sub).unwrap();
    let mut disk = noise(mib << 20, seed);
    let z = disk.len() * 3 / 4;
    disk[z..].fill(0);
    std::fs::write(sub.join("disk.img"), disk).unwrap();
    std::fs::write(sub.join("image.bin"), [0xf4u8; 512]).unwrap();
    std::fs::write(
        sub.join("vm.toml"),
        "name = \"reg\"\nvcpus = 1\nmemory_mib = 16\n[flat]\nimage = \"image.bin\"\nload_address = 0x1000\nentry = 0x1000\nmode = \"real\"\n[[disk]]\npath = \"disk.img\"\nformat = \"raw\"\n",
    )
    .unwrap();
    let pack = dir.join(format!("{name}.vmpack"));
    ok(&vm(
        dir,
        &[
            "pack",
            sub.join("vm.toml").to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "-q",
        ],
    ));
    pack
}

fn same_file(a: &Path, b: &Path) {
    let st = Command::new("cmp").arg(a).arg(b).status().unwrap();
    assert!(st.success(), "{} and {} differ", a.display(), b.display());
}

fn skopeo_raw(reference: &str) -> serde_json::Value {
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn push_pull_is_bit_for_bit_with_cache_and_split_manifests() {
    if !have("docker-registry", "the registry tests") || !have("skopeo", "the registry tests") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let pack = make_pack(d, "a", 8, 1);
    let r = format!("{}/team/vm:v1", reg.host());

    let pushed = json(&vm(
        d,
        &["push", pack.to_str().unwrap(), &r, "--json", "-q"],
    ));
    assert_eq!(pushed["chunks"], 8, "{pushed}"); // 6 MiB of disk data + image + manifest
    assert_eq!(pushed["blobs"], 10); // and the index and the config
    assert_eq!(pushed["present_blobs"], 0);

    // skopeo reads what vmpack wrote: an OCI 1.1 manifest with our artifactType.
    let m = skopeo_raw(&r);
    assert_eq!(m["artifactType"], "application/vnd.vmpack.pack.v1", "{m}");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.vmpack.pack.config.v1+json"
    );
    assert_eq!(m["layers"].as_array().unwrap().len(), 9);

    let out = d.join("pulled.vmpack");
    let pulled = json(&vm(
        d,
        &["pull", &r, "-o", out.to_str().unwrap(), "--json", "-q"],
    ));
    same_file(&pack, &out);
    assert_eq!(pulled["fetched_blobs"], 8, "{pulled}");
    assert_eq!(pulled["digest"], pushed["digest"]);

    // The chunk cache: a second pull (by digest) fetches nothing.
    let by_digest = format!(
        "{}/team/vm@{}",
        reg.host(),
        pushed["digest"].as_str().unwrap()
    );
    let out2 = d.join("again.vmpack");
    let again = json(&vm(
        d,
        &[
            "pull",
            &by_digest,
            "-o",
            out2.to_str().unwrap(),
            "--json",
            "-q",
        ],
    ));
    assert_eq!(again["fetched_blobs"], 0, "{again}");
    assert_eq!(again["cached_blobs"], 8);
    same_file(&pack, &out2);
    let ls = json(&vm(d, &["cache", "ls", "--json"]));
    assert_eq!(ls["chunks"]["count"], 8, "{ls}");

    // Pushing the same pack again uploads nothing; to another tag neither.
    let re = json(&vm(
        d,
        &[
            "push",
            pack.to_str().unwrap(),
            &format!("{}/team/vm:v2", reg.host()),
            "--json",
            "-q",
        ],
    ));
    assert_eq!(re["uploaded_blobs"], 0, "{re}");

    // More chunks than one manifest holds: an image index of parts; pulled identically.
    let split = format!("{}/team/split:v1", reg.host());
    ok(&vm_env(
        d,
        &["push", pack.to_str().unwrap(), &split, "-q"],
        &[("VMPACK_OCI_MAX_LAYERS", "3")],
    ));
    let idx = skopeo_raw(&split);
    assert_eq!(
        idx["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{idx}"
    );
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 3); // head (index + 2 chunks) + 3 + 3
    ok(&vm(d, &["cache", "prune", "-q"]));
    assert_eq!(
        json(&vm(d, &["cache", "ls", "--json"]))["chunks"]["count"],
        0
    );
    let out3 = d.join("split.vmpack");
    ok(&vm(
        d,
        &["pull", &split, "-o", out3.to_str().unwrap(), "-q"],
    ));
    same_file(&pack, &out3);

    // Errors name what failed.
    let e = fails(&vm(
        d,
        &[
            "pull",
            &format!("{}/team/none:v1", reg.host()),
            "-o",
            "x.vmpack",
        ],
    ));
    assert!(e.contains("not found in the registry"), "{e}");
    assert!(!d.join("x.vmpack").exists());
    let e = fails(&vm(
        d,
        &[
            "push",
            pack.to_str().unwrap(),
            &format!("{}/team/vm", reg.host()),
        ],
    ));
    assert!(e.contains("give a tag"), "{e}");
}

/// A push to a second repository of the same registry mounts every blob from the first
/// (cross-repository blob mount): no chunk byte is sent again, and the pack pulls back
/// identical from either.
#[test]
fn a_push_to_a_second_repository_mounts_its_blobs() {
    if !have("docker-registry", "the blob mount test") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let pack = make_pack(d, "m", 4, 5);
    let first = format!("{}/team/one:v1", reg.host());
    let second = format!("{}/other/two:v1", reg.host());
    let a = json(&vm(
        d,
        &["push", pack.to_str().unwrap(), &first, "--json", "-q"],
    ));
    assert_eq!(a["mounted_blobs"], 0, "{a}");
    assert!(a["uploaded_bytes"].as_u64().unwrap() > 3 << 20, "{a}");
    let b = json(&vm(
        d,
        &["push", pack.to_str().unwrap(), &second, "--json", "-q"],
    ));
    assert_eq!(b["mounted_from"], "team/one", "{b}");
    assert_eq!(b["uploaded_bytes"], 0, "{b}");
    assert_eq!(b["uploaded_blobs"], 0, "{b}");
    assert_eq!(b["mounted_blobs"], a["uploaded_blobs"], "{b}");
    let o = vm(
        d,
        &[
            "push",
            pack.to_str().unwrap(),
            &format!("{}/third/three:v1", reg.host()),
        ],
    );
    assert!(
        stdout(&o).contains("mounted from other/two"),
        "{}",
        stdout(&o)
    );
    for (i, r) in [&first, &second].into_iter().enumerate() {
        let out = d.join(format!("back{i}.vmpack"));
        ok(&vm(d, &["cache", "prune", "-q"]));
        ok(&vm(d, &["pull", r, "-o", out.to_str().unwrap(), "-q"]));
        same_file(&pack, &out);
    }
}

#[test]
fn basic_auth_from_the_command_line_and_docker_config() {
    if !have("docker-registry", "the registry auth test")
        || !have("htpasswd", "the registry auth test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let pw = d.join("htpasswd");
    let o = Command::new("htpasswd")
        .args(["-Bbc"])
        .arg(&pw)
        .args(["alice", "s3cret"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let reg = Registry::start(&d.join("reg"), Some(&pw));
    let pack = make_pack(d, "a", 2, 2);
    let r = format!("{}/team/vm:v1", reg.host());

    let e = fails(&vm(d, &["push", pack.to_str().unwrap(), &r]));
    assert!(e.contains("wants a login"), "{e}");
    let o = vm_stdin(
        d,
        &[
            "push",
            pack.to_str().unwrap(),
            &r,
            "--username",
            "alice",
            "--password-stdin",
            "-q",
        ],
        b"wrong\n",
    );
    let e = fails(&o);
    assert!(e.contains("401") || e.contains("refused the login"), "{e}");
    ok(&vm_stdin(
        d,
        &[
            "push",
            pack.to_str().unwrap(),
            &r,
            "--username",
            "alice",
            "--password-stdin",
            "-q",
        ],
        b"s3cret\n",
    ));

    // docker login's file: {"auths": {"HOST": {"auth": base64("user:pass")}}}.
    std::fs::create_dir_all(d.join("docker")).unwrap();
    std::fs::write(
        d.join("docker/config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"YWxpY2U6czNjcmV0\"}}}}}}",
            reg.host()
        ),
    )
    .unwrap();
    let out = d.join("pulled.vmpack");
    ok(&vm(d, &["pull", &r, "-o", out.to_str().unwrap(), "-q"]));
    same_file(&pack, &out);

    // A credential helper named in docker's config (`credHelpers`): docker-credential-NAME
    // on PATH, asked `get` with the registry on stdin, answers with the login.
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-vmpacktest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nserver=$(cat)\necho \"$1 $server\" >> {}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}}' \"$server\"\n",
            d.join("helper.log").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        d.join("docker/config.json"),
        format!(
            "{{\"credHelpers\": {{\"{}\": \"vmpacktest\"}}}}",
            reg.host()
        ),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = d.join("helped.vmpack");
    ok(&vm_env(
        d,
        &["pull", &r, "-o", out.to_str().unwrap(), "-q"],
        &[("PATH", &path)],
    ));
    same_file(&pack, &out);
    let log = std::fs::read_to_string(d.join("helper.log")).unwrap();
    assert_eq!(log.trim(), format!("get {}", reg.host()), "{log}");
    // Without the helper on PATH the login is missing, and the message says which helper.
    let e = fails(&vm(d, &["pull", &r, "-o", "x.vmpack", "-q"]));
    assert!(e.contains("credentials") || e.contains("helper"), "{e}");
    assert!(!d.join("x.vmpack").exists());
}

fn sh(dir: &Path, script: &str) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}: {}", stderr(&o));
}

/// A CA (`NAME.pem`, `NAME.key`) made with openssl in `dir`.
fn make_ca(dir: &Path, name: &str) {
    sh(
        dir,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout {name}.key -out {name}.pem -days 2 -subj /CN={name} \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
        ),
    );
}

/// A registry over HTTPS on 127.0.0.1 with a certificate signed by a CA made in the test:
/// vmpack refuses it until told to trust that CA (`--ca-file`, or `SSL_CERT_FILE`), and
/// refuses a certificate from another CA; on loopback it finds on its own that the registry
/// speaks HTTPS.
#[test]
fn a_registry_over_tls_is_trusted_only_through_its_ca() {
    if !have("docker-registry", "the registry TLS test")
        || !have("openssl", "the registry TLS test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_ca(d, "ca");
    make_ca(d, "other");
    sh(
        d,
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key \
         -out srv.csr -subj /CN=127.0.0.1 && \
         printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem \
         -days 2 -extfile ext",
    );
    let tls = format!(
        ", tls: {{certificate: {}, key: {}}}",
        d.join("srv.pem").display(),
        d.join("srv.key").display()
    );
    let reg = Registry::start_with(&d.join("reg"), &tls, "");
    let pack = make_pack(d, "tls", 2, 9);
    let r = format!("{}/team/tls:v1", reg.host());
    let p = pack.to_str().unwrap();

    let e = fails(&vm(d, &["push", p, &r]));
    assert!(e.contains(&format!("https://{}", reg.host())), "{e}");
    assert!(e.contains("not trusted") && e.contains("--ca-file"), "{e}");
    let e = fails(&vm(d, &["push", p, &r, "--ca-file", "other.pem"]));
    assert!(e.contains("not trusted"), "{e}");
    let pushed = json(&vm(
        d,
        &["push", p, &r, "--ca-file", "ca.pem", "--json", "-q"],
    ));
    assert!(
        pushed["uploaded_bytes"].as_u64().unwrap() > 1 << 20,
        "{pushed}"
    );
    let ca = d.join("ca.pem");
    let out = d.join("back.vmpack");
    ok(&vm_env(
        d,
        &["pull", &r, "-o", out.to_str().unwrap(), "-q"],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    ));
    same_file(&pack, &out);
    let e = fails(&vm(d, &["push", p, &r, "--ca-file", "srv.key"]));
    assert!(e.contains("no PEM certificate"), "{e}");
}

/// A token server for the registry's bearer-token auth: answers `GET /token?...` from the
/// login alice:s3cret with `token` (a JWT the test signed), anything else with 401; keeps
/// the request lines. Serves at most 500 requests.
fn token_server(token: String) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().take(500) {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut first = String::new();
            let _ = r.read_line(&mut first);
            let mut authorized = false;
            for _ in 0..100 {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                // base64("alice:s3cret")
                authorized |= h
                    .trim()
                    .eq_ignore_ascii_case("authorization: Basic YWxpY2U6czNjcmV0");
            }
            log.lock().unwrap().push(first.trim().to_string());
            let (status, body) = if authorized && first.starts_with("GET /token?") {
                ("200 OK", format!("{{\"token\": \"{token}\"}}"))
            } else {
                ("401 Unauthorized", "{}".to_string())
            };
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, seen)
}

/// Bearer-token auth (the WWW-Authenticate Bearer flow docker's registry uses with a token
/// service): the registry trusts tokens signed by a key made in the test, the token server
/// hands one out for the login, vmpack asks it with the challenge's realm, service and
/// scope, and pushes and pulls with the token; without a login the token server refuses.
#[test]
fn bearer_token_auth_through_a_token_server() {
    if !have("docker-registry", "the bearer token test")
        || !have("openssl", "the bearer token test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // RS256 over header.claims with the key whose (self-signed) certificate the registry
    // trusts; the certificate travels in the header (x5c).
    sh(
        d,
        r#"set -e
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
openssl req -x509 -newkey rsa:2048 -nodes -keyout tok.key -out tok.pem -days 2 -subj /CN=vmpack-token 2>/dev/null
X5C=$(openssl x509 -in tok.pem -outform DER | openssl base64 -A)
NOW=$(date +%s)
H=$(printf '{"alg":"RS256","typ":"JWT","x5c":["%s"]}' "$X5C" | b64url)
C=$(printf '{"iss":"vmpack-issuer","sub":"alice","aud":"vmpack-registry","exp":%d,"nbf":%d,"iat":%d,"jti":"t1","access":[{"type":"repository","name":"team/vm","actions":["pull","push"]}]}' $((NOW+3600)) $((NOW-60)) $((NOW-60)) | b64url)
S=$(printf '%s.%s' "$H" "$C" | openssl dgst -sha256 -sign tok.key | b64url)
printf '%s.%s.%s' "$H" "$C" "$S" > token
"#,
    );
    let token = std::fs::read_to_string(d.join("token")).unwrap();
    let (tport, seen) = token_server(token);
    let auth = format!(
        "auth: {{token: {{realm: \"http://127.0.0.1:{tport}/token\", service: vmpack-registry, issuer: vmpack-issuer, rootcertbundle: {}}}}}\n",
        d.join("tok.pem").display()
    );
    let reg = Registry::start_with(&d.join("reg"), "", &auth);
    let pack = make_pack(d, "bear", 2, 11);
    let r = format!("{}/team/vm:v1", reg.host());
    let p = pack.to_str().unwrap();

    let e = fails(&vm(d, &["push", p, &r]));
    assert!(e.contains("token from") && e.contains("401"), "{e}");
    let login = ["--username", "alice", "--password-stdin", "-q"];
    let o = vm_stdin(d, &[&["push", p, &r][..], &login].concat(), b"s3cret\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.join("back.vmpack");
    let o = vm_stdin(
        d,
        &[&["pull", &r, "-o", out.to_str().unwrap()][..], &login].concat(),
        b"s3cret\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    same_file(&pack, &out);
    let asked = seen.lock().unwrap().clone();
    assert!(
        asked.iter().any(|l| l.contains("service=vmpack-registry")
            && l.contains("scope=repository%3Ateam%2Fvm%3A")),
        "{asked:?}"
    );
    // The token grants team/vm only: another repository is refused.
    let o = vm_stdin(
        d,
        &[
            &["push", p, &format!("{}/team/other:v1", reg.host())][..],
            &login,
        ]
        .concat(),
        b"s3cret\n",
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("401")
            || e.contains("403")
            || e.contains("UNAUTHORIZED")
            || e.contains("DENIED"),
        "{e}"
    );
}

#[test]
fn a_registry_killed_mid_push_and_mid_pull_leaves_no_half_file() {
    if !have("docker-registry", "the registry interruption test") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let mut reg = Registry::start(&d.join("reg"), None);
    let pack = make_pack(d, "big", 96, 3); // 72 one-MiB blobs
    let r = format!("{}/team/big:v1", reg.host());

    let push = |d: &Path| {
        Command::new(vmpack())
            .current_dir(d)
            .env("VMPACK_CACHE_DIR", d.join("cache"))
            .env("DOCKER_CONFIG", d.join("docker"))
            .args(["push", pack.to_str().unwrap(), &r, "--transfers", "1", "-q"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = push(d);
    wait_for(
        "a few blobs in the registry",
        Duration::from_secs(60),
        || reg.blob_files().len() >= 4,
    );
    reg.kill();
    let o = child.wait_with_output().unwrap();
    let e = fails(&o);
    assert!(e.contains("pushing"), "{e}");
    reg.restart();
    // The tag does not exist yet: the manifest goes last.
    let e = fails(&vm(d, &["pull", &r, "-o", "none.vmpack"]));
    assert!(e.contains("not found"), "{e}");
    let done = json(&vm(
        d,
        &["push", pack.to_str().unwrap(), &r, "--json", "-q"],
    ));
    assert!(
        done["present_blobs"].as_u64().unwrap() >= 3,
        "the rerun reuses what arrived: {done}"
    );

    let out = d.join("out").join("pulled.vmpack");
    std::fs::create_dir_all(d.join("out")).unwrap();
    let pull = Command::new(vmpack())
        .current_dir(d)
        .env("VMPACK_CACHE_DIR", d.join("cache"))
        .env("DOCKER_CONFIG", d.join("docker"))
        .args([
            "pull",
            &r,
            "-o",
            out.to_str().unwrap(),
            "--transfers",
            "1",
            "-q",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let chunks = d.join("cache/chunks/sha256");
    let cached = || std::fs::read_dir(&chunks).map_or(0, |r| r.count());
    wait_for("a few chunks in the cache", Duration::from_secs(60), || {
        cached() >= 4
    });
    reg.kill();
    let o = pull.wait_with_output().unwrap();
    fails(&o);
    let left: Vec<_> = std::fs::read_dir(d.join("out")).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    reg.restart();
    let res = json(&vm(
        d,
        &["pull", &r, "-o", out.to_str().unwrap(), "--json", "-q"],
    ));
    assert!(
        res["cached_blobs"].as_u64().unwrap() >= 3,
        "the rerun reuses the cache: {res}"
    );
    same_file(&pack, &out);
}

#[test]
fn a_blob_altered_in_the_registry_is_refused_naming_the_chunk() {
    if !have("docker-registry", "the altered-blob test") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let pack = make_pack(d, "a", 4, 4);
    let r = format!("{}/team/vm:v1", reg.host());
    ok(&vm(d, &["push", pack.to_str().unwrap(), &r, "-q"]));
    // The disk's chunk 1: its digest is the SHA-256 of the second MiB of the disk.
    let disk = std::fs::read(d.join("a-src/disk.img")).unwrap();
    use sha2::{Digest, Sha256};
    let hex = hex::encode(Sha256::digest(&disk[1 << 20..2 << 20]));
    let data = reg
        .blob_files()
        .into_iter()
        .find(|p| p.parent().unwrap().file_name().unwrap().to_str() == Some(hex.as_str()))
        .expect("the chunk's blob in the registry's storage");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[12345] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();
    let out = d.join("pulled.vmpack");
    let e = fails(&vm(d, &["pull", &r, "-o", out.to_str().unwrap()]));
    assert!(e.contains("section 'disk/0' chunk 1"), "{e}");
    assert!(e.contains(&hex), "{e}");
    assert!(!out.exists());
    assert!(
        !d.join("cache/chunks/sha256").join(&hex).exists(),
        "a refused blob never enters the chunk cache"
    );
}

fn keygen(dir: &Path, name: &str, comment: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut it = public.split_whitespace();
    let line = format!("{comment} {} {}\n", it.next().unwrap(), it.next().unwrap());
    (key, line)
}

#[test]
fn signatures_checked_both_ways_with_ssh_keygen_and_pushed_as_referrers() {
    if !have("ssh-keygen", "the signature test")
        || !have("docker-registry", "the signature test")
        || !have("skopeo", "the signature test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let pack = make_pack(d, "a", 2, 5);
    let root = json(&vm(d, &["inspect", "--json", pack.to_str().unwrap()]))["root_digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (alice, alice_line) = keygen(d, "alice", "alice@example.com");
    let (bob, bob_line) = keygen(d, "bob", "bob@example.com");
    std::fs::write(d.join("allowed_alice"), &alice_line).unwrap();
    std::fs::write(d.join("allowed_bob"), &bob_line).unwrap();

    // The message is the root digest in hex and a newline.
    let msg = ok(&vm(d, &["sign", pack.to_str().unwrap(), "--message"]));
    assert_eq!(msg, format!("{root}\n"));
    std::fs::write(d.join("msg"), &msg).unwrap();

    // Unsigned: refused.
    let e = fails(&vm(
        d,
        &[
            "verify",
            pack.to_str().unwrap(),
            "--allowed-signers",
            "allowed_alice",
        ],
    ));
    assert!(e.contains("not signed"), "{e}");

    // vmpack signs; ssh-keygen verifies it.
    let signed = d.join("signed.vmpack");
    ok(&vm(
        d,
        &[
            "sign",
            pack.to_str().unwrap(),
            "--key",
            alice.to_str().unwrap(),
            "-o",
            signed.to_str().unwrap(),
            "-q",
        ],
    ));
    let info = json(&vm(d, &["inspect", "--json", signed.to_str().unwrap()]));
    assert_eq!(
        info["root_digest"].as_str().unwrap(),
        root,
        "signing keeps the root digest"
    );
    std::fs::write(
        d.join("vm.sig"),
        info["signatures"][0]["signature"].as_str().unwrap(),
    )
    .unwrap();
    let o = Command::new("ssh-keygen")
        .args([
            "-Y",
            "verify",
            "-f",
            "allowed_alice",
            "-I",
            "alice@example.com",
            "-n",
            "vmpack",
            "-s",
            "vm.sig",
        ])
        .current_dir(d)
        .stdin(std::fs::File::open(d.join("msg")).unwrap())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ssh-keygen refused vmpack's signature: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let good = ok(&vm(
        d,
        &[
            "verify",
            signed.to_str().unwrap(),
            "--allowed-signers",
            "allowed_alice",
        ],
    ));
    assert!(
        good.contains("good signature by alice@example.com"),
        "{good}"
    );

    // A signer not in the file is refused, naming the key found.
    let e = fails(&vm(
        d,
        &[
            "verify",
            signed.to_str().unwrap(),
            "--allowed-signers",
            "allowed_bob",
        ],
    ));
    let fp = info["signatures"][0]["key"].as_str().unwrap();
    assert!(
        e.contains(fp) && e.contains("not in the allowed signers"),
        "{e}"
    );
    let e = fails(&vm(
        d,
        &[
            "restore",
            signed.to_str().unwrap(),
            "--require-signature",
            "--allowed-signers",
            "allowed_bob",
        ],
    ));
    assert!(e.contains(fp), "{e}");
    let e = fails(&vm(
        d,
        &[
            "restore",
            pack.to_str().unwrap(),
            "--require-signature",
            "--allowed-signers",
            "allowed_alice",
        ],
    ));
    assert!(e.contains("not signed"), "{e}");

    // ssh-keygen signs the documented message; vmpack attaches and verifies it.
    let o = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "vmpack", "-f"])
        .arg(&bob)
        .arg(d.join("msg"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    ok(&vm(
        d,
        &[
            "sign",
            signed.to_str().unwrap(),
            "--signature",
            "msg.sig",
            "-q",
        ],
    ));
    let good = ok(&vm(
        d,
        &[
            "verify",
            signed.to_str().unwrap(),
            "--allowed-signers",
            "allowed_bob",
        ],
    ));
    assert!(good.contains("good signature by bob@example.com"), "{good}");
    // A signature over another message is not attached.
    std::fs::write(d.join("other"), "something else\n").unwrap();
    Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "vmpack", "-f"])
        .arg(&bob)
        .arg(d.join("other"))
        .output()
        .unwrap();
    let e = fails(&vm(
        d,
        &["sign", signed.to_str().unwrap(), "--signature", "other.sig"],
    ));
    assert!(e.contains("not over this pack's root digest"), "{e}");
    // A byte flipped in the data is caught by verify before any signature is considered.
    let mut bad = std::fs::read(&signed).unwrap();
    bad[1000] ^= 1;
    std::fs::write(d.join("bad.vmpack"), bad).unwrap();
    fails(&vm(
        d,
        &["verify", "bad.vmpack", "--allowed-signers", "allowed_alice"],
    ));

    // Pushed: the signatures travel inside the pack and as OCI referrers (this registry has
    // no referrers API: the sha256-<digest> tag lists them).
    let reg = Registry::start(&d.join("reg"), None);
    let r = format!("{}/team/signed:v1", reg.host());
    let pushed = json(&vm(
        d,
        &["push", signed.to_str().unwrap(), &r, "--json", "-q"],
    ));
    assert_eq!(pushed["signatures"], 2);
    assert_eq!(pushed["referrers_api"], false);
    let tag = pushed["digest"].as_str().unwrap().replace(':', "-");
    let refs = skopeo_raw(&format!("{}/team/signed:{tag}", reg.host()));
    let list = refs["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{refs}");
    assert!(list
        .iter()
        .all(|m| m["artifactType"] == "application/vnd.vmpack.signature.v1"));
    let sigm = skopeo_raw(&format!(
        "{}/team/signed@{}",
        reg.host(),
        list[0]["digest"].as_str().unwrap()
    ));
    assert_eq!(sigm["subject"]["digest"], pushed["digest"], "{sigm}");
    let out = d.join("pulled.vmpack");
    ok(&vm(d, &["pull", &r, "-o", out.to_str().unwrap(), "-q"]));
    same_file(&signed, &out);
    ok(&vm(
        d,
        &[
            "verify",
            out.to_str().unwrap(),
            "--allowed-signers",
            "allowed_bob",
            "-q",
        ],
    ));
}

/// One HTTP request over a control socket.
fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::Read;
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

#[test]
fn a_second_save_uploads_only_the_changed_chunks() {
    if !kvm_available("the registry dedupe test")
        || !have("docker-registry", "the registry dedupe test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let sock = d.join("kv.sock");
    let mut guest = Command::new(bin("vmboot"))
        .args(["run", "--serial-out", "none", "--api-sock"])
        .arg(&sock)
        .arg(samples_dir().join("kvstore.toml"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let output = |sock: &Path| {
        let (_, body) = http(sock, "GET", "/vm/serial/output?since=0", b"");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["output"]
            .as_str()
            .unwrap()
            .to_string()
    };
    wait_for("the prompt", Duration::from_secs(20), || {
        sock.exists() && UnixStream::connect(&sock).is_ok() && output(&sock).ends_with("> ")
    });
    let r = format!("{}/team/kv:latest", reg.host());
    let first = ok(&vm(
        d,
        &[
            "save",
            "--api-sock",
            sock.to_str().unwrap(),
            "-o",
            "one.vmpack",
            "--push",
            &r,
            "-q",
        ],
    ));
    assert!(first.is_empty(), "quiet: {first}");
    // A pull fills the chunk cache with the first save's chunks.
    ok(&vm(d, &["pull", &r, "-o", "one-pulled.vmpack", "-q"]));
    same_file(&d.join("one.vmpack"), &d.join("one-pulled.vmpack"));
    let (st, _) = http(&sock, "PUT", "/vm/serial/input", b"set answer 42\n");
    assert_eq!(st, 204);
    wait_for("the answer", Duration::from_secs(20), || {
        output(&sock).ends_with("ok\n> ")
    });
    // The second save goes straight to the registry (no -o) and replaces the tag.
    ok(&vm(
        d,
        &[
            "save",
            "--api-sock",
            sock.to_str().unwrap(),
            "--push",
            &r,
            "--then",
            "stop",
            "-q",
        ],
    ));
    assert!(guest.wait().unwrap().success());
    let out = d.join("two.vmpack");
    let two = json(&vm(
        d,
        &["pull", &r, "-o", out.to_str().unwrap(), "--json", "-q"],
    ));
    let info = json(&vm(d, &["inspect", "--json", out.to_str().unwrap()]));
    let stored: u64 = info["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stored_bytes"].as_u64().unwrap())
        .sum();
    let fetched = two["fetched_bytes"].as_u64().unwrap();
    assert!(two["cached_blobs"].as_u64().unwrap() >= 1, "{two}");
    assert!(fetched < stored, "{two}");
    // The same on the push side: the second save after the first uploads only what changed.
    let r2 = format!("{}/team/kv2:latest", reg.host());
    ok(&vm(d, &["push", "one.vmpack", &r2, "-q"]));
    let up = json(&vm(
        d,
        &["push", out.to_str().unwrap(), &r2, "--json", "-q"],
    ));
    let uploaded = up["uploaded_bytes"].as_u64().unwrap();
    eprintln!(
        "second save: {stored} bytes of chunks; push uploaded {uploaded}, pull fetched {fetched}"
    );
    assert!(
        uploaded < stored && up["present_blobs"].as_u64().unwrap() >= 1,
        "{up}"
    );
    // The pulled second save resumes: its answer is there.
    let cases = d.join("cases.toml");
    std::fs::write(
        &cases,
        "[[case]]\nname = \"the answer survived\"\nsend = \"get answer\\n\"\nexpect = '42'\n",
    )
    .unwrap();
    ok(&vm(d, &["test", &r, cases.to_str().unwrap(), "-q"]));
}

/// Runs `config` under vmboot with its serial output in `dir/NAME.serial`, waits for
/// `needle`, saves it (`--then stop`) into `dir/NAME.vmpack` and returns the pack and the
/// serial output before the save.
fn run_and_save(
    dir: &Path,
    name: &str,
    config: impl AsRef<Path>,
    needle: &str,
    compress: &str,
) -> (PathBuf, String) {
    let sock = dir.join(format!("{name}.sock"));
    let serial = dir.join(format!("{name}.serial"));
    // Built first: the counter ends 6 s after it starts.
    let _ = vmpack();
    let mut guest = Command::new(bin("vmboot"))
        .arg("run")
        .arg(samples_dir().join(config.as_ref()))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-out")
        .arg(&serial)
        .env("VMPACK_CACHE_DIR", dir.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_for(needle, Duration::from_secs(60), || {
        text().contains(needle) && UnixStream::connect(&sock).is_ok()
    });
    let pack = dir.join(format!("{name}.vmpack"));
    ok(&vm(
        dir,
        &[
            "save",
            "--api-sock",
            sock.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--compress",
            compress,
            "--then",
            "stop",
            "-q",
        ],
    ));
    assert!(guest.wait().unwrap().success());
    (pack, text())
}

/// `vmpack restore REF` with its serial output in `dir/NAME.serial`: (output, serial).
fn restore_ref(dir: &Path, name: &str, r: &str) -> (Output, String) {
    let serial = dir.join(format!("{name}.serial"));
    let o = vm(
        dir,
        &["restore", r, "--serial-out", serial.to_str().unwrap()],
    );
    (o, std::fs::read_to_string(&serial).unwrap_or_default())
}

/// Restore straight from a registry: the guest resumes exactly where it was saved (the
/// joined serial output equals an uninterrupted run), memory comes lazily from the
/// registry, and the chunk cache then holds every blob, so a second restore fetches none.
/// `--clones N` from a reference runs N clones from one pulled file.
#[test]
fn restore_from_a_reference_continues_exactly_and_fills_the_chunk_cache() {
    if !kvm_available("the restore-from-registry test")
        || !have("docker-registry", "the restore-from-registry test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let expected: String = (1..=300).map(|i| format!("{i}\n")).collect();
    for compress in ["none", "zstd"] {
        let (pack, before) = run_and_save(d, compress, "counter64.toml", "\n20\n", compress);
        let r = format!("{}/team/counter:{compress}", reg.host());
        ok(&vm(d, &["push", pack.to_str().unwrap(), &r, "-q"]));
        let (o, after) = restore_ref(d, &format!("{compress}-1"), &r);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        assert_eq!(format!("{before}{after}"), expected, "{compress}: {err}");
        assert!(err.contains("memory: lazy"), "{err}");
        assert!(
            err.contains("memory and disks fetched on first touch"),
            "{err}"
        );
        // Memory came from the registry (the cache may already hold blobs the two packs
        // share, such as the boot image).
        assert!(!err.contains("fetched 0 blobs"), "{err}");
        // The second restore takes every chunk from the cache.
        let (o, after) = restore_ref(d, &format!("{compress}-2"), &r);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        assert_eq!(format!("{before}{after}"), expected, "{compress}: {err}");
        assert!(
            err.contains("fetched 0 blobs (0 bytes) from the registry"),
            "{err}"
        );
        // Nothing is left behind but the cache's own entries.
        let stray: Vec<_> = std::fs::read_dir(d.join("cache"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".remote-"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
    // --json: one line once the VM runs, before any serial output, from a reference (whose
    // manifest now comes from the cache, checked against the tag) and from a file.
    let r = format!("{}/team/counter:zstd", reg.host());
    let o = vm(
        d,
        &[
            "restore",
            &r,
            "--json",
            "--serial-out",
            "none",
            "--api-sock",
            "j.sock",
        ],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(j["clones"], 1, "{j}");
    assert_eq!(j["sockets"][0], "j.sock", "{j}");
    assert_eq!(j["reference"], r.as_str(), "{j}");
    assert_eq!(j["memory"], "lazy", "{j}");
    assert!(j["digest"].as_str().unwrap().starts_with("sha256:"), "{j}");
    assert!(j["milliseconds"].as_f64().unwrap() > 0.0, "{j}");
    let steps: Vec<&str> = j["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(
        steps.contains(&"manifest") && steps.contains(&"vCPUs start"),
        "{j}"
    );
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    let (pack, _) = (d.join("zstd.vmpack"), ());
    let o = vm(
        d,
        &[
            "restore",
            pack.to_str().unwrap(),
            "--json",
            "--serial-out",
            "none",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["clones"], 1, "{j}");
    assert!(j["sockets"].as_array().unwrap().is_empty(), "{j}");
    assert!(j["memory"].is_string(), "{j}");

    // A tag moved since its manifest was cached: found before the VM is built, and the
    // restore runs what the tag points to now.
    let moved = format!("{}/team/counter:none", reg.host());
    ok(&vm(d, &["push", pack.to_str().unwrap(), &moved, "-q"]));
    let (o, after) = restore_ref(d, "moved", &moved);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("the tag moved"), "{err}");
    assert!(after.ends_with("300\n"), "{after}");
    let (o, _) = restore_ref(d, "moved-2", &moved);
    assert!(!stderr(&o).contains("the tag moved"), "{}", stderr(&o));

    // Clones from a reference run from one pulled file, which then sits in the cache.
    let o = vm(d, &["restore", &r, "--clones", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for i in 0..2 {
        assert!(out.contains(&format!("[{i}] 300\n")), "{out}");
    }
    assert_eq!(
        std::fs::read_dir(d.join("cache/pulled")).unwrap().count(),
        1
    );
}

/// A memory chunk's blob altered in the registry's storage is refused on first touch,
/// naming the section and chunk: the VM stops (status 76) before the guest reads it, and
/// the bad blob never enters the chunk cache.
#[test]
fn restore_from_a_reference_refuses_an_altered_memory_blob() {
    if !kvm_available("the restore-from-registry test")
        || !have("docker-registry", "the restore-from-registry test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let (pack, _) = run_and_save(d, "m", "memtest.toml", "filled\n", "none");
    let r = format!("{}/team/memtest:v1", reg.host());
    ok(&vm(d, &["push", pack.to_str().unwrap(), &r, "-q"]));
    // The last stored memory chunk: memtest reads it late, long after the restore.
    let rd = vmpack_formats::pack::PackReader::open(&pack).unwrap();
    let chunks = rd.chunks(rd.section("memory/0").unwrap().id);
    let (seq, e) = chunks
        .iter()
        .enumerate()
        .rev()
        .find(|(_, e)| e.clen > 0)
        .unwrap();
    let hex = hex::encode(e.sha256);
    let data = reg
        .blob_files()
        .into_iter()
        .find(|p| p.parent().unwrap().file_name().unwrap().to_str() == Some(hex.as_str()))
        .expect("the chunk's blob in the registry's storage");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();
    let (o, out) = restore_ref(d, "bad", &r);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(76), "{err}");
    assert!(
        err.contains(&format!("section 'memory/0' chunk {seq}")),
        "{err}"
    );
    assert!(err.contains(&hex), "{err}");
    assert!(err.contains("failed verification"), "{err}");
    assert!(!out.contains("memtest:"), "the guest read it: {out}");
    assert!(
        !d.join("cache/chunks/sha256").join(&hex).exists(),
        "a refused blob never enters the chunk cache"
    );
}

/// The README's restore-from-registry figures (`cargo test -p vmpack-e2e --test registry --
/// --ignored --nocapture restore_from_registry_figures`): a 1 GiB guest holding 600 MiB of
/// incompressible data in RAM (the kvstore guest with the data behind its code) and a
/// 64 MiB disk of noise (which it never reads: it is fetched after the vCPUs start), pushed to
/// a loopback registry and restored from the reference with an empty chunk cache, then
/// again with the cache full; each restore is given a command as soon as its control socket
/// answers (the guest's answer is its first serial line) and shut down once its memory is
/// fully resident. Prints vmpack's own timing lines.
#[test]
#[ignore]
fn restore_from_registry_figures() {
    if !kvm_available("the restore-from-registry figures")
        || !have("docker-registry", "the restore-from-registry figures")
    {
        return;
    }
    use std::io::BufRead;
    use vmpack_formats::pack::{Compression, SectionRange, SectionSource, WriteOptions};
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let code = std::fs::read(samples_dir().join("guests/bin/kvstore.bin")).unwrap();
    let mut image = code.clone();
    image.extend(noise(600 << 20, 7));
    std::fs::write(d.join("big.bin"), &image).unwrap();
    drop(image);
    std::fs::write(d.join("disk.img"), noise(64 << 20, 11)).unwrap();
    std::fs::write(
        d.join("big.toml"),
        "name = \"big\"\nvcpus = 1\nmemory_mib = 1024\n[flat]\nimage = \"big.bin\"\nload_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n[[disk]]\npath = \"disk.img\"\nformat = \"raw\"\n",
    )
    .unwrap();
    let (saved, _) = run_and_save(d, "big", d.join("big.toml"), "> ", "none");
    // The saved pack also holds the 600 MiB image as a boot file; the RAM already has it, so
    // the pack measured carries only the code as its image (what a real guest's is).
    let pack = d.join("ram.vmpack");
    {
        let old = vmpack_formats::vm::VmPack::open(&saved).unwrap();
        let r = old.reader();
        let cfg = old.config().unwrap();
        let state = r
            .read_section(r.section("vmstate").unwrap().id, 1 << 30)
            .unwrap();
        let mem = r.section("memory/0").unwrap();
        let ram = SectionRange::whole(r, mem.id);
        let disk = SectionRange::whole(r, r.section("disk/0").unwrap().id);
        let plan = vmpack_formats::vm::VmPackPlan {
            memory: vec![(0, &ram as &dyn SectionSource)],
            disks: Some(vec![&disk as &dyn SectionSource]),
            vmstate: Some(&state),
            files: Some(vec![("image", &code as &dyn SectionSource)]),
            memory_chunk_size: Some(mem.chunk_size),
            ..Default::default()
        };
        let opts = WriteOptions {
            compression: Compression::None,
            aligned: true,
            ..WriteOptions::default()
        };
        vmpack_formats::vm::write_vm_pack(
            std::fs::File::create(&pack).unwrap(),
            &cfg,
            plan,
            &opts,
            &(),
        )
        .unwrap();
    }
    std::fs::remove_file(&saved).unwrap();
    let r = format!("{}/bench/big:v1", reg.host());
    ok(&vm(d, &["push", pack.to_str().unwrap(), &r, "-q"]));
    for run in ["empty chunk cache", "full chunk cache"] {
        let sock = d.join("r.sock");
        let mut child = Command::new(vmpack())
            .current_dir(d)
            .env("VMPACK_CACHE_DIR", d.join("cache"))
            .args(["restore", &r, "--serial-out", "none", "--api-sock"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A command for the guest as soon as it runs: its answer is the first serial line, and
        // vmpack says how many chunk bytes had come by then.
        wait_for("the control socket", Duration::from_secs(60), || {
            UnixStream::connect(&sock).is_ok()
        });
        let (st, _) = http(&sock, "PUT", "/vm/serial/input", b"get nothing\n");
        assert_eq!(st, 204);
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut err = String::new();
        for l in lines.by_ref() {
            let l = l.unwrap();
            err += &l;
            err.push('\n');
            if l.contains("fully resident") {
                break;
            }
        }
        assert!(err.contains("fully resident"), "{err}");
        let (st, _) = http(&sock, "PUT", "/vm/shutdown", b"");
        assert_eq!(st, 204);
        for l in lines {
            err += &l.unwrap();
            err.push('\n');
        }
        assert!(child.wait().unwrap().success(), "{err}");
        eprintln!("--- {run}:\n{err}");
    }
}

/// Restore straight from a registry of a VM with a 64 MiB disk (the blk guest, saved after
/// its first pass of writes): the vCPUs start before any of the disk is fetched (the
/// `--json` line counts the disk chunks still to come), the guest continues exactly, and a
/// save of the restored VM holds the whole disk, the chunks the guest never read included.
#[test]
fn restore_from_a_reference_fetches_the_disk_on_demand() {
    if !kvm_available("the restore-from-registry test")
        || !have("docker-registry", "the restore-from-registry test")
    {
        return;
    }
    use common::blk::{checksum, pattern, PASSES, SECTORS};
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let content = noise(64 << 20, 93);
    std::fs::write(d.join("big.img"), &content).unwrap();
    let _ = bin("vmboot");
    std::fs::write(
        d.join("big.toml"),
        format!(
            "name = \"blk\"\nmemory_mib = 16\n[flat]\nimage = \"{}\"\nload_address = 0x100000\n\
             entry = 0x100000\nmode = \"long\"\n[[disk]]\npath = \"big.img\"\nformat = \"raw\"\n",
            samples_dir().join("guests/bin/blk.bin").display()
        ),
    )
    .unwrap();
    let (pack, before) = run_and_save(d, "big", d.join("big.toml"), "pass 1 written\n", "zstd");
    let r = format!("{}/team/blk:v1", reg.host());
    ok(&vm(d, &["push", pack.to_str().unwrap(), &r, "-q"]));
    let (serial, sock) = (d.join("big2.serial"), d.join("big2.sock"));
    let child = Command::new(vmpack())
        .current_dir(d)
        .env("VMPACK_CACHE_DIR", d.join("cache"))
        .args(["restore", &r, "--json", "--serial-out"])
        .arg(&serial)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = common::blk::Running::from_child(child);
    run.wait_for("\n", Duration::from_secs(60));
    let line = run.out.lock().unwrap().lines().next().unwrap().to_string();
    let j: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(j["memory"], "lazy", "{j}");
    assert_eq!(j["disk_chunks_pending"], 64, "{j}");
    let text = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_for("pass 3 written", Duration::from_secs(120), || {
        text().contains("pass 3 written\n")
    });
    let end = d.join("end.vmpack");
    common::blk::save(d, &sock, &end, "resume");
    let (code, _, err) = run.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("memory and disks fetched on first touch"),
        "{err}"
    );
    assert!(err.contains("disks fully fetched"), "{err}");
    let mut want = format!(
        "capacity {}\npass 0 sum={}\n",
        (64 << 20) / 512,
        checksum(&content)
    );
    for p in 1..=PASSES {
        let data: Vec<u8> = (0..SECTORS).flat_map(|s| pattern(s, p)).collect();
        want += &format!("pass {p} written\npass {p} sum={} bad=0\n", checksum(&data));
    }
    want += "flush status=0\nid vmboot-disk0\n";
    assert_eq!(format!("{before}{}", text()), want, "{err}");
    let mut last = content;
    for s in 0..SECTORS {
        let o = (s * 512) as usize;
        last[o..o + 512].copy_from_slice(&pattern(s, PASSES));
    }
    assert!(
        common::blk::export_disk(d, &end, "end-export") == last,
        "the later save's disk is not the whole disk as the guest left it"
    );

    // A disk chunk altered in the registry's storage (one the guest never reads: the
    // background fill meets it) stops the VM, naming the section and chunk.
    let rd = vmpack_formats::pack::PackReader::open(&pack).unwrap();
    let e = rd.chunks(rd.section("disk/0").unwrap().id)[10].clone();
    let hex = hex::encode(e.sha256);
    let blob = reg
        .blob_files()
        .into_iter()
        .find(|p| p.parent().unwrap().file_name().unwrap().to_str() == Some(hex.as_str()))
        .expect("the chunk's blob in the registry's storage");
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&blob, bytes).unwrap();
    std::fs::remove_dir_all(d.join("cache/chunks")).unwrap();
    let (o, _) = restore_ref(d, "bad", &r);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(76), "{err}");
    assert!(err.contains("section 'disk/0' chunk 10"), "{err}");
    assert!(err.contains("disk 0 at 0xa00000..0xb00000"), "{err}");
    assert!(err.contains("failed verification"), "{err}");
}

/// `vmpack save` of the VM behind `sock` into `out`, optionally `--diff-from PARENT`.
fn save_to(dir: &Path, sock: &Path, out: &Path, diff_from: Option<&Path>, then: &str) {
    let mut args = vec![
        "save",
        "--api-sock",
        sock.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--then",
        then,
        "-q",
    ];
    if let Some(p) = diff_from {
        args.extend(["--diff-from", p.to_str().unwrap()]);
    }
    ok(&vm(dir, &args));
}

/// A chain of diff packs through a registry: `push CHILD REF` sends its parents first (each
/// tagged by its root digest) and names the parent in the child's config; `restore REF`
/// continues exactly; `pull REF` writes the child with its parents next to it under the
/// names its manifest gives, and that chain verifies and restores exactly; a parent's blob
/// altered in the registry is refused naming the parent and the chunk.
#[test]
fn a_diff_chain_pushed_restored_and_pulled_through_a_registry() {
    if !kvm_available("the diff-chain registry test")
        || !have("docker-registry", "the diff-chain registry test")
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let reg = Registry::start(&d.join("reg"), None);
    let p = |n: &str| d.join(n);
    let sock = p("a.sock");
    let serial = p("a.serial");
    let _ = vmpack();
    let mut guest = Command::new(bin("vmboot"))
        .arg("run")
        .arg(samples_dir().join("counter64.toml"))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-out")
        .arg(&serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&serial).unwrap_or_default();
    for (needle, name, parent, then) in [
        ("\n10\n", "base.vmpack", None, "resume"),
        ("\n20\n", "d1.vmpack", Some("base.vmpack"), "resume"),
        ("\n30\n", "d2.vmpack", Some("d1.vmpack"), "stop"),
    ] {
        wait_for(needle, Duration::from_secs(60), || {
            text().contains(needle) && UnixStream::connect(&sock).is_ok()
        });
        save_to(d, &sock, &p(name), parent.map(&p).as_deref(), then);
    }
    assert!(guest.wait().unwrap().success());
    let before = text();
    let root = |f: &Path| {
        hex::encode(
            vmpack_formats::pack::PackReader::open(f)
                .unwrap()
                .root_digest(),
        )
    };

    let r = format!("{}/team/chain:v1", reg.host());
    let o = vm(d, &["push", "d2.vmpack", &r, "--json"]);
    let j = json(&o);
    assert_eq!(
        j["parent"]["root_digest"],
        format!("sha256:{}", root(&p("d1.vmpack"))),
        "{j}"
    );
    let err = stderr(&o);
    for f in ["base.vmpack", "d1.vmpack"] {
        let tag = format!("{}/team/chain:vmpack-root-{}", reg.host(), root(&p(f)));
        assert!(
            err.contains(&format!("pushed the parent pack {f} as {tag}")),
            "{err}"
        );
    }

    // Restored straight from the reference: the chain comes from the registry.
    let (o, after) = restore_ref(d, "r", &r);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("memory: lazy, layered over the parent packs"),
        "{err}"
    );
    assert_eq!(
        format!("{before}{after}"),
        (1..=300).map(|i| format!("{i}\n")).collect::<String>(),
        "{err}"
    );

    // --memory eager: every pack of the chain fetched whole first, then layered.
    let serial = d.join("e.serial");
    let o = vm(
        d,
        &[
            "restore",
            &r,
            "--memory",
            "eager",
            "--serial-out",
            serial.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), after);

    // Pulled: the child, and its parents beside it under the names the manifests give.
    std::fs::create_dir(p("out")).unwrap();
    ok(&vm(d, &["pull", &r, "-o", "out/child.vmpack", "-q"]));
    for f in ["base.vmpack", "d1.vmpack"] {
        same_file(&p(f), &p("out").join(f));
    }
    same_file(&p("d2.vmpack"), &p("out/child.vmpack"));
    ok(&vm(d, &["verify", "out/child.vmpack"]));
    let o = vm(
        d,
        &[
            "restore",
            "out/child.vmpack",
            "--serial-out",
            "pulled.serial",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(p("pulled.serial")).unwrap(), after);
    // Clones from the reference run from one pulled chain, in a folder of its own in the
    // cache (other chains' parents may have the same names).
    let o = vm(d, &["restore", &r, "--clones", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for i in 0..2 {
        assert!(out.contains(&format!("[{i}] 300\n")), "{out}");
    }
    let chains: Vec<_> = std::fs::read_dir(d.join("cache/pulled"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(chains.len(), 1, "{chains:?}");
    assert_eq!(
        std::fs::read_dir(chains[0].path()).unwrap().count(),
        3,
        "the child and its two parents"
    );
    // A file under a parent's name that is not that parent is never replaced.
    std::fs::create_dir(p("out2")).unwrap();
    std::fs::write(p("out2/d1.vmpack"), b"mine").unwrap();
    let e = fails(&vm(d, &["pull", &r, "-o", "out2/child.vmpack", "-q"]));
    assert!(e.contains("exists and is not the parent pack"), "{e}");
    assert_eq!(std::fs::read(p("out2/d1.vmpack")).unwrap(), b"mine");
    assert!(!p("out2/child.vmpack").exists());

    // A blob of a base altered in the registry's storage: one no other pack shares, of a
    // region chunk the diff does not replace (so a lazy restore reads it from the base).
    // memtest fills 30 MiB, then checks it: its base holds chunks no diff replaces.
    let msock = p("m.sock");
    let mserial = p("m.serial");
    let mut guest = Command::new(bin("vmboot"))
        .arg("run")
        .arg(samples_dir().join("memtest.toml"))
        .arg("--api-sock")
        .arg(&msock)
        .arg("--serial-out")
        .arg(&mserial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("memtest to fill", Duration::from_secs(60), || {
        std::fs::read_to_string(&mserial)
            .unwrap_or_default()
            .contains("filled")
            && UnixStream::connect(&msock).is_ok()
    });
    save_to(d, &msock, &p("mbase.vmpack"), None, "resume");
    save_to(
        d,
        &msock,
        &p("mdiff.vmpack"),
        Some(&p("mbase.vmpack")),
        "stop",
    );
    assert!(guest.wait().unwrap().success());
    let r = format!("{}/team/chain:memtest", reg.host());
    ok(&vm(d, &["push", "mdiff.vmpack", &r, "-q"]));
    let diff = vmpack_formats::vm::VmPack::open(&p("mdiff.vmpack")).unwrap();
    let m = &diff.manifest().memory[0];
    let ds = diff.reader().section(&m.section).unwrap();
    let map = vmpack_formats::diff::ChunkMap::from_section(ds, m.size).unwrap();
    let newer: Vec<String> = diff
        .reader()
        .chunks(ds.id)
        .iter()
        .map(|e| hex::encode(e.sha256))
        .collect();
    let rd = vmpack_formats::pack::PackReader::open(&p("mbase.vmpack")).unwrap();
    let cs = u64::from(rd.section("memory/0").unwrap().chunk_size);
    let (seq, e) = rd
        .chunks(rd.section("memory/0").unwrap().id)
        .iter()
        .enumerate()
        .find(|(_, e)| {
            e.clen > 0 && !newer.contains(&hex::encode(e.sha256)) && !map.get(e.offset / cs)
        })
        .expect("a base chunk of its own");
    let hex = hex::encode(e.sha256);
    let data = reg
        .blob_files()
        .into_iter()
        .find(|b| b.parent().unwrap().file_name().unwrap().to_str() == Some(hex.as_str()))
        .expect("the chunk's blob in the registry's storage");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();
    std::fs::create_dir(p("out3")).unwrap();
    let fresh = p("cache2");
    let o = vm_env(
        d,
        &["pull", &r, "-o", "out3/child.vmpack", "-q"],
        &[("VMPACK_CACHE_DIR", fresh.to_str().unwrap())],
    );
    let e = fails(&o);
    assert!(
        e.contains(&format!("section 'memory/0' chunk {seq}")),
        "{e}"
    );
    assert!(e.contains(&hex), "{e}");
    assert!(e.contains("/team/chain@sha256:"), "{e}");
    assert_eq!(std::fs::read_dir(p("out3")).unwrap().count(), 0);
    // restore REF, with an empty cache too: the chain is served on first touch, and the
    // altered chunk (reached by the guest or the prefetch) stops the VM naming the parent's
    // reference and the chunk, before the guest reads it.
    let o = vm_env(
        d,
        &["restore", &r, "--serial-out", "bad.serial"],
        &[("VMPACK_CACHE_DIR", p("cache3").to_str().unwrap())],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(76), "{e}");
    assert!(
        e.contains(&format!("section 'memory/0' chunk {seq}"))
            && e.contains(&hex)
            && e.contains("/team/chain@sha256:"),
        "{e}"
    );
    assert!(!std::fs::read_to_string(p("bad.serial"))
        .unwrap_or_default()
        .contains("pages ok"));
}
