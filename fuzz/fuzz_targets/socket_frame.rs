//! Frames a (possibly hostile) client sends to the server's socket.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::socket::{Frame, MAX_FRAME_SIZE};

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = Frame::decode(data) {
        assert!(used <= data.len());
        let mut buf = [0u8; MAX_FRAME_SIZE];
        let n = frame.encode(&mut buf);
        assert_eq!(Frame::decode(&buf[..n]), Ok((frame, n)));
    }
});
