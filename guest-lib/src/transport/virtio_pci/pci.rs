//! The PCI side of virtio-pci from user space: finding the device in sysfs, reading its
//! configuration space, locating the modern virtio-pci capabilities and mapping the BAR
//! windows they point into (`resourceN` files), with volatile MMIO accessors.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::VirtioPciError;

/// Where Linux lists PCI devices.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// The virtio vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// The modern virtio-pci device ID of a vrdma device: 0x1040 + virtio ID 42.
pub const DEVICE_ID: u16 = 0x1040 + vrdma_proto::VIRTIO_ID_RDMA as u16;

/// `cfg_type` of the virtio-pci capabilities this driver uses.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
/// The PCI capability ID of a vendor-specific capability (all virtio-pci ones are).
const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_STATUS: u64 = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
const PCI_CAPABILITY_LIST: u64 = 0x34;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;
const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;
/// Bytes of the common configuration structure (virtio 1.x, up to `queue_device`).
pub const COMMON_CFG_LEN: u64 = 0x38;

fn sysfs_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> VirtioPciError {
    let path = path.to_owned();
    move |source| VirtioPciError::Sysfs { path, what, source }
}

/// Reads a sysfs attribute holding one hexadecimal number (`0x1af4`).
fn read_hex(path: &Path) -> Result<u64, VirtioPciError> {
    let text = std::fs::read_to_string(path).map_err(sysfs_err(path, "reading"))?;
    let trimmed = text.trim();
    u64::from_str_radix(trimmed.trim_start_matches("0x"), 16).map_err(|_| VirtioPciError::Sysfs {
        path: path.to_owned(),
        what: "parsing",
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{trimmed:?} is not hex"),
        ),
    })
}

