//! Test support shared by the privileged tests, the XDP benchmark and the demo.
pub mod fixture;
pub mod frames;
pub mod netns;
pub mod report;
