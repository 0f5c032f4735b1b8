//! Devices: the list, names and GUIDs, opening and closing, and the queries of device, port,
//! GID and P_Key.

use std::ffi::{CStr, c_char, c_int};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use vrdma_proto::Gid;

use crate::abi::*;
use crate::context::Context;
use crate::{fill_c_string, guard, init_logging, null_with, set_errno};

/// A device in the list: the `ibv_device` programs hold, and the vrdma device behind it.
#[repr(C)]
pub(crate) struct DeviceEntry {
    /// First, so an `ibv_device *` is a `DeviceEntry *`.
    pub(crate) ibv: ibv_device,
    pub(crate) device: vrdma::Device,
    /// The port's GID once known (from a context, or a short connection for the GUID).
    pub(crate) gid: Mutex<Option<Gid>>,
}

/// The process's devices, found on the first `ibv_get_device_list` and kept for the life of
/// the process: programs may keep `ibv_device` pointers after freeing the list, as they can
/// with libibverbs (which refcounts them).
struct DeviceTable(Vec<&'static DeviceEntry>);

// SAFETY: the entries' only raw pointers are `ibv_device._ops`, always NULL and never
// dereferenced; everything else in an entry is plain data or behind a Mutex.
unsafe impl Sync for DeviceTable {}
// SAFETY: as for Sync.
unsafe impl Send for DeviceTable {}

fn devices() -> &'static [&'static DeviceEntry] {
    static TABLE: OnceLock<DeviceTable> = OnceLock::new();
    &TABLE
        .get_or_init(|| {
            let list = vrdma::device_list();
            if list.is_empty() {
                log::warn!(
                    "no vrdma device: VRDMA_SOCKETS is unset or empty, this machine has no \
                     vrdma PCI function and {} has no sockets; set VRDMA_SOCKETS to the VM's \
                     vhost-user socket path(s), separated by ':'",
                    vrdma::DEFAULT_SOCKET_DIR
                );
            }
            DeviceTable(
                list.into_iter()
                    .enumerate()
                    .map(|(i, d)| &*Box::leak(Box::new(new_entry(i, d))))
                    .collect(),
            )
        })
        .0
}

fn new_entry(index: usize, device: vrdma::Device) -> DeviceEntry {
    let mut ibv = ibv_device {
        _ops: _ibv_device_ops {
            _dummy1: std::ptr::null_mut(),
            _dummy2: std::ptr::null_mut(),
        },
        node_type: IBV_NODE_CA,
        transport_type: IBV_TRANSPORT_IB,
        name: [0; IBV_SYSFS_NAME_MAX],
        dev_name: [0; IBV_SYSFS_NAME_MAX],
        dev_path: [0; IBV_SYSFS_PATH_MAX],
        ibdev_path: [0; IBV_SYSFS_PATH_MAX],
    };
    fill_c_string(&mut ibv.name, &device.name);
    fill_c_string(&mut ibv.dev_name, &format!("uverbs{index}"));
    // Paths a real device would have; nothing is there, so sysfs reads of them fail cleanly.
    fill_c_string(
        &mut ibv.dev_path,
        &format!("/sys/class/infiniband_verbs/uverbs{index}"),
    );
    fill_c_string(
        &mut ibv.ibdev_path,
        &format!("/sys/class/infiniband/{}", device.name),
    );
    DeviceEntry {
        ibv,
        device,
        gid: Mutex::new(None),
    }
}

/// Finds the entry behind a device pointer a program passed, or `None` if it is not one of
/// ours (NULL, or a device of another library).
pub(crate) fn entry(device: *mut ibv_device) -> Option<&'static DeviceEntry> {
    devices()
        .iter()
        .copied()
        .find(|e| std::ptr::eq(&e.ibv, device.cast_const()))
}

