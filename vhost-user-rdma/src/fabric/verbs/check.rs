//! `--check-fabric`: proves a NIC can carry what the verbs fabric will ask of it before any
//! guest depends on it. Two RC QPs of the daemon's own, connected to each other through the
//! NIC's port, run an RDMA WRITE, a READ, a SEND with immediate data into a posted receive,
//! and both atomics on one registered buffer; then a UD QP sends a datagram to itself through
//! an address handle. Every byte and result is checked.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use super::nic::{
    self, Access, Completion, Cq, Nic, Pd, Qp, QpCaps, QpKind, RemoteQp, SendOp, Sge,
};

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NIC refused a verb.
    #[error(transparent)]
    Nic(#[from] nic::Error),
    /// A work request completed with an error.
    #[error("the loopback {what} completed with status {status} ({}) on RDMA device {device}", nic::status_text(*.status))]
    Completion {
        /// The step.
        what: &'static str,
        /// `IBV_WC_*` status.
        status: u32,
        /// The device.
        device: String,
    },
    /// A completion never came.
    #[error(
        "the loopback {what} did not complete within {waited:?} on RDMA device {device}: the \
         port may not route to its own GID (check the GID index)"
    )]
    Timeout {
        /// The step.
        what: &'static str,
        /// How long the check waited.
        waited: Duration,
        /// The device.
        device: String,
    },
    /// The bytes or value that arrived are not what was sent.
    #[error("the loopback {what} on RDMA device {device} delivered wrong data: {detail}")]
    Mismatch {
        /// The step.
        what: &'static str,
        /// The device.
        device: String,
        /// What differed.
        detail: String,
    },
    /// The check's buffer could not be allocated.
    #[error("cannot allocate the check's {0}-byte buffer")]
    NoMemory(usize),
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The device.
    pub device: String,
    /// Its port.
    pub port: nic::PortInfo,
    /// The steps that passed, in order.
    pub passed: Vec<&'static str>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.port;
        writeln!(
            f,
            "{}: port {} active, {} link layer, MTU {}, LID {}, GID[{}] {}",
            self.device,
            p.port,
            if p.ethernet { "Ethernet" } else { "InfiniBand" },
            p.active_mtu,
            p.lid,
            p.gid_index,
            gid_text(&p.gid)
        )?;
        write!(f, "loopback over RC passed: {}", self.passed.join(", "))
    }
}

/// A GID as `ibv_devinfo -v` prints it: eight groups of four hex digits.
pub fn gid_text(gid: &[u8; 16]) -> String {
    gid.chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(":")
}

/// Page-aligned memory the NIC reads and writes: outside Rust's view while registered, so it
/// is only ever touched through copies behind fences.
struct DmaBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl DmaBuffer {
    fn new(len: usize) -> Result<DmaBuffer, Error> {
        let layout = Layout::from_size_align(len, 4096).map_err(|_| Error::NoMemory(len))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(Error::NoMemory(len))?;
        Ok(DmaBuffer { ptr, layout })
    }

    fn addr(&self, offset: usize) -> u64 {
        self.ptr.as_ptr() as u64 + offset as u64
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.layout.size());
        // SAFETY: in bounds (asserted); the NIC touches this range only for work requests
        // posted after this copy, which the release fence orders before them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            )
        };
        fence(Ordering::Release);
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.layout.size());
        fence(Ordering::Acquire);
        // SAFETY: in bounds (asserted); read after the completion of the work request that
        // wrote it was polled (the acquire fence orders the copy after that).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout; the MR over it is dropped first (check drops it
        // before the buffer).
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

const CHUNK: usize = 4096;
/// Where each part of the buffer is.
const SOURCE: usize = 0;
const WRITTEN: usize = CHUNK;
const READ_BACK: usize = 2 * CHUNK;
const RECEIVED: usize = 3 * CHUNK;
const ATOMIC: usize = 4 * CHUNK;
const ATOMIC_RESULT: usize = 4 * CHUNK + 64;
const DATAGRAM: usize = 5 * CHUNK;
const BUFFER: usize = 6 * CHUNK;
/// What a UD receive holds before the payload: the GRH, present or not.
const GRH: usize = 40;
/// The check's UD Q_Key.
const UD_QKEY: u32 = 0x1111_1111;
/// Bytes of the datagram (within the port's MTU, whatever it is).
const DATAGRAM_LEN: usize = 200;

/// How long one step may take.
const STEP_LIMIT: Duration = Duration::from_secs(5);

