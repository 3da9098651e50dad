//! Everything vmboot saves about a paused VM, as plain serde structs, and the traits every
//! saved component implements.
//!
//! The vmstate is a tree of components, each with its own version (docs/FORMAT.md §12.2):
//! the VM-level state (`vm`), one entry per vCPU and one per registered device, keyed by
//! the device's id. A component's [`Persist::VERSION`] is bumped when its state changes; a
//! reader accepts every version up to its own and refuses newer ones by name.
//!
//! KVM structures serialize as raw bytes (kvm-bindings' `serde` feature). Guest RAM is not
//! part of [`VmState`]: it is written separately through [`crate::VmHandle::with_memory`].

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmpack_formats::config::VmConfig;

/// The serialized vmstate is small (a few KiB per vCPU); anything larger is hostile.
pub(crate) const MAX_VMSTATE_LEN: u64 = 64 << 20;

pub use crate::error::StateError;

/// The version of the vmstate's outer shape. Version 1 (vmboot 0.1.0) had fixed fields per
/// device and no per-component versions; it is still read.
pub const VM_STATE_VERSION: u32 = 2;

/// A component of the VM whose state goes into the vmstate (Firecracker's persist
/// pattern): a plain `State`, captured by [`Persist::save`]; a restore builds a fresh
/// object from it plus the `ConstructorArgs` that are not state (fds, guest memory,
/// backends).
pub trait Persist<'a>: Sized {
    type State: Serialize + DeserializeOwned;
    type ConstructorArgs: 'a;
    /// The version of `State` this build writes; it reads every version up to it.
    const VERSION: u32;
    /// The component's layer error (`devices::Error`, `vstate::Error`).
    type Error;
    fn save(&self) -> Result<Self::State, Self::Error>;
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// A component that does work outside the vCPUs (an I/O thread, a worker) and must stop
/// touching guest memory while the VM is paused.
pub trait Pausable {
    /// Returns once work in progress has completed; no new work starts until `resume`.
    fn pause(&self) {}
    fn resume(&self) {}
}

/// A device in the registry, as the VM loops over them: pause, resume, save, status.
pub trait VmDevice: Pausable + Send + Sync {
    /// The device's state, under its registry `id`.
    fn save(&self, id: &str) -> Result<DeviceState, crate::devices::Error>;
    /// Its entry in `GET /vm`.
    fn status(&self) -> Option<crate::api::DeviceStatus> {
        None
    }
    /// Makes the device's backend durable (disk images).
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// The VM has ended: release host resources (sockets) now rather than when the last
    /// reference to the device goes.
    fn stop(&self) {}
    /// Puts the device back in `state` (as `save` made it) in place, keeping what it is
    /// registered with (bus ranges, ioeventfds, irqfd), for `PUT /vm/reset`. Only while the
    /// VM is paused.
    fn reset_to(&self, state: &DeviceState) -> Result<(), crate::devices::Error> {
        Err(crate::devices::Error::NotResettable {
            id: state.id.clone(),
        })
    }
    /// Whether `reset_to` is implemented (checked before a reset changes anything).
    fn resettable(&self) -> bool {
        false
    }
    /// Whether the device wrote its backend (a disk image) since it was built or this was
    /// last asked; a reset then puts the backend back too.
    fn take_backend_written(&self) -> bool {
        false
    }
}

/// One device in the vmstate: its registry id, the version of its state and the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub id: String,
    pub version: u32,
    pub state: serde_json::Value,
}

impl DeviceState {
    pub fn new<'a, T: Persist<'a>>(id: &str, dev: &T) -> Result<DeviceState, T::Error>
    where
        T::Error: From<StateError>,
    {
        Ok(DeviceState {
            id: id.to_string(),
            version: T::VERSION,
            state: serde_json::to_value(dev.save()?).map_err(|source| StateError::Encode {
                id: id.to_string(),
                source,
            })?,
        })
    }

    /// The typed state, refused if its version is newer than this build's.
    pub fn decode<'a, T: Persist<'a>>(&self) -> Result<T::State, StateError> {
        check_version(&format!("device {}", self.id), self.version, T::VERSION)?;
        serde_json::from_value(self.state.clone()).map_err(|error| StateError::Decode {
            id: self.id.clone(),
            error,
        })
    }
}

/// A reader accepts component versions 1 up to its own.
pub fn check_version(what: &str, version: u32, ours: u32) -> Result<(), StateError> {
    if version == 0 || version > ours {
        return Err(StateError::Version {
            what: what.to_string(),
            version,
            ours,
        });
    }
    Ok(())
}

fn version_one() -> u32 {
    1
}