impl DeviceEntry {
    pub(crate) fn name(&self) -> String {
        // SAFETY: `name` is NUL-terminated by fill_c_string.
        unsafe { CStr::from_ptr(self.ibv.name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// The port's GID: remembered from an open context, or asked of the device over a short
    /// connection.
    fn gid(&self) -> Option<Gid> {
        let mut known = self.gid.lock().unwrap_or_else(|p| p.into_inner());
        if known.is_none() {
            match self.device.open() {
                Ok(ctx) => *known = Some(ctx.gid()),
                Err(e) => log::warn!(
                    "{}: cannot reach the device at {} to read its GUID: {}",
                    self.name(),
                    self.device.path.display(),
                    vrdma::error_chain(&e)
                ),
            }
        }
        *known
    }
}

/// `ibv_get_device_list`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_get_device_list(num_devices: *mut c_int) -> *mut *mut ibv_device {
    guard(
        "ibv_get_device_list",
        || null_with(libc::ENOMEM),
        || {
            init_logging();
            let list = devices();
            if !num_devices.is_null() {
                // SAFETY: the caller passes a valid int pointer or NULL (checked).
                unsafe { *num_devices = list.len() as c_int };
            }
            if list.is_empty() {
                // As libibverbs with no device: an empty list (not NULL: that means an error).
                set_errno(libc::ENOSYS);
            }
            let mut array: Vec<*mut ibv_device> = list
                .iter()
                .map(|e| (&e.ibv as *const ibv_device).cast_mut())
                .collect();
            array.push(std::ptr::null_mut());
            Box::into_raw(array.into_boxed_slice()).cast::<*mut ibv_device>()
        },
    )
}

/// `ibv_free_device_list`.
///
/// # Safety
///
/// `list` must come from [`ibv_get_device_list`] and not have been freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_free_device_list(list: *mut *mut ibv_device) {
    guard(
        "ibv_free_device_list",
        || (),
        || {
            if list.is_null() {
                return;
            }
            let len = devices().len() + 1;
            // SAFETY: the list was a boxed slice of exactly `len` pointers (the table never
            // changes after it is built).
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(list, len)) });
        },
    )
}

/// `ibv_get_device_name`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_get_device_name(device: *mut ibv_device) -> *const c_char {
    match entry(device) {
        Some(e) => e.ibv.name.as_ptr(),
        None => null_with::<c_char>(libc::EINVAL),
    }
}

/// `ibv_get_device_guid`: the node GUID, in network order.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_get_device_guid(device: *mut ibv_device) -> u64 {
    guard(
        "ibv_get_device_guid",
        || 0,
        || {
            init_logging();
            match entry(device).and_then(|e| e.gid()) {
                Some(gid) => gid.node_guid().to_be(),
                None => 0,
            }
        },
    )
}

/// `ibv_get_device_index`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_get_device_index(device: *mut ibv_device) -> c_int {
    devices()
        .iter()
        .position(|e| std::ptr::eq(&e.ibv, device.cast_const()))
        .map_or(-1, |i| i as c_int)
}

/// `ibv_open_device`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_open_device(device: *mut ibv_device) -> *mut ibv_context {
    guard(
        "ibv_open_device",
        || null_with(libc::EIO),
        || {
            init_logging();
            let Some(entry) = entry(device) else {
                return null_with(libc::EINVAL);
            };
            match Context::open(entry) {
                Ok(ctx) => ctx,
                Err(errno) => null_with(errno),
            }
        },
    )
}

/// `ibv_close_device`.
///
/// # Safety
///
/// `context` must come from [`ibv_open_device`] and every object made in it must have been
/// destroyed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_close_device(context: *mut ibv_context) -> c_int {
    guard(
        "ibv_close_device",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            unsafe { Context::close(context) }
        },
    )
}

/// `ibv_query_device`.
///
/// # Safety
///
/// `context` must be an open context and `attr` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_device(
    context: *mut ibv_context,
    attr: *mut ibv_device_attr,
) -> c_int {
    guard(
        "ibv_query_device",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return libc::EINVAL;
            };
            if attr.is_null() {
                return libc::EINVAL;
            }
            let a = ctx.device_attr();
            // SAFETY: `attr` is valid for writing (checked non-NULL; the caller's contract).
            unsafe { attr.write(a) };
            0
        },
    )
}

/// `ibv_query_port` (the exported one: writes the 48 bytes every caller owns).
///
/// # Safety
///
/// `context` must be an open context and `attr` valid for writing 48 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_port(
    context: *mut ibv_context,
    port_num: u8,
    attr: *mut ibv_port_attr,
) -> c_int {
    guard(
        "ibv_query_port",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return libc::EINVAL;
            };
            if attr.is_null() {
                return libc::EINVAL;
            }
            match ctx.port_attr(port_num) {
                Ok(a) => {
                    // SAFETY: the caller owns at least COMPAT_PORT_ATTR_SIZE bytes at `attr`; the
                    // source is a whole ibv_port_attr.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (&a as *const ibv_port_attr).cast::<u8>(),
                            attr.cast::<u8>(),
                            COMPAT_PORT_ATTR_SIZE,
                        )
                    };
                    0
                }
                Err(errno) => errno,
            }
        },
    )
}

/// `ibv_query_gid`.
///
/// # Safety
///
/// `context` must be an open context and `gid` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_gid(
    context: *mut ibv_context,
    port_num: u8,
    index: c_int,
    gid: *mut ibv_gid,
) -> c_int {
    guard(
        "ibv_query_gid",
        || -1,
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return -1;
            };
            if gid.is_null() || port_num != 1 || index != 0 {
                return -1;
            }
            // SAFETY: checked non-NULL; the caller's contract.
            unsafe {
                gid.write(ibv_gid {
                    raw: ctx.port.gid.0,
                })
            };
            0
        },
    )
}

