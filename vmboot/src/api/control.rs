//! The API server's view of a VM: [`VmControl`] for [`VmHandle`], and the one mapping of the
//! VMM's errors onto the API's.

use super::server::VmControl;
use super::types::{
    AfterSave, ApiError, Compression, DirtyLog, DirtyMark, ResetStats, RunState, SaveRequest,
    SerialOutput, VmStatus,
};
use crate::error::Chain;
use crate::vmm::{self, PauseError, VmHandle};
use crate::vstate;
use std::io::Write;

impl From<PauseError> for ApiError {
    fn from(e: PauseError) -> Self {
        match e {
            PauseError::Ended(_) => ApiError::conflict(e.to_string()),
            PauseError::TimedOut { .. } => ApiError::timeout(e.to_string()),
        }
    }
}

impl VmControl for VmHandle {
    fn status(&self) -> VmStatus {
        VmHandle::status(self)
    }

    fn pause(&self) -> Result<(), ApiError> {
        Ok(VmHandle::pause(self)?)
    }

    fn resume(&self) -> Result<(), ApiError> {
        Ok(VmHandle::resume(self)?)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        VmHandle::shutdown(self);
        Ok(())
    }

    fn serial_input(&self, bytes: &[u8]) -> Result<(), ApiError> {
        VmHandle::serial_input(self, bytes, std::time::Duration::from_secs(5))
            .map_err(|e| ApiError::conflict(Chain(&e).to_string()))
    }

    fn serial_output(&self, since: u64) -> Result<SerialOutput, ApiError> {
        let log = self
            .serial_log()
            .ok_or_else(|| ApiError::not_found("this VM keeps no serial output"))?;
        let (start, bytes) = log.since(usize::try_from(since).unwrap_or(usize::MAX));
        Ok(SerialOutput {
            start: start as u64,
            next: (start + bytes.len()) as u64,
            ended: self.run_state() == RunState::Stopped,
            output: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    fn reset(&self) -> Result<ResetStats, ApiError> {
        let stats = VmHandle::reset(self).map_err(|e| {
            let msg = Chain(&e).to_string();
            match e {
                vmm::Error::ResetFailed(_) => ApiError::internal(msg),
                _ => ApiError::conflict(msg),
            }
        })?;
        Ok(stats)
    }

    fn dirty_mark(&self) -> Result<DirtyMark, ApiError> {
        let mark =
            VmHandle::dirty_mark(self).map_err(|e| ApiError::internal(Chain(&e).to_string()))?;
        Ok(DirtyMark { mark })
    }

    fn dirty_since(&self, since: u64) -> Result<DirtyLog, ApiError> {
        let p = VmHandle::dirty_since(self, since).map_err(|e| {
            let msg = Chain(&e).to_string();
            match e {
                vmm::Error::Vstate(
                    vstate::Error::NoSuchMark { .. } | vstate::Error::MarkGone { .. },
                ) => ApiError::not_found(msg),
                _ => ApiError::internal(msg),
            }
        })?;
        Ok(DirtyLog {
            mark: p.mark,
            page_size: crate::vstate::dirty::PAGE,
            pages: p.count(),
            ranges: p.ranges().iter().map(|&(gpa, len)| [gpa, len]).collect(),
        })
    }

    fn save(&self, req: &SaveRequest, out: &mut dyn Write) -> Result<(), ApiError> {
        let compression = req.compress.unwrap_or(Compression::None);
        compression
            .check_level(req.level)
            .map_err(ApiError::bad_request)?;
        // A VM paused before the save stays paused; one that was running resumes (as early
        // as the save allows) unless it is to stop.
        let was_paused = self.is_paused();
        let resume = !was_paused && req.then == AfterSave::Resume;
        let max_pause = match (req.live, req.max_pause_ms) {
            (false, Some(_)) => {
                return Err(ApiError::bad_request("max_pause_ms needs \"live\": true"))
            }
            (true, m) => {
                let m = m.unwrap_or(super::types::DEFAULT_MAX_PAUSE_MS);
                if m > super::types::MAX_MAX_PAUSE_MS {
                    return Err(ApiError::bad_request(format!(
                        "max_pause_ms {m} is over the limit of {} ms",
                        super::types::MAX_MAX_PAUSE_MS
                    )));
                }
                Some(std::time::Duration::from_millis(m))
            }
            (false, None) => None,
        };
        if let Some(p) = &req.diff_from {
            p.check().map_err(ApiError::bad_request)?;
            if self.pack_mark(&p.root_digest).is_none() {
                return Err(ApiError::conflict(
                    crate::diff::unknown_parent(&p.root_digest).to_string(),
                ));
            }
        }
        let result = match max_pause {
            Some(max_pause) => crate::live::save(
                self,
                compression,
                req.level,
                resume,
                max_pause,
                req.diff_from.as_ref(),
                out,
            ),
            // A diff save of a VM that runs on copies the chunks written since the parent
            // while the guest runs, as a live diff save does: the pause then holds the device
            // state and the pages written during that copy, not the copy of every chunk.
            None if resume && req.diff_from.is_some() => {
                crate::live::save(
                    self,
                    compression,
                    req.level,
                    resume,
                    std::time::Duration::from_millis(super::types::DEFAULT_MAX_PAUSE_MS),
                    req.diff_from.as_ref(),
                    out,
                )
                .map(|mut st| {
                    // Not a `--live` save: no pause target was asked for, none is reported.
                    st.live = None;
                    st
                })
            }
            None => crate::snapshot::save_with(
                self,
                compression,
                req.level,
                resume,
                req.diff_from.as_ref(),
                out,
            ),
        };
        match result {
            Ok(stats) => {
                if let Some(m) = stats.mark {
                    self.note_pack(&stats.root_digest, m);
                }
                self.set_last_save(stats);
                if req.then == AfterSave::Stop {
                    VmHandle::shutdown(self);
                }
                Ok(())
            }
            Err(e) => {
                if !was_paused {
                    let _ = VmHandle::resume(self);
                }
                // A VM that ended is a conflict whichever step noticed it.
                match e.as_pause() {
                    Some(p) => Err(ApiError::from(p.clone())),
                    None => Err(ApiError::internal(format!("save failed: {}", Chain(&e)))),
                }
            }
        }
    }
}
