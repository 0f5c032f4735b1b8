//! perftest for vrdma.
