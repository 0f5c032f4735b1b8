//! `DeviceMemory` against the real daemon: buffers allocated the ways verbs programs allocate
//! them are pinned, registered with `MemoryRegion::register_range`, and a peer VM reads them
//! with RDMA READ and writes them with RDMA WRITE.
//!
//! Each test runs its application side in a child process of its own: this test binary,
//! started again to run only that test, against a daemon in the parent. Moving private memory
//! onto a memfd loses the writes other threads make to the same pages meanwhile, so the
//! application must not share its heap with the daemon's threads (nor with other tests'),
//! and the process-wide registry starts empty for every test, as it does for a program.

use std::ffi::c_void;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::ptr;

use vrdma::{AccessFlags, Context, MemoryRegion, SendWr, Sge, WcStatus};
use vrdma_ibverbs::app_memory::{self, AppMemoryError, DeviceMemory, Pinned};
use vrdma_tests::scenarios::cap;
use vrdma_tests::{Endpoint, TestDaemon, all_access, rc_pair};

/// Set in a child: the directory of the daemon's sockets.
const CHILD_ENV: &str = "VRDMA_APP_MEMORY_TEST_SOCKETS";
/// The peer's registered buffer.
const PEER_BUF: usize = 1 << 20;
const PAGE: usize = 4096;

