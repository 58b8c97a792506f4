//! fs3-mgmtd: the cluster manager of fs3.
//!
//! - [`chain`]: how chains change when their targets' local states change (the failure
//!   detector's rules).

pub mod chain;