/// KVM structures must arrive at exactly their ABI size. kvm-bindings' own `Deserialize`
/// zero-pads a short byte array and ignores the tail of a long one, so a vmstate with a
/// truncated `lapic` would restore a vCPU from made-up zeros; these refuse it, naming the
/// field and the sizes.
mod exact {
    use serde::de::value::BytesDeserializer;
    use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, Error, SeqAccess, Visitor};
    use std::fmt;
    use std::marker::PhantomData;

    /// Collects a byte array, remembering only its first `max` bytes but counting all.
    struct Bytes(usize);

    impl<'de> Visitor<'de> for Bytes {
        type Value = (Vec<u8>, usize);
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of bytes")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok((v[..v.len().min(self.0)].to_vec(), v.len()))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut v = Vec::with_capacity(self.0);
            let mut n = 0usize;
            while let Some(b) = seq.next_element::<u8>()? {
                if n < self.0 {
                    v.push(b);
                }
                n += 1;
            }
            Ok((v, n))
        }
    }

    fn short_name<T>() -> &'static str {
        let n = std::any::type_name::<T>();
        n.rsplit("::").next().unwrap_or(n)
    }

    /// One KVM structure `T` named `field`.
    struct Exact<T>(String, PhantomData<T>);

    impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Exact<T> {
        type Value = T;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
            let size = std::mem::size_of::<T>();
            let (bytes, n) = d.deserialize_bytes(Bytes(size))?;
            if n != size {
                return Err(D::Error::custom(format!(
                    "{}: {n} bytes where {} has {size}",
                    self.0,
                    short_name::<T>()
                )));
            }
            T::deserialize(BytesDeserializer::<D::Error>::new(&bytes))
        }
    }

    struct List<T>(&'static str, PhantomData<T>);

    impl<'de, T: DeserializeOwned> Visitor<'de> for List<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of {}", short_name::<T>())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::new();
            while let Some(x) =
                seq.next_element_seed(Exact::<T>(format!("{}[{}]", self.0, v.len()), PhantomData))?
            {
                v.push(x);
            }
            Ok(v)
        }
    }

    macro_rules! fields {
        ($($name:ident),* $(,)?) => {$(
            pub fn $name<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
                Exact::<T>(stringify!($name).to_string(), PhantomData).deserialize(d)
            }
        )*};
    }
    fields!(
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        vcpu_events,
        pit2,
        clock,
        pic_master,
        pic_slave,
        ioapic,
    );

    macro_rules! lists {
        ($($name:ident),* $(,)?) => {$(
            pub fn $name<'de, D: Deserializer<'de>, T: DeserializeOwned>(
                d: D,
            ) -> Result<Vec<T>, D::Error> {
                d.deserialize_seq(List::<T>(stringify!($name), PhantomData))
            }
        )*};
    }
    lists!(cpuid, msrs);
}

/// The version of [`VcpuState`] this build writes.
pub const VCPU_STATE_VERSION: u32 = 1;

/// One vCPU, captured outside KVM_RUN with any pending port I/O completed.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// Absent in vmstate version 1: 1.
    #[serde(default = "version_one")]
    pub version: u32,
    pub id: u32,
    #[serde(deserialize_with = "exact::mp_state")]
    pub mp_state: kvm_mp_state,
    #[serde(deserialize_with = "exact::regs")]
    pub regs: kvm_regs,
    #[serde(deserialize_with = "exact::sregs")]
    pub sregs: kvm_sregs,
    /// The full XSAVE area (not KVM_GET_FPU, which loses SSE state on restore).
    #[serde(deserialize_with = "exact::xsave")]
    pub xsave: kvm_xsave,
    #[serde(deserialize_with = "exact::xcrs")]
    pub xcrs: kvm_xcrs,
    #[serde(deserialize_with = "exact::debugregs")]
    pub debugregs: kvm_debugregs,
    #[serde(deserialize_with = "exact::lapic")]
    pub lapic: kvm_lapic_state,
    /// TSC frequency the guest saw, in kHz.
    pub tsc_khz: u32,
    #[serde(deserialize_with = "exact::cpuid")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(deserialize_with = "exact::msrs")]
    pub msrs: Vec<kvm_msr_entry>,
    #[serde(deserialize_with = "exact::vcpu_events")]
    pub vcpu_events: kvm_vcpu_events,
}

/// The 16550 at COM1: the same fields as `vm_superio::serial::SerialState`, made serializable.
/// `Default` is the power-on state (transmitter empty, divisor 12), not all zeros.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Default for SerialDeviceState {
    fn default() -> Self {
        (&vm_superio::serial::SerialState::default()).into()
    }
}