struct Loopback {
    device: String,
    a: Qp,
    b: Qp,
    ud: Qp,
    ah: nic::Ah,
    cq: Cq,
    /// Before `buf`: fields drop in order, so the registration goes before its memory.
    mr: nic::Mr,
    buf: DmaBuffer,
}

impl Loopback {
    fn sge(&self, offset: usize, len: usize) -> Sge {
        Sge {
            addr: self.buf.addr(offset),
            len: len as u32,
            lkey: self.mr.lkey(),
        }
    }

    /// Waits for `n` completions and checks them.
    fn complete(&self, what: &'static str, n: usize) -> Result<Vec<Completion>, Error> {
        let mut got = Vec::new();
        let end = Instant::now() + STEP_LIMIT;
        let mut batch = [Completion::default(); 4];
        while got.len() < n {
            let k = self.cq.poll(&mut batch)?;
            for c in &batch[..k] {
                if c.status != 0 {
                    return Err(Error::Completion {
                        what,
                        status: c.status,
                        device: self.device.clone(),
                    });
                }
                got.push(*c);
            }
            if k == 0 {
                if Instant::now() > end {
                    return Err(Error::Timeout {
                        what,
                        waited: STEP_LIMIT,
                        device: self.device.clone(),
                    });
                }
                std::thread::yield_now();
            }
        }
        Ok(got)
    }

    fn expect(&self, what: &'static str, offset: usize, want: &[u8]) -> Result<(), Error> {
        let mut got = vec![0u8; want.len()];
        self.buf.read(offset, &mut got);
        match got.iter().zip(want).position(|(g, w)| g != w) {
            None => Ok(()),
            Some(i) => Err(Error::Mismatch {
                what,
                device: self.device.clone(),
                detail: format!("byte {i} is {:#04x}, sent {:#04x}", got[i], want[i]),
            }),
        }
    }

    fn word(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.buf.read(offset, &mut b);
        u64::from_ne_bytes(b)
    }

    fn expect_word(&self, what: &'static str, offset: usize, want: u64) -> Result<(), Error> {
        let got = self.word(offset);
        if got == want {
            Ok(())
        } else {
            Err(Error::Mismatch {
                what,
                device: self.device.clone(),
                detail: format!("the value is {got}, expected {want}"),
            })
        }
    }
}

/// Runs the loopback check on `nic`.
pub fn check(nic: &Nic) -> Result<Report, Error> {
    let device = nic.name().to_owned();
    let port = nic.port();
    let pd: Pd = nic.alloc_pd()?;
    let cq = nic.create_cq(16)?;
    let caps = QpCaps {
        send_wr: 8,
        recv_wr: 8,
        sge: 1,
    };
    let a = Qp::create(&pd, &cq, &cq, None, QpKind::Rc, caps)?;
    let b = Qp::create(&pd, &cq, &cq, None, QpKind::Rc, caps)?;
    let buf = DmaBuffer::new(BUFFER)?;
    // SAFETY: the buffer outlives the MR: as locals the MR, declared later, drops first, and
    // in Loopback it is the field before the buffer.
    let mr = unsafe { pd.register(buf.ptr.as_ptr(), BUFFER, Access::ALL)? };
    for qp in [&a, &b] {
        qp.to_init(&port, Access::ALL, None)?;
    }
    let (psn_a, psn_b) = (0x1234, 0x5678);
    let end = |qp: &Qp, psn| RemoteQp {
        qpn: qp.qpn(),
        psn,
        gid: port.gid,
        lid: port.lid,
    };
    a.to_rtr(&port, &end(&b, psn_b))?;
    b.to_rtr(&port, &end(&a, psn_a))?;
    a.to_rts(&port, psn_a)?;
    b.to_rts(&port, psn_b)?;
    let ud = Qp::create(&pd, &cq, &cq, None, QpKind::Ud, caps)?;
    ud.to_init(&port, Access::default(), Some(UD_QKEY))?;
    ud.ud_to_rts(&port, 0)?;
    let ah = pd.create_ah(&port, port.gid, port.lid)?;
    let lb = Loopback {
        device: device.clone(),
        a,
        b,
        ud,
        ah,
        cq,
        mr,
        buf,
    };
    let passed = run_steps(&lb);
    drop(lb);
    Ok(Report {
        device,
        port,
        passed: passed?,
    })
}

