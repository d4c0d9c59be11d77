//! The controllers (I/O): Cell and CellSet reconcilers and their shared context.

pub mod cell;
pub mod cellset;
