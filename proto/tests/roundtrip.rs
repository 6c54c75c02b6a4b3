//! Property tests: every typed record survives encode/decode, and no decoder
//! panics on arbitrary bytes.

use mm_upcall_proto::DecodeError;
use mm_upcall_proto::control::{self, Control, HelloReply, Standing};
use mm_upcall_proto::event::{self, Event, PlaceReason};
use mm_upcall_proto::raw::{self, API_VERSION, CTRL_CMD_SIZE, ctrl_op, io_op};
use mm_upcall_proto::socket::{self, Advice, ErrorCode, Frame, MAX_FRAME_SIZE};
use mm_upcall_proto::upcall::{Fault, Request, Upcall};
use mm_upcall_proto::verdict::{IoCommand, Verdict};
use proptest::prelude::*;
use zerocopy::IntoBytes;

fn fault() -> impl Strategy<Value = Fault> {
    (
        any::<u16>(),
        any::<u16>(),
        0u32..20,
        any::<bool>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(nid, cpu_nid, order, thp, tgid, tid, pfn, vaddr)| Fault {
            nid,
            cpu_nid,
            order,
            thp,
            tgid,
            tid,
            pfn,
            vaddr,
        })
}

fn upcall() -> impl Strategy<Value = Upcall> {
    prop_oneof![
        fault().prop_map(Upcall::WriteFault),
        (fault(), any::<u64>()).prop_map(|(fault, since_scan_ms)| Upcall::HintFault {
            fault,
            since_scan_ms
        }),
        (any::<u16>(), any::<u64>())
            .prop_map(|(nid, wanted_pages)| Upcall::DemoteCredit { nid, wanted_pages }),
        any::<u32>().prop_map(|cookie| Upcall::Ping { cookie }),
    ]
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        any::<u16>().prop_map(|nid| Verdict::Promote { nid }),
        Just(Verdict::AllowInPlace),
        Just(Verdict::Stay),
        any::<u32>().prop_map(|pages| Verdict::Grant { pages }),
        Just(Verdict::Deny),
        Just(Verdict::Default),
        any::<u32>().prop_map(|cookie| Verdict::Pong { cookie }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let reason = prop_oneof![
        Just(PlaceReason::Demotion),
        Just(PlaceReason::Migration),
        Just(PlaceReason::Resync)
    ];
    prop_oneof![
        (
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            reason
        )
            .prop_map(|(nid, pfn, order, tgid, vaddr, reason)| Event::Placed {
                nid,
                pfn,
                order,
                tgid,
                vaddr,
                reason
            }),
        (any::<u16>(), any::<u64>(), any::<u32>()).prop_map(|(nid, pfn, order)| Event::Freed {
            nid,
            pfn,
            order
        }),
        (any::<u16>(), any::<u64>(), 1..=u64::MAX)
            .prop_map(|(nid, pfn, pages)| { Event::FreedRange { nid, pfn, pages } }),
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u32>()).prop_map(
            |(nid, target_nid, pfn, order)| Event::Promoted {
                nid,
                target_nid,
                pfn,
                order
            }
        ),
        any::<u64>().prop_map(|lost| Event::Overflow { lost }),
        any::<u64>().prop_map(|cookie| Event::Ping { cookie }),
    ]
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (
            1..=raw::MAX_QUEUES,
            1..=raw::MAX_QUEUE_DEPTH,
            0..=raw::MAX_TIMEOUT_MS,
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(nr_queues, queue_depth, timeout_ms, features, reply_addr)| Control::Hello {
                    nr_queues,
                    queue_depth,
                    timeout_ms,
                    features: raw::Features::from_bits_retain(features),
                    reply_addr
                }
            ),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(nid, credit_pages, reply_addr)| {
            Control::AttachNode {
                nid,
                credit_pages,
                reply_addr,
            }
        }),
        any::<u32>().prop_map(|nid| Control::DetachNode { nid }),
        (any::<u32>(), any::<u64>()).prop_map(|(nid, pages)| Control::SetCredit { nid, pages }),
        (any::<u64>(), any::<u32>()).prop_map(|(pfn, nid)| Control::PromotePfn { pfn, nid }),
        (any::<u32>(), any::<u32>(), 0..3u8).prop_map(|(nid, target, k)| Control::SetStanding {
            nid,
            standing: match k {
                0 => Standing::Ask,
                1 => Standing::Default,
                _ => Standing::Promote(target),
            },
        }),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(nid, start_pfn, nr_pages)| {
            Control::Resync {
                nid,
                start_pfn,
                nr_pages,
            }
        }),
        (
            0..=raw::ping::MAX_UPCALLS,
            1..=raw::ping::MAX_THREADS,
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(
                |(nr_upcalls, nr_threads, events, reply_addr)| Control::Ping {
                    nr_upcalls,
                    nr_threads,
                    events,
                    reply_addr,
                }
            ),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let advice = prop_oneof![
        Just(Advice::Normal),
        Just(Advice::Hot),
        Just(Advice::Cold),
        Just(Advice::KeepFast)
    ];
    let code = prop_oneof![
        Just(ErrorCode::BadVersion),
        Just(ErrorCode::BadFrame),
        Just(ErrorCode::PermissionDenied),
        Just(ErrorCode::Invalid),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Unsupported)
    ];
    prop_oneof![
        (1u16..10, 0u16..10, any::<u64>()).prop_map(|(min, extra, features)| Frame::Hello {
            min_version: min,
            max_version: min + extra,
            features
        }),
        any::<u64>().prop_map(|features| Frame::HelloReply {
            version: 1,
            features
        }),
        (any::<u32>(), advice, any::<u64>(), any::<u64>()).prop_map(|(pid, advice, addr, len)| {
            Frame::Advise {
                pid,
                advice,
                addr,
                len,
            }
        }),
        any::<[u64; 4]>().prop_map(|a| Frame::AdviseReply(socket::AdviseReplyRec {
            pages: a[0],
            moved: a[1],
            already: a[2],
            skipped: a[3]
        })),
        (any::<u32>(), any::<u64>(), any::<u64>())
            .prop_map(|(pid, addr, len)| { Frame::Residency { pid, addr, len } }),
        Just(Frame::Stats),
        any::<[u64; 12]>().prop_map(|a| Frame::StatsReply(socket::StatsRec {
            upcalls: a[0],
            write_faults: a[1],
            hint_faults: a[2],
            credit_requests: a[3],
            promotions: a[4],
            placements: a[5],
            denials: a[6],
            evictions: a[7],
            physical_used_bytes: a[8],
            physical_capacity_bytes: a[9],
            resident_pages: a[10],
            zero_pages: a[11]
        })),
        Just(Frame::Ok),
        Just(Frame::Metrics),
        (i32::MIN..0, code).prop_map(|(errno, code)| Frame::Error { errno, code }),
    ]
}

