//! Event batches read(2) from the device.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::event::{Event, decode_batch};

fuzz_target!(|data: &[u8]| {
    use zerocopy::IntoBytes;
    let mut at = 0;
    for ev in decode_batch(data) {
        let Ok(ev) = ev else { break };
        let raw = ev.to_raw();
        assert_eq!(Event::from_raw(&raw), Ok(ev));
        // Canonical: each record that decodes is exactly its encoding.
        let n = raw.as_bytes().len();
        assert_eq!(raw.as_bytes(), &data[at..at + n]);
        at += n;
    }
});
