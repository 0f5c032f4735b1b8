//! The verbs-like library guest applications link (issue 4 builds it out).
