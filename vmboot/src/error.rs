//! What the error types of the layers share (docs/ARCHITECTURE.md, "Errors").
//!
//! Each layer has its own `thiserror` enum (`devices::Error`, ...). Besides the variants a
//! caller branches on, each has `Io`, `Kvm` and `Context` variants: a host or KVM call that
//! failed, or an error of the layer with where it happened. Their text is the message
//! alone and the cause is the `source`, so `{:#}` and the binaries' error chain read
//! `what: cause` as `anyhow`'s `.context` did.

/// The saved-state error (`persist.rs` re-exports it); here, with what the layers share, so
/// that `devices` and `persist` do not need each other for it.
/// What reading or writing a component's state can fail with (before any KVM call: the
/// restore's checks use it to refuse a pack by name).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("encoding the state of device {id}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// A saved device state that does not decode as the device's `State`.
    #[error("device {id}: {error}")]
    Decode {
        id: String,
        error: serde_json::Error,
    },
    /// A component's version is newer than this build's (or 0).
    #[error(
        "{what}: state version {version} is not supported (this vmboot reads versions 1 to {ours})"
    )]
    Version {
        what: String,
        version: u32,
        ours: u32,
    },
    #[error("not a valid vm state")]
    Parse(#[source] serde_json::Error),
    #[error(
        "vm state version {version} is not supported by this vmboot (it reads versions 1 and {ours})"
    )]
    VmStateVersion { version: u32, ours: u32 },
}

/// Declares, in the module where it is invoked, a `Context` trait giving `.context(what)` and
/// `.with_context(|| what)` on `io::Result`, on KVM's results and on the layer's own
/// `Result`, mapping to the layer error's `Io`, `Kvm` and `Context` variants.
macro_rules! layer_context {
    ($error:ident) => {
        /// `.context(..)` / `.with_context(..)` for this layer's errors.
        #[allow(dead_code)] // not every layer uses both
        pub(crate) trait Context<T> {
            fn context(self, what: impl Into<String>) -> std::result::Result<T, $error>;
            fn with_context<S: Into<String>>(
                self,
                what: impl FnOnce() -> S,
            ) -> std::result::Result<T, $error>;
        }

        impl<T> Context<T> for std::result::Result<T, std::io::Error> {
            fn context(self, what: impl Into<String>) -> std::result::Result<T, $error> {
                self.map_err(|source| $error::Io {
                    what: what.into(),
                    source,
                })
            }
            fn with_context<S: Into<String>>(
                self,
                what: impl FnOnce() -> S,
            ) -> std::result::Result<T, $error> {
                self.map_err(|source| $error::Io {
                    what: what().into(),
                    source,
                })
            }
        }

        impl<T> Context<T> for std::result::Result<T, kvm_ioctls::Error> {
            fn context(self, what: impl Into<String>) -> std::result::Result<T, $error> {
                self.map_err(|source| $error::Kvm {
                    what: what.into(),
                    source,
                })
            }
            fn with_context<S: Into<String>>(
                self,
                what: impl FnOnce() -> S,
            ) -> std::result::Result<T, $error> {
                self.map_err(|source| $error::Kvm {
                    what: what().into(),
                    source,
                })
            }
        }

        impl<T> Context<T> for std::result::Result<T, $error> {
            fn context(self, what: impl Into<String>) -> std::result::Result<T, $error> {
                self.map_err(|source| $error::Context {
                    what: what.into(),
                    source: Box::new(source),
                })
            }
            fn with_context<S: Into<String>>(
                self,
                what: impl FnOnce() -> S,
            ) -> std::result::Result<T, $error> {
                self.map_err(|source| $error::Context {
                    what: what().into(),
                    source: Box::new(source),
                })
            }
        }
    };
}

pub(crate) use layer_context;

/// An error and its sources as `a: b: c`, as `anyhow`'s `{:#}` prints them, for the places
/// that fold a typed error into a message.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;
    use crate::devices::Error;

    /// A typed error prints as `anyhow`'s contexts did: through `Chain`, through `anyhow`'s
    /// `{:#}` at a binary, and with its lower layer's text unchanged.
    #[test]
    fn a_typed_chain_reads_like_the_anyhow_contexts() {
        let e = || Error::Context {
            what: "device virtio-blk0".into(),
            source: Box::new(Error::Io {
                what: "virtio irq eventfd".into(),
                source: std::io::Error::other("boom"),
            }),
        };
        let want = "device virtio-blk0: virtio irq eventfd: boom";
        assert_eq!(Chain(&e()).to_string(), want);
        assert_eq!(format!("{:#}", anyhow::Error::from(e())), want);
        let up = crate::vmm::Error::from(e());
        assert_eq!(Chain(&up).to_string(), want);
        assert_eq!(format!("{:#}", anyhow::Error::from(up)), want);
    }
}
