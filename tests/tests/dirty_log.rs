//! Live migration's dirty-page log (vhost-user `SET_LOG_BASE` with `LOG_SHMFD`): a guest's
//! transport turns it on and off with the messages QEMU sends, another VM RDMA WRITEs into
//! the guest's memory, and the test reads the log as the VMM would.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::{Whence, lseek};
use vrdma::mem::SharedMemory;
use vrdma::{MemoryRegion, QpCap, SendWr, Sge, WcStatus};
use vrdma_tests::{Endpoint, TestDaemon, all_access, rc_pair};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
const LOG_PAGE: u64 = 4096;
/// Guest-physical addresses are the guest process's virtual addresses, which stay below
/// 2^48 (2^47 on x86-64) unless a mapping asks for more.
const ADDRESS_BITS: u32 = 48;

/// A VMM's dirty log over every address a guest of this process can have: a sparse memfd
/// (8 GiB for 48 bits, of which only the pages the device marks are allocated).
struct DirtyLog {
    file: File,
    size: u64,
}

impl DirtyLog {
    fn new() -> DirtyLog {
        let size = (1u64 << ADDRESS_BITS) / LOG_PAGE / 8;
        let file = File::from(memfd_create("vrdma-dirty-log", MFdFlags::MFD_CLOEXEC).unwrap());
        file.set_len(size).unwrap();
        DirtyLog { file, size }
    }

    /// The pages whose bits are set: the allocated stretches of the memfd (`SEEK_DATA`,
    /// `SEEK_HOLE`), bit by bit, so nothing set anywhere is missed.
    fn marked_pages(&self) -> BTreeSet<u64> {
        let mut pages = BTreeSet::new();
        let mut at = 0;
        loop {
            let data = match lseek(self.file.as_fd(), at, Whence::SeekData) {
                Ok(data) => data,
                Err(Errno::ENXIO) => return pages,
                Err(e) => panic!("SEEK_DATA in the dirty log: {e}"),
            };
            let hole = lseek(self.file.as_fd(), data, Whence::SeekHole).unwrap();
            let mut bytes = vec![0u8; (hole - data) as usize];
            self.file.read_exact_at(&mut bytes, data as u64).unwrap();
            for (i, byte) in bytes.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        pages.insert((data as u64 + i as u64) * 8 + bit);
                    }
                }
            }
            at = hole;
        }
    }

    /// Clears every bit, as a VMM does once it has copied the pages they name.
    fn clear(&self) {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(self.file.as_fd(), flags, 0, self.size as i64).unwrap();
        assert_eq!(self.marked_pages(), BTreeSet::new());
    }
}

/// The log pages `len` bytes at guest-physical `gpa` cover.
fn pages(gpa: u64, len: u64) -> BTreeSet<u64> {
    (gpa / LOG_PAGE..=(gpa + len - 1) / LOG_PAGE).collect()
}

fn cap() -> QpCap {
    QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    }
}

/// RDMA WRITEs `len` bytes of a recognisable pattern from `a`'s buffer to `gpa` under `rkey`,
/// waits for its completion and checks the bytes arrived (`check` reads them back).
fn write(a: &Endpoint, gpa: u64, rkey: u32, len: u32, seed: u8, check: impl Fn(&mut [u8])) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
    a.buf.write_at(0, &data).unwrap();
    let src = [Sge::new(a.buf.addr(), len, a.mr.lkey())];
    a.send(&[
        SendWr::rdma_write(u64::from(seed), &src, gpa, rkey).with_flags(vrdma::SendFlags::SIGNALED)
    ])
    .unwrap();
    let wc = a.poll_one();
    assert_eq!((wc.wr_id, wc.status), (u64::from(seed), WcStatus::Success));
    let mut got = vec![0u8; len as usize];
    check(&mut got);
    assert_eq!(got, data, "the WRITE at {gpa:#x} did not land");
}

/// Guest `b` is the migrating VM: `a` writes into memory `b` had before the log was set and
/// into memory `b` added while logging, then after logging stopped.
#[test]
fn the_log_marks_the_pages_the_device_writes_until_logging_stops() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let ca = d.open("a");
    let (cb, dev_b) = d.open_shared("b");
    // b only answers WRITEs: it rings no doorbell and gets no completion, so its rings are
    // idle whenever its log is turned on or off (see `VirtioUser::start_dirty_log`).
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let log = DirtyLog::new();
    dev_b.start_dirty_log(log.file.as_fd(), log.size).unwrap();

    // (a) Memory from before SET_LOG_BASE: exactly the pages the WRITE covered, across a
    // page boundary, are marked.
    log.clear();
    let target = b.buf.addr() + LOG_PAGE + 3000;
    write(&a, target, b.mr.rkey(), 2000, 1, |got| {
        b.buf
            .read_at((target - b.buf.addr()) as usize, got)
            .unwrap()
    });
    assert_eq!(pages(target, 2000).len(), 2);
    assert_eq!(log.marked_pages(), pages(target, 2000));

    // (b) Memory added (ADD_MEM_REG) after SET_LOG_BASE is logged too.
    let extra = Arc::new(SharedMemory::new("extra", 1 << 20).unwrap());
    cb.add_memory(extra.clone()).unwrap();
    let mr = MemoryRegion::register_range(&b.pd, extra.addr(), 1 << 20, all_access()).unwrap();
    log.clear();
    let target = extra.addr() + 5 * LOG_PAGE + 100;
    write(&a, target, mr.rkey(), 64, 2, |got| {
        extra.read(target, got).unwrap()
    });
    assert_eq!(
        log.marked_pages(),
        pages(target, 64),
        "a WRITE into memory added while logging must be logged"
    );

    // Removing other memory (REM_MEM_REG rebuilds the table) leaves the rest logged.
    let other = Arc::new(SharedMemory::new("other", 1 << 16).unwrap());
    cb.add_memory(other.clone()).unwrap();
    cb.remove_memory(other.addr()).unwrap();
    log.clear();
    write(&a, target, mr.rkey(), 64, 3, |got| {
        extra.read(target, got).unwrap()
    });
    assert_eq!(log.marked_pages(), pages(target, 64));

    // (c) After SET_FEATURES without LOG_ALL nothing is marked, in either memory.
    dev_b.stop_dirty_log().unwrap();
    log.clear();
    let first = b.buf.addr() + 100;
    write(&a, first, b.mr.rkey(), 64, 4, |got| {
        b.buf.read_at(100, got).unwrap()
    });
    write(&a, target, mr.rkey(), 64, 5, |got| {
        extra.read(target, got).unwrap()
    });
    assert_eq!(
        log.marked_pages(),
        BTreeSet::new(),
        "the device still logs after logging was turned off"
    );
}