proptest! {
    #[test]
    fn request_round_trips(seq in any::<u32>(), upcall in upcall()) {
        let req = Request { seq, upcall };
        let raw = req.to_raw();
        prop_assert_eq!(Request::decode(raw.as_bytes()), Ok(req));
    }

    #[test]
    fn io_command_round_trips(q_id in any::<u16>(), slot in any::<u16>(), seq in any::<u32>(),
                              v in verdict(), fetch in any::<bool>()) {
        let cmd = if fetch {
            IoCommand::Fetch { q_id, slot }
        } else {
            IoCommand::CommitAndFetch { q_id, slot, seq, verdict: v }
        };
        prop_assert_eq!(IoCommand::decode(cmd.cmd_op(), cmd.to_raw().as_bytes()), Ok(cmd));
    }

    #[test]
    fn event_batch_round_trips(evs in proptest::collection::vec(event(), 0..16)) {
        let mut buf = Vec::new();
        for e in &evs {
            buf.extend_from_slice(e.to_raw().as_bytes());
        }
        let back: Result<Vec<Event>, DecodeError> = event::decode_batch(&buf).collect();
        prop_assert_eq!(back, Ok(evs));
    }

    #[test]
    fn control_round_trips(c in control()) {
        prop_assert_eq!(Control::decode(c.cmd_op(), &c.encode()), Ok(c));
    }

    #[test]
    fn frame_round_trips(f in frame()) {
        let mut buf = [0u8; MAX_FRAME_SIZE];
        let n = f.encode(&mut buf);
        prop_assert_eq!(Frame::decode(&buf[..n]), Ok((f, n)));
        // Every strict prefix is reported short, never misread.
        for cut in 0..n {
            let is_short = matches!(Frame::decode(&buf[..cut]), Err(DecodeError::Short { .. }));
            prop_assert!(is_short);
        }
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                            cmd_op in any::<u32>()) {
        let _ = Request::decode(&bytes);
        let _ = IoCommand::decode(cmd_op, &bytes);
        let _ = IoCommand::decode(io_op::COMMIT_AND_FETCH, &bytes);
        let _ = event::decode_batch(&bytes).count();
        let _ = Control::decode(cmd_op, &bytes);
        for (op, _) in ctrl_op::ALL {
            let _ = Control::decode(op, &bytes);
        }
        let _ = HelloReply::decode(&bytes);
        let _ = control::decode_node_info(&bytes);
        let _ = control::decode_ping_reply(&bytes);
        let _ = Frame::decode(&bytes);
    }

    // Canonical decoding: a valid encoding with one bit flipped is either
    // rejected or decodes to a value that encodes back to exactly those
    // bytes (a decoder that ignored a field the kernel reads would accept
    // the flip and lose it).

    #[test]
    fn flipped_descriptor_is_rejected_or_canonical(seq in any::<u32>(), upcall in upcall(),
                                                    bit in 0usize..(8 * size_of::<raw::Desc>())) {
        let mut bytes = Request { seq, upcall }.to_raw().as_bytes().to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        if let Ok(r) = Request::decode(&bytes) {
            prop_assert_eq!(r.to_raw().as_bytes().to_vec(), bytes);
        }
    }

    #[test]
    fn flipped_io_command_is_rejected_or_canonical(q_id in any::<u16>(), slot in any::<u16>(),
                                                   seq in any::<u32>(), v in verdict(),
                                                   bit in 0usize..(8 * size_of::<raw::IoCmd>())) {
        let cmd = IoCommand::CommitAndFetch { q_id, slot, seq, verdict: v };
        let mut bytes = cmd.to_raw().as_bytes().to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        if let Ok(c) = IoCommand::decode(cmd.cmd_op(), &bytes) {
            prop_assert_eq!(c.to_raw().as_bytes().to_vec(), bytes);
        }
    }

    #[test]
    fn flipped_event_is_rejected_or_canonical(e in event(),
                                              bit in 0usize..(8 * size_of::<raw::Event>())) {
        let mut bytes = e.to_raw().as_bytes().to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let first = event::decode_batch(&bytes).next();
        if let Some(Ok(d)) = first {
            prop_assert_eq!(d.to_raw().as_bytes().to_vec(), bytes);
        }
    }

    #[test]
    fn flipped_control_is_rejected_or_canonical(c in control(), bit in 0usize..(8 * CTRL_CMD_SIZE)) {
        let mut bytes = c.encode().to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        if let Ok(d) = Control::decode(c.cmd_op(), &bytes) {
            prop_assert_eq!(&d.encode()[..], &bytes[..]);
        }
    }

    #[test]
    fn flipped_frame_is_rejected_or_canonical(f in frame(), bit in 0usize..(8 * 64)) {
        let mut buf = [0u8; MAX_FRAME_SIZE];
        let n = f.encode(&mut buf);
        prop_assume!(bit / 8 < n);
        buf[bit / 8] ^= 1 << (bit % 8);
        if let Ok((d, used)) = Frame::decode(&buf[..n])
            && !matches!(d, Frame::MetricsReply { .. } | Frame::ResidencyReply { .. })
        {
            let mut again = [0u8; MAX_FRAME_SIZE];
            let m = d.encode(&mut again);
            prop_assert_eq!(&again[..m], &buf[..used]);
        }
    }

    #[test]
    fn any_reserved_bit_in_a_descriptor_is_rejected(bit in 0u32..64, upcall in upcall()) {
        let mut raw = Request { seq: 1, upcall }.to_raw();
        raw.reserved = 1u64 << bit;
        prop_assert_eq!(Request::decode(raw.as_bytes()),
                        Err(DecodeError::ReservedNonZero { field: "reserved" }));
    }
}

