//! Descriptors read from a slot: decode, and re-encode what decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::upcall::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode(data) {
        // Whatever decodes must encode back to a descriptor that decodes
        // to the same request.
        let raw = req.to_raw();
        assert_eq!(Request::from_raw(&raw), Ok(req));
        // Canonical: what decodes is exactly what it encodes to.
        use zerocopy::IntoBytes;
        assert_eq!(raw.as_bytes(), &data[..raw.as_bytes().len()]);
    }
});
