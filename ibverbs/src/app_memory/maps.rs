//! This process's mappings as `/proc/self/maps` lists them.
//!
//! Read afresh on every pin: nothing about an address is cached, because the application can
//! unmap a buffer (`free` of a large chunk does) and get fresh memory at the same address at
//! any time.

use std::io;

/// One mapping (a VMA). `P` is how its path is held: owned, or borrowed from the text it was
/// parsed from ([`for_each`], which allocates nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Vma<P = String> {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `PROT_READ`.
    pub read: bool,
    /// `PROT_WRITE`.
    pub write: bool,
    /// `PROT_EXEC`.
    pub exec: bool,
    /// `MAP_SHARED` (`s`), as opposed to private copy-on-write (`p`).
    pub shared: bool,
    /// Offset in the file of `start` (in bytes).
    pub offset: u64,
    /// The file's device, major and minor (0:0 for anonymous memory).
    pub dev: (u32, u32),
    /// The file's inode (0 for anonymous memory, and for SysV shared memory).
    pub inode: u64,
    /// The file's path, or a pseudo-name such as `[heap]`; empty for anonymous memory.
    /// Deleted files end in ` (deleted)`.
    pub path: P,
}

impl<P> Vma<P> {
    /// The `mmap` protection bits.
    pub fn prot(&self) -> i32 {
        let mut prot = libc::PROT_NONE;
        if self.read {
            prot |= libc::PROT_READ;
        }
        if self.write {
            prot |= libc::PROT_WRITE;
        }
        if self.exec {
            prot |= libc::PROT_EXEC;
        }
        prot
    }

    /// The file offset of address `addr` of the mapping.
    pub fn offset_of(&self, addr: u64) -> u64 {
        self.offset + (addr - self.start)
    }

    /// Whether `addr` lies in the mapping.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// Whether the mapping and `start..end` share a byte.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

impl Vma<&str> {
    /// The mapping with its path copied.
    pub fn to_owned(&self) -> Vma {
        Vma {
            start: self.start,
            end: self.end,
            read: self.read,
            write: self.write,
            exec: self.exec,
            shared: self.shared,
            offset: self.offset,
            dev: self.dev,
            inode: self.inode,
            path: self.path.to_owned(),
        }
    }
}

impl Vma {
    /// Whether a file backs the mapping (anonymous memory has neither device nor inode; SysV
    /// shared memory has an inode of 0 but a path).
    pub fn is_file(&self) -> bool {
        self.inode != 0 || self.path.starts_with('/')
    }

    /// Whether the mapping is one of the kernel's own (`[vdso]`, `[vvar]`, `[vsyscall]`, ...)
    /// rather than memory: `[heap]`, `[stack]` and named anonymous memory are memory.
    pub fn is_special(&self) -> bool {
        let Some(name) = self.path.strip_prefix('[') else {
            return false;
        };
        !(name.starts_with("heap]")
            || name.starts_with("stack")
            || name.starts_with("anon:")
            || name.starts_with("anon_shmem:"))
    }

    /// `/proc/self/map_files/<start>-<end>`: the file of this mapping, to open.
    pub fn map_files_path(&self) -> String {
        format!("/proc/self/map_files/{:x}-{:x}", self.start, self.end)
    }
}

/// The mappings that overlap `start..end`, in address order.
pub(crate) fn overlapping(start: u64, end: u64) -> io::Result<Vec<Vma>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(parse(&text).filter(|v| v.overlaps(start, end)).collect())
}

/// The shared mappings of the file `dev`:`inode`, anywhere in the address space, in address
/// order.
pub(crate) fn of_file(dev: (u32, u32), inode: u64) -> io::Result<Vec<Vma>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(parse(&text)
        .filter(|v| v.shared && v.dev == dev && v.inode == inode)
        .collect())
}

/// Every mapping in `maps` text; lines that do not parse are skipped.
pub(crate) fn parse(text: &str) -> impl Iterator<Item = Vma> + '_ {
    text.lines().filter_map(parse_line).map(|v| v.to_owned())
}

/// The longest `/proc/self/maps` line [`for_each`] reads: the fields take under 80 bytes, a
/// path at most `PATH_MAX` (4096) plus ` (deleted)`.
const MAX_LINE: usize = 4352;

/// Calls `f` with each mapping of this process, in address order, reading `/proc/self/maps`
/// in pieces through a buffer on the stack: it allocates nothing and takes no lock, so a
/// child can call it between `fork` and `exec` (its `fork` handler does). `f` may change the
/// mappings it has been shown (the kernel continues after the last mapping it printed).
/// Lines longer than [`MAX_LINE`] (none are) are skipped.
pub(crate) fn for_each(f: impl FnMut(&Vma<&str>)) -> io::Result<()> {
    // SAFETY: a NUL-terminated literal path; the flags ask for a plain read-only descriptor.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let read = |buf: &mut [u8]| loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let result = for_each_line(read, f);
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::close(fd) };
    result
}