fn run_steps(lb: &Loopback) -> Result<Vec<&'static str>, Error> {
    let mut passed = Vec::new();
    let pattern: Vec<u8> = (0..CHUNK).map(|i| (i * 7 + 3) as u8).collect();
    lb.buf.write(SOURCE, &pattern);

    let what = "RDMA WRITE";
    let remote = |offset| (lb.buf.addr(offset), lb.mr.rkey());
    let (addr, rkey) = remote(WRITTEN);
    lb.a.post_send(
        1,
        &[lb.sge(SOURCE, CHUNK)],
        SendOp::Write {
            addr,
            rkey,
            imm: None,
        },
    )?;
    lb.complete(what, 1)?;
    lb.expect(what, WRITTEN, &pattern)?;
    passed.push(what);

    let what = "RDMA READ";
    let (addr, rkey) = remote(WRITTEN);
    lb.b.post_send(2, &[lb.sge(READ_BACK, CHUNK)], SendOp::Read { addr, rkey })?;
    lb.complete(what, 1)?;
    lb.expect(what, READ_BACK, &pattern)?;
    passed.push(what);

    let what = "SEND with immediate";
    lb.b.post_recv(3, &[lb.sge(RECEIVED, CHUNK)])?;
    lb.a.post_send(
        4,
        &[lb.sge(SOURCE, 1000)],
        SendOp::Send { imm: Some(0xfeed) },
    )?;
    let done = lb.complete(what, 2)?;
    let recv = done.iter().find(|c| c.wr_id == 3);
    if recv.map(|c| (c.byte_len, c.imm)) != Some((1000, Some(0xfeed))) {
        return Err(Error::Mismatch {
            what,
            device: lb.device.clone(),
            detail: format!("the receive completed as {recv:?}"),
        });
    }
    lb.expect(what, RECEIVED, &pattern[..1000])?;
    passed.push(what);

    let what = "atomic fetch-and-add";
    lb.buf.write(ATOMIC, &5u64.to_ne_bytes());
    let (addr, rkey) = remote(ATOMIC);
    lb.a.post_send(
        5,
        &[lb.sge(ATOMIC_RESULT, 8)],
        SendOp::FetchAdd { addr, rkey, add: 3 },
    )?;
    lb.complete(what, 1)?;
    lb.expect_word(what, ATOMIC_RESULT, 5)?;
    lb.expect_word(what, ATOMIC, 8)?;
    passed.push(what);

    let what = "atomic compare-and-swap";
    lb.a.post_send(
        6,
        &[lb.sge(ATOMIC_RESULT, 8)],
        SendOp::CompareSwap {
            addr,
            rkey,
            compare: 8,
            swap: 42,
        },
    )?;
    lb.complete(what, 1)?;
    lb.expect_word(what, ATOMIC_RESULT, 8)?;
    lb.expect_word(what, ATOMIC, 42)?;
    passed.push(what);

    let what = "UD SEND";
    lb.ud
        .post_recv(7, &[lb.sge(DATAGRAM, GRH + DATAGRAM_LEN)])?;
    lb.ud.post_send(
        8,
        &[lb.sge(SOURCE, DATAGRAM_LEN)],
        SendOp::Datagram {
            ah: &lb.ah,
            qpn: lb.ud.qpn(),
            qkey: UD_QKEY,
            imm: None,
        },
    )?;
    let done = lb.complete(what, 2)?;
    let recv = done.iter().find(|c| c.wr_id == 7);
    if recv.map(|c| c.byte_len as usize) != Some(GRH + DATAGRAM_LEN) {
        return Err(Error::Mismatch {
            what,
            device: lb.device.clone(),
            detail: format!(
                "the receive completed as {recv:?}, not with GRH + {DATAGRAM_LEN} bytes"
            ),
        });
    }
    lb.expect(what, DATAGRAM + GRH, &pattern[..DATAGRAM_LEN])?;
    passed.push(what);
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gid_prints_as_ibv_devinfo_does() {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(gid_text(&gid), "0000:0000:0000:0000:0000:ffff:0a00:0001");
    }

    #[test]
    fn the_buffer_s_parts_do_not_overlap() {
        let parts = [
            (SOURCE, CHUNK),
            (WRITTEN, CHUNK),
            (READ_BACK, CHUNK),
            (RECEIVED, CHUNK),
            (ATOMIC, 8),
            (ATOMIC_RESULT, 8),
            (DATAGRAM, GRH + DATAGRAM_LEN),
        ];
        for (i, &(a, la)) in parts.iter().enumerate() {
            assert!(a + la <= BUFFER);
            for &(b, lb) in &parts[i + 1..] {
                assert!(a + la <= b || b + lb <= a, "{a}+{la} and {b}+{lb}");
            }
        }
    }
}
