//! The control API's requests, responses and errors, as the server sends them and the client
//! and the CLI read them. `docs/API.md` documents each field and every status of
//! [`ErrorKind::status`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
pub use vmpack_formats::pack::Compression;

/// Media type of a streamed pack (`POST /vm/save`).
pub const PACK_CONTENT_TYPE: &str = "application/vnd.vmpack";

/// Body of `POST /vm/save`. Every field is optional; an empty body means all defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    /// Compression of every chunk; `None` = `none`.
    #[serde(default)]
    pub compress: Option<Compression>,
    /// Compression level; `None` = the compressor's default. Checked against `compress` by
    /// the controller ([`Compression::check_level`]), answered with 400.
    #[serde(default)]
    pub level: Option<i32>,
    /// What the VM does once the pack is written.
    #[serde(default)]
    pub then: AfterSave,
    /// Write a diff pack: only the memory written since the VM was restored from, or last
    /// saved to, this parent (`{"root_digest", "file"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_from: Option<vmpack_formats::diff::ParentRef>,
    /// Live save: copy guest memory in pre-copy rounds while the guest runs, then pause
    /// only for the last written pages and the device state (`docs/API.md`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub live: bool,
    /// With `live`: the pause to aim for, in ms; `None` = [`DEFAULT_MAX_PAUSE_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pause_ms: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The pause a live save aims for when the request names none.
pub const DEFAULT_MAX_PAUSE_MS: u64 = 20;
/// The largest `max_pause_ms` accepted (a minute).
pub const MAX_MAX_PAUSE_MS: u64 = 60_000;

/// What a live save did (`live` of [`SaveStats`]).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct LiveStats {
    /// The pause aimed for, ms.
    pub max_pause_ms: f64,
    /// Whether the guest's pause (`pause_ms`) stayed within it.
    pub max_pause_met: bool,
    /// The pre-copy rounds while the guest ran: the first copies all resident memory, each
    /// later one the pages written since the previous.
    pub rounds: Vec<LiveRound>,
    /// Bytes copied during the pause (the pages written since the last round).
    pub final_bytes: u64,
    /// Why the pause may exceed the target (the fallback taken), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// One pre-copy round of a live save.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq)]
pub struct LiveRound {
    /// Bytes of guest memory copied.
    pub bytes: u64,
    /// How long the copy took, ms.
    pub ms: f64,
}

/// What happens to the VM after `POST /vm/save`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AfterSave {
    /// Continue running (or stay paused if it was paused before the save).
    #[default]
    Resume,
    /// End the VM as `PUT /vm/shutdown` would.
    Stop,
}

impl FromStr for AfterSave {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resume" => Ok(AfterSave::Resume),
            "stop" => Ok(AfterSave::Stop),
            _ => Err(format!("unknown value '{s}' (expected resume or stop)")),
        }
    }
}

impl fmt::Display for AfterSave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AfterSave::Resume => "resume",
            AfterSave::Stop => "stop",
        })
    }
}

/// `state` of `GET /vm`. A VM not started yet, or with a pause under way, is `Running`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    Stopped,
}

/// What a save produced (`last_save` of `GET /vm`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct SaveStats {
    /// How long the guest stood still for the capture.
    pub pause_ms: f64,
    /// Bytes of the pack.
    pub bytes: u64,
    /// The pack's root digest, hex.
    pub root_digest: String,
    pub compress: Compression,
    /// For a diff save: the parent's root digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For a diff save: the bytes of guest memory stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_bytes: Option<u64>,
    /// For a live save: its rounds and whether the pause target was met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveStats>,
    /// Bytes of old disk content the save kept because the guest wrote its disks after the
    /// pause, while the pack was being written (whole 64 KiB blocks; 0 when it did not).
    #[serde(default)]
    pub disk_kept_bytes: u64,
    /// The dirty mark taken at the pause: guest memory then equalled the pack written.
    /// Kept by the VMM (not sent).
    #[serde(skip)]
    pub mark: Option<u64>,
}

