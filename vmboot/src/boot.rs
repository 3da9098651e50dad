//! The boot layer's error: loading a payload (`flat`, `linux`), the MP table (`mptable`),
//! the ACPI tables (`acpi`), CPUID (`cpuid`) and the host's fingerprint (`host_info`).

/// What preparing a guest to boot can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The payload (kernel, initrd, flat image) cannot be loaded as configured.
    #[error("{0}")]
    Payload(String),
    /// A table or the boot structures do not fit where they must go.
    #[error("{0}")]
    Layout(String),
    /// CPUID that KVM would not take.
    #[error("{0}")]
    Cpuid(String),
    /// Writing guest memory.
    #[error(transparent)]
    Memory(#[from] crate::vstate::Error),
    #[error(transparent)]
    Msr(#[from] crate::msr::Error),
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
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
    /// An error of this layer, with where it happened.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

crate::error::layer_context!(Error);

impl<T> Context<T> for std::result::Result<T, crate::vstate::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(Error::from).context(what)
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(Error::from).with_context(what)
    }
}
