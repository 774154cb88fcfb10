//! HTTP handlers: each parses and validates its request, calls one
//! operation of the machine manager, and shapes the answer. No logic lives
//! here.

pub mod apps;
pub mod checkpoints;
pub mod egress;
pub mod files;
pub mod images;
pub mod machines;
pub mod volumes;
