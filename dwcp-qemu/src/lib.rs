//! QEMU proxy mode. Work in progress (issue 7).
#![deny(missing_docs)]
