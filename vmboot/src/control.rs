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

    fn save(&self, req: &SaveRequest, out: &mut dyn Write) -> Result<(), ApiError> {
        let compression = match req.compress.as_deref() {
            None => Compression::None,
            Some(c) => c
                .parse()
                .map_err(|e| ApiError::bad_request(format!("{e}")))?,
        };
        let was_paused = self.is_paused();
        let result = crate::snapshot::save_paused(self, compression, req.level, out);
        match result {
            Ok(stats) => {
                self.set_last_save(serde_json::to_value(&stats).unwrap_or_default());
                match req.then {
                    AfterSave::Stop => VmHandle::shutdown(self),
                    AfterSave::Resume if !was_paused => {
                        VmHandle::resume(self).map_err(|e| ApiError::internal(format!("{e:#}")))?
                    }
                    AfterSave::Resume => {}
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
