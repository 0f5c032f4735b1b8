use std::path::{Path, PathBuf};

use super::{Context, Result};

/// Where vrdma devices are looked for when `VRDMA_SOCKETS` is not set: the directory operators
/// give the daemon's `--vm ...,socket=` paths in by convention.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vrdma";

/// A device the application can open (`ibv_device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `vrdma0`, `vrdma1`, ... in list order, as `ibv_get_device_name` would name them.
    pub name: String,
    /// Where it is: a vhost-user socket (virtio-user) or a PCI function's sysfs directory
    /// (virtio-pci, inside a VM).
    pub path: PathBuf,
    /// How it is reached.
    pub kind: DeviceKind,
}

/// How a [`Device`] is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The process is the vhost-user frontend of the daemon's socket.
    VirtioUser,
    /// The VM's virtio-pci function, driven from user space (needs root; one process at a
    /// time: opening it resets the device).
    VirtioPci,
}

impl Device {
    /// The device behind a vhost-user socket, named `name`.
    pub fn socket(name: impl Into<String>, path: impl Into<PathBuf>) -> Device {
        Device {
            name: name.into(),
            path: path.into(),
            kind: DeviceKind::VirtioUser,
        }
    }

    /// Opens the device.
    #[doc(alias = "ibv_open_device")]
    pub fn open(&self) -> Result<Context> {
        match self.kind {
            DeviceKind::VirtioUser => Context::open(&self.path),
            DeviceKind::VirtioPci => Context::open_pci(&self.path),
        }
    }
}

/// The devices this process can open (`ibv_get_device_list`): the sockets named in
/// `VRDMA_SOCKETS` (separated by `:`); or else, inside a VM, its vrdma PCI functions in PCI
/// address order, then every socket in [`DEFAULT_SOCKET_DIR`], sorted. An empty list means no
/// device, as `ibv_get_device_list` returning none does.
#[doc(alias = "ibv_get_device_list")]
pub fn device_list() -> Vec<Device> {
    let found: Vec<(PathBuf, DeviceKind)> = match std::env::var_os("VRDMA_SOCKETS") {
        Some(list) => std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| (p, DeviceKind::VirtioUser))
            .collect(),
        None => {
            let functions = crate::transport::virtio_pci::find_devices().unwrap_or_else(|e| {
                log::debug!("no vrdma PCI functions: {e}");
                Vec::new()
            });
            functions
                .into_iter()
                .map(|p| (p, DeviceKind::VirtioPci))
                .chain(
                    sockets_in(Path::new(DEFAULT_SOCKET_DIR))
                        .into_iter()
                        .map(|p| (p, DeviceKind::VirtioUser)),
                )
                .collect()
        }
    };
    found
        .into_iter()
        .enumerate()
        .map(|(i, (path, kind))| Device {
            name: format!("vrdma{i}"),
            path,
            kind,
        })
        .collect()
}

fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_in_a_directory_are_listed_in_order_and_other_files_are_not() {
        let dir = std::env::temp_dir().join(format!("vrdma-devlist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _b = std::os::unix::net::UnixListener::bind(dir.join("b.sock")).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(dir.join("a.sock")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a device").unwrap();
        // The daemon's management socket lives in a directory of its own: not a device.
        std::fs::create_dir_all(dir.join("control")).unwrap();
        let _control =
            std::os::unix::net::UnixListener::bind(dir.join("control").join("vrdmactl.sock"))
                .unwrap();
        assert_eq!(
            sockets_in(&dir),
            vec![dir.join("a.sock"), dir.join("b.sock")]
        );
        assert!(sockets_in(&dir.join("missing")).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