#[test]
fn unknown_upcall_opcode_is_a_typed_error() {
    for op in [0u16, 5, 0xffff] {
        let raw = raw::Desc {
            op,
            ..raw::Desc::default()
        };
        assert_eq!(
            Request::decode(raw.as_bytes()),
            Err(DecodeError::Unknown {
                what: "upcall opcode",
                value: u32::from(op)
            })
        );
    }
}

#[test]
fn short_descriptor_is_a_typed_error() {
    let raw = Request {
        seq: 7,
        upcall: Upcall::Ping { cookie: 9 },
    }
    .to_raw();
    assert_eq!(
        Request::decode(&raw.as_bytes()[..55]),
        Err(DecodeError::Short { need: 56, got: 55 })
    );
}

#[test]
fn ping_with_fault_fields_is_rejected() {
    let mut raw = Request {
        seq: 7,
        upcall: Upcall::Ping { cookie: 9 },
    }
    .to_raw();
    raw.pfn = 0x1000;
    assert_eq!(
        Request::decode(raw.as_bytes()),
        Err(DecodeError::ReservedNonZero { field: "pfn" })
    );
}

#[test]
fn hint_and_credit_requests_without_no_wait_are_rejected() {
    // Found by the upcall_desc fuzz target's canonical check: a hint
    // without NO_WAIT decoded, and encoded back with it.
    for upcall in [
        Upcall::HintFault {
            fault: Fault {
                nid: 1,
                cpu_nid: 0,
                order: 0,
                thp: false,
                tgid: 1,
                tid: 1,
                pfn: 0x1000,
                vaddr: 0x7000,
            },
            since_scan_ms: 0,
        },
        Upcall::DemoteCredit {
            nid: 1,
            wanted_pages: 1,
        },
    ] {
        let mut raw = Request { seq: 1, upcall }.to_raw();
        raw.flags &= !raw::DescFlags::NO_WAIT.bits();
        assert!(
            matches!(
                Request::decode(raw.as_bytes()),
                Err(DecodeError::Invalid { field: "flags", .. })
            ),
            "{upcall:?} without NO_WAIT decoded"
        );
    }
}

