//! The driver-side split virtqueue against the device-side implementation of `virtio-queue`.
//!
//! The device maps the same memfd a second time, at the same guest-physical address as the
//! driver's virtual address, exactly as a vhost-user backend does.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vrdma::mem::{DmaAllocator, DmaBuf, SharedMemory};
use vrdma::virtio::{QueueError, SplitQueue};

struct Fixture {
    alloc: DmaAllocator,
    guest: GuestMemoryMmap<()>,
}

fn fixture() -> Fixture {
    let mem = Arc::new(SharedMemory::new("vrdma-split-test", 1 << 20).unwrap());
    let file = mem.file().try_clone().unwrap();
    let guest = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(mem.addr()),
        mem.len(),
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    Fixture {
        alloc: DmaAllocator::with_region(mem),
        guest,
    }
}

fn split(addr: u64) -> (Option<u32>, Option<u32>) {
    (Some(addr as u32), Some((addr >> 32) as u32))
}

/// The device's view of `driver`'s rings.
fn device_for(driver: &SplitQueue, guest: &GuestMemoryMmap<()>) -> Queue {
    let mut q = Queue::new(driver.size()).unwrap();
    let a = driver.addresses();
    let (lo, hi) = split(a.desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(a.avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(a.used);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    assert!(
        q.is_valid(guest),
        "device must accept the driver's ring layout"
    );
    q
}

/// Pops one chain on the device side: its head and its descriptors.
fn device_pop(q: &mut Queue, guest: &GuestMemoryMmap<()>) -> Option<(u16, Vec<Descriptor>)> {
    let chain = q.pop_descriptor_chain(guest)?;
    let head = chain.head_index();
    Some((head, chain.collect()))
}

fn filled(alloc: &DmaAllocator, len: usize, seed: u8) -> DmaBuf {
    let buf = alloc.alloc_aligned(len, 8).unwrap();
    let bytes: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
    buf.write_at(0, &bytes).unwrap();
    buf
}

#[test]
fn device_reads_readable_parts_and_driver_sees_written_length() {
    let f = fixture();
    let mut driver = SplitQueue::new(&f.alloc, 16).unwrap();
    let mut device = device_for(&driver, &f.guest);

    let a = filled(&f.alloc, 24, 1);
    let b = filled(&f.alloc, 40, 100);
    let resp = f.alloc.alloc_aligned(64, 8).unwrap();
    let head = driver
        .add_chain(
            &[(a.addr(), 24), (b.addr(), 40)],
            &[(resp.addr(), 32), (resp.addr() + 32, 32)],
        )
        .unwrap();
    assert_eq!(driver.num_free(), 12);
    assert_eq!(driver.in_flight(), 1);
    assert!(driver.needs_kick());
    assert!(!driver.has_used());

    let (dev_head, descs) = device_pop(&mut device, &f.guest).expect("device sees the chain");
    assert_eq!(dev_head, head);
    assert_eq!(descs.len(), 4);
    let flags: Vec<bool> = descs.iter().map(|d| d.is_write_only()).collect();
    assert_eq!(flags, [false, false, true, true]);
    let mut readable = Vec::new();
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let mut part = vec![0u8; d.len() as usize];
        f.guest.read_slice(&mut part, d.addr()).unwrap();
        readable.extend(part);
    }
    let expected: Vec<u8> = (0..24u8)
        .map(|i| 1 + i)
        .chain((0..40u8).map(|i| 100 + i))
        .collect();
    assert_eq!(readable, expected);

    // The device answers across both writable descriptors.
    let answer: Vec<u8> = (0..40u8).map(|i| 0xf0 ^ i).collect();
    let w: Vec<_> = descs.iter().filter(|d| d.is_write_only()).collect();
    f.guest.write_slice(&answer[..32], w[0].addr()).unwrap();
    f.guest.write_slice(&answer[32..], w[1].addr()).unwrap();
    device.add_used(&f.guest, dev_head, 40).unwrap();

    assert!(driver.has_used());
    assert_eq!(driver.pop_used().unwrap(), Some((head, 40)));
    assert_eq!(driver.pop_used().unwrap(), None);
    assert_eq!(driver.num_free(), 16);
    assert_eq!(driver.in_flight(), 0);
    let mut back = vec![0u8; 40];
    resp.read_at(0, &mut back).unwrap();
    assert_eq!(back, answer);
}

#[test]
fn rings_wrap_many_times_with_varying_chains() {
    let f = fixture();
    let mut driver = SplitQueue::new(&f.alloc, 4).unwrap();
    let mut device = device_for(&driver, &f.guest);
    let buf = filled(&f.alloc, 256, 7);

    // 4 entries, 37 rounds of two chains: both ring indices pass the queue size ~18 times,
    // and descriptors are recycled in shifting positions.
    for round in 0..37u32 {
        let len_a = 1 + (round % 3) as usize; // 1..=3 descriptors
        let parts_a: Vec<(u64, u32)> = (0..len_a).map(|i| (buf.addr() + 8 * i as u64, 8)).collect();
        let (ro, wo) = parts_a.split_at(len_a / 2);
        let head_a = driver.add_chain(ro, wo).unwrap();
        let head_b = driver
            .add_chain(&[(buf.addr() + 128, 4)], &[])
            .unwrap_or(u16::MAX);
        let expect_b = len_a < 4;
        assert_eq!(head_b != u16::MAX, expect_b);

        let (h, descs) = device_pop(&mut device, &f.guest).unwrap();
        assert_eq!(h, head_a, "round {round}");
        assert_eq!(descs.len(), len_a, "round {round}");
        for (i, d) in descs.iter().enumerate() {
            assert_eq!(d.addr().0, buf.addr() + 8 * i as u64);
            assert_eq!(d.is_write_only(), i >= len_a / 2);
        }
        let (h2, descs2) = device_pop(&mut device, &f.guest).unwrap();
        assert_eq!(h2, head_b);
        assert_eq!(descs2.len(), 1);
        assert_eq!(descs2[0].len(), 4);
        assert!(device_pop(&mut device, &f.guest).is_none());

        // Complete them in reverse order: the free list must cope.
        device.add_used(&f.guest, head_b, 0).unwrap();
        device.add_used(&f.guest, head_a, round).unwrap();
        assert_eq!(driver.pop_used().unwrap(), Some((head_b, 0)));
        assert_eq!(driver.pop_used().unwrap(), Some((head_a, round)));
        assert_eq!(driver.pop_used().unwrap(), None);
        assert_eq!(driver.num_free(), 4);
    }
    assert_eq!(device.next_avail(), 74);
    assert_eq!(device.next_used(), 74);
}

#[test]
fn indices_survive_u16_wrap() {
    let f = fixture();
    let mut driver = SplitQueue::new(&f.alloc, 2).unwrap();
    let mut device = device_for(&driver, &f.guest);
    let buf = filled(&f.alloc, 8, 0);
    for i in 0..70_000u32 {
        let head = driver.add_chain(&[], &[(buf.addr(), 8)]).unwrap();
        let (h, _) = device_pop(&mut device, &f.guest).expect("chain visible");
        assert_eq!(h, head);
        device.add_used(&f.guest, h, i % 9).unwrap();
        assert_eq!(driver.pop_used().unwrap(), Some((head, i % 9)));
    }
    assert_eq!(device.next_avail(), (70_000u32 % 65_536) as u16);
    assert_eq!(driver.num_free(), 2);
}

#[test]
fn free_list_exhaustion_is_an_error_and_recovers() {
    let f = fixture();
    let mut driver = SplitQueue::new(&f.alloc, 8).unwrap();
    let mut device = device_for(&driver, &f.guest);
    let buf = filled(&f.alloc, 64, 0);
    let three = [(buf.addr(), 8u32); 3];

    let h1 = driver.add_chain(&three, &[]).unwrap();
    let h2 = driver.add_chain(&three[..2], &three[..1]).unwrap();
    assert_eq!(driver.num_free(), 2);
    let err = driver.add_chain(&three, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::Full {
                needed: 3,
                free: 2,
                size: 8
            }
        ),
        "{err}"
    );
    let h3 = driver.add_chain(&three[..2], &[]).unwrap();
    assert_eq!(driver.num_free(), 0);
    assert!(matches!(
        driver.add_chain(&[], &three[..1]),
        Err(QueueError::Full {
            needed: 1,
            free: 0,
            ..
        })
    ));

    // The device returns the middle chain first.
    let popped: Vec<u16> = (0..3)
        .map(|_| device_pop(&mut device, &f.guest).unwrap().0)
        .collect();
    assert_eq!(popped, [h1, h2, h3]);
    device.add_used(&f.guest, h2, 0).unwrap();
    assert_eq!(driver.pop_used().unwrap(), Some((h2, 0)));
    assert_eq!(driver.num_free(), 3);
    let h4 = driver.add_chain(&[], &three).unwrap();
    let (h, descs) = device_pop(&mut device, &f.guest).unwrap();
    assert_eq!(h, h4);
    assert!(descs.iter().all(|d| d.is_write_only()));

    for h in [h1, h3, h4] {
        device.add_used(&f.guest, h, 0).unwrap();
    }
    while driver.pop_used().unwrap().is_some() {}
    assert_eq!(driver.num_free(), 8);
    // Every descriptor is usable again: eight one-descriptor chains get eight distinct heads.
    let mut heads: Vec<u16> = (0..8)
        .map(|_| driver.add_chain(&[(buf.addr(), 1)], &[]).unwrap())
        .collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..8).collect::<Vec<u16>>());
}

