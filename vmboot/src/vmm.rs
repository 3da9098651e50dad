//! The VM: KVM setup from a config or a saved state, the devices, and [`VmHandle`], which
//! pauses, resumes, captures and reports on a running VM from any thread. The vCPU threads,
//! their run loop and the pause state machine are the vCPU manager's
//! ([`crate::vcpu::VcpuManager`]).

use crate::api::{ExitStatus, RunState, SaveStats, UnhandledIo, VmStatus};
use crate::cpuid;
use crate::device_manager::DeviceManager;
use crate::devices::bus::lock;
use crate::devices::serial::spawn_stdin_forwarder;
pub use crate::devices::SerialSink;
use crate::devices::{DebugExit, SerialDevice, COM1_IRQ, I8042};
use crate::memory::{ram_layout, GuestMemoryInit, GuestRam};
use crate::msr;
use crate::persist::{
    DeviceState, Persist, VmState, VCPU_STATE_VERSION, VM_LEVEL_STATE_VERSION, VM_STATE_VERSION,
};
use crate::vcpu::{self, install_kick_handler, tell_kvmclock_paused, Vcpu, VcpuManager};
pub use crate::vcpu::{
    ExitReason, PauseError, EXIT_CORRUPT_MEMORY, EXIT_FAIL_ENTRY, EXIT_GUEST_CRASH,
    EXIT_INTERNAL_ERROR, EXIT_KVM_ERROR, EXIT_TRIPLE_FAULT, EXIT_UNEXPECTED, PAUSE_TIMEOUT,
};
use crate::vstate::vm::KvmVm;