#[test]
fn write_fault_with_no_wait_flag_is_rejected() {
    let mut raw = Request {
        seq: 1,
        upcall: Upcall::WriteFault(Fault {
            nid: 1,
            cpu_nid: 0,
            order: 0,
            thp: false,
            tgid: 1,
            tid: 1,
            pfn: 1,
            vaddr: 0x1000,
        }),
    }
    .to_raw();
    raw.flags = raw::DescFlags::NO_WAIT.bits();
    assert!(matches!(
        Request::decode(raw.as_bytes()),
        Err(DecodeError::ReservedNonZero { .. })
    ));
    raw.flags = 0x80;
    assert!(matches!(
        Request::decode(raw.as_bytes()),
        Err(DecodeError::ReservedNonZero { .. })
    ));
}

#[test]
fn verdict_with_an_argument_it_does_not_take_is_rejected() {
    let c = raw::IoCmd {
        verdict: raw::verdict::DENY,
        arg: 3,
        ..raw::IoCmd::default()
    };
    assert_eq!(
        IoCommand::decode(io_op::COMMIT_AND_FETCH, c.as_bytes()),
        Err(DecodeError::ReservedNonZero { field: "arg" })
    );
    let c = raw::IoCmd {
        verdict: 0,
        ..raw::IoCmd::default()
    };
    assert_eq!(
        IoCommand::decode(io_op::COMMIT_AND_FETCH, c.as_bytes()),
        Err(DecodeError::Unknown {
            what: "verdict",
            value: 0
        })
    );
    let c = raw::IoCmd {
        verdict: raw::verdict::PROMOTE,
        arg: 0x1_0000,
        ..raw::IoCmd::default()
    };
    assert!(matches!(
        IoCommand::decode(io_op::COMMIT_AND_FETCH, c.as_bytes()),
        Err(DecodeError::Invalid { field: "arg", .. })
    ));
}

