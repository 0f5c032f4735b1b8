//! Application buffers made reachable by the device (placeholder: written next).
