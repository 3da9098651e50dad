//! A restored VM's network identity: `--net-tap` and `--mac` of `vmpack restore` (also with
//! `--clones N`) and `vmpack test`, turned into the per-clone override vmboot applies to
//! the pack's first `[[net]]` (docs/TESTING.md, "What a clone shares and what it gets fresh").

use crate::util::Usage;
use anyhow::Result;
use clap::Args;
use vmboot::devices::virtio::net::NetOverride;
use vmpack_formats::config::MacAddr;

#[derive(Args, Clone, Debug, Default)]
pub struct NetIdentityArgs {
    /// Attach the VM's first [[net]] to this host tap instead of the packed one; `%d` stands
    /// for the clone index (0 without --clones), e.g. `tap%d`. The tap must exist.
    #[arg(long, value_name = "NAME")]
    pub net_tap: Option<String>,
    /// Give the VM's first [[net]] this MAC, or `auto`: the locally administered
    /// 02:76:6d:HH:LL:00, HHLL the clone index (0 without --clones). The guest gets a
    /// configuration-change interrupt when its MAC changes.
    #[arg(long, value_name = "MAC|auto")]
    pub mac: Option<String>,
}

impl NetIdentityArgs {
    /// Checks the flags for `clones` VMs: with more than one, a tap needs `%d` and a MAC
    /// must be `auto`, so no two clones share either.
    pub fn check(&self, clones: usize) -> Result<()> {
        if clones > 1 {
            if let Some(t) = &self.net_tap {
                if !t.contains("%d") {
                    return Err(Usage(format!(
                        "--net-tap {t}: with several clones the name needs %d (the clone index), e.g. tap%d"
                    ))
                    .into());
                }
            }
            if let Some(m) = &self.mac {
                if m != "auto" {
                    return Err(Usage(format!(
                        "--mac {m}: several clones cannot share one MAC; use --mac auto"
                    ))
                    .into());
                }
            }
        }
        // Every name and address is checked before any VM starts.
        for i in [0, clones.saturating_sub(1)] {
            self.for_clone(i)?;
        }
        Ok(())
    }

    /// The override for clone `i`.
    pub fn for_clone(&self, i: usize) -> Result<NetOverride> {
        let tap = match &self.net_tap {
            Some(t) => {
                let name = t.replace("%d", &i.to_string());
                vmpack_formats::config::check_ifname(&name)
                    .map_err(|e| Usage(format!("--net-tap {t}: {e}")))?;
                Some(name)
            }
            None => None,
        };
        let mac = match self.mac.as_deref() {
            None => None,
            Some("auto") => Some(MacAddr::auto(i as u32, 0)),
            Some(m) => Some(
                m.parse::<MacAddr>()
                    .map_err(|e| Usage(format!("--mac: {e}")))?,
            ),
        };
        Ok(NetOverride { tap, mac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_clone_names_and_macs() {
        let a = NetIdentityArgs {
            net_tap: Some("tap%d".into()),
            mac: Some("auto".into()),
        };
        a.check(10).unwrap();
        let o = a.for_clone(9).unwrap();
        assert_eq!(o.tap.as_deref(), Some("tap9"));
        assert_eq!(o.mac.unwrap().to_string(), "02:76:6d:00:09:00");
        let fixed = NetIdentityArgs {
            net_tap: Some("tap0".into()),
            mac: Some("02:00:00:00:00:01".into()),
        };
        fixed.check(1).unwrap();
        assert!(fixed.check(2).is_err());
        let long = NetIdentityArgs {
            net_tap: Some("averyveryverylongtap%d".into()),
            mac: None,
        };
        assert!(long.check(2).is_err());
        let multicast = NetIdentityArgs {
            net_tap: None,
            mac: Some("01:00:00:00:00:01".into()),
        };
        assert!(multicast.check(1).is_err());
    }
}
