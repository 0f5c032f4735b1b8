//! The driver's side of a shared ring (send, receive or completion), in DMA memory.

use std::sync::atomic::{AtomicU32, Ordering, fence};

use vrdma_proto::ring::{self, Geometry};

use crate::mem::DmaBuf;

/// A ring in memory the device maps.
#[derive(Debug)]
pub(crate) struct Ring {
    buf: DmaBuf,
    geometry: Geometry,
}

impl Ring {
    pub(crate) fn new(buf: DmaBuf, geometry: Geometry) -> Self {
        debug_assert!(buf.len() as u64 >= geometry.byte_len());
        debug_assert!(buf.addr() % ring::ALIGN == 0);
        Ring { buf, geometry }
    }

    pub(crate) fn addr(&self) -> u64 {
        self.buf.addr()
    }

    /// Bytes of memory the ring occupies.
    pub(crate) fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn word(&self, offset: u64) -> &AtomicU32 {
        debug_assert!(offset + 4 <= ring::HEADER_SIZE && offset % 4 == 0);
        // SAFETY: the header words lie inside `buf` (HEADER_SIZE <= its length), are 4-byte
        // aligned (the ring base is 64-byte aligned and the offsets are multiples of 4), and the
        // mapping lives as long as `self.buf`. The device accesses them only with atomic
        // operations as well, so viewing them as AtomicU32 is sound.
        unsafe { AtomicU32::from_ptr(self.buf.as_ptr().add(offset as usize).cast::<u32>()) }
    }

    pub(crate) fn load(&self, offset: u64, order: Ordering) -> u32 {
        self.word(offset).load(order)
    }

    pub(crate) fn store(&self, offset: u64, value: u32, order: Ordering) {
        self.word(offset).store(value, order)
    }

    /// Copies `bytes` into the entry of free-running index `index`.
    pub(crate) fn write_entry(&self, index: u32, bytes: &[u8]) {
        debug_assert!(bytes.len() <= self.geometry.stride() as usize);
        // The offset is within the ring by construction, so this cannot fail.
        let _ = self
            .buf
            .write_at(self.geometry.entry_offset(index) as usize, bytes);
    }

    /// Copies the entry of free-running index `index` into `out`.
    pub(crate) fn read_entry(&self, index: u32, out: &mut [u8]) {
        let _ = self
            .buf
            .read_at(self.geometry.entry_offset(index) as usize, out);
    }

    pub(crate) fn full_fence() {
        fence(Ordering::SeqCst);
    }
}