#[test]
fn fetch_with_a_verdict_is_rejected() {
    let c = raw::IoCmd {
        verdict: raw::verdict::STAY,
        ..raw::IoCmd::default()
    };
    assert_eq!(
        IoCommand::decode(io_op::FETCH, c.as_bytes()),
        Err(DecodeError::ReservedNonZero { field: "verdict" })
    );
}

#[test]
fn verdicts_are_only_valid_for_their_upcalls() {
    use raw::op;
    assert!(Verdict::AllowInPlace.valid_for(op::WRITE_FAULT));
    assert!(!Verdict::AllowInPlace.valid_for(op::HINT_FAULT));
    assert!(Verdict::Stay.valid_for(op::HINT_FAULT));
    assert!(!Verdict::Stay.valid_for(op::WRITE_FAULT));
    assert!(Verdict::Grant { pages: 1 }.valid_for(op::DEMOTE_CREDIT));
    assert!(!Verdict::Grant { pages: 1 }.valid_for(op::PING));
    assert!(Verdict::Pong { cookie: 1 }.valid_for(op::PING));
    assert!(!Verdict::Promote { nid: 0 }.valid_for(op::DEMOTE_CREDIT));
    for o in [op::WRITE_FAULT, op::HINT_FAULT, op::DEMOTE_CREDIT, op::PING] {
        assert!(Verdict::Default.valid_for(o));
    }
}

#[test]
fn hello_of_another_version_is_bad_version() {
    let mut area = Control::Hello {
        nr_queues: 1,
        queue_depth: 8,
        timeout_ms: 0,
        features: raw::Features::ALL,
        reply_addr: 0,
    }
    .encode();
    area[0] = 2;
    assert_eq!(
        Control::decode(ctrl_op::HELLO, &area),
        Err(DecodeError::BadVersion {
            got: 2,
            min: API_VERSION,
            max: API_VERSION
        })
    );
}

#[test]
fn control_with_non_zero_tail_is_rejected() {
    let mut area = Control::DetachNode { nid: 1 }.encode();
    area[CTRL_CMD_SIZE - 1] = 1;
    assert_eq!(
        Control::decode(ctrl_op::DETACH_NODE, &area),
        Err(DecodeError::ReservedNonZero { field: "tail" })
    );
    let mut area = Control::SetCredit { nid: 1, pages: 2 }.encode();
    area[4] = 1; // flags
    assert_eq!(
        Control::decode(ctrl_op::SET_CREDIT, &area),
        Err(DecodeError::ReservedNonZero { field: "flags" })
    );
}

#[test]
fn unknown_control_opcode_is_a_typed_error() {
    assert_eq!(
        Control::decode(0, &[0u8; CTRL_CMD_SIZE]),
        Err(DecodeError::Unknown {
            what: "control cmd_op",
            value: 0
        })
    );
    // A hot-path opcode is not a control command.
    assert!(matches!(
        Control::decode(io_op::FETCH, &[0u8; CTRL_CMD_SIZE]),
        Err(DecodeError::Unknown { .. })
    ));
}

#[test]
fn opcodes_never_use_zero_and_are_distinct() {
    let all: Vec<u32> = [io_op::FETCH, io_op::COMMIT_AND_FETCH]
        .into_iter()
        .chain(ctrl_op::ALL.map(|(op, _)| op))
        .collect();
    for (i, a) in all.iter().enumerate() {
        assert_ne!(*a & 0xff, 0, "opcode number 0 used");
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }
}

