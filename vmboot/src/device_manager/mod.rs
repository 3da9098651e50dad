//! The device registry: every device of a VM with its id, bus ranges and interrupt line,
//! handed out by [`resources::Resources`]. The port and MMIO buses, the kernel command
//! line's `virtio_mmio.device=` arguments and the ACPI tables (MADT overrides, DSDT) are
//! all derived from this one list, never written by hand; pause, resume, save, flush and
//! status loop over its devices ([`DeviceManager::objects`]).

pub mod resources;

use crate::devices::{Bus, BusDevice};
use crate::devices::{Context, Error, Result};
use crate::persist::VmDevice;
use resources::Resources;
use std::sync::{Arc, Mutex};

/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// How a device appears in the DSDT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcpiId {
    /// A PC device with a PNP id (`_HID EisaId("PNP0501")`), under `\_SB.<name>`.
    Pnp {
        hid: &'static str,
        name: &'static str,
    },
    /// A virtio-mmio window (`_HID "LNRO0005"`), under `\_SB.Vnnn`.
    VirtioMmio,
    /// The VM generation ID at `addr` (`\_SB.VGEN`) and the Generic Event Device on the
    /// device's GSI that notifies it (`\_SB.GED0`).
    VmGenId { addr: u64 },
}

/// One registered device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Unique within the VM: `com1`, `i8042`, `virtio-blk0`, …
    pub id: String,
    /// Port I/O ranges `(base, len)`.
    pub pio: Vec<(u64, u64)>,
    /// MMIO window `(base, len)`.
    pub mmio: Option<(u64, u64)>,
    /// Interrupt line.
    pub gsi: Option<u32>,
    /// The ISA IRQ the device uses on a PC (legacy devices); the MADT gets an override
    /// where its GSI differs from the PC's default wiring.
    pub isa_irq: Option<u8>,
    /// Emulated in the kernel (KVM's PIT): described, not on vmboot's buses.
    pub in_kernel: bool,
    pub acpi: Option<AcpiId>,
}

impl DeviceInfo {
    pub fn new(id: impl Into<String>) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            pio: Vec::new(),
            mmio: None,
            gsi: None,
            isa_irq: None,
            in_kernel: false,
            acpi: None,
        }
    }
}

/// A virtio-mmio device as registered: its transport (on the MMIO bus) and the device as
/// paused and saved.
pub type VirtioParts<T> = (Arc<Mutex<T>>, Arc<dyn VmDevice>);
/// A legacy device as registered: on the port bus, and as paused and saved if it has state.
pub type LegacyParts = (Arc<Mutex<dyn BusDevice>>, Option<Arc<dyn VmDevice>>);

