use std::path::{Path, PathBuf};

use super::{Context, Result};

/// Where vrdma devices are looked for when `VRDMA_SOCKETS` is not set: the directory operators
/// give the daemon's `--vm ...,socket=` paths in by convention.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vrdma";

/// A device the application can open (`ibv_device`): under virtio-user, a vhost-user socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `vrdma0`, `vrdma1`, ... in list order, as `ibv_get_device_name` would name them.
    pub name: String,
    /// The socket.
    pub socket: PathBuf,
}

impl Device {
    /// Opens the device.
    #[doc(alias = "ibv_open_device")]
    pub fn open(&self) -> Result<Context> {
        Context::open(&self.socket)
    }
}

/// The devices this process can open (`ibv_get_device_list`): the sockets named in
/// `VRDMA_SOCKETS` (separated by `:`), or else every socket in [`DEFAULT_SOCKET_DIR`], sorted.
/// An empty list means no device, as `ibv_get_device_list` returning none does.
#[doc(alias = "ibv_get_device_list")]
pub fn device_list() -> Vec<Device> {
    let sockets = match std::env::var_os("VRDMA_SOCKETS") {
        Some(list) => std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        None => sockets_in(Path::new(DEFAULT_SOCKET_DIR)),
    };
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| Device {
            name: format!("vrdma{i}"),
            socket,
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
        assert_eq!(
            sockets_in(&dir),
            vec![dir.join("a.sock"), dir.join("b.sock")]
        );
        assert!(sockets_in(&dir.join("missing")).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
