//! Easel's inference engine: everything between a prompt and an image, with no UI.
//!
//! Layout follows the architecture: [`pipeline`] (text encoding, the denoising loop, decoding)
//! drives [`models`] (families, loading, the networks) and [`schedulers`] (one file per sampler),
//! drawing noise from [`rng`] generators that reproduce torch's. [`metadata`] reads and writes
//! the AUTOMATIC1111 `parameters` text that other apps understand.

// Anything a user can cause must come back as an `Error`, never a panic: no unwrap/expect in the
// engine's own code (tests, examples and benches may: they fail by panicking).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bench;
pub mod device;
pub mod error;
pub mod hub;
pub mod kernels;
pub mod memory;
pub mod metadata;
pub mod models;
pub mod pipeline;
pub mod rng;
pub mod schedulers;

pub use error::{Error, Result};
