//! This process's mappings as `/proc/self/maps` lists them.
//!
//! Read afresh on every pin: nothing about an address is cached, because the application can
//! unmap a buffer (`free` of a large chunk does) and get fresh memory at the same address at
//! any time.

use std::io;

/// One mapping (a VMA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Vma {
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
    pub path: String,
}

impl Vma {
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

/// Every mapping in `maps` text; lines that do not parse are skipped.
pub(crate) fn parse(text: &str) -> impl Iterator<Item = Vma> + '_ {
    text.lines().filter_map(parse_line)
}

/// One line: `start-end perms offset major:minor inode   path`.
fn parse_line(line: &str) -> Option<Vma> {
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
        path: path.to_owned(),
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
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, page) };
        assert_eq!(found.len(), 1);
        assert!(found[0].start <= start && found[0].end >= start + page as u64);
        assert!(found[0].read && !found[0].write && !found[0].shared);
    }
}
