//! Memory a guest shares in pieces: an MR whose pages lie in two adjacent regions, one adopted
//! from a mapping someone else made, at a file offset (as the libibverbs shim shares an
//! application's buffers). `tests/regions.rs` runs it on the soft fabric,
//! `tests/verbs_fabric.rs` over the NIC fabric.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr;
use std::sync::Arc;

use vrdma::mem::{SharedMemory, page_size};
use vrdma::{Context, MemoryRegion, SendWr, Sge, WcStatus};

use crate::scenarios::cap;
use crate::{all_access, rc_pair};

/// Maps `len` bytes of `file` from `offset` over `addr`, inside a reservation of the test's.
fn map_over(addr: u64, len: usize, file: &std::fs::File, offset: u64) {
    // SAFETY: `addr..addr + len` lies in the test's own PROT_NONE reservation, which nothing
    // else uses; MAP_FIXED replaces only that.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    assert_eq!(p as u64, addr, "mmap: {}", std::io::Error::last_os_error());
}

/// A WRITE from `ca` into an MR of `cb` over the last page of one region and the first of the
/// next (the second mapped from one page into its file) lands in both files, and a READ brings
/// it back; removing a region makes the range unregistrable.
pub fn mr_across_adjacent_regions(ca: &Context, cb: &Context) {
    let (a, b) = rc_pair(ca, cb, 1 << 16, cap());
    let page = page_size();

    // Two files: one mapped from its start, the other from its second page, side by side.
    let first = SharedMemory::create("vrdma-test-first", 2 * page, false).unwrap();
    let second = SharedMemory::create("vrdma-test-second", 3 * page, false).unwrap();
    // SAFETY: a new inaccessible reservation where the kernel likes; unmapped at the end.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            4 * page,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as u64;
    let mid = base + 2 * page as u64;
    map_over(base, 2 * page, &first.file(), 0);
    map_over(mid, 2 * page, &second.file(), page as u64);
    // SAFETY: the test accesses the adopted regions only while the mappings above exist (they
    // are unmapped after the regions are dropped).
    let (low, high) = unsafe {
        (
            SharedMemory::adopt("low", first.file().try_clone().unwrap(), 0, base, 2 * page)
                .unwrap(),
            SharedMemory::adopt(
                "high",
                second.file().try_clone().unwrap(),
                page as u64,
                mid,
                2 * page,
            )
            .unwrap(),
        )
    };
    let (low, high) = (Arc::new(low), Arc::new(high));
    cb.add_memory(low.clone()).unwrap();
    assert!(
        !cb.is_shared(base, 4 * page as u64),
        "half is not shared yet"
    );
    cb.add_memory(high.clone()).unwrap();
    assert!(
        cb.is_shared(base, 4 * page as u64),
        "two adjacent regions cover it"
    );
    assert_eq!(cb.shared_region(mid), Some((mid, 2 * page as u64)));

    // An MR over the last page of one region and the first of the other.
    let start = base + page as u64 + 10;
    let len = 2 * page as u64 - 20;
    let mr = MemoryRegion::register_range(&b.pd, start, len, all_access())
        .expect("an MR over two adjacent regions");

    // A WRITE across the boundary lands in both files, the second at its offset.
    let data: Vec<u8> = (0..len as usize).map(|i| (i % 251) as u8).collect();
    a.buf.write_at(0, &data).unwrap();
    let src = [Sge::new(a.buf.addr(), len as u32, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(1, &src, start, mr.rkey())])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!(wc.status, WcStatus::Success, "{wc:?}");
    let below = page - 10;
    let mut got = vec![0u8; below];
    first
        .file()
        .read_exact_at(&mut got, page as u64 + 10)
        .unwrap();
    assert_eq!(got, data[..below], "the first file's second page");
    let mut got = vec![0u8; data.len() - below];
    second.file().read_exact_at(&mut got, page as u64).unwrap();
    assert_eq!(
        got,
        data[below..],
        "the second file from the mapping's offset, one page in"
    );
    let mut through_mapping = vec![0u8; data.len()];
    high.read(mid, &mut through_mapping[below..]).unwrap();
    assert_eq!(through_mapping[below..], data[below..]);

    // A READ across it brings the bytes back.
    let dst = [Sge::new(a.buf.addr() + 8192, len as u32, a.mr.lkey())];
    a.send(&[SendWr::rdma_read(2, &dst, start, mr.rkey())])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let mut back = vec![0u8; len as usize];
    a.buf.read_at(8192, &mut back).unwrap();
    assert_eq!(back, data);

    drop(mr);
    cb.remove_memory(mid).unwrap();
    assert!(
        MemoryRegion::register_range(&b.pd, start, len, all_access()).is_err(),
        "half of the range is no longer shared"
    );
    cb.remove_memory(base).unwrap();
    drop((low, high));
    // Adopted regions leave their mappings alone: still mapped here.
    let mut byte = [0u8; 1];
    first
        .read(first.addr() + page as u64 + 10, &mut byte)
        .unwrap();
    // SAFETY: `base` is still mapped (dropping the adopted regions must not unmap it).
    let still = unsafe { ptr::read_volatile((base + page as u64 + 10) as *const u8) };
    assert_eq!(still, byte[0]);
    // SAFETY: the reservation made above, with the files mapped over it.
    let rc = unsafe { libc::munmap(base as *mut libc::c_void, 4 * page) };
    assert_eq!(rc, 0);
}