impl From<&vm_superio::serial::SerialState> for SerialDeviceState {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialDeviceState> for vm_superio::serial::SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// vm-superio's i8042 keeps no state (it only reacts to the reset command); the struct exists
/// so a later, stateful model can be added without changing `VmState`'s shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// The version of [`VmLevelState`] this build writes.
pub const VM_LEVEL_STATE_VERSION: u32 = 1;

/// The in-kernel devices KVM emulates for the whole VM: PIT, kvmclock, PIC pair, IOAPIC.
#[derive(Serialize, Deserialize)]
pub struct VmLevelState {
    #[serde(default = "version_one")]
    pub version: u32,
    #[serde(deserialize_with = "exact::pit2")]
    pub pit2: kvm_pit_state2,
    /// kvmclock at save time; restored with flags 0 so guest time resumes at this value
    /// (the guest does not see the time it spent saved).
    #[serde(deserialize_with = "exact::clock")]
    pub clock: kvm_clock_data,
    #[serde(deserialize_with = "exact::pic_master")]
    pub pic_master: kvm_irqchip,
    #[serde(deserialize_with = "exact::pic_slave")]
    pub pic_slave: kvm_irqchip,
    #[serde(deserialize_with = "exact::ioapic")]
    pub ioapic: kvm_irqchip,
}

/// A whole paused VM except guest RAM.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    /// Only in version 1 packs written before the manifest became the config's only
    /// authority (see docs/FORMAT.md §12.2); a restore checks it against the manifest's
    /// config and never uses it otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<VmConfig>,
    /// Guest RAM regions `(gpa, size)` the memory image must cover.
    pub memory_regions: Vec<(u64, u64)>,
    /// Where the loader put the initrd, `(gpa, len)` (Linux guests booted with one).
    #[serde(default)]
    pub initrd: Option<(u64, u64)>,
    pub vm: VmLevelState,
    pub vcpus: Vec<VcpuState>,
    /// One per registered device that has state, in registration order.
    pub devices: Vec<DeviceState>,
    /// Fingerprint of the host that saved the VM (docs/FORMAT.md §12.2); absent in packs
    /// from vmboots before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_on: Option<vmpack_formats::host::HostFingerprint>,
}

/// Version 1 of the vmstate (vmboot 0.1.0): VM-level fields at the top, devices by kind.
#[derive(Deserialize)]
struct VmStateV1 {
    #[serde(default)]
    config: Option<VmConfig>,
    memory_regions: Vec<(u64, u64)>,
    #[serde(deserialize_with = "exact::pit2")]
    pit2: kvm_pit_state2,
    #[serde(deserialize_with = "exact::clock")]
    clock: kvm_clock_data,
    #[serde(deserialize_with = "exact::pic_master")]
    pic_master: kvm_irqchip,
    #[serde(deserialize_with = "exact::pic_slave")]
    pic_slave: kvm_irqchip,
    #[serde(deserialize_with = "exact::ioapic")]
    ioapic: kvm_irqchip,
    #[serde(default)]
    initrd: Option<(u64, u64)>,
    vcpus: Vec<VcpuState>,
    devices: DeviceStatesV1,
    #[serde(default)]
    saved_on: Option<vmpack_formats::host::HostFingerprint>,
}

#[derive(Deserialize)]
struct DeviceStatesV1 {
    serial: serde_json::Value,
    i8042: serde_json::Value,
    /// Absent in packs from before virtio-blk.
    #[serde(default)]
    virtio_blk: Vec<serde_json::Value>,
}

impl VmState {
    /// Reads a vmstate of any supported version (JSON). Versions of the components are
    /// checked by [`VmState::validate`].
    pub fn parse(bytes: &[u8]) -> Result<VmState, StateError> {
        #[derive(Deserialize)]
        struct Outer {
            version: u32,
        }
        // Every vmboot writes the version first: read there, it saves a pass over the whole
        // document (most of a vmstate check); anything else is read the general way.
        let version = match leading_version(bytes) {
            Some(v) => v,
            None => {
                let outer: Outer = serde_json::from_slice(bytes).map_err(StateError::Parse)?;
                outer.version
            }
        };
        match version {
            1 => {
                let v1: VmStateV1 = serde_json::from_slice(bytes).map_err(StateError::Parse)?;
                Ok(v1.into())
            }
            VM_STATE_VERSION => serde_json::from_slice(bytes).map_err(StateError::Parse),
            v => Err(StateError::VmStateVersion {
                version: v,
                ours: VM_STATE_VERSION,
            }),
        }
    }

    /// The saved state of device `id`.
    pub fn device(&self, id: &str) -> Option<&DeviceState> {
        self.devices.iter().find(|d| d.id == id)
    }
}

