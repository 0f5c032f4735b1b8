//! The small fixed-layout decoders, all on the same input: `doorbell::decode_batch` (device
//! side), `event::Event::decode`, `cqe::Cqe::decode` and `config::Config::decode` (driver
//! side), plus the ring index arithmetic of `ring::Geometry`. Whatever decodes must re-encode
//! to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vrdma_proto::{config, cqe, doorbell, event, queue, ring};
use zerocopy::IntoBytes;

fuzz_target!(|data: &[u8]| {
    doorbells(data);
    events(data);
    completions(data);
    config_space(data);
    ring_indices(data);
});

fn doorbells(data: &[u8]) {
    let Ok(batch) = doorbell::decode_batch(data) else {
        return;
    };
    let batch: Vec<_> = batch.collect();
    // A batch is all or nothing: every 8-byte doorbell is returned.
    assert!(!data.is_empty() && data.len() % doorbell::SIZE == 0);
    assert!(batch.len() <= doorbell::MAX_BATCH);
    assert_eq!(batch.len(), data.len() / doorbell::SIZE);
    for ((kind, qpn), chunk) in batch.iter().zip(data.chunks_exact(doorbell::SIZE)) {
        assert_eq!(doorbell::Doorbell::new(*kind, *qpn).as_bytes(), chunk);
    }
}

fn events(data: &[u8]) {
    let Ok((kind, handle)) = event::Event::decode(data) else {
        return;
    };
    assert_eq!(
        event::Event::new(kind, handle).as_bytes(),
        &data[..event::SIZE]
    );
}

fn completions(data: &[u8]) {
    let Ok(c) = cqe::Cqe::decode(data) else {
        return;
    };
    let size = cqe::SIZE as usize;
    assert_eq!(c.cqe.as_bytes(), &data[..size]);
    assert_eq!(c.status.raw(), c.cqe.status);
    assert_eq!(c.opcode.raw(), c.cqe.opcode);
    assert_eq!(c.flags.bits(), c.cqe.wc_flags);
    let _ = c.cqe.sgid.to_string();
    // The decoded opcode round-trips through the wire enum.
    assert_eq!(cqe::Opcode::from_raw(c.opcode.raw()), Ok(c.opcode));
}

fn config_space(data: &[u8]) {
    if let Ok(caps) = config::DeviceCaps::decode(data) {
        assert_eq!(caps.as_bytes(), &data[..caps.as_bytes().len()]);
        assert!(config::AtomicCap::from_raw(caps.atomic_cap).is_ok());
    }
    if let Ok(port) = config::PortAttr::decode(data) {
        assert_eq!(port.as_bytes(), &data[..port.as_bytes().len()]);
        let active = config::Mtu::from_raw(port.active_mtu).expect("decoded active_mtu");
        assert!(active.bytes() >= 256 && active.bytes() <= 4096);
    }
    let Ok(cfg) = config::Config::decode(data) else {
        return;
    };
    if data.len() == config::BASE_CONFIG_SIZE {
        // A space that ends before the SRQ limits reads as one whose limits are zero.
        assert_eq!(&cfg.as_bytes()[..data.len()], data);
        assert_eq!(cfg.srq, config::SrqCaps::default());
    } else {
        assert_eq!(cfg.as_bytes(), &data[..cfg.as_bytes().len()]);
    }
    assert_eq!(cfg.version.get(), vrdma_proto::PROTOCOL_VERSION);
    let queues = cfg.num_doorbell_queues.get();
    assert!((1..=queue::MAX_DOORBELL_QUEUES).contains(&queues));
    // Every virtqueue index the device has gets a role, and no other.
    let count = queue::count(queues);
    for index in 0..=count {
        assert_eq!(queue::role(index, queues).is_some(), index < count);
    }
    // The embedded structures passed their own checks.
    assert!(config::DeviceCaps::decode(cfg.caps.as_bytes()).is_ok());
    assert!(config::PortAttr::decode(cfg.port.as_bytes()).is_ok());
    assert!(config::SrqCaps::decode(cfg.srq.as_bytes()).is_ok());
    let _ = cfg.gid.to_string();
    let _ = cfg.gid.to_ipv4();
}

fn ring_indices(data: &[u8]) {
    let Some((words, _)) = data.split_first_chunk::<16>() else {
        return;
    };
    let word = |i: usize| u32::from_le_bytes([words[i], words[i + 1], words[i + 2], words[i + 3]]);
    let (depth, stride, producer, consumer) = (word(0), word(4), word(8), word(12));

    let (seq, solicited) = ring::split_arm_word(producer);
    assert_eq!(ring::arm_word(seq, solicited), producer);

    let Ok(geometry) = ring::Geometry::new(depth, stride) else {
        return;
    };
    assert!(depth.is_power_of_two() && depth <= ring::MAX_DEPTH);
    assert!(geometry.slot(producer) < depth);
    // Every entry lies inside the ring.
    assert!(geometry.entry_offset(producer) + u64::from(stride) <= geometry.byte_len());
    assert!(geometry.entry_offset(producer) >= ring::HEADER_SIZE);
    match (
        geometry.occupancy(producer, consumer),
        geometry.free(producer, consumer),
    ) {
        (Ok(used), Ok(free)) => {
            assert!(used <= depth);
            assert_eq!(used + free, depth);
            assert_eq!(consumer.wrapping_add(used), producer);
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            assert!(a.ahead > depth);
            assert_eq!(a.ahead, producer.wrapping_sub(consumer));
        }
        (used, free) => panic!("occupancy {used:?} and free {free:?} disagree"),
    }
}
