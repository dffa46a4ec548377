//! Easel's app crate: the window (`app`), the background `worker` that owns the model, and the
//! headless `cli`. The engine (models, schedulers, pipeline) lives in the `easel-engine` crate
//! and knows nothing of egui; the app never touches tensors.

pub mod allocator;
pub mod app;
pub mod cli;
pub mod worker;
