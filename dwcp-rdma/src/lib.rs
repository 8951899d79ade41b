//! AMST over RDMA verbs. Work in progress (issue 6).
#![deny(missing_docs)]
