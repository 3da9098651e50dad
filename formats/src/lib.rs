pub mod config;
pub mod diff;
pub mod disk;
pub mod host;
pub mod interchange;
pub mod pack;
pub mod vm;
