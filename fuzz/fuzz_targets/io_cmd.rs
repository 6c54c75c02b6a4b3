//! FETCH / COMMIT_AND_FETCH payloads as the kernel would see them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::verdict::IoCommand;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let cmd_op = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
    if let Ok(cmd) = IoCommand::decode(cmd_op, &data[4..]) {
        use zerocopy::IntoBytes;
        let raw = cmd.to_raw();
        assert_eq!(IoCommand::decode(cmd.cmd_op(), raw.as_bytes()), Ok(cmd));
        // Canonical: what decodes is exactly what it encodes to.
        assert_eq!(raw.as_bytes(), &data[4..4 + raw.as_bytes().len()]);
    }
});