/// Guest port and MMIO accesses no device claimed.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnhandledIo {
    pub port_reads: u64,
    pub port_writes: u64,
    pub mmio_reads: u64,
    pub mmio_writes: u64,
}

/// How the VM ended (`exit` of `GET /vm`); `code` is vmboot's exit status.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i32,
    pub message: String,
}

/// A virtio-blk device (`disks` of `GET /vm`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskStatus {
    pub mmio_base: u64,
    pub gsi: u32,
    /// Requests served (completed, also with an error status).
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Malformed requests the guest sent.
    pub warnings: u64,
    /// Requests the guest made available that the device has not started yet.
    pub queued: u16,
}

/// The virtio-rng device (`entropy` of `GET /vm`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntropyStatus {
    pub mmio_base: u64,
    pub gsi: u32,
    /// Bytes of host entropy given to the guest.
    pub bytes: u64,
}

/// A virtio-net device (`net` of `GET /vm`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct NetStatus {
    pub mmio_base: u64,
    pub gsi: u32,
    /// The host tap it is attached to.
    pub tap: String,
    /// The MAC the device gives the guest.
    pub mac: String,
    /// Frames and bytes given to the guest since it first booted.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    /// Frames and bytes the guest sent.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

/// A device's entry in `GET /vm` (`VmDevice::status`); a new kind of device adds a variant
/// here and its list to [`VmStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceStatus {
    Disk(DiskStatus),
    Entropy(EntropyStatus),
    Net(NetStatus),
    Vsock(VsockStatus),
    VmGenId(VmGenIdStatus),
}

/// The virtio-vsock device (`vsock` of `GET /vm`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct VsockStatus {
    pub mmio_base: u64,
    pub gsi: u32,
    /// The guest's context ID.
    pub cid: u64,
    /// The host Unix socket the VM listens on.
    pub uds_path: String,
    /// Connections open now.
    pub connections: u64,
    /// Payload bytes given to / taken from the guest.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The VM generation ID device (`vmgenid` of `GET /vm`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct VmGenIdStatus {
    /// 32 hex digits; fresh on every restore and clone.
    pub id: String,
    /// Its guest-physical address.
    pub address: u64,
    /// The GSI that notifies the guest.
    pub gsi: u32,
    /// How many restores this VM has been through.
    pub generation: u64,
}

/// Body of `GET /vm`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct VmStatus {
    pub state: RunState,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Time since the VM started (or was restored).
    pub uptime_ms: u64,
    pub unhandled_io: UnhandledIo,
    /// The most recent `POST /vm/save`, `null` before the first.
    pub last_save: Option<SaveStats>,
    /// Present once the VM has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    /// Present when the VM has disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskStatus>,
    /// Present when the VM has a virtio-rng device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entropy: Vec<EntropyStatus>,
    /// Present when the VM has `[[net]]`s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetStatus>,
    /// Present when the VM has `[vsock]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vsock: Vec<VsockStatus>,
    /// Present when the VM has `vmgenid = true`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vmgenid: Vec<VmGenIdStatus>,
}

impl VmStatus {
    /// Adds a device's entry to its list.
    pub fn push_device(&mut self, d: DeviceStatus) {
        match d {
            DeviceStatus::Disk(s) => self.disks.push(s),
            DeviceStatus::Entropy(s) => self.entropy.push(s),
            DeviceStatus::Net(s) => self.net.push(s),
            DeviceStatus::Vsock(s) => self.vsock.push(s),
            DeviceStatus::VmGenId(s) => self.vmgenid.push(s),
        }
    }
}

/// Body of `GET /vm/serial/output?since=N`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct SerialOutput {
    /// Offset of the first byte of `output` (later than `since` if those bytes were dropped).
    pub start: u64,
    /// The `since` of the next poll.
    pub next: u64,
    /// The VM has ended: no more output will come.
    pub ended: bool,
    /// UTF-8, invalid bytes replaced.
    pub output: String,
}

