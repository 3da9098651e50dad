//! The API server's view of a VM: [`crate::api::VmControl`] for [`VmHandle`].

use crate::api::{AfterSave, ApiError, SaveRequest, VmControl};
use crate::vmm::VmHandle;
use std::io::Write;
use vmpack_formats::pack::Compression;

impl VmControl for VmHandle {
    fn status(&self) -> serde_json::Value {
        self.status_json()
    }

    fn pause(&self) -> Result<(), ApiError> {
        VmHandle::pause(self).map_err(|e| ApiError::conflict(format!("{e:#}")))
    }

    fn resume(&self) -> Result<(), ApiError> {
        VmHandle::resume(self).map_err(|e| ApiError::conflict(format!("{e:#}")))
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        VmHandle::shutdown(self);
        Ok(())
    }

    fn serial_input(&self, bytes: &[u8]) -> Result<(), ApiError> {
        VmHandle::serial_input(self, bytes, std::time::Duration::from_secs(5))
            .map_err(|e| ApiError::conflict(format!("{e:#}")))
    }

    fn serial_output(&self, since: u64) -> Result<serde_json::Value, ApiError> {
        let log = self
            .serial_log()
            .ok_or_else(|| ApiError::new(404, "this VM keeps no serial output"))?;
        let (start, bytes) = log.since(usize::try_from(since).unwrap_or(usize::MAX));
        Ok(serde_json::json!({
            "start": start,
            "next": start + bytes.len(),
            "ended": self.status_json()["state"] == "stopped",
            "output": String::from_utf8_lossy(&bytes),
        }))
    }

    fn reset(&self) -> Result<serde_json::Value, ApiError> {
        let stats = VmHandle::reset(self).map_err(|e| {
            let msg = format!("{e:#}");
            if msg.starts_with("reset failed") {
                ApiError::internal(msg)
            } else {
                ApiError::conflict(msg)
            }
        })?;
        Ok(serde_json::to_value(stats).unwrap_or_default())
    }

    fn dirty_mark(&self) -> Result<u64, ApiError> {
        VmHandle::dirty_mark(self).map_err(|e| ApiError::internal(format!("{e:#}")))
    }

    fn dirty_since(&self, since: u64) -> Result<serde_json::Value, ApiError> {
        let p = VmHandle::dirty_since(self, since).map_err(|e| {
            let msg = format!("{e:#}");
            if msg.starts_with("KVM_") {
                ApiError::internal(msg)
            } else {
                ApiError::new(404, msg)
            }
        })?;
        Ok(serde_json::json!({
            "mark": p.mark,
            "page_size": crate::vstate::dirty::PAGE,
            "pages": p.count(),
            "ranges": p.ranges().iter().map(|&(gpa, len)| [gpa, len]).collect::<Vec<_>>(),
        }))
    }

    fn save(&self, req: &SaveRequest, out: &mut dyn Write) -> Result<(), ApiError> {
        let compression = match req.compress.as_deref() {
            None => Compression::None,
            Some(c) => c.parse().map_err(ApiError::bad_request)?,
        };
        compression
            .check_level(req.level)
            .map_err(ApiError::bad_request)?;
        // A VM paused before the save stays paused; one that was running resumes (as early
        // as the save allows) unless it is to stop.
        let was_paused = self.is_paused();
        let resume = !was_paused && req.then == AfterSave::Resume;
        let result = crate::snapshot::save(self, compression, req.level, resume, out);
        match result {
            Ok(stats) => {
                self.set_last_save(serde_json::to_value(&stats).unwrap_or_default());
                if req.then == AfterSave::Stop {
                    VmHandle::shutdown(self);
                }
                Ok(())
            }
            Err(e) => {
                if !was_paused {
                    let _ = VmHandle::resume(self);
                }
                Err(ApiError::internal(format!("save failed: {e:#}")))
            }
        }
    }
}
