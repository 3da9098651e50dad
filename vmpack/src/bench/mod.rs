//! The benchmark harnesses behind `vmpack bench`, `bench-snapshot`, `bench-clones` and
//! `bench-registry` (README, "Performance"). They measure the commands from outside, as a
//! user would: none of the commands' own code depends on anything here, and each harness
//! reaches the rest of vmpack only through its public commands and helpers.

pub mod clones;
pub mod pack;
pub mod registry;
pub mod snapshot;