/// [`for_each`] over the text `read` produces (`Ok(0)` at its end).
fn for_each_line(
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    mut f: impl FnMut(&Vma<&str>),
) -> io::Result<()> {
    let mut buf = [0u8; 2 * MAX_LINE];
    // Bytes of an incomplete line kept at the start of `buf`.
    let mut kept = 0usize;
    // Skipping the rest of a line too long for the buffer.
    let mut skipping = false;
    loop {
        let n = read(&mut buf[kept..])?;
        if n == 0 {
            return Ok(());
        }
        let filled = kept + n;
        let mut line_start = 0usize;
        while let Some(pos) = buf[line_start..filled].iter().position(|&b| b == b'\n') {
            let line = &buf[line_start..line_start + pos];
            line_start += pos + 1;
            if std::mem::take(&mut skipping) {
                continue;
            }
            if let Some(vma) = std::str::from_utf8(line).ok().and_then(parse_line) {
                f(&vma);
            }
        }
        kept = filled - line_start;
        if kept > MAX_LINE {
            skipping = true;
            kept = 0;
        } else {
            buf.copy_within(line_start..filled, 0);
        }
    }
}

/// One line: `start-end perms offset major:minor inode   path`.
fn parse_line(line: &str) -> Option<Vma<&str>> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    if perms.len() != 4 {
        return None;
    }
    let vma = Vma {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
        path,
    };
    (vma.start < vma.end).then_some(vma)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
555cc4333000-555cc4354000 rw-p 00000000 00:00 0                          [heap]
7f3a64f73000-7f3a64f83000 rw-s 00000000 00:01 0                          /SYSV00000000 (deleted)
7f3a6515b000-7f3a65168000 rw-p 00000000 00:00 0 
7f3a6516c000-7f3a6516e000 ---p 00000000 00:00 0 
7f3a6516e000-7f3a65170000 rw-p 00000000 00:06 4                          /dev/zero
7f3a65170000-7f3a65172000 rw-s 00002000 fd:1a 144170                     /tmp/a file (deleted)
7f3a6517a000-7f3a6517c000 r-xp 00000000 00:00 0                          [vdso]
7fff6d709000-7fff6d72a000 rw-p 00000000 00:00 0                          [stack]
garbage
";

    #[test]
    fn lines_parse_into_their_fields() {
        let vmas: Vec<Vma> = parse(SAMPLE).collect();
        assert_eq!(vmas.len(), 8, "the garbage line is skipped");
        let heap = &vmas[0];
        assert_eq!((heap.start, heap.end), (0x555c_c433_3000, 0x555c_c435_4000));
        assert!(heap.read && heap.write && !heap.exec && !heap.shared);
        assert!(!heap.is_file() && !heap.is_special());
        let shm = &vmas[1];
        assert!(shm.shared && shm.is_file());
        assert_eq!((shm.dev, shm.inode), ((0, 1), 0));
        assert_eq!(shm.path, "/SYSV00000000 (deleted)");
        let anon = &vmas[2];
        assert_eq!(anon.path, "");
        assert!(!anon.is_file());
        assert_eq!(vmas[3].prot(), libc::PROT_NONE);
        let file = &vmas[5];
        assert_eq!(file.path, "/tmp/a file (deleted)");
        assert_eq!(
            (file.dev, file.inode, file.offset),
            ((0xfd, 0x1a), 144170, 0x2000)
        );
        assert_eq!(file.offset_of(file.start + 0x1000), 0x3000);
        assert_eq!(
            file.map_files_path(),
            "/proc/self/map_files/7f3a65170000-7f3a65172000"
        );
        assert!(vmas[6].is_special(), "[vdso] is not memory");
        assert!(!vmas[7].is_special(), "[stack] is memory");
        assert_eq!(vmas[6].prot(), libc::PROT_READ | libc::PROT_EXEC);
    }

    #[test]
    fn lines_read_in_small_pieces_parse_and_overlong_lines_are_skipped() {
        let long = format!(
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 /{}\n",
            "x".repeat(3 * MAX_LINE)
        );
        let text = format!("{}{long}{}", &SAMPLE[..SAMPLE.len() - 8], SAMPLE);
        for chunk in [1, 7, 100, 5000, 1 << 20] {
            let mut at = 0;
            let read = |buf: &mut [u8]| {
                let n = chunk.min(buf.len()).min(text.len() - at);
                buf[..n].copy_from_slice(&text.as_bytes()[at..at + n]);
                at += n;
                Ok(n)
            };
            let mut seen: Vec<Vma> = Vec::new();
            for_each_line(read, |v| seen.push(v.to_owned())).unwrap();
            let expected: Vec<Vma> = parse(SAMPLE).chain(parse(SAMPLE)).collect();
            assert_eq!(seen, expected, "read {chunk} bytes at a time");
        }
    }

    #[test]
    fn this_processs_own_maps_include_a_fresh_mapping() {
        let page = vrdma::mem::page_size();
        // SAFETY: a fresh private anonymous mapping, unmapped below; nothing else uses it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let start = addr as u64;
        let found = overlapping(start, start + 1).unwrap();
        let mut streamed: Vec<Vma> = Vec::new();
        for_each(|v| {
            if v.overlaps(start, start + 1) {
                streamed.push(v.to_owned());
            }
        })
        .unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, page) };
        assert_eq!(found.len(), 1);
        assert!(found[0].start <= start && found[0].end >= start + page as u64);
        assert!(found[0].read && !found[0].write && !found[0].shared);
        assert_eq!(streamed, found);
    }
}
