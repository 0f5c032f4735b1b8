//! Memory a guest shares in pieces, on the soft fabric: see `vrdma_tests::regions`.

use vrdma_tests::TestDaemon;

#[test]
fn an_mr_spans_adjacent_regions_one_adopted_at_a_file_offset() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    vrdma_tests::regions::mr_across_adjacent_regions(&d.open("a"), &d.open("b"));
}
