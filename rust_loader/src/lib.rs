//! ddetr's data pipeline: COCO parsing, image decoding, DETR augmentations and batching; and the
//! reader of COCO results files that evaluation uses.
//!
//! The core is plain Rust (`cargo test` needs no Python); `python.rs` is a thin PyO3 layer
//! compiled only with the `python` feature (maturin turns it on).
pub mod batch;
pub mod coco;
pub mod decode;
pub mod error;
pub mod pipeline;
pub mod pool;
pub mod resample;
pub mod results;
pub mod rng;
pub mod scan;
pub mod transforms;

pub use error::{LoaderError, Result};

#[cfg(feature = "python")]
mod python;
