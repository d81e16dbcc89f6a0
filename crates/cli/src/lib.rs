//! Pieces of the `tchserve` binary: background start/stop and the archive check.

pub mod control;
pub mod startup_check;