#[test]
fn event_batch_with_trailing_garbage_ends_in_short() {
    let mut buf = Event::Overflow { lost: 3 }.to_raw().as_bytes().to_vec();
    buf.extend_from_slice(&[1, 2, 3]);
    let v: Vec<_> = event::decode_batch(&buf).collect();
    assert_eq!(
        v,
        vec![
            Ok(Event::Overflow { lost: 3 }),
            Err(DecodeError::Short { need: 40, got: 3 })
        ]
    );
}

fn metrics_reply(text: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; socket::HEADER_SIZE + text.len()];
    Frame::MetricsReply {
        len: text.len() as u32,
    }
    .encode(&mut buf);
    buf[socket::HEADER_SIZE..].copy_from_slice(text);
    buf
}

#[test]
fn metrics_reply_carries_its_text() {
    let text = b"# TYPE mm_server_upcalls_total counter\nmm_server_upcalls_total 3\n";
    let buf = metrics_reply(text);
    assert_eq!(
        Frame::decode(&buf),
        Ok((
            Frame::MetricsReply {
                len: text.len() as u32
            },
            buf.len()
        ))
    );
    assert_eq!(
        socket::metrics_text(&buf).map(str::as_bytes),
        Some(&text[..])
    );
    // Cut short: the reader is told how much more to read.
    assert!(matches!(
        Frame::decode(&buf[..buf.len() - 1]),
        Err(DecodeError::Short { .. })
    ));
    // Not UTF-8, or longer than the limit: rejected.
    assert!(matches!(
        Frame::decode(&metrics_reply(&[0xff, 0xfe])),
        Err(DecodeError::Invalid { .. })
    ));
    let mut huge = metrics_reply(b"");
    huge[8..12].copy_from_slice(&((socket::MAX_METRICS_TEXT + 1) as u32).to_ne_bytes());
    assert!(matches!(
        Frame::decode_header(&huge),
        Err(DecodeError::BadLength { .. })
    ));
}

#[test]
fn residency_reply_carries_whole_records() {
    let pages = [
        socket::PageResidency {
            node: 1,
            bytes: 1234,
        },
        socket::PageResidency {
            node: -2,
            bytes: socket::SIZE_UNKNOWN,
        },
    ];
    let body = pages.as_bytes();
    let mut buf = vec![0u8; socket::HEADER_SIZE + body.len()];
    Frame::ResidencyReply { count: 2 }.encode(&mut buf);
    buf[socket::HEADER_SIZE..].copy_from_slice(body);
    assert_eq!(
        Frame::decode(&buf),
        Ok((Frame::ResidencyReply { count: 2 }, buf.len()))
    );
    assert_eq!(socket::residency_pages(&buf), Some(&pages[..]));
    // A partial record, or more than a request may cover: rejected.
    let mut bad = buf.clone();
    bad[8..12].copy_from_slice(&12u32.to_ne_bytes());
    assert!(matches!(
        Frame::decode_header(&bad),
        Err(DecodeError::BadLength { .. })
    ));
    let too_many = (socket::MAX_REQUEST_PAGES as u32 + 1) * 8;
    bad[8..12].copy_from_slice(&too_many.to_ne_bytes());
    assert!(matches!(
        Frame::decode_header(&bad),
        Err(DecodeError::BadLength { .. })
    ));
}

#[test]
fn frame_with_wrong_magic_version_or_length_is_rejected() {
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let n = Frame::Stats.encode(&mut buf);
    let mut bad = buf;
    bad[0] ^= 1;
    assert!(matches!(
        Frame::decode(&bad[..n]),
        Err(DecodeError::BadMagic { .. })
    ));
    let mut bad = buf;
    bad[4] = 2;
    assert!(matches!(
        Frame::decode(&bad[..n]),
        Err(DecodeError::BadVersion { got: 2, .. })
    ));
    let mut bad = buf;
    bad[8] = 4;
    assert!(matches!(
        Frame::decode(&bad[..n + 4]),
        Err(DecodeError::BadLength { .. })
    ));
    let mut bad = buf;
    bad[6] = 99;
    assert!(matches!(
        Frame::decode(&bad[..n]),
        Err(DecodeError::Unknown { .. })
    ));
    let mut bad = buf;
    bad[12] = 1;
    assert!(matches!(
        Frame::decode(&bad[..n]),
        Err(DecodeError::ReservedNonZero { .. })
    ));
}