/// `_ibv_query_gid_ex`, behind verbs.h's inline `ibv_query_gid_ex`.
///
/// # Safety
///
/// `context` must be an open context and `entry` valid for writing `entry_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _ibv_query_gid_ex(
    context: *mut ibv_context,
    port_num: u32,
    gid_index: u32,
    entry: *mut ibv_gid_entry,
    flags: u32,
    entry_size: usize,
) -> c_int {
    guard(
        "ibv_query_gid_ex",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return libc::EINVAL;
            };
            if entry.is_null() || flags != 0 || entry_size < size_of::<ibv_gid_entry>() {
                return libc::EINVAL;
            }
            if port_num != 1 || gid_index != 0 {
                return libc::ENODATA;
            }
            // SAFETY: checked non-NULL and large enough; the caller's contract.
            unsafe {
                entry.write(ibv_gid_entry {
                    gid: ibv_gid {
                        raw: ctx.port.gid.0,
                    },
                    gid_index,
                    port_num,
                    gid_type: IBV_GID_TYPE_IB,
                    ndev_ifindex: 0,
                })
            };
            0
        },
    )
}

/// `ibv_query_gid_type` (libibverbs-private, used by ibv_devinfo).
///
/// # Safety
///
/// `context` must be an open context and `gid_type` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_gid_type(
    context: *mut ibv_context,
    port_num: u8,
    index: u32,
    gid_type: *mut u32,
) -> c_int {
    guard(
        "ibv_query_gid_type",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            if unsafe { Context::from_ptr(context) }.is_none() || gid_type.is_null() {
                return libc::EINVAL;
            }
            if port_num != 1 || index != 0 {
                return libc::ENODATA;
            }
            // SAFETY: checked non-NULL; the caller's contract.
            unsafe { gid_type.write(IBV_GID_TYPE_IB) };
            0
        },
    )
}

/// `ibv_query_pkey`: one P_Key, the default full-membership 0xFFFF.
///
/// # Safety
///
/// `context` must be an open context and `pkey` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_pkey(
    context: *mut ibv_context,
    port_num: u8,
    index: c_int,
    pkey: *mut u16,
) -> c_int {
    guard(
        "ibv_query_pkey",
        || -1,
        || {
            // SAFETY: the caller's contract.
            if unsafe { Context::from_ptr(context) }.is_none() || pkey.is_null() {
                return -1;
            }
            if port_num != 1 || index != 0 {
                return -1;
            }
            // SAFETY: checked non-NULL; the caller's contract.
            unsafe { pkey.write(0xffffu16.to_be()) };
            0
        },
    )
}

/// `ibv_get_pkey_index`.
///
/// # Safety
///
/// `context` must be an open context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_get_pkey_index(
    context: *mut ibv_context,
    port_num: u8,
    pkey: u16,
) -> c_int {
    // SAFETY: the caller's contract.
    if unsafe { Context::from_ptr(context) }.is_none() || port_num != 1 {
        set_errno(libc::EINVAL);
        return -1;
    }
    if u16::from_be(pkey) & 0x7fff == 0x7fff {
        0
    } else {
        set_errno(libc::ENOENT);
        -1
    }
}

/// `ibv_read_sysfs_file`: reads a sysfs attribute (the devices' sysfs paths do not exist, so
/// reads of them fail as they would for a missing attribute).
///
/// # Safety
///
/// `dir` and `file` must be NUL-terminated strings and `buf` valid for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_read_sysfs_file(
    dir: *const c_char,
    file: *const c_char,
    buf: *mut c_char,
    size: usize,
) -> c_int {
    guard(
        "ibv_read_sysfs_file",
        || -1,
        || {
            if dir.is_null() || file.is_null() || buf.is_null() || size == 0 {
                set_errno(libc::EINVAL);
                return -1;
            }
            // SAFETY: both are NUL-terminated (the caller's contract).
            let (dir, file) = unsafe { (CStr::from_ptr(dir), CStr::from_ptr(file)) };
            let path =
                PathBuf::from(dir.to_string_lossy().as_ref()).join(file.to_string_lossy().as_ref());
            match std::fs::read(&path) {
                Ok(mut bytes) => {
                    bytes.truncate(size - 1);
                    if bytes.last() == Some(&b'\n') {
                        bytes.pop();
                    }
                    // SAFETY: `buf` holds `size` bytes and we write at most size - 1 plus the NUL.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            bytes.as_ptr(),
                            buf.cast::<u8>(),
                            bytes.len(),
                        );
                        *buf.add(bytes.len()) = 0;
                    }
                    bytes.len() as c_int
                }
                Err(e) => {
                    set_errno(e.raw_os_error().unwrap_or(libc::ENOENT));
                    -1
                }
            }
        },
    )
}
