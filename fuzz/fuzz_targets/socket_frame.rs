//! Frames a (possibly hostile) client sends to the server's socket.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_upcall_proto::socket::{
    Frame, HEADER_SIZE, MAX_FRAME_SIZE, PageResidency, metrics_text, residency_pages,
};

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = Frame::decode(data) {
        assert!(used <= data.len());
        if let Frame::MetricsReply { len } = frame {
            // The one variable-length payload: the text follows the header.
            assert_eq!(used, HEADER_SIZE + len as usize);
            assert!(metrics_text(&data[..used]).is_some());
            return;
        }
        if let Frame::ResidencyReply { count } = frame {
            // Records follow the header, whole.
            let recs = residency_pages(&data[..used]).expect("decoded records");
            assert_eq!(recs.len(), count as usize);
            assert_eq!(used, HEADER_SIZE + recs.len() * size_of::<PageResidency>());
            return;
        }
        let mut buf = [0u8; MAX_FRAME_SIZE];
        let n = frame.encode(&mut buf);
        assert_eq!(Frame::decode(&buf[..n]), Ok((frame, n)));
        // Canonical: what decodes is exactly what it encodes to.
        assert_eq!(&buf[..n], &data[..used]);
    }
});