/// The registry plus the buses its devices sit on.
#[derive(Default)]
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    resources: Resources,
    devices: Vec<DeviceInfo>,
    /// The devices with state or work of their own, by id, in registration order (the
    /// order of the vmstate's `devices`).
    objects: Vec<(String, Arc<dyn VmDevice>)>,
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// Every device with state or work of its own, with its id.
    pub fn objects(&self) -> impl Iterator<Item = (&str, &Arc<dyn VmDevice>)> + '_ {
        self.objects.iter().map(|(id, d)| (id.as_str(), d))
    }

    pub fn device(&self, id: &str) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.id == id)
    }

    fn check_id(&self, id: &str) -> Result<()> {
        if self.device(id).is_some() {
            return Err(Error::DuplicateId(id.to_string()));
        }
        Ok(())
    }

    /// A legacy device at fixed ports with a fixed ISA line; `dev` is `None` for devices KVM
    /// emulates itself. Every range of `info.pio` routes to `dev`; `object` is the device
    /// as saved and paused (if it has state).
    pub fn add_legacy(
        &mut self,
        mut info: DeviceInfo,
        dev: Option<Arc<Mutex<dyn BusDevice>>>,
        object: Option<Arc<dyn VmDevice>>,
    ) -> Result<()> {
        self.check_id(&info.id)?;
        if let Some(g) = info.gsi {
            self.resources
                .claim_legacy_gsi(g)
                .map_err(Error::from)
                .with_context(|| format!("device {}", info.id))?;
        }
        match dev {
            Some(dev) => {
                let first = info.pio.first().map_or(0, |r| r.0);
                for &(base, len) in &info.pio {
                    self.pio
                        .insert_at_offset(base, len, base - first, dev.clone())?;
                }
            }
            None => info.in_kernel = true,
        }
        if let Some(o) = object {
            self.objects.push((info.id.clone(), o));
        }
        self.devices.push(info);
        Ok(())
    }

    /// A device with no bus access of its own that needs an interrupt line: allocates a
    /// GSI, lets `make` build the device for it and records both.
    pub fn add_platform(
        &mut self,
        mut info: DeviceInfo,
        make: impl FnOnce(u32) -> Result<Arc<dyn VmDevice>>,
    ) -> Result<u32> {
        self.check_id(&info.id)?;
        let mut res = self.resources.clone();
        let gsi = res
            .allocate_gsi()
            .map_err(Error::from)
            .with_context(|| format!("device {}", info.id))?;
        let object = make(gsi)?;
        self.resources = res;
        info.gsi = Some(gsi);
        self.objects.push((info.id.clone(), object));
        self.devices.push(info);
        Ok(gsi)
    }

    /// A virtio-mmio device: allocates its window and GSI, lets `make` build the device for
    /// them (registering its ioeventfds and irqfd; returning its transport for the bus and
    /// the device as saved and paused), puts it on the MMIO bus and records it. Returns the
    /// window base and GSI.
    pub fn add_virtio_mmio<T: BusDevice + 'static>(
        &mut self,
        id: &str,
        make: impl FnOnce(u64, u32) -> Result<VirtioParts<T>>,
    ) -> Result<(u64, u32)> {
        self.check_id(id)?;
        // Allocated on a copy so a failure leaves nothing half-claimed.
        let mut res = self.resources.clone();
        let base = res
            .mmio
            .allocate(VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE)
            .map_err(Error::from)
            .with_context(|| format!("device {id}"))?;
        let gsi = res
            .allocate_gsi()
            .map_err(Error::from)
            .with_context(|| format!("device {id}"))?;
        let (dev, object) = make(base, gsi)?;
        self.mmio.insert(base, VIRTIO_MMIO_SIZE, dev)?;
        self.resources = res;
        self.objects.push((id.to_string(), object));
        self.devices.push(DeviceInfo {
            mmio: Some((base, VIRTIO_MMIO_SIZE)),
            gsi: Some(gsi),
            acpi: Some(AcpiId::VirtioMmio),
            ..DeviceInfo::new(id)
        });
        Ok((base, gsi))
    }

    /// The virtio-mmio windows in registration order: `(base, size, gsi)`.
    pub fn virtio_mmio(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.devices
            .iter()
            .filter_map(|d| match (&d.acpi, d.mmio, d.gsi) {
                (Some(AcpiId::VirtioMmio), Some((base, len)), Some(gsi)) => Some((base, len, gsi)),
                _ => None,
            })
    }

    /// `virtio_mmio.device=` arguments for every virtio-mmio device (appended to a Linux
    /// command line; kernels built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` read them).
    pub fn virtio_cmdline(&self) -> String {
        self.virtio_mmio()
            .map(|(base, len, gsi)| format!(" virtio_mmio.device={}K@{base:#x}:{gsi}", len >> 10))
            .collect()
    }

    /// Interrupt source overrides the MADT needs: `(isa irq, gsi)` for every legacy device
    /// whose GSI is not where a PC wires its ISA IRQ (IRQ 0 goes to pin 2 on a PC; KVM's PIT
    /// raises GSI 0).
    pub fn isa_overrides(&self) -> Vec<(u8, u32)> {
        let pc_default = |irq: u8| if irq == 0 { 2 } else { u32::from(irq) };
        self.devices
            .iter()
            .filter_map(|d| Some((d.isa_irq?, d.gsi?)))
            .filter(|&(irq, gsi)| pc_default(irq) != gsi)
            .collect()
    }
}

