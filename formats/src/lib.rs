pub mod config;
pub mod disk;
pub mod host;
pub mod pack;
pub mod vm;
