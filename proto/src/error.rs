/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer is shorter than the record.
    #[error("short buffer: need {need} bytes, got {got}")]
    Short { need: usize, got: usize },
    /// An opcode, verdict, event type or enum value this version does not know.
    #[error("unknown {what} {value:#x}")]
    Unknown { what: &'static str, value: u32 },
    /// The peer speaks an API version this side does not.
    #[error("unsupported version {got} (supported: {min} to {max})")]
    BadVersion { got: u16, min: u16, max: u16 },
    /// A reserved field, unused field or undefined flag bit is not zero.
    #[error("reserved field `{field}` is not zero")]
    ReservedNonZero { field: &'static str },
    /// A field holds a value outside its range.
    #[error("invalid `{field}`: {value:#x}")]
    Invalid { field: &'static str, value: u64 },
    /// A socket frame does not start with the frame magic.
    #[error("bad frame magic {got:#010x}")]
    BadMagic { got: u32 },
    /// A socket frame's payload length does not match its opcode.
    #[error("frame opcode {op} carries {len} payload bytes, expected {expected}")]
    BadLength { op: u16, len: u32, expected: u32 },
}
