//! ddetr's data pipeline: COCO parsing, image decoding, DETR augmentations and batching.

#[cfg(feature = "python")]
mod python;