/// The sysfs directories of every vrdma device (1af4:106a), sorted by address.
pub fn find_devices() -> Result<Vec<PathBuf>, VirtioPciError> {
    let dir = Path::new(SYSFS_PCI_DEVICES);
    let entries = std::fs::read_dir(dir).map_err(sysfs_err(dir, "listing"))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(sysfs_err(dir, "listing"))?.path();
        let vendor = read_hex(&path.join("vendor"))?;
        let device = read_hex(&path.join("device"))?;
        if vendor == u64::from(VENDOR_ID) && device == u64::from(DEVICE_ID) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// The kernel drivers a user-space driver may share the function with: `uio_pci_generic`
/// only forwards its interrupt.
const SHAREABLE_DRIVERS: [&str; 1] = ["uio_pci_generic"];
/// The kernel's generic virtio-pci driver, which binds every virtio function, vrdma's too,
/// but has no virtio driver for device type 42 to hand it to.
const KERNEL_VIRTIO_PCI: &str = "virtio-pci";

/// Makes sure no kernel driver drives the function at `path`: `virtio-pci`, which binds it
/// when its module loads (a guest with a virtio NIC or disk loads it), is unbound, and the
/// function's `driver_override` is set to `uio_pci_generic` so that it does not bind again;
/// any other driver but `uio_pci_generic` is an error.
fn claim(path: &Path) -> Result<(), VirtioPciError> {
    let Ok(driver) = std::fs::read_link(path.join("driver")) else {
        return Ok(());
    };
    let name = driver
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if SHAREABLE_DRIVERS.contains(&name.as_str()) {
        return Ok(());
    }
    if name != KERNEL_VIRTIO_PCI {
        return Err(VirtioPciError::BoundElsewhere {
            function: path.to_owned(),
            driver: name,
        });
    }
    let override_path = path.join("driver_override");
    std::fs::write(&override_path, SHAREABLE_DRIVERS[0])
        .map_err(sysfs_err(&override_path, "writing (run as root)"))?;
    let address = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unbind = Path::new("/sys/bus/pci/drivers")
        .join(KERNEL_VIRTIO_PCI)
        .join("unbind");
    std::fs::write(&unbind, &address).map_err(sysfs_err(&unbind, "writing (run as root)"))?;
    log::info!(
        "{}: unbound from the kernel's {KERNEL_VIRTIO_PCI} driver, which has no driver for \
         vrdma",
        path.display()
    );
    Ok(())
}

/// A mapped BAR (`resourceN`).
#[derive(Debug)]
pub struct Bar {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is device memory accessed only through volatile reads and writes of
// plain integers; sharing the pointer between threads is as safe as sharing the device.
unsafe impl Send for Bar {}
// SAFETY: as for `Send`: no Rust references into the mapping are ever created.
unsafe impl Sync for Bar {}

impl Bar {
    fn map(path: &Path) -> Result<Bar, VirtioPciError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(sysfs_err(path, "opening (run as root)"))?;
        let len = file.metadata().map_err(sysfs_err(path, "sizing"))?.len() as usize;
        if len == 0 {
            return Err(VirtioPciError::BadCapability {
                reason: format!("{} is empty: the BAR is not a memory BAR", path.display()),
            });
        }
        // SAFETY: a fresh shared mapping of the whole resource file; the kernel checks the
        // length and the pointer is only used through the bounds-checked accessors below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(sysfs_err(path, "mapping")(io::Error::last_os_error()));
        }
        Ok(Bar {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A window of a BAR that a capability names; offsets are relative to its start and checked
/// against its length.
#[derive(Debug, Clone)]
pub struct Window {
    bar: Arc<Bar>,
    offset: usize,
    len: usize,
}

macro_rules! accessors {
    ($read:ident, $write:ident, $ty:ty) => {
        /// Volatile read at `at`; out of range reads return all ones, as a missing device does.
        pub fn $read(&self, at: u64) -> $ty {
            match self.ptr(at, size_of::<$ty>()) {
                // SAFETY: `ptr` checked that the access lies inside the mapping and is aligned.
                Some(p) => unsafe { p.cast::<$ty>().read_volatile() },
                None => <$ty>::MAX,
            }
        }

        /// Volatile write at `at`; out of range writes are dropped.
        pub fn $write(&self, at: u64, value: $ty) {
            if let Some(p) = self.ptr(at, size_of::<$ty>()) {
                // SAFETY: as for the read.
                unsafe { p.cast::<$ty>().write_volatile(value) }
            }
        }
    };
}

impl Window {
    /// The window's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    fn ptr(&self, at: u64, size: usize) -> Option<*mut u8> {
        let at = usize::try_from(at).ok()?;
        let end = at.checked_add(size)?;
        if end > self.len || (self.offset + at) % size != 0 {
            return None;
        }
        Some(self.bar.ptr.wrapping_add(self.offset + at))
    }

    accessors!(read8, write8, u8);
    accessors!(read16, write16, u16);
    accessors!(read32, write32, u32);
}

/// The device's virtio-pci windows.
#[derive(Debug)]
pub struct Windows {
    pub common: Window,
    pub notify: Window,
    pub notify_multiplier: u32,
    pub isr: Window,
    pub device: Window,
}

/// A vrdma PCI function opened through sysfs.
#[derive(Debug)]
pub struct PciDevice {
    pub path: PathBuf,
    config: File,
}

impl PciDevice {
    /// Opens the function at `path` (a directory under [`SYSFS_PCI_DEVICES`]), enables it and
    /// turns on memory decoding and bus mastering so the device can reach guest memory.
    pub fn open(path: &Path) -> Result<PciDevice, VirtioPciError> {
        claim(path)?;
        let enable = path.join("enable");
        // Already enabled (by a kernel driver or an earlier run) is fine too.
        if read_hex(&enable).unwrap_or(0) == 0 {
            std::fs::write(&enable, "1").map_err(sysfs_err(&enable, "writing (run as root)"))?;
        }
        let cfg_path = path.join("config");
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg_path)
            .map_err(sysfs_err(&cfg_path, "opening (run as root)"))?;
        let dev = PciDevice {
            path: path.to_owned(),
            config,
        };
        let command = u16::from_le_bytes(dev.read_cfg(PCI_COMMAND)?);
        let wanted = command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        if wanted != command {
            dev.config
                .write_all_at(&wanted.to_le_bytes(), PCI_COMMAND)
                .map_err(sysfs_err(&cfg_path, "enabling bus mastering in"))?;
        }
        Ok(dev)
    }

    /// Clears the command register's INTx-disable bit, which `uio_pci_generic` sets when the
    /// interrupt fires.
    pub fn unmask_intx(&self) -> Result<(), VirtioPciError> {
        let command = u16::from_le_bytes(self.read_cfg(PCI_COMMAND)?);
        if command & PCI_COMMAND_INTX_DISABLE != 0 {
            self.config
                .write_all_at(
                    &(command & !PCI_COMMAND_INTX_DISABLE).to_le_bytes(),
                    PCI_COMMAND,
                )
                .map_err(sysfs_err(&self.path.join("config"), "unmasking INTx in"))?;
        }
        Ok(())
    }

    fn read_cfg<const N: usize>(&self, at: u64) -> Result<[u8; N], VirtioPciError> {
        let mut buf = [0u8; N];
        self.config
            .read_exact_at(&mut buf, at)
            .map_err(sysfs_err(&self.path.join("config"), "reading"))?;
        Ok(buf)
    }

    /// Walks the capability list and maps the common, notify, ISR and device windows.
    pub fn map_windows(&self) -> Result<Windows, VirtioPciError> {
        let bad = |reason: String| VirtioPciError::BadCapability { reason };
        if u16::from_le_bytes(self.read_cfg(PCI_STATUS)?) & PCI_STATUS_CAP_LIST == 0 {
            return Err(bad("the function has no capability list".into()));
        }
        let mut bars: [Option<Arc<Bar>>; 6] = Default::default();
        let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
        let mut notify_multiplier = 0;
        let mut at = u64::from(self.read_cfg::<1>(PCI_CAPABILITY_LIST)?[0] & !3);
        // At most 48 capabilities fit in 256 bytes: more means a loop.
        for _ in 0..48 {
            if at == 0 {
                break;
            }
            let cap: [u8; 16] = self.read_cfg(at)?;
            let next = u64::from(cap[1] & !3);
            if cap[0] == PCI_CAP_ID_VNDR
                && matches!(cap[3], CAP_COMMON | CAP_NOTIFY | CAP_ISR | CAP_DEVICE)
            {
                let bar_index = usize::from(cap[4]);
                let offset = u32::from_le_bytes(cap[8..12].try_into().expect("4 bytes")) as usize;
                let len = u32::from_le_bytes(cap[12..16].try_into().expect("4 bytes")) as usize;
                let slot = bars
                    .get_mut(bar_index)
                    .ok_or_else(|| bad(format!("capability at {at:#x} names BAR {bar_index}")))?;
                let bar = match slot {
                    Some(bar) => bar.clone(),
                    None => {
                        let bar =
                            Arc::new(Bar::map(&self.path.join(format!("resource{bar_index}")))?);
                        *slot = Some(bar.clone());
                        bar
                    }
                };
                if offset.checked_add(len).is_none_or(|end| end > bar.len) {
                    return Err(bad(format!(
                        "capability type {} at {at:#x} ({offset:#x}+{len:#x}) lies outside BAR \
                         {bar_index} ({:#x} bytes)",
                        cap[3], bar.len
                    )));
                }
                let window = Window { bar, offset, len };
                match cap[3] {
                    CAP_COMMON => common = common.or(Some(window)),
                    CAP_NOTIFY => {
                        if notify.is_none() {
                            let m: [u8; 4] = self.read_cfg(at + 16)?;
                            notify_multiplier = u32::from_le_bytes(m);
                            notify = Some(window);
                        }
                    }
                    CAP_ISR => isr = isr.or(Some(window)),
                    _ => device = device.or(Some(window)),
                }
            }
            at = next;
        }
        let missing = |what: &str| {
            bad(format!(
                "no {what} capability: not a modern virtio-pci device"
            ))
        };
        let common = common.ok_or_else(|| missing("common configuration"))?;
        if (common.len as u64) < COMMON_CFG_LEN {
            return Err(bad(format!(
                "the common configuration is {} bytes, fewer than {COMMON_CFG_LEN}",
                common.len
            )));
        }
        Ok(Windows {
            common,
            notify: notify.ok_or_else(|| missing("notification"))?,
            notify_multiplier,
            isr: isr.ok_or_else(|| missing("ISR"))?,
            device: device.ok_or_else(|| missing("device configuration"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    /// A virtio-pci capability as QEMU lays it out.
    fn cap(next: u8, cfg_type: u8, bar: u8, offset: u32, len: u32) -> Vec<u8> {
        let mut c = vec![PCI_CAP_ID_VNDR, next, 16, cfg_type, bar, 0, 0, 0];
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(&len.to_le_bytes());
        c
    }

    /// A fake sysfs directory of a function: `config` with a capability list, `enable` and a
    /// 16 KiB `resource4`, as QEMU's virtio-pci places its windows in BAR 4.
    fn fake_function(device_cfg_len: u32) -> TempDir {
        let dir = TempDir::new_with_prefix("/tmp/vrdma-pci-").expect("temp dir");
        let path = dir.as_path();
        let mut config = vec![0u8; 256];
        config[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        config[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        config[PCI_STATUS as usize] = PCI_STATUS_CAP_LIST as u8;
        config[PCI_CAPABILITY_LIST as usize] = 0x40;
        let caps = [
            (0x40, cap(0x50, CAP_COMMON, 4, 0, 0x1000)),
            (0x50, cap(0x60, CAP_ISR, 4, 0x1000, 0x1000)),
            (0x60, cap(0x74, CAP_DEVICE, 4, 0x2000, device_cfg_len)),
            (0x74, {
                let mut c = cap(0, CAP_NOTIFY, 4, 0x3000, 0x1000);
                c[2] = 20;
                c.extend_from_slice(&4u32.to_le_bytes());
                c
            }),
        ];
        for (at, bytes) in caps {
            config[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        std::fs::write(path.join("config"), &config).expect("config");
        std::fs::write(path.join("enable"), "1\n").expect("enable");
        std::fs::write(path.join("resource4"), vec![0u8; 0x4000]).expect("resource4");
        dir
    }

    #[test]
    fn maps_the_four_windows_and_enables_bus_mastering() {
        let dir = fake_function(0x1000);
        let dev = PciDevice::open(dir.as_path()).expect("open");
        let w = dev.map_windows().expect("windows");
        assert_eq!(w.common.len(), 0x1000);
        assert_eq!(w.notify_multiplier, 4);
        // The windows are views of the same BAR at their offsets.
        w.device.write32(8, 0xdead_beef);
        w.notify.write16(6, 0x1234);
        let resource = std::fs::read(dir.as_path().join("resource4")).expect("read");
        assert_eq!(resource[0x2008..0x200c], 0xdead_beefu32.to_le_bytes());
        assert_eq!(resource[0x3006..0x3008], 0x1234u16.to_le_bytes());
        assert_eq!(w.device.read32(8), 0xdead_beef);
        let config = std::fs::read(dir.as_path().join("config")).expect("read");
        let command = u16::from_le_bytes([config[4], config[5]]);
        assert_eq!(
            command & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER),
            PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        );
    }

    #[test]
    fn accesses_outside_a_window_or_misaligned_do_nothing() {
        let dir = fake_function(0x1000);
        let w = PciDevice::open(dir.as_path())
            .expect("open")
            .map_windows()
            .expect("windows");
        // The ISR window ends where the device window starts: a write past it is dropped.
        w.isr.write32(0x1000, 0x5555_5555);
        w.isr.write32(0x0ffe, 0x5555_5555);
        assert_eq!(w.device.read32(0), 0);
        assert_eq!(w.isr.read32(0x1000), u32::MAX);
        assert_eq!(w.device.read32(2), u32::MAX, "misaligned");
        assert_eq!(w.device.read16(u64::MAX), u16::MAX);
    }

    #[test]
    fn a_capability_outside_its_bar_is_refused() {
        let dir = fake_function(0x2001);
        let err = PciDevice::open(dir.as_path())
            .expect("open")
            .map_windows()
            .expect_err("the device window runs past the BAR");
        assert!(
            matches!(&err, VirtioPciError::BadCapability { reason } if reason.contains("outside BAR 4")),
            "{err}"
        );
    }
}
