//! This host's fingerprint (`vmpack host-info`; recorded in every saved pack): KVM's
//! supported CPUID, the MSRs a vCPU can save, the KVM capabilities vmboot uses, TSC rate
//! and scaling, kernel and vmboot versions.

use crate::boot::{Context, Error, Result};
use crate::cpu_features::to_entry;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use vmpack_formats::host::{HostCpu, HostFingerprint, FINGERPRINT_VERSION};

fn kernel_release() -> String {
    // SAFETY: `uname` fills the zeroed struct; its fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: NUL-terminated by uname.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// This host's fingerprint, measured once per process (a scratch VM with one vCPU tells
/// which MSRs are readable and the TSC rate).
pub fn fingerprint() -> Result<&'static HostFingerprint> {
    static F: std::sync::OnceLock<HostFingerprint> = std::sync::OnceLock::new();
    if let Some(f) = F.get() {
        return Ok(f);
    }
    let f = measure()?;
    Ok(F.get_or_init(|| f))
}

fn measure() -> Result<HostFingerprint> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?
        .as_slice()
        .to_vec();
    cpuid.sort_by_key(|e| (e.function, e.index));
    let kvm_list = kvm
        .get_msr_index_list()
        .context("KVM_GET_MSR_INDEX_LIST")?
        .as_slice()
        .to_vec();
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let msrs = crate::msr::filter_readable(&vcpu, crate::msr::candidate_list(&kvm_list))?;
    let tsc_khz = vcpu.get_tsc_khz().context("KVM_GET_TSC_KHZ")?;
    let features = crate::cpu_features::feature_names()
        .filter(|n| {
            let b = crate::cpu_features::feature_bit(n).expect("from the table");
            crate::cpu_features::has_bit(&cpuid, &b)
        })
        .map(str::to_string)
        .collect();
    Ok(HostFingerprint {
        fingerprint_version: FINGERPRINT_VERSION,
        name: hostname(),
        cpu: HostCpu::detect(),
        kvm_cpuid: cpuid.iter().map(to_entry).collect(),
        features,
        highest_level: crate::cpuid::highest_level(&cpuid).map(|t| t.to_string()),
        msrs,
        kvm_caps: crate::kvm_caps::present(&kvm)
            .into_iter()
            .map(str::to_string)
            .collect(),
        tsc_khz,
        tsc_scaling: kvm.check_extension(Cap::TscControl),
        kernel: kernel_release(),
        vmboot_version: env!("CARGO_PKG_VERSION").to_string(),
        vmstate_version: crate::persist::VM_STATE_VERSION,
    })
}