#[test]
fn no_notify_suppresses_kicks() {
    let f = fixture();
    let mut driver = SplitQueue::new(&f.alloc, 8).unwrap();
    let mut device = device_for(&driver, &f.guest);
    let buf = filled(&f.alloc, 8, 0);

    device.disable_notification(&f.guest).unwrap();
    driver.add_chain(&[(buf.addr(), 8)], &[]).unwrap();
    assert!(!driver.needs_kick(), "device set VRING_USED_F_NO_NOTIFY");
    driver.add_chain(&[(buf.addr(), 8)], &[]).unwrap();
    assert!(!driver.needs_kick());

    // Re-enabling reports the pending buffers to the device, and kicks are wanted again.
    assert!(device.enable_notification(&f.guest).unwrap());
    assert!(driver.needs_kick());
    let count = device.iter(&f.guest).unwrap().count();
    assert_eq!(count, 2);
}

#[test]
fn bogus_used_elements_are_reported() {
    let f = fixture();
    let mut driver = SplitQueue::new(&f.alloc, 8).unwrap();
    let mut device = device_for(&driver, &f.guest);
    let buf = filled(&f.alloc, 8, 0);
    let head = driver.add_chain(&[(buf.addr(), 8)], &[]).unwrap();
    device_pop(&mut device, &f.guest).unwrap();

    // Descriptor 5 is free, not a chain in flight.
    device.add_used(&f.guest, 5, 0).unwrap();
    let err = driver.pop_used().unwrap_err();
    assert!(
        matches!(err, QueueError::BadUsedId { id: 5, size: 8 }),
        "{err}"
    );
    assert_eq!(driver.num_free(), 7, "the free list is untouched");

    // A used index far ahead of what is in flight.
    let mut driver = SplitQueue::new(&f.alloc, 8).unwrap();
    driver.add_chain(&[(buf.addr(), 8)], &[]).unwrap();
    let used_idx = GuestAddress(driver.addresses().used + 2);
    f.guest.write_obj(5u16.to_le(), used_idx).unwrap();
    assert!(matches!(
        driver.pop_used(),
        Err(QueueError::UsedIndexJump {
            used_idx: 5,
            in_flight: 1,
            ..
        })
    ));
    let _ = head;
}
