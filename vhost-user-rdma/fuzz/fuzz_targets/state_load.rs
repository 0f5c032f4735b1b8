//! Live migration's device-state loader on arbitrary bytes: `model::state::load` is what a
//! destination daemon runs on the blob a frontend hands it, so it must refuse anything it
//! cannot restore exactly, with an error and never a panic.
//!
//! Input byte 0 chooses how the rest is used: even, as a whole blob (header included), to
//! reach the framing checks; odd, as a payload that the harness frames with a valid header and
//! checksum, to reach the decoder and every validation behind it.
//!
//! Oracle: a state that loads saves again to bytes that load to the same state (saving the
//! second restore gives the same bytes as saving the first).
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use vhost_user_rdma::config::{Quotas, VmConfig};
use vhost_user_rdma::model::state::{self, codec};
use vrdma_proto::Gid;
use vrdma_proto::config::Mtu;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let blob = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        codec::frame(state::VERSION, rest)
    };
    let cfg = VmConfig {
        name: "fuzz".into(),
        socket: "/nonexistent".into(),
        gid: Gid::from_ipv4([10, 0, 0, 2]),
        weight: 1,
        class: Default::default(),
        sl_classes: Default::default(),
        quotas: Quotas::default(),
        doorbell_queues: 1,
        active_mtu: Mtu::Mtu4096,
        roce: mode & 2 != 0,
        incoming: false,
        nic_qpns: false,
        socket_access: Default::default(),
    };
    let now = Instant::now();
    let restored = match state::load(&blob, &cfg, 7, now) {
        Ok(r) => r,
        Err(e) => {
            // Every error has a message an operator can read.
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let again = state::save(&restored.objects, restored.counters, &restored.events, now);
    let second = state::load(&again, &cfg, 7, now).expect("a saved state loads");
    let third = state::save(&second.objects, second.counters, &second.events, now);
    assert_eq!(again, third, "save(load(x)) is stable");
});
