//! Control command areas (the kernel's validation, mirrored).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::control::Control;
use mm_upcall_proto::raw::ctrl_op;


fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // Mostly real opcodes, sometimes arbitrary ones.
    let cmd_op = match ctrl_op::ALL.get(usize::from(sel) % 8) {
        Some((op, _)) => *op,
        None if rest.len() >= 4 => u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]),
        None => return,
    };
    if let Ok(c) = Control::decode(cmd_op, rest) {
        let area = c.encode();
        assert_eq!(Control::decode(c.cmd_op(), &area), Ok(c));
        // Canonical: what decodes is exactly what it encodes to (the
        // decoder reads a record prefix; the rest of the area is zero).
        let n = rest.len().min(area.len());
        assert_eq!(&area[..n], &rest[..n]);
        assert!(area[n..].iter().all(|&b| b == 0));
    }
});
