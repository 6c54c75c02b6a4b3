//! Reply records the kernel writes to the server's memory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::control::{HelloReply, decode_node_info, decode_ping_reply};

fuzz_target!(|data: &[u8]| {
    let _ = HelloReply::decode(data);
    let _ = decode_node_info(data);
    let _ = decode_ping_reply(data);
});
