//! RoCEv2 packets for the vrdma soft fabric.
#![no_std]
#![forbid(unsafe_code)]
