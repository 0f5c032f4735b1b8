//! Interrupts through `uio_pci_generic`: the function is bound to it (if the module is loaded)
//! and `/dev/uioN` becomes readable when the device raises its (INTx) interrupt. The driver
//! masks INTx (the command register's INTx-disable bit) when it fires and, having no
//! `irqcontrol`, leaves unmasking to user space: `PciDevice::unmask_intx`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const DRIVER: &str = "uio_pci_generic";
const DRIVERS_PROBE: &str = "/sys/bus/pci/drivers_probe";

/// An open `/dev/uioN` of the function.
#[derive(Debug)]
pub struct Uio {
    file: File,
}

impl Uio {
    /// Binds the function at `path` to `uio_pci_generic` unless it already is, and opens its
    /// `/dev/uioN`. `None` (with the reason logged) when the module is not loaded or the
    /// function is bound to another driver: the transport then polls.
    pub fn bind(path: &Path) -> Option<Uio> {
        match Self::try_bind(path) {
            Ok(uio) => Some(uio),
            Err(e) => {
                log::info!(
                    "{}: no interrupts, polling instead: {e} (load uio_pci_generic for \
                     interrupts)",
                    path.display()
                );
                None
            }
        }
    }

    fn try_bind(path: &Path) -> io::Result<Uio> {
        let driver = std::fs::read_link(path.join("driver")).ok();
        let bound_to = driver
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned());
        match bound_to.as_deref() {
            Some(DRIVER) => {}
            Some(other) => {
                return Err(io::Error::other(format!("bound to driver {other}")));
            }
            None => {
                if !Path::new("/sys/bus/pci/drivers").join(DRIVER).is_dir() {
                    return Err(io::Error::other(format!("{DRIVER} is not loaded")));
                }
                std::fs::write(path.join("driver_override"), DRIVER)?;
                let name = path
                    .file_name()
                    .ok_or_else(|| io::Error::other("no PCI address"))?;
                std::fs::write(DRIVERS_PROBE, name.as_encoded_bytes())?;
            }
        }
        let uio = std::fs::read_dir(path.join("uio"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .find(|n| n.to_string_lossy().starts_with("uio"))
            .ok_or_else(|| io::Error::other("the driver created no uio device"))?;
        let dev = Path::new("/dev").join(uio);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&dev)?;
        log::info!("{}: interrupts through {}", path.display(), dev.display());
        Ok(Uio { file })
    }

    /// The file descriptor, readable once the device has raised its interrupt.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Takes the interrupt count, if an interrupt came since the last call; true if one did.
    /// Never blocks.
    pub fn take(&self) -> io::Result<bool> {
        let mut count = [0u8; 4];
        match (&self.file).read(&mut count) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}