#[test]
fn hello_reply_checks_descriptor_size() {
    let r = raw::HelloReply {
        api_version: API_VERSION,
        desc_size: 48,
        ..raw::HelloReply::default()
    };
    assert!(matches!(
        HelloReply::decode(r.as_bytes()),
        Err(DecodeError::Invalid {
            field: "desc_size",
            ..
        })
    ));
}

#[test]
fn ping_histogram_buckets_are_monotonic_and_bounded() {
    use raw::ping::{HIST_BUCKETS, hist_bucket, hist_lower_bound};
    let mut last = 0;
    for ns in (0..100_000u64).chain([1 << 20, 1 << 30, 1 << 40, u64::MAX]) {
        let b = hist_bucket(ns);
        assert!(b >= last || ns > 100_000, "bucket of {ns} went down");
        assert!(b < HIST_BUCKETS);
        if b < HIST_BUCKETS - 1 {
            assert!(
                hist_lower_bound(b) <= ns && ns < hist_lower_bound(b + 1),
                "{ns} not in bucket {b}"
            );
        }
        last = b;
    }
    assert_eq!(hist_bucket(4), 4);
    assert_eq!(hist_bucket(1000), hist_bucket(1023));
    assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
}

// ---------------------------------------------------------------------------
// Seed corpora for the fuzz targets (`fuzz/seeds/<target>/`): valid
// encodings drawn from the strategies above with a fixed seed.  With
// MM_UPCALL_WRITE_SEEDS=1 this test writes them; otherwise it checks that
// every committed seed still decodes, so that the corpora follow the ABI.

fn draw<T: std::fmt::Debug>(s: impl Strategy<Value = T>, n: usize) -> Vec<T> {
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| s.new_tree(&mut runner).expect("strategy").current())
        .collect()
}

fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let upcalls = draw((any::<u32>(), upcall()), 16)
        .into_iter()
        .map(|(seq, upcall)| Request { seq, upcall }.to_raw().as_bytes().to_vec())
        .collect();
    let io = draw((any::<u16>(), any::<u16>(), any::<u32>(), verdict()), 16)
        .into_iter()
        .map(|(q_id, slot, seq, verdict)| {
            let cmd = IoCommand::CommitAndFetch {
                q_id,
                slot,
                seq,
                verdict,
            };
            let mut b = cmd.cmd_op().to_ne_bytes().to_vec();
            b.extend_from_slice(cmd.to_raw().as_bytes());
            b
        })
        .collect();
    let controls = draw(control(), 24)
        .into_iter()
        .map(|c| {
            let sel = ctrl_op::ALL
                .iter()
                .position(|&(op, _)| op == c.cmd_op())
                .expect("op") as u8;
            let mut b = vec![sel];
            b.extend_from_slice(&c.encode());
            b
        })
        .collect();
    let events = draw(proptest::collection::vec(event(), 1..6), 16)
        .into_iter()
        .map(|evs| {
            evs.iter()
                .flat_map(|e| e.to_raw().as_bytes().to_vec())
                .collect()
        })
        .collect();
    let frames = draw(frame(), 24)
        .into_iter()
        .map(|f| {
            let mut buf = [0u8; MAX_FRAME_SIZE];
            let n = f.encode(&mut buf);
            buf[..n].to_vec()
        })
        .collect();
    vec![
        ("upcall_desc", upcalls),
        ("io_cmd", io),
        ("control_cmd", controls),
        ("event_batch", events),
        ("socket_frame", frames),
    ]
}

