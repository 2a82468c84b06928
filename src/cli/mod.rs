pub mod data;
pub mod demo;
pub mod generate;
pub mod progress;
pub mod train;