/// Body of the answer to `PUT /vm/reset`: what the reset did.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct ResetStats {
    /// Guest pages put back (written since the restore or the previous reset).
    pub pages: u64,
    /// Disks whose copy was put back (written since then).
    pub disks: usize,
    /// Time the guest stood still for the reset, in milliseconds.
    pub pause_ms: f64,
}

/// Body of `PUT /vm/dirty/mark`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyMark {
    pub mark: u64,
}

/// Body of `GET /vm/dirty?since=M`: the guest pages written since mark `mark`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct DirtyLog {
    pub mark: u64,
    pub page_size: u64,
    /// The number of pages in `ranges`.
    pub pages: u64,
    /// `[guest physical address, bytes]` runs of written pages, in address order.
    pub ranges: Vec<[u64; 2]>,
}

/// Body of every error answer.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// Why a request failed. [`ErrorKind::status`] is the one place that maps a failure to its
/// HTTP status; `docs/API.md` ("Errors") lists the same table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: malformed request, or a value outside its documented range.
    BadRequest,
    /// 403: the peer is not vmboot's user.
    Forbidden,
    /// 404: no such endpoint, or the VM has no such device.
    NotFound,
    /// 405: wrong method for the endpoint.
    MethodNotAllowed,
    /// 408: the request did not arrive in time.
    RequestTimeout,
    /// 409: not possible in the VM's current state (stopped; a save in progress; a serial
    /// input the guest does not read).
    Conflict,
    /// 413: request body too large.
    BodyTooLarge,
    /// 417: an `Expect` other than `100-continue`.
    ExpectationFailed,
    /// 431: request head too large.
    HeaderTooLarge,
    /// 500: the VMM failed.
    Internal,
    /// 501: a request feature the server does not implement (`Transfer-Encoding`).
    NotImplemented,
    /// 503: too many connections.
    Unavailable,
    /// 504: the VM did not reach the requested state in time (a pause whose vCPUs did not
    /// all park): the VMM's own timeout, the request itself was fine and may be retried.
    Timeout,
    /// 505: an HTTP version other than 1.0 or 1.1.
    HttpVersion,
}

impl ErrorKind {
    pub const fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::Conflict => 409,
            ErrorKind::BodyTooLarge => 413,
            ErrorKind::ExpectationFailed => 417,
            ErrorKind::HeaderTooLarge => 431,
            ErrorKind::Internal => 500,
            ErrorKind::NotImplemented => 501,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::HttpVersion => 505,
        }
    }
}

/// An error answer: its kind (hence status) and the message of its [`ErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (HTTP {})", kind.status())]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
    pub fn status(&self) -> u16 {
        self.kind.status()
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
}

impl From<String> for ApiError {
    fn from(message: String) -> Self {
        ApiError::internal(message)
    }
}

