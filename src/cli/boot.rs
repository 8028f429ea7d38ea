//! `vault-bootstrap boot`: the boot path lives in [`crate::boot`]; this leaf only runs it.

pub use crate::boot::run;
