//! Placeholder until the app module is wired in; the UI will use these items.
#[allow(dead_code)]
pub mod preview;