impl From<&str> for ApiError {
    fn from(message: &str) -> Self {
        ApiError::internal(message)
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_request_wire_form() {
        let r: SaveRequest =
            serde_json::from_str(r#"{"compress":"zstd","level":3,"then":"stop"}"#).unwrap();
        assert_eq!(r.compress, Some(Compression::Zstd));
        assert_eq!((r.level, r.then), (Some(3), AfterSave::Stop));
        assert!(serde_json::from_str::<SaveRequest>(r#"{"compress":"lz4"}"#).is_err());
        assert!(serde_json::from_str::<SaveRequest>(r#"{"then":"pause"}"#).is_err());
        assert!(serde_json::from_str::<SaveRequest>(r#"{"extra":1}"#).is_err());
        assert_eq!("stop".parse::<AfterSave>(), Ok(AfterSave::Stop));
    }

    #[test]
    fn live_save_wire_form() {
        let r: SaveRequest = serde_json::from_str(r#"{"live":true,"max_pause_ms":5}"#).unwrap();
        assert_eq!((r.live, r.max_pause_ms), (true, Some(5)));
        assert!(serde_json::from_str::<SaveRequest>(r#"{"max_pause_ms":-1}"#).is_err());
        assert!(serde_json::from_str::<SaveRequest>(r#"{"max_pause_ms":1.5}"#).is_err());
        // An ordinary save sends neither key.
        let v = serde_json::to_value(SaveRequest::default()).unwrap();
        assert!(v.get("live").is_none() && v.get("max_pause_ms").is_none());
        let live = LiveStats {
            max_pause_ms: 20.0,
            max_pause_met: false,
            rounds: vec![LiveRound {
                bytes: 4096,
                ms: 1.5,
            }],
            final_bytes: 8192,
            warning: Some("w".into()),
        };
        let v = serde_json::to_value(&live).unwrap();
        assert_eq!(v["rounds"][0]["bytes"], 4096);
        assert_eq!(serde_json::from_value::<LiveStats>(v).unwrap(), live);
    }

    #[test]
    fn diff_save_wire_form() {
        let d = "ab".repeat(32);
        let r: SaveRequest = serde_json::from_str(&format!(
            r#"{{"diff_from":{{"root_digest":"{d}","file":"base.vmpack"}}}}"#
        ))
        .unwrap();
        let p = r.diff_from.clone().unwrap();
        assert_eq!(
            (p.root_digest.as_str(), p.file.as_str()),
            (d.as_str(), "base.vmpack")
        );
        // A full save sends no `diff_from`; its stats no `parent`/`diff_bytes`, never `mark`.
        let full = serde_json::to_value(SaveRequest::default()).unwrap();
        assert!(full.get("diff_from").is_none());
        let mut st = SaveStats {
            pause_ms: 1.0,
            bytes: 2,
            root_digest: d.clone(),
            compress: Compression::None,
            parent: None,
            diff_bytes: None,
            live: None,
            disk_kept_bytes: 0,
            mark: Some(7),
        };
        let v = serde_json::to_value(&st).unwrap();
        assert!(v.get("parent").is_none() && v.get("diff_bytes").is_none());
        assert!(v.get("mark").is_none());
        st.parent = Some(d.clone());
        st.diff_bytes = Some(4096);
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(
            (v["parent"].as_str(), v["diff_bytes"].as_u64()),
            (Some(d.as_str()), Some(4096))
        );
        let back: SaveStats = serde_json::from_value(v).unwrap();
        assert_eq!((back.diff_bytes, back.mark), (Some(4096), None));
    }

    #[test]
    fn status_lists_appear_only_when_present() {
        let mut s = VmStatus {
            state: RunState::Paused,
            name: "n".into(),
            vcpus: 1,
            memory_mib: 16,
            uptime_ms: 1,
            unhandled_io: UnhandledIo::default(),
            last_save: None,
            exit: None,
            disks: Vec::new(),
            entropy: Vec::new(),
            net: Vec::new(),
            vsock: Vec::new(),
            vmgenid: Vec::new(),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "paused");
        assert!(v["last_save"].is_null());
        assert!(v.get("disks").is_none() && v.get("exit").is_none());
        s.push_device(DeviceStatus::Entropy(EntropyStatus {
            mmio_base: 0xd000_0000,
            gsi: 5,
            bytes: 64,
        }));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["entropy"][0]["bytes"], 64);
        assert_eq!(serde_json::from_value::<VmStatus>(v).unwrap(), s);
    }

    #[test]
    fn a_timed_out_pause_is_not_a_conflict() {
        assert_eq!(ApiError::timeout("x").status(), 504);
        assert_eq!(ApiError::conflict("x").status(), 409);
        assert_eq!(ApiError::conflict("gone").to_string(), "gone (HTTP 409)");
    }
}