/// What building, running and driving a VM can fail with: vmboot's crate-level error
/// (`vmboot::Error`). The lower layers' errors pass through unchanged (their text is the
/// message); a caller branches on the variants, e.g. [`Error::Pause`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config this vmboot cannot run (or a payload it does not hold).
    #[error("{0}")]
    Config(String),
    /// A CPU template the host's KVM cannot provide, or a template file that is not one.
    #[error("{0}")]
    CpuTemplate(String),
    /// A saved state that does not fit the config (`VmState::validate`).
    #[error("{0}")]
    InvalidState(String),
    /// Pausing or resuming: the VM ended, or the vCPUs did not park in time.
    #[error(transparent)]
    Pause(#[from] PauseError),
    #[error("save_state needs a paused VM")]
    NotPaused,
    /// `VmHandle::reset` refused before changing anything.
    #[error("{0}")]
    NotResettable(String),
    /// A reset failed after it changed the VM, which was then stopped.
    #[error("reset failed; the VM was stopped")]
    ResetFailed(#[source] Box<Error>),
    #[error("putting disk {disk} back")]
    DiskReset {
        disk: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the VM has ended; {pending} input bytes not sent")]
    InputAfterEnd { pending: usize },
    #[error(
        "the guest did not read its serial input within {timeout:?}; {pending} bytes not sent"
    )]
    InputTimeout { timeout: Duration, pending: usize },
    /// A thread vmboot needs could not start (a vCPU, the signal handler).
    #[error("{0}")]
    Thread(String),
    #[error(transparent)]
    Devices(#[from] crate::devices::Error),
    #[error(transparent)]
    Vstate(#[from] crate::vstate::Error),
    #[error(transparent)]
    Boot(#[from] crate::boot::Error),
    #[error(transparent)]
    State(#[from] crate::persist::StateError),
    #[error(transparent)]
    Msr(#[from] crate::msr::Error),
    /// A host call failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl failed (named in `what`).
    #[error("{what}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An error, with where it happened.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

crate::error::layer_context!(Error);

impl Error {
    /// The pause failure this is, if it is one (the VM ended, or the vCPUs did not park).
    pub fn as_pause(&self) -> Option<&PauseError> {
        match self {
            Error::Pause(p) => Some(p),
            Error::Context { source, .. } | Error::ResetFailed(source) => source.as_pause(),
            _ => None,
        }
    }
}

impl<T> Context<T> for std::result::Result<T, crate::vstate::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(Error::from).context(what)
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(Error::from).with_context(what)
    }
}
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VcpuFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vmpack_formats::config::{Boot, VmConfig};

/// Where the guest's serial output goes and whether host stdin feeds it.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub serial_out: SerialSink,
    /// Start the HTTP control socket here (see docs/API.md).
    pub api_sock: Option<PathBuf>,
    /// Forward stdin to COM1 (only done when stdin is a terminal).
    pub stdin_input: bool,
    /// A folder owned by this VM (e.g. private disk copies of a restore), removed when
    /// [`Vm::run`] returns.
    pub work_dir: Option<PathBuf>,
    /// The vsock device's host socket, in place of the config's `uds_path` (a restore's
    /// config names a socket in its work folder, never the pack's path).
    pub vsock_sock: Option<PathBuf>,
    /// A restore's new identity for the first `[[net]]` (a clone's tap and MAC).
    pub net: crate::devices::virtio::net::NetOverride,
    /// Where a save of a VM without a `work_dir` (one booted from a config) keeps, in an
    /// unlinked temporary file, the old disk content the guest overwrites while the pack is
    /// written and that does not fit in memory. The binaries pass `std::env::temp_dir()`
    /// (the library reads no environment); unset, the current folder.
    pub temp_dir: Option<PathBuf>,
    /// A restore's lazily filled disks (`vstate::lazy_disk`): disk `i` is served from its
    /// entry here instead of the config's file.
    pub disks: crate::vstate::lazy_disk::LazyDisks,
}

/// The bytes a boot needs; read from the config's files or supplied by a pack.
#[derive(Clone, Debug, Default)]
pub struct BootPayload {
    pub kernel: Option<Vec<u8>>,
    pub initrd: Option<Vec<u8>>,
    pub image: Option<Vec<u8>>,
}

/// Largest kernel/initrd/image vmboot reads (guest RAM is the real limit; this stops a
/// mistaken path to a huge file before it is read).
const MAX_PAYLOAD: u64 = 4 << 30;

fn read_file(role: &str, p: &std::path::Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(p)
        .with_context(|| format!("{role} {}", p.display()))?
        .len();
    if len > MAX_PAYLOAD {
        return Err(Error::Config(format!(
            "{role} {} is {len} bytes, more than 4 GiB",
            p.display()
        )));
    }
    std::fs::read(p).with_context(|| format!("reading {role} {}", p.display()))
}

/// The boot files a VM keeps so a save can put them into its pack.
pub enum BootFiles {
    /// Held in memory (read from the config's files, or from a pack read through a pipe).
    Bytes(BootPayload),
    /// Still in the pack the VM was restored from: read only if the VM is saved again, so a
    /// restore never pays for reading (and hashing) a kernel and initrd the guest's memory
    /// already holds. The open file keeps working even if the pack is deleted meanwhile.
    Pack(Arc<vmpack_formats::vm::VmPack>),
    /// Read from a pipe: the files that came as sections, plus an initrd that the pack kept
    /// only in guest memory, copied out while that memory streamed in.
    Stream {
        payload: BootPayload,
        initrd: Arc<OnceLock<Vec<u8>>>,
    },
}

impl From<BootPayload> for BootFiles {
    fn from(p: BootPayload) -> Self {
        BootFiles::Bytes(p)
    }
}

impl BootPayload {
    pub fn from_config(cfg: &VmConfig) -> Result<BootPayload> {
        let mut p = BootPayload::default();
        for (role, path) in cfg.boot_files() {
            let bytes = read_file(role, path)?;
            match role {
                "kernel" => p.kernel = Some(bytes),
                "initrd" => p.initrd = Some(bytes),
                _ => p.image = Some(bytes),
            }
        }
        Ok(p)
    }
}

/// Controls a VM from any thread: pause, resume, shutdown, capture.
pub struct VmHandle {
    config: VmConfig,
    /// Kept so a save can put the boot files into the pack, also for a restored VM whose
    /// original files may not exist on this host.
    payload: BootFiles,
    last_save: Mutex<Option<SaveStats>>,
    /// The packs this VM's memory can be diffed against: `(root digest, dirty mark)` of the
    /// pack it was restored from (mark 0) and of each pack it was saved to.
    lineage: Mutex<Vec<(String, u64)>>,
    /// For `PUT /vm/reset`: the state a restored VM started from, and what puts a written
    /// disk copy back (see [`VmHandle::reset`]).
    reset_point: OnceLock<VmState>,
    disk_reset: OnceLock<DiskReset>,
    /// Where the loader put the initrd (`(gpa, len)`), kept across saves: while guest RAM
    /// still holds it there, a save records it instead of storing it twice.
    initrd_at: OnceLock<(u64, u64)>,
    /// Where a save keeps, beyond its memory bound, the old disk content the guest
    /// overwrites while the pack is written: the VM's work folder, else the temp folder.
    spill_dir: PathBuf,
    // Field order = drop order: vCPUs and devices before the VM, memory last.
    vcpus: VcpuManager,
    devices: Devices,
    vm: KvmVm,
    mem: GuestRam,
    created: Instant,
    /// The guest's serial output, when a console or control socket needs it.
    serial_log: Option<Arc<crate::devices::serial_log::SerialLog>>,
}

/// A VM ready to run. [`Vm::run`] starts the vCPU threads and blocks until the guest ends.
pub struct Vm {
    handle: Arc<VmHandle>,
    opts: RunOptions,
}

fn validate(cfg: &VmConfig) -> Result<()> {
    if cfg.vcpus == 0 || cfg.vcpus > vmpack_formats::config::MAX_VCPUS {
        return Err(Error::Config(format!(
            "vcpus = {} (1..=254 supported)",
            cfg.vcpus
        )));
    }
    if cfg.memory_mib == 0 || cfg.memory_mib > vmpack_formats::config::MAX_MEMORY_MIB {
        return Err(Error::Config(format!(
            "memory_mib = {} (1..=65536 supported)",
            cfg.memory_mib
        )));
    }
    if cfg.kernel.is_none() && cfg.flat.is_none() {
        return Err(Error::Config(
            "config has neither [kernel] nor [flat]".into(),
        ));
    }
    Ok(())
}

struct Base {
    vm: KvmVm,
    mem: GuestRam,
    fds: Vec<VcpuFd>,
}

/// The devices of a VM: the registry (with the buses) and COM1, which vmboot also talks
/// to directly (host input, the final flush).
struct Devices {
    /// Serves every virtio queue; stopped (dropped) first, while the devices and guest
    /// memory it uses are still there.
    _worker: crate::devices::virtio::Worker,
    dm: DeviceManager,
    serial: Arc<Mutex<SerialDevice>>,
    /// The config's disks in order, as a save freezes them.
    disks: Vec<Arc<crate::disk_snapshot::DiskTrack>>,
    /// A restore's lazily filled disks (also behind their devices in `dm`).
    lazy_disks: crate::vstate::lazy_disk::LazyDisks,
}

impl Devices {
    /// The ids of the devices a VM of `cfg` has that keep state, in registration order.
    fn ids(cfg: &VmConfig) -> Vec<String> {
        let mut ids = vec!["com1".to_string(), "i8042".to_string()];
        ids.extend((0..cfg.disks.len()).map(crate::devices::virtio::blk_id));
        if cfg.rng {
            ids.push(crate::devices::virtio::rng::ID.to_string());
        }
        ids.extend((0..cfg.nets.len()).map(crate::devices::virtio::net::id));
        if cfg.vsock.is_some() {
            ids.push(crate::devices::virtio::vsock::ID.to_string());
        }
        if cfg.vmgenid {
            ids.push(crate::devices::vmgenid::ID.to_string());
        }
        ids
    }

    /// Checks a saved device's state without building anything.
    fn validate_state(d: &DeviceState) -> crate::devices::Result<()> {
        use crate::devices::virtio::{net::NetHandle, rng::RngHandle, vsock::VsockHandle};
        let checked = match d.id.as_str() {
            "com1" => return Ok(d.decode::<SerialDevice>().map(drop)?),
            "i8042" => return Ok(d.decode::<I8042>().map(drop)?),
            crate::devices::vmgenid::ID => {
                return Ok(d.decode::<crate::devices::vmgenid::VmGenId>().map(drop)?)
            }
            crate::devices::virtio::rng::ID => d.decode::<Arc<RngHandle>>()?.validate(),
            crate::devices::virtio::vsock::ID => d.decode::<Arc<VsockHandle>>()?.validate(),
            id if id.starts_with("virtio-net") => d.decode::<Arc<NetHandle>>()?.validate(),
            _ => d
                .decode::<Arc<crate::devices::virtio::BlkHandle>>()?
                .validate(),
        };
        checked.map_err(|e| crate::devices::Error::Context {
            what: format!("device {}", d.id),
            source: Box::new(e),
        })
    }

    /// Builds every device of `cfg` (from its saved state on a restore, power-on state
    /// otherwise) and registers it.
    fn new(
        cfg: &VmConfig,
        base: &Base,
        sink: &SerialSink,
        saved: &[DeviceState],
        vsock_sock: Option<&std::path::Path>,
        lazy_disks: &crate::vstate::lazy_disk::LazyDisks,
    ) -> Result<Devices> {
        let find = |id: &str| saved.iter().find(|d| d.id == id);
        let serial = match find("com1") {
            Some(s) => SerialDevice::restore(sink.clone(), &s.decode::<SerialDevice>()?)?,
            None => SerialDevice::new(&Default::default(), sink)?,
        };
        base.vm
            .fd
            .register_irqfd(serial.irq_fd(), COM1_IRQ)
            .context("KVM_IRQFD for COM1")?;
        let i8042 = match find("i8042") {
            Some(s) => I8042::restore((), &s.decode::<I8042>()?)?,
            None => I8042::new(),
        };
        let serial = Arc::new(Mutex::new(serial));
        let i8042 = Arc::new(Mutex::new(i8042));
        let mut dm = DeviceManager::new();
        crate::device_manager::add_pc_devices(
            &mut dm,
            (serial.clone(), Some(serial.clone())),
            (i8042.clone(), Some(i8042)),
            Arc::new(Mutex::new(DebugExit)),
        )?;
        let worker = crate::devices::virtio::Worker::start()?;
        let disks = crate::devices::virtio::attach_disks(
            cfg,
            &base.vm.fd,
            base.mem.memory(),
            &worker,
            &mut dm,
            find,
            lazy_disks,
        )?;
        if cfg.rng {
            let id = crate::devices::virtio::rng::ID;
            crate::devices::virtio::rng::attach(
                &base.vm.fd,
                base.mem.memory(),
                &worker,
                &mut dm,
                find(id),
            )?;
        }
        crate::devices::virtio::net::attach_all(
            cfg,
            &base.vm.fd,
            base.mem.memory(),
            &worker,
            &mut dm,
            find,
        )?;
        if let Some(v) = &cfg.vsock {
            let id = crate::devices::virtio::vsock::ID;
            let path = vsock_sock.or(v.uds_path.as_deref()).ok_or_else(|| {
                Error::Config(
                    "[vsock] has no uds_path: give one in the config or --vsock-sock PATH".into(),
                )
            })?;
            crate::devices::virtio::vsock::attach(
                v.cid,
                path,
                &base.vm.fd,
                base.mem.memory(),
                &worker,
                &mut dm,
                find(id),
            )?;
        }
        if cfg.vmgenid {
            let id = crate::devices::vmgenid::ID;
            crate::devices::vmgenid::attach(&base.vm.fd, base.mem.memory(), &mut dm, find(id))?;
        }
        Ok(Devices {
            _worker: worker,
            dm,
            serial,
            disks,
            lazy_disks: lazy_disks.clone(),
        })
    }
}

/// A [`VmState`] that passed [`VmState::validate`] for a config: what [`Vm::restore`] takes,
/// so the checks run once, before any KVM call.
pub struct ValidState(VmState);

impl std::ops::Deref for ValidState {
    type Target = VmState;
    fn deref(&self) -> &VmState {
        &self.0
    }
}

impl VmState {
    /// Every check of a saved state against the config that needs no KVM and no backend:
    /// versions of the state and of each component, vCPU count, memory layout, the set of
    /// devices, and each device's state (decoded and checked). A restore then checks only
    /// what needs the opened backends (a disk's size and read-only-ness).
    pub fn validate(self, cfg: &VmConfig) -> Result<ValidState> {
        validate(cfg)?;
        crate::persist::check_version("vm state", self.version, VM_STATE_VERSION)?;
        crate::persist::check_version("VM-level state", self.vm.version, VM_LEVEL_STATE_VERSION)?;
        if self.vcpus.len() != cfg.vcpus as usize {
            return Err(Error::InvalidState(format!(
                "saved state has {} vCPUs but the config says {}",
                self.vcpus.len(),
                cfg.vcpus
            )));
        }
        for v in &self.vcpus {
            crate::persist::check_version(
                &format!("vCPU {}", v.id),
                v.version,
                VCPU_STATE_VERSION,
            )?;
        }
        let layout = ram_layout(cfg.memory_bytes());
        if self.memory_regions != layout {
            return Err(Error::InvalidState(format!(
                "saved memory layout {:x?} does not match the config's {} MiB ({layout:x?})",
                self.memory_regions, cfg.memory_mib
            )));
        }
        let ids = Devices::ids(cfg);
        for (i, d) in self.devices.iter().enumerate() {
            if !ids.contains(&d.id) || self.devices[..i].iter().any(|e| e.id == d.id) {
                return Err(Error::InvalidState(format!(
                    "the saved VM has a device {} that a VM of this config does not have (or has it twice)",
                    d.id
                )));
            }
            Devices::validate_state(d)?;
        }
        // A pack saved before vmboot had disks holds none (its guest never saw them); any
        // other must hold every disk.
        let blk = self
            .devices
            .iter()
            .filter(|d| d.id.starts_with("virtio-blk"))
            .count();
        if blk != 0 && blk != cfg.disks.len() {
            return Err(Error::InvalidState(format!(
                "the saved VM has {blk} virtio-blk devices but the config has {} disks",
                cfg.disks.len()
            )));
        }
        Ok(ValidState(self))
    }
}

/// KVM VM with irqchip, PIT, memory slots and vCPUs (not configured yet), in the order that
/// restores reliably on this host.
fn build_base(cfg: &VmConfig, init: GuestMemoryInit) -> Result<Base> {
    validate(cfg)?;
    install_kick_handler()?;
    let vm = KvmVm::new()?;
    // Measured now (once per process) so a save records it without lengthening the pause.
    crate::host_info::fingerprint()?;
    let mem = GuestRam::new(&ram_layout(cfg.memory_bytes()), init)?;
    vm.map_memory(&mem)?;
    let fds = (0..cfg.vcpus)
        .map(|id| {
            vm.fd
                .create_vcpu(u64::from(id))
                .with_context(|| format!("KVM_CREATE_VCPU {id}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Base { vm, mem, fds })
}

impl Vm {
    /// Boots `cfg` from scratch with `payload`.
    pub fn create(cfg: &VmConfig, payload: BootPayload, opts: &RunOptions) -> Result<Vm> {
        let opts = &with_log(opts);
        let mut base = build_base(cfg, GuestMemoryInit::Zeroed)?;
        let mut supported = base
            .vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?
            .as_slice()
            .to_vec();
        cpuid::apply_template(&mut supported, &cfg.cpu_template).map_err(Error::CpuTemplate)?;
        let mut cpuids = Vec::new();
        for (id, fd) in base.fds.iter().enumerate() {
            let c = cpuid::for_vcpu(&supported, id as u32, cfg.vcpus)?;
            vcpu::configure_new(fd, &c).with_context(|| format!("configuring vCPU {id}"))?;
            cpuids.push(c.as_slice().to_vec());
        }
        let kvm_list = base
            .vm
            .kvm
            .get_msr_index_list()
            .context("KVM_GET_MSR_INDEX_LIST")?
            .as_slice()
            .to_vec();
        let msrs: Arc<[u32]> =
            msr::filter_readable(&base.fds[0], msr::candidate_list(&kvm_list))?.into();

        let devices = Devices::new(
            cfg,
            &base,
            &opts.serial_out,
            &[],
            opts.vsock_sock.as_deref(),
            &opts.disks,
        )?;
        let bsp = &base.fds[0];
        let sregs = bsp.get_sregs().context("KVM_GET_SREGS")?;
        let (regs, sregs, initrd_at) = match cfg.boot() {
            Boot::Flat(flat) => {
                let image = payload.image.as_deref().ok_or_else(|| {
                    Error::Config("flat boot without an image in the payload".into())
                })?;
                let (regs, sregs) = crate::flat::load(&base.mem, flat, image, sregs)?;
                (regs, sregs, None)
            }
            Boot::Linux(k) => {
                let kernel = payload.kernel.as_deref().ok_or_else(|| {
                    Error::Config("Linux boot without a kernel in the payload".into())
                })?;
                crate::mptable::write(&base.mem, cfg.vcpus)?;
                crate::acpi::write(&base.mem, cfg.vcpus, &devices.dm)?;
                let cmdline = format!("{}{}", k.cmdline, devices.dm.virtio_cmdline());
                crate::linux::load(
                    &base.mem,
                    kernel,
                    payload.initrd.as_deref(),
                    &cmdline,
                    sregs,
                )?
            }
        };
        bsp.set_sregs(&sregs).context("KVM_SET_SREGS")?;
        bsp.set_regs(&regs).context("KVM_SET_REGS")?;
        vcpu::set_runnable(bsp)?;
        let vcpus = std::mem::take(&mut base.fds)
            .into_iter()
            .zip(cpuids)
            .enumerate()
            .map(|(id, (fd, cpuid))| Vcpu::new(id as u32, fd, cpuid, msrs.clone()))
            .collect();
        let vm = Vm::assemble(cfg, base, devices, vcpus, payload.into(), opts)?;
        if let Some(at) = initrd_at {
            let _ = vm.handle.initrd_at.set(at);
        }
        Ok(vm)
    }

    /// Builds a fresh VM from a validated `state` and guest memory. `payload` is not loaded
    /// (memory holds the guest already); it is kept for later saves.
    pub fn restore(
        cfg: &VmConfig,
        state: ValidState,
        memory: GuestMemoryInit,
        payload: impl Into<BootFiles>,
        opts: &RunOptions,
    ) -> Result<Vm> {
        let state = state.0;
        let payload = payload.into();
        // A clone's own tap and MAC: the VM runs (and a later save records) them.
        let cfg = &opts.net.apply(cfg)?;
        let opts = &with_log(opts);
        let mut base = build_base(cfg, memory)?;
        let msr_list: Vec<u32> = state.vcpus[0].msrs.iter().map(|m| m.index).collect();
        let msrs: Arc<[u32]> = msr::filter_readable(&base.fds[0], msr_list)?.into();
        // vCPUs before the VM-level irqchip and PIT, as Firecracker does: the LAPICs exist
        // in their saved state before the IOAPIC and PIC route anything to them.
        let vcpus = std::mem::take(&mut base.fds)
            .into_iter()
            .zip(&state.vcpus)
            .map(|(fd, s)| {
                let msrs = msrs.clone();
                Vcpu::restore(vcpu::VcpuArgs { fd, msrs }, s)
            })
            .collect::<Result<Vec<_>, _>>()?;
        base.vm = KvmVm::restore(base.vm, &state.vm)?;
        for v in &vcpus {
            tell_kvmclock_paused(&lock(&v.fd));
        }
        let devices = Devices::new(
            cfg,
            &base,
            &opts.serial_out,
            &state.devices,
            opts.vsock_sock.as_deref(),
            &opts.disks,
        )?;
        let initrd_at = state.initrd;
        let vm = Vm::assemble(cfg, base, devices, vcpus, payload, opts)?;
        if let Some(at) = initrd_at {
            let _ = vm.handle.initrd_at.set(at);
        }
        let _ = vm.handle.reset_point.set(state);
        if let Some(lazy) = vm.handle.mem.lazy() {
            let weak = Arc::downgrade(&vm.handle);
            lazy.on_failure(Box::new(move |message| {
                if let Some(h) = weak.upgrade() {
                    h.request_exit(ExitReason {
                        code: EXIT_CORRUPT_MEMORY,
                        message,
                    });
                }
            }));
        }
        // A disk chunk failing its check ends the VM the same way.
        for d in &vm.handle.devices.lazy_disks.0 {
            let weak = Arc::downgrade(&vm.handle);
            d.on_failure(Box::new(move |message| {
                if let Some(h) = weak.upgrade() {
                    h.request_exit(ExitReason {
                        code: EXIT_CORRUPT_MEMORY,
                        message,
                    });
                }
            }));
        }
        Ok(vm)
    }

    fn assemble(
        cfg: &VmConfig,
        base: Base,
        devices: Devices,
        vcpus: Vec<Vcpu>,
        payload: BootFiles,
        opts: &RunOptions,
    ) -> Result<Vm> {
        let vcpus = VcpuManager::new(vcpus);
        let handle = Arc::new(VmHandle {
            config: cfg.clone(),
            payload,
            last_save: Mutex::new(None),
            lineage: Mutex::new(Vec::new()),
            reset_point: OnceLock::new(),
            disk_reset: OnceLock::new(),
            initrd_at: OnceLock::new(),
            spill_dir: opts
                .work_dir
                .clone()
                .or_else(|| opts.temp_dir.clone())
                .unwrap_or_else(|| PathBuf::from(".")),
            vcpus,
            devices,
            vm: base.vm,
            mem: base.mem,
            created: Instant::now(),
            serial_log: match &opts.serial_out {
                SerialSink::Console { log, .. } => Some(log.clone()),
                _ => None,
            },
        });
        Ok(Vm {
            handle,
            opts: opts.clone(),
        })
    }

    pub fn controller(&self) -> Arc<VmHandle> {
        self.handle.clone()
    }

    /// The serial output log, if the VM's serial sink is [`SerialSink::Console`].
    pub fn serial_log(&self) -> Option<Arc<crate::devices::serial_log::SerialLog>> {
        self.handle.serial_log.clone()
    }

    /// Runs the guest until it ends (debug-exit port, i8042 reset, a fatal exit, or
    /// [`VmHandle::shutdown`]).
    pub fn run(self) -> Result<ExitReason> {
        let h = self.handle;
        let _api = match &self.opts.api_sock {
            Some(path) => Some(
                crate::api::ApiServer::start(path, h.clone() as Arc<dyn crate::api::VmControl>)
                    .with_context(|| format!("API socket {}", path.display()))?,
            ),
            None => None,
        };
        // SAFETY: isatty only inspects fd 0.
        if self.opts.stdin_input && unsafe { libc::isatty(0) } == 1 {
            spawn_stdin_forwarder(h.serial().clone());
        }
        let mut threads = Vec::new();
        let mut not_started = None;
        if let Err(ended) = h.vcpus.begin_run() {
            return Ok(ended);
        }
        for idx in 0..h.vcpus.vcpus().len() {
            let hh = h.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{idx}"))
                .spawn(move || {
                    let io = &hh.devices.dm;
                    hh.vcpus.run_loop(idx, &io.pio, &io.mmio, &hh.mem)
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    h.vcpus.not_started(idx);
                    let message = format!("cannot start vCPU thread {idx}: {e}");
                    h.request_exit(ExitReason {
                        code: EXIT_KVM_ERROR,
                        message: message.clone(),
                    });
                    not_started = Some(message);
                    break;
                }
            }
        }
        // The guest runs: fill what it has not touched yet in the background.
        if let Some(lazy) = h.mem.lazy() {
            lazy.start_prefetch();
        }
        for d in &h.devices.lazy_disks.0 {
            d.start_fill();
        }
        let reason = h.vcpus.wait_exit();
        for t in threads {
            let _ = t.join();
        }
        lock(&h.devices.serial).flush();
        for d in &h.devices.lazy_disks.0 {
            d.stop();
        }
        for (_, d) in h.devices.dm.objects() {
            d.stop();
        }
        if let Some(dir) = &self.opts.work_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        // The VM never ran as a whole: vmboot could not start it (status 1), not a KVM failure.
        if let Some(m) = not_started {
            return Err(Error::Thread(m));
        }
        Ok(reason)
    }
}

/// Puts disk `i`'s private copy back to the content the VM was restored with.
pub type DiskReset = Box<
    dyn Fn(usize) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
        + Send
        + Sync,
>;

pub use crate::api::ResetStats;

impl VmHandle {
    /// Pauses the VM: returns once every vCPU thread is parked outside KVM_RUN (see
    /// [`VcpuManager::pause`]) and every device has finished the work it had started.
    pub fn pause(&self) -> std::result::Result<(), PauseError> {
        self.vcpus.pause()?;
        // Requests already taken off a queue complete before this returns.
        for (_, d) in self.devices.dm.objects() {
            d.pause();
        }
        Ok(())
    }

    /// Lets the devices and then the vCPUs run again.
    pub fn resume(&self) -> std::result::Result<(), PauseError> {
        if let Some(e) = self.vcpus.exit_reason() {
            return Err(PauseError::Ended(e.message));
        }
        for (_, d) in self.devices.dm.objects() {
            d.resume();
        }
        self.vcpus.resume()
    }

    /// Ends the VM because the process got `signal`; [`Vm::run`] then returns 128 + signal,
    /// after the usual cleanup (socket and work folder removed).
    pub fn terminate(&self, signal: i32) {
        self.request_exit(ExitReason {
            code: 128 + signal,
            message: format!("terminated by signal {signal}"),
        });
    }

    /// Ends the VM; [`Vm::run`] then returns status 0.
    pub fn shutdown(&self) {
        self.request_exit(ExitReason {
            code: 0,
            message: "shutdown requested".into(),
        });
    }

    /// True when a pause was requested and every running vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// True when no vCPU can be in KVM_RUN: paused, not started yet, or ended.
    fn is_quiescent(&self) -> bool {
        self.vcpus.is_quiescent()
    }

    fn request_exit(&self, reason: ExitReason) {
        self.vcpus.request_exit(reason);
    }

    /// Captures every vCPU, the in-kernel irqchip/PIT/clock and the device models.
    /// Only while paused (or before [`Vm::run`], or after the VM ended).
    pub fn save_state(&self) -> Result<VmState> {
        if !self.is_quiescent() {
            return Err(Error::NotPaused);
        }
        let vcpus = self
            .vcpus
            .vcpus()
            .iter()
            .map(|v| v.save().with_context(|| format!("saving vCPU {}", v.id)))
            .collect::<Result<Vec<_>>>()?;
        let devices = self
            .devices
            .dm
            .objects()
            .map(|(id, d)| d.save(id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            version: VM_STATE_VERSION,
            // The pack's manifest carries the config (its one authoritative copy).
            config: None,
            memory_regions: self.mem.layout(),
            vm: self.vm.save()?,
            initrd: self.initrd_at.get().copied(),
            vcpus,
            devices,
            saved_on: Some(crate::host_info::fingerprint()?.clone()),
        })
    }

    /// Calls `f` with every guest RAM region as `(gpa, bytes)`. If the VM is running, it is
    /// paused for the duration of the call (so the bytes are a consistent image) and resumed.
    pub fn with_memory<R>(&self, f: impl FnOnce(&[(u64, &[u8])]) -> R) -> R {
        let paused_here = !self.is_quiescent() && self.pause().is_ok();
        // SAFETY: no vCPU is in KVM_RUN (quiescent, or paused just above; a failed pause means
        // the VM ended, so its vCPUs are gone) and no device writes guest RAM.
        let r = f(&unsafe { self.mem.slices() });
        if paused_here {
            let _ = self.resume();
        }
        r
    }

    /// How a reset puts a written disk copy back (set by the restore that made the copies).
    pub fn set_disk_reset(&self, f: DiskReset) {
        let _ = self.disk_reset.set(f);
    }

    /// Puts a VM restored from a pack back to the pack's state, in place: the guest pages
    /// written since the restore (or the previous reset) revert to the pack's (see
    /// [`GuestRam::reset_to_start`]), then every vCPU, the VM-level irqchip/PIT/clock and
    /// every device are loaded from the pack's state again, in the order of a restore, and
    /// written disk copies are put back. A VM that was running runs on from the pack's
    /// state; a paused one stays paused. A failure once the VM was changed ends it (its
    /// state would be neither the old nor the pack's).
    pub fn reset(&self) -> Result<ResetStats> {
        let state = self.reset_point.get().ok_or_else(|| {
            Error::NotResettable("only a VM restored from a pack can be reset".into())
        })?;
        if !self.mem.revertible() {
            return Err(crate::vstate::Error::NotRevertible.into());
        }
        // A pack from before a device existed starts that device at power-on: it has no
        // state to go back to. Refused before anything changes.
        for (id, d) in self.devices.dm.objects() {
            if !state.devices.iter().any(|s| s.id == id) {
                return Err(Error::NotResettable(format!(
                    "the pack holds no state of device {id} to reset it to"
                )));
            }
            if !d.resettable() {
                return Err(crate::devices::Error::NotResettable { id: id.to_string() }.into());
            }
        }
        let was_paused = self.is_paused();
        let t = Instant::now();
        self.pause()?;
        let r = (|| -> Result<(u64, usize)> {
            let pages = self.mem.reset_to_start(&self.vm.fd)?;
            for (v, s) in self.vcpus.vcpus().iter().zip(&state.vcpus) {
                vcpu::load(&lock(&v.fd), s)?;
            }
            self.vm.restore_state(&state.vm)?;
            for v in self.vcpus.vcpus() {
                tell_kvmclock_paused(&lock(&v.fd));
            }
            let mut disks = 0;
            for (id, d) in self.devices.dm.objects() {
                let s = state.devices.iter().find(|s| s.id == id).ok_or_else(|| {
                    Error::NotResettable(format!("the pack holds no state of device {id}"))
                })?;
                d.reset_to(s)?;
                if d.take_backend_written() {
                    let i = id
                        .strip_prefix("virtio-blk")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| {
                            Error::NotResettable(format!(
                                "device {id} wrote a backend that is not a disk"
                            ))
                        })?;
                    let put_back = self.disk_reset.get().ok_or_else(|| {
                        Error::NotResettable(
                            "the disks cannot be put back (no pack to read them from)".into(),
                        )
                    })?;
                    put_back(i).map_err(|source| Error::DiskReset { disk: i, source })?;
                    disks += 1;
                }
            }
            // Every disk is the pack's again, as memory is at its mark 0.
            for d in &self.devices.disks {
                d.reset_marks();
            }
            Ok((pages, disks))
        })();
        match r {
            Ok((pages, disks)) => {
                let pause_ms = t.elapsed().as_secs_f64() * 1000.0;
                if !was_paused {
                    self.resume()?;
                }
                Ok(ResetStats {
                    pages,
                    disks,
                    pause_ms,
                })
            }
            Err(e) => {
                self.request_exit(ExitReason {
                    code: EXIT_KVM_ERROR,
                    message: format!("reset failed: {}", crate::error::Chain(&e)),
                });
                Err(Error::ResetFailed(Box::new(e)))
            }
        }
    }

    /// The vsock device's host socket, if the VM has one.
    pub fn vsock_socket(&self) -> Option<PathBuf> {
        self.devices
            .dm
            .objects()
            .find_map(|(_, d)| match d.status() {
                Some(crate::api::DeviceStatus::Vsock(v)) => Some(PathBuf::from(v.uds_path)),
                _ => None,
            })
    }

    /// Starts a new dirty-page mark and returns its number (see `vstate::dirty`).
    pub fn dirty_mark(&self) -> Result<u64> {
        let id = self.mem.dirty_mark(&self.vm.fd)?;
        // Each disk counts the blocks written since the same mark (`disk_snapshot`).
        for d in &self.devices.disks {
            d.mark(id);
        }
        Ok(id)
    }

    /// Per disk, the blocks written since `mark` (see [`DiskTrack::written_since`]), with
    /// the disk's size; None for a disk whose mark is not kept.
    ///
    /// [`DiskTrack::written_since`]: crate::disk_snapshot::DiskTrack::written_since
    pub fn disk_written_since(&self, mark: u64) -> Vec<(u64, Option<Vec<u64>>)> {
        self.devices
            .disks
            .iter()
            .map(|d| (d.size(), d.written_since(mark)))
            .collect()
    }

    /// The guest pages written (by vCPUs or devices) since `mark`; mark 0 is the state the
    /// VM started from (for a restore: the pack's).
    pub fn dirty_since(&self, mark: u64) -> Result<crate::vstate::dirty::DirtyPages> {
        Ok(self.mem.dirty_since(&self.vm.fd, mark)?)
    }

    /// Drops a dirty mark no one needs any more (a live save's rounds).
    pub fn dirty_forget(&self, mark: u64) {
        self.mem.dirty_forget(mark);
        for d in &self.devices.disks {
            d.forget(mark);
        }
    }

    /// `(gpa, host address, size)` of every RAM region. The memory lives as long as the VM;
    /// reading it while vCPUs run races with them, which only a live save does (and it
    /// copies again, paused, every page written meanwhile).
    pub fn raw_memory(&self) -> Vec<(u64, *const u8, usize)> {
        self.mem.raw_regions()
    }

    /// Per RAM region, the ranges that may hold data (see [`GuestRam::data_ranges`]).
    pub fn memory_data_ranges(&self) -> Vec<Vec<std::ops::Range<u64>>> {
        self.mem.data_ranges()
    }

    /// For a lazily restored VM: waits until every chunk is in place, and says why that
    /// failed (a chunk or boot file failed verification), if it did.
    pub fn memory_failure(&self) -> Option<String> {
        let l = self.mem.lazy()?;
        l.wait_complete();
        l.failure()
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Stored chunks of lazily restored disks not yet in their private copies (0 once the
    /// background fill is done, or when no disk is filled lazily).
    pub fn disk_chunks_pending(&self) -> u64 {
        self.devices.lazy_disks.pending()
    }

    /// Flushes every disk backend (qcow2 metadata included), so the image files hold what
    /// the guest wrote; call while paused before reading the disk files.
    pub fn flush_disks(&self) -> Result<()> {
        for (id, d) in self.devices.dm.objects() {
            d.flush().with_context(|| format!("flushing {id}"))?;
        }
        Ok(())
    }

    /// Freezes every disk as it is now (call while paused), one view per `[[disk]]` in
    /// order, until the views are dropped; see `crate::disk_snapshot`.
    pub fn freeze_disks(&self) -> Result<Vec<crate::disk_snapshot::FrozenDisk>> {
        self.devices
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.freeze(&self.spill_dir)
                    .with_context(|| format!("freezing disk {i}"))
            })
            .collect()
    }

    /// Where the loader put the initrd, `(gpa, len)`.
    pub fn initrd_at(&self) -> Option<(u64, u64)> {
        self.initrd_at.get().copied()
    }

    pub fn boot_payload(&self) -> &BootFiles {
        &self.payload
    }

    /// Records that guest memory equalled the pack with this root digest at dirty `mark`
    /// (the restore's mark 0, or the mark a save took at its pause), so a later save can
    /// store only what was written since (`vmpack save --diff-from`).
    pub fn note_pack(&self, root_digest: &str, mark: u64) {
        let mut l = lock(&self.lineage);
        l.retain(|(r, _)| r != root_digest);
        l.push((root_digest.to_string(), mark));
        // Marks older than the dirty log keeps are useless; the bound only limits the list.
        let n = l.len();
        if n > 64 {
            l.drain(..n - 64);
        }
    }

    /// The dirty mark at which guest memory equalled the pack with this root digest.
    pub fn pack_mark(&self, root_digest: &str) -> Option<u64> {
        lock(&self.lineage)
            .iter()
            .find(|(r, _)| r == root_digest)
            .map(|&(_, m)| m)
    }

    /// Remembers the figures of the latest save for `GET /vm`.
    pub fn set_last_save(&self, v: SaveStats) {
        *lock(&self.last_save) = Some(v);
    }

    /// Time from VM creation to the first exit of vCPU 0 (roughly, its first instructions).
    pub fn first_exit_after_create(&self) -> Option<Duration> {
        self.vcpus
            .first_exit()
            .map(|t| t.duration_since(self.created))
    }

    /// Instant of vCPU 0's first exit.
    pub fn first_exit_instant(&self) -> Option<Instant> {
        self.vcpus.first_exit()
    }

    /// `running`, `paused` or `stopped`; a VM not started yet or still pausing is running.
    pub fn run_state(&self) -> RunState {
        if self.vcpus.exit_reason().is_some() {
            RunState::Stopped
        } else if self.vcpus.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// The body of `GET /vm`.
    pub fn status(&self) -> VmStatus {
        let state = self.run_state();
        let exit = self.vcpus.exit_reason().map(|e| ExitStatus {
            code: e.code,
            message: e.message,
        });
        let (port_reads, port_writes) = self.devices.dm.pio.unknown_counts();
        let (mmio_reads, mmio_writes) = self.devices.dm.mmio.unknown_counts();
        let mut v = VmStatus {
            state,
            name: self.config.name.clone(),
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            uptime_ms: self.created.elapsed().as_millis() as u64,
            unhandled_io: UnhandledIo {
                port_reads,
                port_writes,
                mmio_reads,
                mmio_writes,
            },
            last_save: lock(&self.last_save).clone(),
            exit,
            disks: Vec::new(),
            entropy: Vec::new(),
            net: Vec::new(),
            vsock: Vec::new(),
            vmgenid: Vec::new(),
        };
        for (_, d) in self.devices.dm.objects() {
            if let Some(entry) = d.status() {
                v.push_device(entry);
            }
        }
        v
    }

    pub(crate) fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.devices.serial
    }

    /// The serial output log (see [`Vm::serial_log`]).
    pub fn serial_log(&self) -> Option<&Arc<crate::devices::serial_log::SerialLog>> {
        self.serial_log.as_ref()
    }
}

/// `opts` with a serial log attached: the one it already has (a [`SerialSink::Console`]),
/// or, when a control socket is served, a new one that also passes output on to the
/// configured sink (so `GET /vm/serial/output` works for every VM with an API socket).
fn with_log(opts: &RunOptions) -> RunOptions {
    let mut o = opts.clone();
    if opts.api_sock.is_some() && !matches!(opts.serial_out, SerialSink::Console { .. }) {
        o.serial_out = SerialSink::Console {
            log: crate::devices::serial_log::SerialLog::new(),
            also: Box::new(opts.serial_out.clone()),
        };
    }
    o
}

impl VmHandle {
    /// Puts `bytes` into COM1's receive FIFO, waiting while the FIFO is full (the guest reads
    /// it at its own pace). Fails if the guest has not made room within `timeout` or the VM
    /// has ended.
    pub fn serial_input(&self, bytes: &[u8], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending = bytes;
        while !pending.is_empty() {
            let took = lock(self.serial()).enqueue(pending);
            pending = &pending[took..];
            if took == 0 {
                if self.has_ended() {
                    return Err(Error::InputAfterEnd {
                        pending: pending.len(),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(Error::InputTimeout {
                        timeout,
                        pending: pending.len(),
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    fn has_ended(&self) -> bool {
        self.run_state() == RunState::Stopped
    }
}

/// SIGINT, SIGTERM and SIGHUP: the signals that end a VM cleanly.
fn exit_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// The VMs the exit signals end (weak: a finished VM is not kept alive for this), and a
/// signal that came while there was none.
type SignalTarget = (Vec<std::sync::Weak<VmHandle>>, Option<i32>);
static SIGNAL_TARGET: Mutex<SignalTarget> = Mutex::new((Vec::new(), None));

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts later,
/// and starts the thread that waits for them (now, while the process is small: under a
/// tight memory limit it is the VM's own allocations that fail, cleanly). Call it first
/// thing in `main`, before any VM exists, then hand the VM to [`terminate_on_signals`]: a
/// signal that arrives in between is kept until then.
pub fn block_exit_signals() {
    let set = exit_signals();
    // SAFETY: changes only this thread's mask, with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // A failure is reported by terminate_on_signals.
    let _ = signal_thread();
}

/// Starts the signal-waiting thread once per process.
fn signal_thread() -> Result<()> {
    static STARTED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            let set = exit_signals();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || loop {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: waits on a valid set of signals blocked in every thread.
                    if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                        let mut t = lock(&SIGNAL_TARGET);
                        let vms: Vec<_> = t.0.iter().filter_map(std::sync::Weak::upgrade).collect();
                        if vms.is_empty() {
                            t.1 = Some(sig);
                        }
                        for vm in vms {
                            vm.terminate(sig);
                        }
                    }
                })
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| {
            Error::Thread(format!(
                "cannot start the thread that handles Ctrl-C and kill: {e}"
            ))
        })
}

/// Ends `vm` cleanly (see [`VmHandle::terminate`]) when one of the blocked exit signals
/// arrives (or arrived since [`block_exit_signals`]), so Ctrl-C or `kill` never leaves a
/// socket or a work folder behind. Fails if the thread that waits for them cannot start
/// (the signals would stay blocked).
pub fn terminate_on_signals(vm: Arc<VmHandle>) -> Result<()> {
    terminate_all_on_signals(vec![vm])
}

/// [`terminate_on_signals`] for several VMs of one process (clones): a signal ends them all.
pub fn terminate_all_on_signals(vms: Vec<Arc<VmHandle>>) -> Result<()> {
    signal_thread()?;
    let mut t = lock(&SIGNAL_TARGET);
    if let Some(sig) = t.1.take() {
        for vm in &vms {
            vm.terminate(sig);
        }
    }
    // VMs handed over earlier stay targets while they live.
    t.0.retain(|w| w.strong_count() > 0);
    t.0.extend(vms.iter().map(Arc::downgrade));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{MmioTransportState, VirtqState};
    use crate::devices::virtio::VirtioBlkState;
    use crate::persist::{SerialDeviceState, VcpuState, VmLevelState};

    fn cfg(disks: usize) -> VmConfig {
        let mut t = "name = \"t\"\nmemory_mib = 16\n[flat]\nimage = \"g.bin\"\nload_address = 0x100000\nentry = 0x100000\nmode = \"long\"\n"
            .to_string();
        for i in 0..disks {
            t += &format!("[[disk]]\npath = \"d{i}.img\"\n");
        }
        VmConfig::parse(&t, std::path::Path::new("t.toml")).unwrap()
    }

    fn dev(id: &str, version: u32, state: impl serde::Serialize) -> DeviceState {
        DeviceState {
            id: id.into(),
            version,
            state: serde_json::to_value(state).unwrap(),
        }
    }

    fn blk() -> VirtioBlkState {
        VirtioBlkState {
            transport: MmioTransportState {
                queues: vec![VirtqState {
                    max_size: 256,
                    ..Default::default()
                }],
                ..Default::default()
            },
            disk_size: 1 << 20,
            read_only: false,
        }
    }

    /// A state as a VM of `cfg(disks)` saves it (through JSON, as in a pack).
    fn state(disks: usize) -> VmState {
        let mut devices = vec![
            dev("com1", 1, SerialDeviceState::default()),
            dev("i8042", 1, serde_json::json!({})),
        ];
        for i in 0..disks {
            devices.push(dev(&format!("virtio-blk{i}"), 1, blk()));
        }
        let s = VmState {
            version: VM_STATE_VERSION,
            config: None,
            memory_regions: ram_layout(16 << 20),
            initrd: None,
            vm: VmLevelState {
                version: 1,
                pit2: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            vcpus: vec![VcpuState {
                version: 1,
                id: 0,
                mp_state: Default::default(),
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debugregs: Default::default(),
                lapic: Default::default(),
                tsc_khz: 1,
                cpuid: vec![],
                msrs: vec![],
                vcpu_events: Default::default(),
            }],
            devices,
            saved_on: None,
        };
        VmState::parse(&serde_json::to_vec(&s).unwrap()).unwrap()
    }

    fn refused(s: VmState, c: &VmConfig) -> String {
        match s.validate(c) {
            Ok(_) => panic!("validated"),
            Err(e) => crate::error::Chain(&e).to_string(),
        }
    }

    #[test]
    fn validate_applies_the_compatibility_rule() {
        assert!(state(2).validate(&cfg(2)).is_ok());
        // A pack from before disks: its disks start at power-on.
        assert!(state(0).validate(&cfg(2)).is_ok());
        let err = refused(state(1), &cfg(2));
        assert!(
            err.contains("the saved VM has 1 virtio-blk devices but the config has 2 disks"),
            "{err}"
        );
        let err = refused(state(2), &cfg(1));
        assert!(err.contains("device virtio-blk1"), "{err}");
        // A newer component version is refused by name; older ones are read.
        let mut s = state(1);
        s.devices[2].version = 2;
        let err = refused(s, &cfg(1));
        assert!(
            err.contains(
                "device virtio-blk0: state version 2 is not supported (this vmboot reads versions 1 to 1)"
            ),
            "{err}"
        );
        let mut s = state(1);
        s.vcpus[0].version = 2;
        assert!(refused(s, &cfg(1)).contains("vCPU 0: state version 2"));
        let mut s = state(1);
        s.vm.version = 2;
        assert!(refused(s, &cfg(1)).contains("VM-level state: state version 2"));
        let mut s = state(1);
        s.devices.push(s.devices[0].clone());
        assert!(refused(s, &cfg(1)).contains("device com1"));
        // A device's state is checked before any KVM call.
        let mut s = state(1);
        s.devices[2].state["transport"]["queues"][0]["size"] = 512.into();
        assert!(refused(s, &cfg(1)).contains("virtqueue 0: size 512"));
        let mut v = serde_json::to_value(state(1)).unwrap();
        v["version"] = 3.into();
        let err =
            crate::error::Chain(&VmState::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err())
                .to_string();
        assert!(
            err.contains(
                "vm state version 3 is not supported by this vmboot (it reads versions 1 and 2)"
            ),
            "{err}"
        );
    }

    #[test]
    fn version_1_reads_as_version_2() {
        let mut v = serde_json::to_value(state(1)).unwrap();
        let o = v.as_object_mut().unwrap();
        let vm = o.remove("vm").unwrap();
        for k in ["pit2", "clock", "pic_master", "pic_slave", "ioapic"] {
            o.insert(k.into(), vm[k].clone());
        }
        o.insert("version".into(), 1.into());
        o["vcpus"][0].as_object_mut().unwrap().remove("version");
        let d = o["devices"].clone();
        o.insert(
            "devices".into(),
            serde_json::json!({"serial": d[0]["state"], "i8042": {}, "virtio_blk": [d[2]["state"]]}),
        );
        let s = VmState::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(s.version, 1);
        assert_eq!(s.vcpus[0].version, 1);
        let ids: Vec<&str> = s.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["com1", "i8042", "virtio-blk0"]);
        assert_eq!(s.devices[2].state, serde_json::to_value(blk()).unwrap());
        assert!(s.validate(&cfg(1)).is_ok());
    }
}
