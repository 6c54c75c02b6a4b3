//! Event batches read(2) from the device.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::event::{Event, decode_batch};

fuzz_target!(|data: &[u8]| {
    for ev in decode_batch(data).flatten() {
        assert_eq!(Event::from_raw(&ev.to_raw()), Ok(ev));
    }
});
