//! What a restore of a pack file would do about lazy memory on this host (`vmpack inspect`'s
//! "lazy restore" line): above `vstate`, since it asks the pack modules (the verified-pack
//! cache, a diff pack's chain) as a restore does.

use crate::verified_cache;
use crate::vstate::lazy::{available, touch_dir, touch_order, ChunkTable, PAGE};
use std::sync::Arc;
use vmpack_formats::vm::VmPack;

/// What a restore of a pack file does about lazy memory on this host (`vmpack inspect`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LazyPlan {
    /// Whether `--memory lazy` can restore it here.
    pub possible: bool,
    /// Why not, when it cannot.
    pub why_not: Option<String>,
    /// Memory chunks served on first touch (for a diff pack, over its chain).
    pub chunks: usize,
    /// How many chunks the touch order recorded by an earlier lazy restore on this host
    /// holds (prefetched first); `None` when none was recorded.
    pub touch_order: Option<usize>,
    /// The path `--memory auto` (with `--verify auto`) takes here now: `lazy`, `mmap`,
    /// `decompress`, or for a diff pack `layered` (mapped or unpacked over its parents).
    pub auto: &'static str,
}

/// The [`LazyPlan`] of the pack at `path` (`parent` as for a restore of a diff pack).
pub fn plan(path: &std::path::Path, parent: Option<&std::path::Path>) -> LazyPlan {
    let mut plan = LazyPlan {
        possible: false,
        why_not: None,
        chunks: 0,
        touch_order: None,
        auto: "none",
    };
    let pack = match VmPack::open(path) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            plan.why_not = Some(e.to_string());
            return plan;
        }
    };
    let m = pack.manifest();
    if m.vmstate.is_none() || m.memory.is_empty() {
        plan.why_not = Some("not a saved VM (no vmstate or no memory)".into());
        return plan;
    }
    let reader = pack.reader();
    let root = reader.root_digest();
    let known = verified_cache::is_verified(path, root);
    let eager = m.memory_restore_path(reader).unwrap_or("decompress");
    let table = if m.parent.is_some() {
        plan.auto = "layered";
        vmpack_formats::diff::open_chain(path, parent)
            .map_err(|e| format!("its chain is broken: {e}"))
            .and_then(|c| {
                crate::diff::chain_table(&c).map_err(|e| crate::error::Chain(&e).to_string())
            })
    } else if m.has_overlays() {
        // A live save's pack: base and overlay, the same table a restore serves.
        plan.auto = eager;
        vmpack_formats::diff::open_chain(path, None)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                crate::diff::chain_table(&c).map_err(|e| crate::error::Chain(&e).to_string())
            })
    } else {
        plan.auto = eager;
        m.memory
            .iter()
            .map(|x| {
                reader
                    .section(&x.section)
                    .map(|s| (x.gpa, s.id))
                    .ok_or_else(|| format!("section '{}' is missing", x.section))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|sections| ChunkTable::of_pack(pack.clone(), &sections))
    };
    let table = match table {
        Ok(t) => t,
        Err(e) => {
            plan.why_not = Some(e);
            return plan;
        }
    };
    plan.chunks = table.chunks.len();
    if let Some(c) = table
        .chunks
        .iter()
        .find(|c| c.gpa % PAGE != 0 || u64::from(c.entry.ulen) % PAGE != 0)
    {
        plan.why_not = Some(format!(
            "memory chunk {} at guest address {:#x} is not page-aligned",
            c.entry.seq, c.gpa
        ));
        return plan;
    }
    if let Some(d) = touch_dir(verified_cache::base_dir()) {
        if d.join(hex::encode(root)).is_file() {
            plan.touch_order = Some(touch_order::load(&d, root, plan.chunks).len());
        }
    }
    if !available() {
        plan.why_not = Some(
            "userfaultfd is not available to this process (vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE)"
                .into(),
        );
        return plan;
    }
    plan.possible = true;
    if m.parent.is_none() && (!known || eager != "mmap") {
        plan.auto = "lazy";
    }
    plan
}
