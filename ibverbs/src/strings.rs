//! The string and rate helpers libibverbs exports, with its texts.

use std::ffi::{c_char, c_int};

macro_rules! c_strings {
    ($name:ident: $($s:literal),* $(,)?) => {
        const $name: &[&std::ffi::CStr] = &[$($s),*];
    };
}

c_strings!(WC_STATUS:
    c"success", c"local length error", c"local QP operation error", c"local EE context operation error",
    c"local protection error", c"Work Request Flushed Error", c"memory management operation error",
    c"bad response error", c"local access error", c"remote invalid request error",
    c"remote access error", c"remote operation error", c"transport retry counter exceeded",
    c"RNR retry counter exceeded", c"local RDD violation error", c"remote invalid RD request",
    c"aborted error", c"invalid EE context number", c"invalid EE context state",
    c"fatal error", c"response timeout error", c"general error", c"TM error",
    c"TM Rendezvous with SRQ error",
);

c_strings!(EVENT_TYPE:
    c"CQ error", c"local work queue catastrophic error", c"invalid request local work queue error",
    c"local access violation work queue error", c"communication established",
    c"send queue drained", c"path migrated", c"path migration request error",
    c"local catastrophic error", c"port active", c"port error", c"LID change",
    c"P_Key change", c"SM change", c"SRQ catastrophic error", c"SRQ limit reached",
    c"last WQE reached", c"client reregistration", c"GID table change", c"WQ fatal",
);

c_strings!(PORT_STATE: c"PORT_NOP", c"PORT_DOWN", c"PORT_INIT", c"PORT_ARMED", c"PORT_ACTIVE", c"PORT_ACTIVE_DEFER");

fn pick(
    table: &[&'static std::ffi::CStr],
    index: c_int,
    unknown: &'static std::ffi::CStr,
) -> *const c_char {
    usize::try_from(index)
        .ok()
        .and_then(|i| table.get(i))
        .copied()
        .unwrap_or(unknown)
        .as_ptr()
}

/// `ibv_wc_status_str`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_wc_status_str(status: c_int) -> *const c_char {
    pick(WC_STATUS, status, c"unknown")
}

/// `ibv_event_type_str`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_event_type_str(event: c_int) -> *const c_char {
    pick(EVENT_TYPE, event, c"unknown")
}

/// `ibv_port_state_str`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_port_state_str(state: c_int) -> *const c_char {
    pick(PORT_STATE, state, c"(unknown)")
}

/// `ibv_node_type_str`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_node_type_str(node_type: c_int) -> *const c_char {
    match node_type {
        1 => c"InfiniBand channel adapter",
        2 => c"InfiniBand switch",
        3 => c"InfiniBand router",
        4 => c"iWARP NIC",
        5 => c"usNIC",
        6 => c"usNIC UDP",
        7 => c"unspecified",
        _ => c"unknown",
    }
    .as_ptr()
}

/// (`enum ibv_rate`, multiple of 2.5 Gb/s, Mb/s) for every rate verbs.h names.
const RATES: &[(c_int, c_int, c_int)] = &[
    (2, 1, 2500),
    (6, 2, 5000),
    (3, 4, 10000),
    (7, 8, 20000),
    (4, 12, 30000),
    (8, 16, 40000),
    (9, 24, 60000),
    (5, 32, 80000),
    (10, 48, 120000),
    (11, 6, 14062),
    (12, 22, 56250),
    (13, 45, 112500),
    (14, 67, 168750),
    (15, 10, 25781),
    (16, 40, 103125),
    (17, 60, 168750),
    (18, 120, 309375),
    (19, 20, 50000),
    (20, 80, 200000),
    (21, 160, 400000),
    (22, 240, 600000),
    (23, 320, 800000),
    (24, 480, 1200000),
];

/// `ibv_rate_to_mult`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_rate_to_mult(rate: c_int) -> c_int {
    RATES.iter().find(|r| r.0 == rate).map_or(-1, |r| r.1)
}

/// `mult_to_ibv_rate`.
#[unsafe(no_mangle)]
pub extern "C" fn mult_to_ibv_rate(mult: c_int) -> c_int {
    RATES.iter().find(|r| r.1 == mult).map_or(0, |r| r.0)
}

/// `ibv_rate_to_mbps`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_rate_to_mbps(rate: c_int) -> c_int {
    RATES.iter().find(|r| r.0 == rate).map_or(-1, |r| r.2)
}

/// `mbps_to_ibv_rate`.
#[unsafe(no_mangle)]
pub extern "C" fn mbps_to_ibv_rate(mbps: c_int) -> c_int {
    RATES.iter().find(|r| r.2 == mbps).map_or(0, |r| r.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn status_strings_match_libibverbs_and_unknown_values_do_not_crash() {
        // SAFETY: the functions return static NUL-terminated strings.
        let s = |p| unsafe { CStr::from_ptr(p) }.to_str().unwrap();
        assert_eq!(s(ibv_wc_status_str(0)), "success");
        assert_eq!(s(ibv_wc_status_str(5)), "Work Request Flushed Error");
        assert_eq!(s(ibv_wc_status_str(12)), "transport retry counter exceeded");
        assert_eq!(s(ibv_wc_status_str(-1)), "unknown");
        assert_eq!(s(ibv_wc_status_str(9999)), "unknown");
        assert_eq!(s(ibv_event_type_str(15)), "SRQ limit reached");
        assert_eq!(s(ibv_port_state_str(4)), "PORT_ACTIVE");
    }
}