/// Registers the PC devices every VM has: KVM's PIT (in the kernel), COM1, the i8042 and the
/// debug-exit port, at their fixed places.
pub fn add_pc_devices(
    dm: &mut DeviceManager,
    serial: LegacyParts,
    i8042: LegacyParts,
    debug_exit: Arc<Mutex<dyn BusDevice>>,
) -> Result<()> {
    use crate::devices::{COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT, I8042_IRQ, I8042_PORT};
    dm.add_legacy(
        DeviceInfo {
            pio: vec![(0x40, 4)],
            gsi: Some(0),
            isa_irq: Some(0),
            ..DeviceInfo::new("pit")
        },
        None,
        None,
    )?;
    dm.add_legacy(
        DeviceInfo {
            pio: vec![(COM1_PORT, 8)],
            gsi: Some(COM1_IRQ),
            isa_irq: Some(COM1_IRQ as u8),
            acpi: Some(AcpiId::Pnp {
                hid: "PNP0501",
                name: "COM1",
            }),
            ..DeviceInfo::new("com1")
        },
        Some(serial.0),
        serial.1,
    )?;
    // Data port 0x60 and command/status port 0x64: one device, two ranges; the model sees
    // offsets 0 and 4.
    dm.add_legacy(
        DeviceInfo {
            pio: vec![(I8042_PORT, 1), (I8042_PORT + 4, 1)],
            gsi: Some(I8042_IRQ),
            isa_irq: Some(I8042_IRQ as u8),
            acpi: Some(AcpiId::Pnp {
                hid: "PNP0303",
                name: "PS2_",
            }),
            ..DeviceInfo::new("i8042")
        },
        Some(i8042.0),
        i8042.1,
    )?;
    dm.add_legacy(
        DeviceInfo {
            pio: vec![(DEBUG_EXIT_PORT, 1)],
            ..DeviceInfo::new("debug-exit")
        },
        Some(debug_exit),
        None,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::IoAction;

    pub(crate) struct Null;
    impl BusDevice for Null {
        fn read(&mut self, _: u64, d: &mut [u8]) {
            d.fill(0);
        }
        fn write(&mut self, _: u64, _: &[u8]) -> IoAction {
            IoAction::Continue
        }
    }

    struct NullState;
    impl crate::persist::Pausable for NullState {}
    impl VmDevice for NullState {
        fn save(&self, id: &str) -> Result<crate::persist::DeviceState> {
            Ok(crate::persist::DeviceState {
                id: id.into(),
                version: 1,
                state: serde_json::Value::Null,
            })
        }
    }

    /// A device for the registry that does nothing.
    pub(crate) fn null_virtio() -> VirtioParts<Null> {
        (Arc::new(Mutex::new(Null)), Arc::new(NullState))
    }

    #[test]
    fn registry_places_and_describes() {
        let mut dm = DeviceManager::new();
        let n = || Arc::new(Mutex::new(Null)) as Arc<Mutex<dyn BusDevice>>;
        add_pc_devices(&mut dm, (n(), None), (n(), None), n()).unwrap();
        for i in 0..3 {
            let at = dm
                .add_virtio_mmio(&format!("virtio-blk{i}"), |_, _| Ok(null_virtio()))
                .unwrap();
            assert_eq!(at, (0xd000_0000 + i * 0x1000, 5 + i as u32));
        }
        assert_eq!(
            dm.virtio_cmdline(),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
        assert_eq!(dm.isa_overrides(), vec![(0, 0)]);
        assert!(dm
            .add_virtio_mmio("virtio-blk0", |_, _| Ok(null_virtio()))
            .is_err());
        // A failed device leaves its window and line free for the next one.
        assert!(dm
            .add_virtio_mmio("bad", |_, _| -> Result<VirtioParts<Null>> {
                Err(Error::Config("no".into()))
            })
            .is_err());
        let at = dm
            .add_virtio_mmio("next", |_, _| Ok(null_virtio()))
            .unwrap();
        assert_eq!(at, (0xd000_3000, 8));
        let mut b = [0u8; 1];
        dm.pio.read(0x3f8, &mut b);
        assert_eq!(b, [0]);
    }
}
