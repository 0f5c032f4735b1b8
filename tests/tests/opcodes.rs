//! Every opcode between two VMs served by one daemon, data verified byte for byte.

use vrdma_tests::TestDaemon;
use vrdma_tests::scenarios;

#[test]
fn rc_send_write_read_and_atomics_move_the_right_bytes() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    scenarios::rc_send_write_read_and_atomics(&d.open("a"), &d.open("b"));
}

#[test]
fn unsignalled_requests_complete_silently_and_in_order() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    scenarios::unsignalled_requests_complete_silently_and_in_order(&d.open("a"), &d.open("b"));
}

#[test]
fn ud_datagrams_carry_grh_source_qp_and_gid() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    scenarios::ud_datagrams_carry_grh_source_qp_and_gid(&d.open("a"), &d.open("b"));
}
