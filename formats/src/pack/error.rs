use std::fmt;

/// What went wrong; [`PackError`] adds where.
#[derive(Debug)]
pub enum PackErrorKind {
    Io(std::io::Error),
    /// The file does not start with the pack magic.
    BadMagic,
    /// A major version this reader does not implement.
    UnsupportedVersion {
        major: u16,
        minor: u16,
    },
    /// A required section kind this reader does not know.
    UnknownRequiredKind(u16),
    /// The data ends before the structure does.
    Truncated,
    /// A stored SHA-256 does not match the bytes.
    ChecksumMismatch(String),
    /// A compressed payload does not decode to exactly the declared length.
    Decompress(String),
    /// A structural rule of the format is broken.
    Corrupt(String),
    /// A declared size or count is over a limit.
    Limit(String),
    /// The caller asked for something invalid.
    InvalidArgument(String),
}

impl fmt::Display for PackErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackErrorKind::Io(e) => write!(f, "{e}"),
            PackErrorKind::BadMagic => f.write_str("not a vmpack file (bad magic)"),
            PackErrorKind::UnsupportedVersion { major, minor } => write!(
                f,
                "unsupported format version {major}.{minor} (this reader implements {}.x)",
                super::FORMAT_MAJOR
            ),
            PackErrorKind::UnknownRequiredKind(k) => write!(
                f,
                "unknown required section kind {k:#06x} (written by a newer vmpack?)"
            ),
            PackErrorKind::Truncated => f.write_str("file is truncated"),
            PackErrorKind::ChecksumMismatch(m) => write!(f, "checksum mismatch: {m}"),
            PackErrorKind::Decompress(m) => write!(f, "bad compressed data: {m}"),
            PackErrorKind::Corrupt(m) => write!(f, "corrupt: {m}"),
            PackErrorKind::Limit(m) => write!(f, "over limit: {m}"),
            PackErrorKind::InvalidArgument(m) => write!(f, "{m}"),
        }
    }
}

/// An error naming the file and, where known, the section, chunk and file offset.
///
/// Displays like `pack.vmpack: section 'disk0' chunk 12 (file offset 1048640): checksum mismatch: ...`.
#[derive(Debug)]
pub struct PackError {
    pub file: String,
    pub section: Option<String>,
    pub chunk: Option<u64>,
    pub offset: Option<u64>,
    pub kind: PackErrorKind,
}

impl PackError {
    pub fn new(file: &str, kind: PackErrorKind) -> Self {
        PackError {
            file: file.to_string(),
            section: None,
            chunk: None,
            offset: None,
            kind,
        }
    }
    pub(crate) fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
    pub(crate) fn section(mut self, name: &str) -> Self {
        // A hostile pack's name reaches a terminal only with its control characters escaped.
        self.section = Some(
            name.chars()
                .flat_map(|c| {
                    let esc = c.is_control();
                    c.escape_default()
                        .filter(move |_| esc)
                        .chain(std::iter::once(c).filter(move |_| !esc))
                })
                .collect(),
        );
        self
    }
    pub(crate) fn chunk(mut self, seq: u64) -> Self {
        self.chunk = Some(seq);
        self
    }
    /// True when the error is about damaged or malformed data (as opposed to I/O or usage).
    pub fn is_corruption(&self) -> bool {
        !matches!(
            self.kind,
            PackErrorKind::Io(_) | PackErrorKind::InvalidArgument(_)
        )
    }
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(s) = &self.section {
            write!(f, ": section '{s}'")?;
            if let Some(c) = self.chunk {
                write!(f, " chunk {c}")?;
            }
            if let Some(o) = self.offset {
                write!(f, " (file offset {o})")?;
            }
        } else if let Some(o) = self.offset {
            write!(f, ": file offset {o}")?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for PackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            PackErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}
