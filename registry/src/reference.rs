//! Image references: `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`, as docker and skopeo
//! spell them.

use anyhow::{bail, Result};
use std::fmt;

/// Where Docker Hub serves the registry API; `docker.io/...` references go there.
const DOCKER_HUB: &str = "registry-1.docker.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (credentials are looked up under it).
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |why: &str| anyhow::anyhow!("{s}: not an image reference: {why}");
        if s.is_empty() || s.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("the digest must be sha256:<64 hex digits>"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(bad("the digest must be sha256:<64 lowercase hex digits>"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (first, remainder) = match rest.split_once('/') {
            Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => (Some(f), r),
            _ => (None, rest),
        };
        // A tag is after the last ':' that follows the last '/'.
        let (repo, tag) = match remainder.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (remainder, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad(
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                ));
            }
        }
        if repo.is_empty()
            || !repo.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
        {
            return Err(bad(
                "repository names are lowercase path components of [a-z0-9._-]",
            ));
        }
        let (registry, repository) = match first {
            Some("docker.io") | Some("index.docker.io") | None => {
                let repo = if repo.contains('/') {
                    repo.to_string()
                } else {
                    format!("library/{repo}")
                };
                ("docker.io".to_string(), repo)
            }
            Some(r) => (r.to_string(), repo.to_string()),
        };
        if tag.is_none() && digest.is_none() {
            bail!("{s}: not an image reference: give a tag (:TAG) or a digest (@sha256:...)");
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What the manifest endpoint takes: the digest if given, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .expect("a reference has a tag or a digest")
    }

    /// The host the API lives on.
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            DOCKER_HUB
        } else {
            &self.registry
        }
    }

    /// Loopback registries may be reached over plain HTTP without `--insecure`.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => self.registry.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether a string is meant as a reference rather than a file path: it names a
    /// registry host (`host.domain/…`, `host:port/…`, `localhost/…`) and a tag or digest.
    pub fn looks_like(s: &str) -> bool {
        match s.split_once('/') {
            Some((f, _)) => {
                (f.contains('.') || f.contains(':') || f == "localhost")
                    && !s.starts_with('.')
                    && Reference::parse(s).is_ok()
            }
            None => false,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let r = Reference::parse("localhost:5000/team/vm:v1").unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "team/vm");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.is_loopback());
        let r = Reference::parse(&format!("127.0.0.1:5055/vm@sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(r.manifest_reference(), format!("sha256:{}", "a".repeat(64)));
        let r = Reference::parse("ghcr.io/org/vm:latest").unwrap();
        assert!(!r.is_loopback());
        let r = Reference::parse("ubuntu:22.04").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/ubuntu")
        );
        assert!(Reference::parse("localhost:5000/vm").is_err());
        assert!(Reference::parse("localhost:5000/VM:x").is_err());
        assert!(Reference::looks_like("localhost:5000/vm:x"));
        assert!(!Reference::looks_like("dir/file.vmpack"));
        assert!(!Reference::looks_like("file.vmpack"));
    }
}