/// `N` of a document that starts `{"version":N,` (N a plain decimal `u32`); the full parse
/// that follows checks the rest, so this only picks which one.
fn leading_version(bytes: &[u8]) -> Option<u32> {
    let rest = bytes.strip_prefix(b"{\"version\":")?;
    let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 10 || (n > 1 && rest[0] == b'0') || rest.get(n) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(&rest[..n]).ok()?.parse().ok()
}

impl From<VmStateV1> for VmState {
    fn from(v1: VmStateV1) -> VmState {
        let dev = |id: String, state| DeviceState {
            id,
            version: 1,
            state,
        };
        let mut devices = vec![
            dev("com1".into(), v1.devices.serial),
            dev("i8042".into(), v1.devices.i8042),
        ];
        for (i, b) in v1.devices.virtio_blk.into_iter().enumerate() {
            devices.push(dev(format!("virtio-blk{i}"), b));
        }
        VmState {
            version: 1,
            config: v1.config,
            memory_regions: v1.memory_regions,
            initrd: v1.initrd,
            vm: VmLevelState {
                version: 1,
                pit2: v1.pit2,
                clock: v1.clock,
                pic_master: v1.pic_master,
                pic_slave: v1.pic_slave,
                ioapic: v1.ioapic,
            },
            vcpus: v1.vcpus,
            devices,
            saved_on: v1.saved_on,
        }
    }
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("version", &self.version)
            .field("vcpus", &self.vcpus.len())
            .field("memory_regions", &self.memory_regions)
            .field(
                "devices",
                &self.devices.iter().map(|d| &d.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_version_only_from_a_plain_prefix() {
        assert_eq!(leading_version(br#"{"version":2,"x":1}"#), Some(2));
        assert_eq!(leading_version(br#"{"version":0,"#), Some(0));
        for other in [
            &br#"{"version":02,"#[..],
            br#"{"version":2}"#,
            br#"{"version":-1,"#,
            br#"{"version":99999999999,"#,
            br#"{ "version":2,"#,
            br#"{"config":{},"version":2}"#,
        ] {
            assert_eq!(
                leading_version(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        // Either way the whole document is checked.
        assert!(VmState::parse(br#"{"version":1,"#).is_err());
        assert!(VmState::parse(br#"{"version":1,"version":2}"#).is_err());
    }

    fn vcpu_json() -> serde_json::Value {
        let v = VcpuState {
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
            cpuid: vec![Default::default(); 2],
            msrs: vec![Default::default(); 3],
            vcpu_events: Default::default(),
        };
        serde_json::to_value(&v).unwrap()
    }

    fn parse(v: &serde_json::Value) -> Result<(), String> {
        serde_json::from_value::<VcpuState>(v.clone())
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn kvm_structures_must_have_their_exact_size() {
        let good = vcpu_json();
        assert!(parse(&good).is_ok());
        let size = |f: &str| good[f].as_array().unwrap().len();
        assert_eq!(size("lapic"), 1024);
        for field in [
            "mp_state",
            "regs",
            "sregs",
            "xsave",
            "xcrs",
            "debugregs",
            "lapic",
            "vcpu_events",
        ] {
            let n = size(field);
            let mut short = good.clone();
            short[field].as_array_mut().unwrap().pop();
            let err = parse(&short).unwrap_err();
            assert!(
                err.contains(&format!("{field}: {} bytes where", n - 1))
                    && err.contains(&format!("has {n}")),
                "{field}: {err}"
            );
            let mut long = good.clone();
            long[field].as_array_mut().unwrap().push(0.into());
            let err = parse(&long).unwrap_err();
            assert!(err.contains(&format!("{field}: {} bytes", n + 1)), "{err}");
        }
        let mut short_entry = good.clone();
        short_entry["cpuid"][1].as_array_mut().unwrap().truncate(8);
        let err = parse(&short_entry).unwrap_err();
        assert!(
            err.contains("cpuid[1]: 8 bytes where kvm_cpuid_entry2 has 40"),
            "{err}"
        );
        let mut short_msr = good.clone();
        short_msr["msrs"][2].as_array_mut().unwrap().pop();
        let err = parse(&short_msr).unwrap_err();
        assert!(
            err.contains("msrs[2]: 15 bytes where kvm_msr_entry has 16"),
            "{err}"
        );
    }

    #[test]
    fn serial_default_is_power_on_state() {
        let s = SerialDeviceState::default();
        // Transmitter empty: polling drivers must see THRE|TEMT.
        assert_eq!(s.line_status, 0x60);
        let back: vm_superio::serial::SerialState = (&s).into();
        assert_eq!(back, vm_superio::serial::SerialState::default());
    }
}
