//! SSH signatures over a pack's root digest (docs/FORMAT.md §3.6): the SSHSIG format of
//! `ssh-keygen -Y sign` with namespace [`NAMESPACE`], over the message [`message`], checked
//! against git's allowed-signers file format.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

pub const NAMESPACE: &str = "vmpack";

/// The signed message: the root digest in lowercase hex and a newline (65 bytes), so
/// `vmpack inspect --json | jq -r .root_digest` (or `echo`) recreates it for `ssh-keygen`.
pub fn message(root: &[u8; 32]) -> Vec<u8> {
    format!("{}\n", hex::encode(root)).into_bytes()
}

/// Signs `root` with the OpenSSH private key at `key` (unencrypted; for a key with a
/// passphrase or in an agent, sign with `ssh-keygen -Y sign` and attach the result).
/// Returns the armored signature.
pub fn sign(key: &Path, root: &[u8; 32]) -> Result<Vec<u8>> {
    let k = PrivateKey::read_openssh_file(key)
        .with_context(|| format!("{}: not an OpenSSH private key", key.display()))?;
    if k.is_encrypted() {
        bail!(
            "{}: the key has a passphrase; sign with `ssh-keygen -Y sign -n {NAMESPACE} -f KEY MSG` \
             and attach it with `vmpack sign PACK --signature MSG.sig` (docs/SECURITY.md)",
            key.display()
        );
    }
    let sig = k
        .sign(NAMESPACE, HashAlg::Sha512, &message(root))
        .with_context(|| format!("{}: signing", key.display()))?;
    Ok(sig.to_pem(LineEnding::LF)?.into_bytes())
}

/// One allowed-signers entry.
#[derive(Debug, Clone)]
pub struct AllowedSigner {
    pub principals: String,
    pub key: PublicKey,
    namespaces: Option<Vec<String>>,
    cert_authority: bool,
    line: usize,
}

/// Splits on whitespace outside double quotes.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parses an allowed-signers file (`ssh-keygen(1)`, ALLOWED SIGNERS): per line
/// `principals [options] keytype base64-key [comment]`. Supported options: `namespaces`,
/// `cert-authority` (such lines are skipped: vmpack checks plain keys),
/// `valid-after`/`valid-before` (refused: vmpack signatures carry no time).
pub fn parse_allowed_signers(path: &Path) -> Result<Vec<AllowedSigner>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}: line {}", path.display(), i + 1);
        let t = tokens(line);
        if t.len() < 3 {
            bail!("{}: expected `principals [options] keytype key`", at());
        }
        let is_keytype =
            |s: &str| s.starts_with("ssh-") || s.starts_with("ecdsa-") || s.starts_with("sk-");
        let (options, rest) = if is_keytype(&t[1]) {
            (None, &t[1..])
        } else {
            (Some(&t[1]), &t[2..])
        };
        if rest.len() < 2 {
            bail!("{}: no key after the options", at());
        }
        let key = PublicKey::from_openssh(&format!("{} {}", rest[0], rest[1]))
            .map_err(|e| anyhow!("{}: bad public key: {e}", at()))?;
        let mut namespaces = None;
        let mut cert_authority = false;
        if let Some(opts) = options {
            for opt in split_options(opts) {
                let (k, v) = opt.split_once('=').unwrap_or((opt.as_str(), ""));
                let v = v.trim_matches('"');
                match k.to_ascii_lowercase().as_str() {
                    "namespaces" => {
                        namespaces = Some(v.split(',').map(|s| s.trim().to_string()).collect())
                    }
                    "cert-authority" => cert_authority = true,
                    "valid-after" | "valid-before" => bail!(
                        "{}: option {k} is not supported (vmpack signatures carry no signing time)",
                        at()
                    ),
                    _ => bail!("{}: unknown option '{k}'", at()),
                }
            }
        }
        out.push(AllowedSigner {
            principals: t[0].trim_matches('"').to_string(),
            key,
            namespaces,
            cert_authority,
            line: i + 1,
        });
    }
    Ok(out)
}

fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in s.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The verdict on one signature of a pack.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignatureCheck {
    /// `ED25519 SHA256:...` (`ssh-keygen -l` style) of the signing key, if readable.
    pub key: Option<String>,
    /// Principals of the allowed-signers line that matched.
    pub signer: Option<String>,
    /// Good and from an allowed signer.
    pub ok: bool,
    /// Why not, when not.
    pub problem: Option<String>,
}

fn describe(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm()
            .as_str()
            .trim_start_matches("ssh-")
            .to_ascii_uppercase(),
        key.fingerprint(HashAlg::Sha256)
    )
}

/// Checks one armored signature over `root` against `allowed`.
pub fn check(sig: &[u8], root: &[u8; 32], allowed: &[AllowedSigner]) -> SignatureCheck {
    let bad = |key: Option<String>, why: String| SignatureCheck {
        key,
        signer: None,
        ok: false,
        problem: Some(why),
    };
    let parsed = match SshSig::from_pem(sig) {
        Ok(s) => s,
        Err(e) => return bad(None, format!("not an SSH signature: {e}")),
    };
    let key = PublicKey::from(parsed.public_key().clone());
    let name = describe(&key);
    if parsed.namespace() != NAMESPACE {
        return bad(
            Some(name),
            format!("namespace is '{}', not '{NAMESPACE}'", parsed.namespace()),
        );
    }
    if let Err(e) = key.verify(NAMESPACE, &message(root), &parsed) {
        return bad(
            Some(name),
            format!("does not match this pack's root digest ({e})"),
        );
    }
    let entry = allowed.iter().find(|a| {
        !a.cert_authority
            && a.key.key_data() == key.key_data()
            && a.namespaces
                .as_ref()
                .is_none_or(|ns| ns.iter().any(|n| n == NAMESPACE || n == "*"))
    });
    match entry {
        Some(a) => SignatureCheck {
            key: Some(name),
            signer: Some(a.principals.clone()),
            ok: true,
            problem: None,
        },
        None => bad(Some(name), "the key is not in the allowed signers".into()),
    }
}

/// Which line of the allowed-signers file an entry came from (for messages).
pub fn line_of(a: &AllowedSigner) -> usize {
    a.line
}

/// Checks that `sig` is a well-formed signature over `root` in the vmpack namespace
/// (whoever made it): what `vmpack sign --signature` requires before attaching one.
pub fn check_own(sig: &[u8], root: &[u8; 32]) -> Result<String> {
    let parsed = SshSig::from_pem(sig).map_err(|e| anyhow!("not an SSH signature: {e}"))?;
    let key = PublicKey::from(parsed.public_key().clone());
    if parsed.namespace() != NAMESPACE {
        bail!(
            "the signature's namespace is '{}', not '{NAMESPACE}'",
            parsed.namespace()
        );
    }
    key.verify(NAMESPACE, &message(root), &parsed)
        .map_err(|e| anyhow!("the signature is not over this pack's root digest ({e})"))?;
    Ok(describe(&key))
}