/// Runs `body` as the application, in a child process running only the test `name` (the
/// calling test's own name) with `env` added, against a daemon serving VMs `app` and `peer`
/// in this process.
fn isolated(name: &str, env: &[(&str, &str)], body: impl FnOnce(&App)) {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let _ = env_logger::builder().is_test(true).try_init();
        let app = App::connect(Path::new(&dir));
        body(&app);
        return;
    }
    let daemon = TestDaemon::start(&[("app", ""), ("peer", "")]);
    let dir = daemon
        .socket("app")
        .parent()
        .expect("the sockets' directory")
        .to_owned();
    let out = Command::new(std::env::current_exe().expect("this test binary"))
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, &dir)
        .envs(env.iter().copied())
        .output()
        .expect("the test's child process runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown with --nocapture (RUST_LOG reaches the child too).
    eprint!("{stderr}");
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the application side of {name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// The application: its device with an RC QP (`a`), and a peer VM's device with an RC QP
/// (`b`) connected to it, whose registered buffer the peer moves data through.
struct App {
    ctx: Context,
    mem: DeviceMemory,
    peer_mem: DeviceMemory,
    a: Endpoint,
    b: Endpoint,
}

/// An application buffer pinned and registered, as `ibv_reg_mr` will do it. The MR goes
/// before the pin (fields drop in order), as `ibv_dereg_mr` does.
struct Registered {
    mr: MemoryRegion,
    pin: Pinned,
}

impl App {
    fn connect(dir: &Path) -> App {
        let ctx = Context::open(dir.join("app.sock")).expect("the application's device opens");
        let peer = Context::open(dir.join("peer.sock")).expect("the peer's device opens");
        let (a, b) = rc_pair(&ctx, &peer, PEER_BUF, cap());
        App {
            mem: DeviceMemory::new(ctx.clone()),
            peer_mem: DeviceMemory::new(peer),
            ctx,
            a,
            b,
        }
    }

    /// Pins and registers `len` bytes at `addr` with every access right.
    fn register(&self, addr: u64, len: usize) -> Registered {
        let pin = self
            .mem
            .pin_for(addr, len as u64, all_access())
            .unwrap_or_else(|e| panic!("pin of {len} bytes at {addr:#x}: {e}"));
        let mr = MemoryRegion::register_range(&self.a.pd, addr, len as u64, all_access())
            .unwrap_or_else(|e| panic!("registration of {len} bytes at {addr:#x}: {e}"));
        Registered { mr, pin }
    }

    /// The peer RDMA-WRITEs `data` to `remote` in `mr`; returns the completion status.
    fn peer_writes(&self, mr: &MemoryRegion, remote: u64, data: &[u8]) -> WcStatus {
        self.b.buf.write_at(0, data).expect("the peer's buffer");
        let sge = [Sge::new(
            self.b.buf.addr(),
            data.len() as u32,
            self.b.mr.lkey(),
        )];
        self.b
            .send(&[SendWr::rdma_write(1, &sge, remote, mr.rkey())])
            .expect("post RDMA WRITE");
        self.b.poll_one().status
    }

    /// The peer RDMA-READs `len` bytes at `remote` in `mr`.
    fn peer_reads(&self, mr: &MemoryRegion, remote: u64, len: usize) -> Vec<u8> {
        let sge = [Sge::new(self.b.buf.addr(), len as u32, self.b.mr.lkey())];
        self.b
            .send(&[SendWr::rdma_read(2, &sge, remote, mr.rkey())])
            .expect("post RDMA READ");
        let wc = self.b.poll_one();
        assert_eq!(wc.status, WcStatus::Success, "RDMA READ: {wc:?}");
        let mut out = vec![0u8; len];
        self.b.buf.read_at(0, &mut out).expect("the peer's buffer");
        out
    }

    /// Registers `len` bytes at `addr` and checks both directions: the peer reads what the
    /// application wrote, the application sees what the peer wrote, and neither disturbs a
    /// byte outside. Deregisters before returning, and checks that memory moved onto a memfd
    /// is private again (nothing else may hold it). Returns the `/proc/self/maps` line of
    /// `addr` while it was registered.
    fn round_trip(&self, addr: u64, len: usize, seed: u8) -> String {
        let mine = pattern(len, seed);
        write_bytes(addr, &mine);
        let r = self.register(addr, len);
        let registered = maps_line(addr);
        assert_eq!(
            read_bytes(addr, len),
            mine,
            "sharing kept the buffer's contents"
        );
        assert_eq!(
            self.peer_reads(&r.mr, addr, len),
            mine,
            "the peer reads the app's bytes"
        );
        let theirs = pattern(len, seed.wrapping_add(100));
        assert_eq!(self.peer_writes(&r.mr, addr, &theirs), WcStatus::Success);
        assert_eq!(
            read_bytes(addr, len),
            theirs,
            "the app sees the peer's bytes"
        );
        let (start, end) = r.pin.pages();
        assert!(self.ctx.is_shared(start, end - start));
        drop(r);
        assert!(
            !self.ctx.is_shared(addr, 1),
            "the device no longer reaches the buffer once its last pin is gone"
        );
        assert_eq!(read_bytes(addr, len), theirs, "the app keeps its memory");
        let now = maps_line(addr);
        assert!(
            !now.contains(MOVED),
            "moved memory is private again once its last pin goes: {now}"
        );
        registered
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn write_bytes(addr: u64, data: &[u8]) {
    // SAFETY: the tests only pass addresses of buffers they allocated, `data.len()` long.
    unsafe { ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

fn read_bytes(addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: as in `write_bytes`: a buffer the test allocated, at least `len` long.
    unsafe { ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), len) };
    out
}

/// The `/proc/self/maps` line of the mapping holding `addr`.
fn maps_line(addr: u64) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .find(|l| {
            let (range, _) = l.split_once(' ').unwrap_or_default();
            let (s, e) = range.split_once('-').unwrap_or_default();
            let s = u64::from_str_radix(s, 16).unwrap_or(u64::MAX);
            let e = u64::from_str_radix(e, 16).unwrap_or(0);
            (s..e).contains(&addr)
        })
        .unwrap_or_default()
        .to_owned()
}

const MOVED: &str = "/memfd:vrdma-app-buffer";

/// A private anonymous mapping of `len` bytes with `prot`.
fn map_anonymous(len: usize, prot: i32) -> u64 {
    map_anonymous_at(0, len, prot)
}

/// A private anonymous mapping at `addr` (0: anywhere), which must be free.
fn map_anonymous_at(addr: u64, len: usize, prot: i32) -> u64 {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | if addr != 0 {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
    // SAFETY: a new mapping where nothing is mapped (the kernel's choice, or a free address
    // under MAP_FIXED_NOREPLACE, which never replaces anything).
    let p = unsafe { libc::mmap(addr as *mut c_void, len, prot, flags, -1, 0) };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as u64
}

fn unmap(addr: u64, len: usize) {
    // SAFETY: the tests unmap only mappings they made, once, after their last use.
    assert_eq!(unsafe { libc::munmap(addr as *mut c_void, len) }, 0);
}

/// A new file `buffer` holding `contents`, in a new directory of its own (`tag` in its name),
/// opened read-write: the directory, the file's path and the file.
fn temp_file(tag: &str, contents: &[u8]) -> (std::path::PathBuf, std::path::PathBuf, File) {
    let dir = std::env::temp_dir().join(format!("vrdma-app-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("buffer");
    File::create(&path).unwrap().write_all(contents).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    (dir, path, file)
}

/// Maps `len` bytes of `file` from `offset`, shared and read-write, where the kernel likes.
fn map_shared_file(file: &File, len: usize, offset: usize) -> u64 {
    // SAFETY: a new shared mapping where the kernel likes overlaps nothing.
    let map = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    assert_ne!(
        map,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    map as u64
}

/// Forks a child that runs `body` and exits with 0 if it returned true, 1 if not: its wait
/// status. The child is killed after 20 seconds, should it hang.
fn in_child(body: impl FnOnce() -> bool) -> i32 {
    // SAFETY: the child runs `body`, which the tests keep to memory accesses and calls that
    // take no lock another thread of the parent could hold, and then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: alarm and _exit are async-signal-safe.
        unsafe {
            libc::alarm(20);
            libc::_exit(if body() { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

/// Forks a child that writes a byte at `addr` and exits: its wait status.
fn child_writes(addr: u64) -> i32 {
    in_child(|| {
        // SAFETY: in the child: `addr` is the parent's mapped buffer, or absent (then the
        // store faults, which is what the test looks for).
        unsafe { ptr::write_volatile(addr as *mut u8, b'C') };
        true
    })
}

/// Whether the `len` bytes at `addr` are `expected`, read without allocating (in a child).
fn holds(addr: u64, expected: &[u8]) -> bool {
    // SAFETY: the tests pass buffers they mapped, at least `expected.len()` long.
    (0..expected.len())
        .all(|i| unsafe { ptr::read_volatile((addr as *const u8).add(i)) } == expected[i])
}

/// A 64-byte malloc chunk on the page of `buf` (a fresh, page-aligned small allocation), and
/// the chunks malloc gave before it: the caller frees them all.
fn malloc_on_the_page_of(buf: u64) -> (u64, Vec<u64>) {
    // malloc serves small requests from its bins first: allocate until one lands on the
    // buffer's page (the rest of the page is free, so one soon does).
    let mut others = Vec::new();
    loop {
        // SAFETY: plain allocation, which the caller frees.
        let n = unsafe { libc::malloc(64) } as u64;
        if n / PAGE as u64 == buf / PAGE as u64 {
            return (n, others);
        }
        others.push(n);
        assert!(others.len() < 10_000, "malloc never used the buffer's page");
    }
}

fn killed_by_segv(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV
}

#[test]
fn memalign_and_posix_memalign_buffers_move_onto_a_memfd() {
    isolated(
        "memalign_and_posix_memalign_buffers_move_onto_a_memfd",
        &[],
        |app| {
            // perftest: memalign(page, size); 128 KiB and up comes from an mmapped chunk.
            for len in [4096, 128 << 10, 640 << 10] {
                // SAFETY: plain allocation, freed below.
                let buf = unsafe { libc::memalign(PAGE, len) } as u64;
                assert_ne!(buf, 0);
                let registered = app.round_trip(buf, len, 1);
                assert!(registered.contains(MOVED), "{registered}");
                // SAFETY: allocated above, freed once.
                unsafe { libc::free(buf as *mut c_void) };
            }
            // qperf: posix_memalign(page, size).
            let mut p: *mut c_void = ptr::null_mut();
            // SAFETY: `p` is a valid out-pointer; the buffer is freed below.
            let rc = unsafe { libc::posix_memalign(&mut p, PAGE, 3 * PAGE + 5) };
            assert_eq!(rc, 0);
            app.round_trip(p as u64, 3 * PAGE + 5, 2);
            // SAFETY: allocated above, freed once.
            unsafe { libc::free(p) };
        },
    );
}

#[test]
fn small_malloc_buffers_share_their_page_with_intact_neighbours() {
    isolated(
        "small_malloc_buffers_share_their_page_with_intact_neighbours",
        &[],
        |app| {
            // qperf rc_lat: a one-byte buffer, and malloc's next chunk on the same page.
            let mut p: *mut c_void = ptr::null_mut();
            // SAFETY: `p` is a valid out-pointer; freed below.
            assert_eq!(unsafe { libc::posix_memalign(&mut p, PAGE, 1) }, 0);
            let buf = p as u64;
            let (neighbour, others) = malloc_on_the_page_of(buf);
            write_bytes(neighbour, b"neighbour-data");
            app.round_trip(buf, 1, 3);
            assert_eq!(read_bytes(neighbour, 14), b"neighbour-data");

            // The heap still works around the moved page.
            // SAFETY: allocated above, freed once each; then fresh allocations.
            unsafe {
                for n in others {
                    libc::free(n as *mut c_void);
                }
                libc::free(neighbour as *mut c_void);
                let again = libc::malloc(64);
                libc::free(again);
                libc::free(p);
            }

            // ib_send_bw's credit MR: a small unaligned malloc.
            // SAFETY: plain allocation, freed below.
            let small = unsafe { libc::malloc(24) } as u64;
            assert_ne!(small % PAGE as u64, 0);
            app.round_trip(small, 24, 4);

            // The device is held to the MR's bounds although it maps the whole page. (Last:
            // the refused write puts the peer's QP in the error state.)
            // SAFETY: allocated above, freed once.
            unsafe { libc::free(small as *mut c_void) };
            let page = map_anonymous(PAGE, libc::PROT_READ | libc::PROT_WRITE);
            write_bytes(page + 124, b"after");
            let r = app.register(page + 100, 24);
            let status = app.peer_writes(&r.mr, page + 100, &[b'X'; 25]);
            assert_eq!(
                status,
                WcStatus::RemAccessErr,
                "a write past the MR is refused"
            );
            assert_eq!(read_bytes(page + 124, 5), b"after");
            drop(r);
            unmap(page, PAGE);
        },
    );
}

#[test]
fn anonymous_mappings_move_and_keep_their_protection() {
    isolated(
        "anonymous_mappings_move_and_keep_their_protection",
        &[],
        |app| {
            let len = 3 * PAGE;
            let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
            // A range starting and ending inside pages.
            let registered = app.round_trip(buf + 100, len - 300, 5);
            assert!(registered.contains(MOVED), "{registered}");
            assert!(registered.contains(" rw-s "), "{registered}");
            assert!(maps_line(buf).contains(" rw-p "), "{}", maps_line(buf));
            unmap(buf, len);

            // Read-only memory: an MR without write access works; with it, EFAULT.
            let ro = map_anonymous(PAGE, libc::PROT_READ);
            let err = app
                .mem
                .pin_for(ro, 64, AccessFlags::LOCAL_WRITE)
                .unwrap_err();
            assert_eq!(err.errno(), libc::EFAULT, "{err}");
            let pin = app.mem.pin_for(ro, 64, AccessFlags::REMOTE_READ).unwrap();
            let mr =
                MemoryRegion::register_range(&app.a.pd, ro, 64, AccessFlags::REMOTE_READ).unwrap();
            assert_eq!(app.peer_reads(&mr, ro, 64), vec![0u8; 64]);
            assert!(maps_line(ro).contains(" r--s "), "{}", maps_line(ro));
            drop(mr);
            drop(pin);
            assert!(maps_line(ro).contains(" r--p "), "{}", maps_line(ro));
            unmap(ro, PAGE);
        },
    );
}

#[test]
fn overlapping_and_repeated_pins_share_pieces_until_the_last_goes() {
    isolated(
        "overlapping_and_repeated_pins_share_pieces_until_the_last_goes",
        &[],
        |app| {
            let len = 4 * PAGE;
            let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
            let page = PAGE as u64;
            let data = pattern(len, 6);
            write_bytes(buf, &data);

            let first = app.mem.pin(buf, 2 * page).unwrap();
            assert_eq!(first.pieces(), 1);
            // Half already shared, half not: the new half becomes a second piece.
            let second = app.mem.pin(buf + page, 3 * page).unwrap();
            assert_eq!(second.pieces(), 2);
            assert_eq!(read_bytes(buf, len), data);
            // One MR over both pieces (two regions of the device): its pages come from both.
            let start = buf + page + 100;
            let mr_len = 3 * PAGE - 200;
            let mr = MemoryRegion::register_range(&app.a.pd, start, mr_len as u64, all_access())
                .expect("an MR over two adjacent regions");
            assert_eq!(
                app.peer_reads(&mr, start, mr_len),
                data[PAGE + 100..len - 100]
            );
            let across = pattern(2 * PAGE, 7);
            let at = buf + 2 * page - 1000;
            assert_eq!(app.peer_writes(&mr, at, &across), WcStatus::Success);
            assert_eq!(
                read_bytes(at, 2 * PAGE),
                across,
                "a WRITE across the boundary"
            );

            // The same range again reuses the piece.
            let again = app.mem.pin(buf, 2 * page).unwrap();
            assert_eq!(again.pieces(), 1);
            drop(first);
            assert!(
                app.ctx.is_shared(buf, len as u64),
                "every piece is still held"
            );
            assert_eq!(app.peer_writes(&mr, start, b"still"), WcStatus::Success);
            assert_eq!(read_bytes(start, 5), b"still");
            drop(mr);
            drop(second);
            assert!(
                app.ctx.is_shared(buf, 2 * page),
                "`again` holds the first piece"
            );
            assert!(
                !app.ctx.is_shared(buf + 2 * page, 1),
                "the second piece went with its last pin"
            );
            drop(again);
            assert!(!app.ctx.is_shared(buf, 1));

            // Unpinned memory stays the application's, and can be pinned again.
            let now = read_bytes(buf, len);
            assert_eq!(&now[2 * PAGE - 1000..4 * PAGE - 1000], &across[..]);
            app.round_trip(buf, len, 8);
            unmap(buf, len);
        },
    );
}

#[test]
fn a_freed_and_reused_address_is_shared_afresh() {
    isolated("a_freed_and_reused_address_is_shared_afresh", &[], |app| {
        let len = 2 * PAGE;
        let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
        write_bytes(buf, &pattern(len, 9));
        // The peer's device keeps the old pages registered (an MR not deregistered yet).
        let held_by_peer = app.peer_mem.pin(buf, len as u64).unwrap();
        // The application frees the buffer and gets fresh memory at the same address.
        unmap(buf, len);
        assert_eq!(
            map_anonymous_at(buf, len, libc::PROT_READ | libc::PROT_WRITE),
            buf
        );
        assert!(!maps_line(buf).contains(MOVED), "{}", maps_line(buf));
        let fresh = pattern(len, 10);
        write_bytes(buf, &fresh);
        // Where the old pages are still registered, the new ones cannot be, and are left
        // as they are.
        let err = app.peer_mem.pin(buf, len as u64).unwrap_err();
        assert!(
            matches!(err, AppMemoryError::StillRegistered { .. }),
            "{err}"
        );
        assert!(!maps_line(buf).contains(MOVED), "{}", maps_line(buf));
        assert_eq!(read_bytes(buf, len), fresh);
        // The old piece must not be reused: the device would see the old pages.
        let r = app.register(buf, len);
        assert_eq!(app.peer_reads(&r.mr, buf, len), fresh);
        assert_eq!(app.peer_writes(&r.mr, buf + 10, b"new"), WcStatus::Success);
        assert_eq!(read_bytes(buf + 10, 3), b"new");
        // Where the old pages are still registered, the new ones cannot be.
        let err = app.peer_mem.pin(buf, len as u64).unwrap_err();
        assert!(
            matches!(err, AppMemoryError::StillRegistered { .. }),
            "{err}"
        );
        assert_eq!(err.errno(), libc::EBUSY);
        drop(held_by_peer);
        let peer_pin = app.peer_mem.pin(buf, len as u64).unwrap();
        drop(peer_pin);
        drop(r);
        unmap(buf, len);

        // The same through malloc: a large chunk is unmapped by free, and a new one usually
        // comes back at the same address as fresh anonymous memory.
        let big = 256 << 10;
        // SAFETY: plain allocation, freed below.
        let p = unsafe { libc::memalign(PAGE, big) } as u64;
        app.round_trip(p, big, 11);
        // SAFETY: allocated above, freed once.
        unsafe { libc::free(p as *mut c_void) };
        // SAFETY: plain allocation, freed below.
        let q = unsafe { libc::memalign(PAGE, big) } as u64;
        if q == p {
            assert!(!maps_line(q).contains(MOVED), "{}", maps_line(q));
        }
        app.round_trip(q, big, 12);
        // SAFETY: allocated above, freed once.
        unsafe { libc::free(q as *mut c_void) };
    });
}

#[test]
fn a_shared_file_mapping_is_shared_by_its_file() {
    isolated("a_shared_file_mapping_is_shared_by_its_file", &[], |app| {
        let contents = pattern(3 * PAGE, 13);
        let (dir, path, file) = temp_file("file", &contents);
        // Pages 1 and 2 of the file.
        let map = map_shared_file(&file, 2 * PAGE, PAGE);
        let r = app.register(map + 100, 2 * PAGE - 200);
        let line = maps_line(map);
        assert!(line.contains(path.to_str().unwrap()), "not moved: {line}");
        assert_eq!(
            app.peer_reads(&r.mr, map + 100, 2 * PAGE - 200),
            contents[PAGE + 100..3 * PAGE - 100],
            "the device maps the file at the mapping's offset"
        );
        assert_eq!(
            app.peer_writes(&r.mr, map + 5000, b"device wrote this"),
            WcStatus::Success
        );
        assert_eq!(read_bytes(map + 5000, 17), b"device wrote this");
        let mut in_file = [0u8; 17];
        file.read_exact_at(&mut in_file, (PAGE + 5000) as u64)
            .unwrap();
        assert_eq!(
            &in_file, b"device wrote this",
            "the file has the device's write"
        );
        drop(r);
        assert!(!app.ctx.is_shared(map, 1));

        // Past the end of the file there is no memory.
        let long = map_shared_file(&file, 5 * PAGE, 0);
        let err = app.mem.pin(long, 4 * PAGE as u64).unwrap_err();
        assert!(matches!(err, AppMemoryError::PastEndOfFile { .. }), "{err}");
        assert_eq!(err.errno(), libc::EFAULT);
        app.round_trip(long, 3 * PAGE, 14);
        unmap(long, 5 * PAGE);
        unmap(map, 2 * PAGE);
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

#[test]
fn sysv_and_shared_anonymous_memory_are_shared_by_their_files() {
    isolated(
        "sysv_and_shared_anonymous_memory_are_shared_by_their_files",
        &[],
        |app| {
            let len = 64 << 10;
            // perftest --use_hugepages, without huge pages: shmget + shmat + IPC_RMID.
            // SAFETY: plain SysV calls; the segment is detached below.
            let shm = unsafe {
                let id = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
                assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
                let at = libc::shmat(id, ptr::null(), 0);
                assert_ne!(at as isize, -1);
                libc::shmctl(id, libc::IPC_RMID, ptr::null_mut());
                at as u64
            };
            let registered = app.round_trip(shm + 8, len - 16, 15);
            assert!(registered.contains("/SYSV"), "{registered}");
            assert!(maps_line(shm).contains("/SYSV"), "{}", maps_line(shm));
            // SAFETY: the segment attached above; shmdt still finds it (it was not replaced).
            assert_eq!(unsafe { libc::shmdt(shm as *const c_void) }, 0);

            // perftest --use_hugepages proper: SHM_HUGETLB, where the system has huge pages.
            let huge = 2 << 20;
            // SAFETY: a plain SysV call.
            let id = unsafe {
                libc::shmget(
                    libc::IPC_PRIVATE,
                    huge,
                    libc::IPC_CREAT | libc::SHM_HUGETLB | 0o600,
                )
            };
            if id < 0 {
                eprintln!("no huge pages on this system: SHM_HUGETLB segments not checked");
            } else {
                // SAFETY: attaches the segment just made; detached below.
                let at = unsafe {
                    let at = libc::shmat(id, ptr::null(), 0);
                    libc::shmctl(id, libc::IPC_RMID, ptr::null_mut());
                    at as u64
                };
                assert_ne!(at as i64, -1);
                // A few pages inside: the device gets the whole huge page (its file maps no
                // less).
                let pin = app.mem.pin(at + 4096, 8192).unwrap();
                assert_eq!(pin.pages(), (at + 4096, at + 3 * 4096));
                assert!(app.ctx.is_shared(at, huge as u64));
                drop(pin);
                app.round_trip(at + 4096, 8192, 24);
                // SAFETY: the segment attached above.
                assert_eq!(unsafe { libc::shmdt(at as *const c_void) }, 0);
            }

            // SAFETY: a new shared anonymous mapping; unmapped below.
            let shared = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            } as u64;
            app.round_trip(shared, len, 16);
            assert!(
                maps_line(shared).contains("/dev/zero (deleted)"),
                "{}",
                maps_line(shared)
            );
            unmap(shared, len);
        },
    );
}

#[test]
fn two_devices_register_the_same_piece() {
    isolated("two_devices_register_the_same_piece", &[], |app| {
        let len = 2 * PAGE;
        let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
        let data = pattern(PAGE, 17);
        write_bytes(buf, &data);
        let on_app = app.register(buf, len);
        let on_peer = app.peer_mem.pin_for(buf, len as u64, all_access()).unwrap();
        assert_eq!(on_peer.pieces(), 1);
        let peer_mr = MemoryRegion::register_range(&app.b.pd, buf, len as u64, all_access())
            .expect("the peer's device registers the same memory");
        // The peer copies the first page into the second through the devices: its local
        // SGE is the memory on its device, the target the same memory on the app's.
        let sge = [Sge::new(buf, PAGE as u32, peer_mr.lkey())];
        // SAFETY: the SGE names the pinned buffer, which stays mapped until after the poll.
        unsafe {
            app.b
                .qp
                .post_send(&[SendWr::rdma_write(
                    3,
                    &sge,
                    buf + PAGE as u64,
                    on_app.mr.rkey(),
                )])
                .unwrap();
        }
        let wc = app.b.poll_one();
        assert_eq!(wc.status, WcStatus::Success, "{wc:?}");
        assert_eq!(read_bytes(buf + PAGE as u64, PAGE), data);
        drop(peer_mr);
        drop(on_peer);
        assert!(
            app.ctx.is_shared(buf, len as u64),
            "the app's device keeps it"
        );
        drop(on_app);
        assert!(!app.ctx.is_shared(buf, 1));
        unmap(buf, len);
    });
}

#[test]
fn pins_from_many_threads_on_two_devices_are_counted_exactly() {
    isolated(
        "pins_from_many_threads_on_two_devices_are_counted_exactly",
        &[],
        |app| {
            let len = 8 * PAGE;
            let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let app = &*app;
                    s.spawn(move || {
                        let mem = if t % 2 == 0 { &app.mem } else { &app.peer_mem };
                        for i in 0..50u64 {
                            let off = ((t + i) % 5) * PAGE as u64 + 7;
                            let pin = mem.pin(buf + off, 3 * PAGE as u64).unwrap();
                            assert!(mem.context().is_shared(buf + off, 3 * PAGE as u64));
                            drop(pin);
                        }
                    });
                }
            });
            assert!(!app.ctx.is_shared(buf, 1), "every pin was released");
            app.round_trip(buf, len, 18);
            unmap(buf, len);
        },
    );
}

#[test]
fn memory_that_cannot_be_shared_gets_ibv_reg_mr_errnos() {
    isolated(
        "memory_that_cannot_be_shared_gets_ibv_reg_mr_errnos",
        &[],
        |app| {
            let errno = |addr: u64, len: u64| {
                let err = app.mem.pin(addr, len).unwrap_err();
                (err.errno(), err)
            };
            // PROT_NONE (guard pages).
            let none = map_anonymous(PAGE, libc::PROT_NONE);
            let (e, err) = errno(none, 1);
            assert_eq!(e, libc::EFAULT, "{err}");
            assert!(matches!(err, AppMemoryError::Protection { .. }), "{err}");
            unmap(none, PAGE);

            // A hole in the range.
            let three = map_anonymous(3 * PAGE, libc::PROT_READ | libc::PROT_WRITE);
            unmap(three + PAGE as u64, PAGE);
            let (e, err) = errno(three, 3 * PAGE as u64);
            assert_eq!(e, libc::EFAULT, "{err}");
            assert!(
                matches!(err, AppMemoryError::Unmapped { hole, .. } if hole == three + PAGE as u64),
                "{err}"
            );
            // Nothing was left behind: the first page was not registered for the failed pin.
            assert!(!app.ctx.is_shared(three, 1));
            // Memory never mapped.
            let (e, _) = errno(three + PAGE as u64 + 8, 8);
            assert_eq!(e, libc::EFAULT);
            unmap(three, PAGE);
            unmap(three + 2 * PAGE as u64, PAGE);

            // No length, or a range around the end of the address space.
            assert_eq!(errno(0x10000, 0).0, libc::EINVAL);
            assert_eq!(errno(u64::MAX - 10, 100).0, libc::EINVAL);

            // The kernel's vDSO.
            // SAFETY: getauxval only reads the auxiliary vector.
            let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
            if vdso != 0 {
                let (e, err) = errno(vdso, 16);
                assert_eq!(e, libc::EFAULT, "{err}");
            }

            // The calling thread's own stack.
            let on_stack = [0u8; 64];
            let (e, err) = errno(on_stack.as_ptr() as u64, 64);
            assert_eq!(e, libc::EINVAL, "{err}");
            assert!(matches!(err, AppMemoryError::CallerStack { .. }), "{err}");

            // Private huge pages, where the system has any to give.
            // SAFETY: a new mapping where the kernel likes; unmapped below if made.
            let huge = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    2 << 20,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                    -1,
                    0,
                )
            };
            if huge == libc::MAP_FAILED {
                eprintln!("no huge pages on this system: private huge pages not checked");
            } else {
                let (e, err) = errno(huge as u64, 4096);
                assert_eq!(e, libc::EINVAL, "{err}");
                assert!(
                    matches!(err, AppMemoryError::PrivateHugePages { .. }),
                    "{err}"
                );
                unmap(huge as u64, 2 << 20);
            }

            // A private mapping of /dev/zero is anonymous memory, and fine.
            let zero = File::open("/dev/zero").unwrap();
            // SAFETY: a new private mapping where the kernel likes; unmapped below.
            let z = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    zero.as_raw_fd(),
                    0,
                )
            } as u64;
            app.round_trip(z, PAGE, 19);
            unmap(z, PAGE);
        },
    );
}

#[test]
fn fork_init_keeps_registered_pages_out_of_children() {
    isolated(
        "fork_init_keeps_registered_pages_out_of_children",
        &[],
        |app| {
            let buf = map_anonymous(PAGE, libc::PROT_READ | libc::PROT_WRITE);
            write_bytes(buf, b"P");
            let r = app.register(buf, 1);
            assert!(!app_memory::is_fork_safe());
            // Without fork safety a child gets its own copy of the page, as with libibverbs
            // (there copy-on-write): its write does not reach the parent.
            assert_eq!(child_writes(buf), 0);
            assert_eq!(read_bytes(buf, 1), b"P");

            assert_eq!(app_memory::fork_init(), 0);
            assert!(app_memory::is_fork_safe());
            // Pages registered before are covered too.
            assert!(killed_by_segv(child_writes(buf)));
            drop(r);
            // Unpinned, the page is inherited again, as private memory.
            assert_eq!(child_writes(buf), 0);
            assert_eq!(read_bytes(buf, 1), b"P");
            let again = app.register(buf, 1);
            assert!(killed_by_segv(child_writes(buf)));
            // Two pins over the page: it stays out of children until both are gone.
            let second = app.mem.pin(buf, 8).unwrap();
            drop(again);
            assert!(killed_by_segv(child_writes(buf)));
            drop(second);
            assert_eq!(child_writes(buf), 0);
            assert_eq!(read_bytes(buf, 1), b"P");
            assert_eq!(app_memory::fork_init(), 0, "a second call is harmless");
            unmap(buf, PAGE);
        },
    );
}

#[test]
fn rdmav_fork_safe_turns_fork_safety_on_from_the_start() {
    isolated(
        "rdmav_fork_safe_turns_fork_safety_on_from_the_start",
        &[("RDMAV_FORK_SAFE", "1")],
        |app| {
            assert!(app_memory::is_fork_safe());
            let buf = map_anonymous(PAGE, libc::PROT_READ | libc::PROT_WRITE);
            let r = app.register(buf, PAGE);
            assert!(killed_by_segv(child_writes(buf)));
            drop(r);
            assert_eq!(child_writes(buf), 0);
            assert_eq!(read_bytes(buf, 1), [0]);
            unmap(buf, PAGE);
        },
    );
}

/// Drops `CAP_SYS_ADMIN` and `CAP_CHECKPOINT_RESTORE` from the calling thread, which
/// `/proc/self/map_files` needs, as for an unprivileged program.
fn drop_map_files_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_CHECKPOINT_RESTORE: u32 = 40;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills the two-element data array a version-3 header asks for.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    for cap in [CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE] {
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
    }
    // SAFETY: capset reads the header and the two-element array; it changes only this
    // thread's capabilities.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

#[test]
fn without_map_files_files_are_found_by_path_and_memfds_moved_again() {
    isolated(
        "without_map_files_files_are_found_by_path_and_memfds_moved_again",
        &[],
        |app| {
            drop_map_files_capabilities();
            let buf = map_anonymous(2 * PAGE, libc::PROT_READ | libc::PROT_WRITE);
            let link = format!("/proc/self/map_files/{:x}-{:x}", buf, buf + 2 * PAGE as u64);
            assert!(
                std::fs::metadata(&link).is_err(),
                "map_files must be out of reach for this test"
            );

            // Private memory is moved onto a memfd each time it is registered afresh (it is
            // moved back in between).
            let before = app.round_trip(buf, 2 * PAGE, 20);
            assert!(before.contains(MOVED), "{before}");
            let after = app.round_trip(buf + 10, 2 * PAGE - 20, 21);
            assert!(after.contains(MOVED), "{after}");
            assert_ne!(before, after, "a new memfd (another inode)");
            unmap(buf, 2 * PAGE);

            // A file mapping is found by its path.
            let (dir, path, file) = temp_file("nocap", &pattern(2 * PAGE, 22));
            let map = map_shared_file(&file, 2 * PAGE, 0);
            app.round_trip(map, 2 * PAGE, 23);
            let mut in_file = vec![0u8; 2 * PAGE];
            file.read_exact_at(&mut in_file, 0).unwrap();
            assert_eq!(
                in_file,
                pattern(2 * PAGE, 123),
                "the peer's write is in the file"
            );
            // Once the path no longer leads to it, the file cannot be found.
            std::fs::remove_file(&path).unwrap();
            let err = app.mem.pin(map, 16).unwrap_err();
            assert!(
                matches!(err, AppMemoryError::FileUnavailable { .. }),
                "{err}"
            );
            assert_eq!(err.errno(), libc::EACCES);
            unmap(map, 2 * PAGE);
            std::fs::remove_dir_all(&dir).unwrap();

            // SysV shared memory has no path at all.
            // SAFETY: plain SysV calls; the segment is detached below.
            let shm = unsafe {
                let id = libc::shmget(libc::IPC_PRIVATE, 4 * PAGE, libc::IPC_CREAT | 0o600);
                assert!(id >= 0);
                let at = libc::shmat(id, ptr::null(), 0);
                libc::shmctl(id, libc::IPC_RMID, ptr::null_mut());
                at as u64
            };
            let err = app.mem.pin(shm, 16).unwrap_err();
            assert!(
                matches!(err, AppMemoryError::FileUnavailable { .. }),
                "{err}"
            );
            // SAFETY: the segment attached above.
            assert_eq!(unsafe { libc::shmdt(shm as *const c_void) }, 0);
        },
    );
}

#[test]
fn moved_memory_is_private_again_once_its_last_pin_goes() {
    isolated(
        "moved_memory_is_private_again_once_its_last_pin_goes",
        &[],
        |app| {
            let len = 3 * PAGE;
            let page = PAGE as u64;
            let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
            let data = pattern(len, 30);
            write_bytes(buf, &data);
            let r = app.register(buf + 100, len - 200);
            assert!(maps_line(buf).contains(MOVED), "{}", maps_line(buf));
            assert_eq!(
                app.peer_writes(&r.mr, buf + page, b"peer"),
                WcStatus::Success
            );
            drop(r);
            let line = maps_line(buf);
            assert!(!line.contains(MOVED) && line.contains(" rw-p "), "{line}");
            let mut expected = data.clone();
            expected[PAGE..PAGE + 4].copy_from_slice(b"peer");
            assert_eq!(read_bytes(buf, len), expected, "the contents stay");

            // Allocators count on private anonymous pages reading back as zeros after
            // MADV_DONTNEED (calloc of memory glibc trimmed from an arena, jemalloc's
            // purge); a shared memfd would keep its contents.
            // SAFETY: the test's own mapping; it holds no Rust object.
            let rc = unsafe { libc::madvise(buf as *mut c_void, len, libc::MADV_DONTNEED) };
            assert_eq!(rc, 0);
            assert_eq!(read_bytes(buf, len), vec![0u8; len]);

            // A forked child gets a copy again.
            write_bytes(buf, b"P");
            assert_eq!(child_writes(buf), 0);
            assert_eq!(read_bytes(buf, 1), b"P");

            // The protection the program set meanwhile stays, PROT_NONE included (the pages
            // are copied through the memfd, not through the program's mapping).
            write_bytes(buf + 2 * page, b"last page");
            let r = app.register(buf, len);
            let protect = |addr: u64, prot: i32| {
                // SAFETY: the test's own mapping; it holds no Rust object.
                let rc = unsafe { libc::mprotect(addr as *mut c_void, PAGE, prot) };
                assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
            };
            protect(buf, libc::PROT_NONE);
            protect(buf + page, libc::PROT_READ);
            drop(r);
            for (addr, perms) in [
                (buf, " ---p "),
                (buf + page, " r--p "),
                (buf + 2 * page, " rw-p "),
            ] {
                let line = maps_line(addr);
                assert!(!line.contains(MOVED) && line.contains(perms), "{line}");
            }
            protect(buf, libc::PROT_READ | libc::PROT_WRITE);
            protect(buf + page, libc::PROT_READ | libc::PROT_WRITE);
            assert_eq!(read_bytes(buf, 1), b"P");
            assert_eq!(read_bytes(buf + 2 * page, 9), b"last page");
            unmap(buf, len);

            // Moved elsewhere while registered (realloc of a large chunk uses mremap): private
            // again where it is now.
            let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
            write_bytes(buf, &data);
            let r = app.register(buf, len);
            // SAFETY: moves the test's own mapping; the old address is not used again.
            let to =
                unsafe { libc::mremap(buf as *mut c_void, len, 2 * len, libc::MREMAP_MAYMOVE) };
            assert_ne!(to, libc::MAP_FAILED);
            let to = to as u64;
            assert!(maps_line(to).contains(MOVED), "{}", maps_line(to));
            // It is the registered memfd, so it is registered as that, where it has pages.
            let again = app.peer_mem.pin(to, len as u64).unwrap();
            assert!(maps_line(to).contains(MOVED), "{}", maps_line(to));
            let err = app.peer_mem.pin(to, 2 * len as u64).unwrap_err();
            assert!(matches!(err, AppMemoryError::PastEndOfFile { .. }), "{err}");
            drop(again);
            drop(r);
            let line = maps_line(to);
            assert!(!line.contains(MOVED) && line.contains(" rw-p "), "{line}");
            assert_eq!(read_bytes(to, len), data);
            // The grown part lay past the memfd's end (touching it was SIGBUS); now it is
            // fresh memory.
            assert_eq!(read_bytes(to + len as u64, len), vec![0u8; len]);
            unmap(to, 2 * len);
        },
    );
}

#[test]
fn a_forked_child_gets_copies_of_registered_memory() {
    isolated(
        "a_forked_child_gets_copies_of_registered_memory",
        &[],
        |app| {
            let len = 2 * PAGE;
            let buf = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE);
            let data = pattern(len, 31);
            write_bytes(buf, &data);
            let r = app.register(buf, len);
            // A heap page, shared by the registered buffer and malloc's other chunks.
            let mut p: *mut c_void = ptr::null_mut();
            // SAFETY: `p` is a valid out-pointer; freed below.
            assert_eq!(unsafe { libc::posix_memalign(&mut p, PAGE, 64) }, 0);
            let small = p as u64;
            let (neighbour, others) = malloc_on_the_page_of(small);
            write_bytes(small, b"small buffer");
            write_bytes(neighbour, b"neighbour");
            let on_heap = app.register(small, 64);
            assert!(maps_line(small).contains(MOVED), "{}", maps_line(small));

            let status = in_child(|| {
                let saw_parents = holds(buf, &data)
                    && holds(small, b"small buffer")
                    && holds(neighbour, b"neighbour");
                // SAFETY: the child's copies of the buffers.
                unsafe {
                    ptr::write_bytes(buf as *mut u8, b'C', len);
                    ptr::write_bytes(neighbour as *mut u8, b'C', 64);
                }
                // The registry's lock is free in the child.
                saw_parents && !app_memory::is_fork_safe()
            });
            assert_eq!(status, 0, "the child saw its parent's memory");
            assert_eq!(
                read_bytes(buf, len),
                data,
                "the child's writes stay in the child"
            );
            assert_eq!(
                read_bytes(neighbour, 9),
                b"neighbour",
                "the child's heap is its own"
            );

            // The parent's pages are still the device's.
            assert_eq!(
                app.peer_writes(&r.mr, buf + 10, b"device"),
                WcStatus::Success
            );
            assert_eq!(read_bytes(buf + 10, 6), b"device");
            assert_eq!(app.peer_reads(&on_heap.mr, small, 12), b"small buffer");
            drop(on_heap);
            drop(r);
            // SAFETY: allocated above, freed once each.
            unsafe {
                libc::free(neighbour as *mut c_void);
                for n in others {
                    libc::free(n as *mut c_void);
                }
                libc::free(p);
            }
            unmap(buf, len);
        },
    );
}

#[test]
fn pages_of_a_registered_memfd_are_never_moved_again() {
    isolated(
        "pages_of_a_registered_memfd_are_never_moved_again",
        &[],
        |app| {
            // Without /proc/self/map_files a memfd cannot be reopened by its mapping: the
            // way its pages used to be moved onto a new one.
            drop_map_files_capabilities();
            let page = PAGE as u64;
            let buf = map_anonymous(3 * PAGE, libc::PROT_READ | libc::PROT_WRITE);
            write_bytes(buf, &pattern(3 * PAGE, 40));
            let r = app.register(buf, 3 * PAGE);
            let inode = |addr: u64| {
                let line = maps_line(addr);
                assert!(line.contains(MOVED), "{line}");
                line.split_whitespace()
                    .nth(4)
                    .unwrap_or_default()
                    .to_owned()
            };
            let memfd = inode(buf);
            let last = buf + 2 * page;
            // The program unmaps the middle page only; the MR stays.
            unmap(buf + page, PAGE);

            // On the same device the last page cannot be registered anew (its old pages
            // are, under the MR), and it is left as it is.
            let err = app.mem.pin(last, 16).unwrap_err();
            assert!(
                matches!(err, AppMemoryError::StillRegistered { .. }),
                "{err}"
            );
            assert_eq!(inode(last), memfd, "nothing was moved");
            // On another device it is registered as the same memfd.
            let on_peer = app
                .peer_mem
                .pin_for(last, page, all_access())
                .expect("the peer's device registers the page");
            assert_eq!(inode(last), memfd, "nothing was moved");
            // The MR and the program still see the same pages.
            assert_eq!(
                app.peer_writes(&r.mr, last, b"through the MR"),
                WcStatus::Success
            );
            assert_eq!(read_bytes(last, 14), b"through the MR");
            write_bytes(last + 100, b"app");
            assert_eq!(app.peer_reads(&r.mr, last + 100, 3), b"app");

            // The MR's piece holds the memfd: the other pin's going does not move it.
            drop(on_peer);
            assert_eq!(inode(last), memfd);
            assert_eq!(app.peer_writes(&r.mr, buf, b"first"), WcStatus::Success);
            drop(r);
            // Nothing registers the memfd now: what is left of it is private again.
            for addr in [buf, last] {
                let line = maps_line(addr);
                assert!(!line.contains(MOVED) && line.contains(" rw-p "), "{line}");
            }
            assert_eq!(read_bytes(buf, 5), b"first");
            assert_eq!(read_bytes(last, 14), b"through the MR");
            assert_eq!(read_bytes(last + 100, 3), b"app");
            unmap(buf, PAGE);
            unmap(last, PAGE);
        },
    );
}