/// Whether a seed of `target` decodes (what the fuzz target first does).
fn seed_decodes(target: &str, b: &[u8]) -> bool {
    match target {
        "upcall_desc" => Request::decode(b).is_ok(),
        "io_cmd" => {
            IoCommand::decode(u32::from_ne_bytes(b[..4].try_into().unwrap()), &b[4..]).is_ok()
        }
        "control_cmd" => Control::decode(ctrl_op::ALL[usize::from(b[0])].0, &b[1..]).is_ok(),
        "event_batch" => event::decode_batch(b).all(|e| e.is_ok()),
        "socket_frame" => Frame::decode(b).is_ok(),
        _ => false,
    }
}

#[test]
fn fuzz_seed_corpora_decode() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    if std::env::var_os("MM_UPCALL_WRITE_SEEDS").is_some() {
        for (target, list) in seeds() {
            let dir = root.join(target);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, b) in list.iter().enumerate() {
                assert!(seed_decodes(target, b), "{target} seed {i} does not decode");
                std::fs::write(dir.join(format!("seed-{i:02}")), b).unwrap();
            }
        }
    }
    let mut checked = 0;
    for (target, _) in seeds() {
        let dir = root.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!("{}: {e} (MM_UPCALL_WRITE_SEEDS=1 writes it)", dir.display())
        });
        for entry in entries {
            let path = entry.unwrap().path();
            let b = std::fs::read(&path).unwrap();
            assert!(
                seed_decodes(target, &b),
                "{} no longer decodes",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 5 * 16, "only {checked} seeds");
}

/// The reply buffer a transport allocates is the whole record the kernel
/// writes: a caller can no longer choose it (a shorter one was a heap
/// overflow reachable from safe code).
#[test]
fn reply_buffers_fit_the_kernels_records() {
    let hello = Control::Hello {
        nr_queues: 1,
        queue_depth: 8,
        timeout_ms: 0,
        features: raw::Features::empty(),
        reply_addr: 0,
    };
    let attach = Control::AttachNode {
        nid: 1,
        credit_pages: 0,
        reply_addr: 0,
    };
    let ping = Control::Ping {
        nr_upcalls: 1,
        nr_threads: 1,
        events: false,
        reply_addr: 0,
    };
    assert_eq!(hello.reply_len(), size_of::<raw::HelloReply>());
    assert_eq!(attach.reply_len(), size_of::<raw::NodeInfo>());
    assert_eq!(ping.reply_len(), size_of::<raw::PingReply>());
    for none in [
        Control::DetachNode { nid: 1 },
        Control::SetCredit { nid: 1, pages: 1 },
        Control::SetStanding {
            nid: 1,
            standing: Standing::Default,
        },
        Control::PromotePfn { pfn: 1, nid: 0 },
        Control::Resync {
            nid: 1,
            start_pfn: 0,
            nr_pages: 1,
        },
    ] {
        assert_eq!(none.reply_len(), 0, "{none:?}");
    }
}

#[test]
fn a_standing_verdict_is_promote_default_or_none() {
    let area = |verdict: u16, arg: u32| {
        let mut a = [0u8; raw::CTRL_CMD_SIZE];
        a[..4].copy_from_slice(&1u32.to_ne_bytes());
        a[4..6].copy_from_slice(&verdict.to_ne_bytes());
        a[8..12].copy_from_slice(&arg.to_ne_bytes());
        a
    };
    let op = raw::ctrl_op::SET_STANDING;
    for (verdict, arg, ok) in [
        (0, 0, true),
        (0, 1, false),
        (raw::verdict::DEFAULT, 0, true),
        (raw::verdict::DEFAULT, 2, false),
        (raw::verdict::PROMOTE, 0, true),
        (raw::verdict::ALLOW_IN_PLACE, 0, false),
        (raw::verdict::STAY, 0, false),
        (99, 0, false),
    ] {
        assert_eq!(
            Control::decode(op, &area(verdict, arg)).is_ok(),
            ok,
            "verdict {verdict} arg {arg}"
        );
    }
    let mut flags = area(0, 0);
    flags[6] = 1;
    assert!(Control::decode(op, &flags).is_err());
    let mut reserved = area(0, 0);
    reserved[12] = 1;
    assert!(Control::decode(op, &reserved).is_err());
}
