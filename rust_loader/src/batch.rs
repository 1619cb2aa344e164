//! Collation: ImageNet normalisation into one zero-padded `[B, 3, H, W]` f32 buffer, a padding
//! mask, and targets as flat arrays (the layout `util.misc.nested_tensor_from_tensor_list` makes).
use std::mem::MaybeUninit;
use std::sync::Arc;

use crate::decode::{recycle, RgbImage};
use crate::pool::{BufferPool, PooledVec};
use crate::resample::{normalise_coefficients, SampleImage};
use crate::transforms::Decisions;

/// One transformed image with its target, ready for collation.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Its pixels, or the pending resize that makes them (run by the collation).
    pub image: SampleImage,
    /// Normalised `cxcywh` boxes of the transformed image.
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<i64>,
    pub image_id: i64,
    /// `(h, w)` of the decoded image.
    pub orig_size: (u32, u32),
    pub path: String,
    /// The augmentation drawn for this sample (training only).
    pub decisions: Option<Decisions>,
}

/// A collated batch. `images` is `[B, 3, H, W]` row-major; `mask` is `[B, H, W]`, true on
/// padding; boxes of all images are concatenated (`counts[b]` rows belong to image `b`).
/// The two big buffers return to their [`BatchPools`] when dropped.
#[derive(Debug, Default)]
pub struct Batch {
    pub shape: [usize; 4],
    pub images: PooledVec<f32>,
    pub mask: PooledVec<bool>,
    pub boxes: Vec<f32>,
    pub labels: Vec<i64>,
    pub counts: Vec<usize>,
    pub image_ids: Vec<i64>,
    pub orig_sizes: Vec<(u32, u32)>,
    pub sizes: Vec<(u32, u32)>,
    pub paths: Vec<String>,
}

/// Writes one sample's image as normalised CHW f32 into the top-left of a `[3, H, W]` slot and
/// zeros into the rest: every element of the slot is written exactly once. A pending resize runs
/// here, writing the slot directly.
fn write_image(image: &SampleImage, slot: &mut [MaybeUninit<f32>], pad_w: usize) {
    match image {
        SampleImage::Rgb(image) => write_normalised(image, slot, pad_w),
        SampleImage::Pending(p) => p.resize.write_normalised(&p.source, slot, pad_w),
    }
}

/// Writes one HWC u8 image as normalised CHW f32 into the top-left of a `[3, H, W]` slot and
/// zeros into the rest. The arithmetic loop is compiled twice, the second time for AVX2 (picked
/// at run time: the wheel itself targets baseline x86-64).
fn write_normalised(image: &RgbImage, slot: &mut [MaybeUninit<f32>], pad_w: usize) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { write_normalised_avx2(image, slot, pad_w) };
    }
    write_normalised_any(image, slot, pad_w);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn write_normalised_avx2(image: &RgbImage, slot: &mut [MaybeUninit<f32>], pad_w: usize) {
    write_normalised_any(image, slot, pad_w);
}

/// `(v / 255 - mean) / std` as `v * scale + offset` (within 1e-6 of torchvision's values).
#[inline(always)]
fn write_normalised_any(image: &RgbImage, slot: &mut [MaybeUninit<f32>], pad_w: usize) {
    // The collate's SAFETY argument rests on this: every pixel row exists, so all get written.
    assert_eq!(
        image.data.len(),
        image.width * image.height * 3,
        "RgbImage size"
    );
    let (scale, offset) = normalise_coefficients();
    let norm = |v: u8, c: usize| f32::from(v) * scale[c] + offset[c];
    let zero = MaybeUninit::new(0.0);
    let plane_len = slot.len() / 3;
    let (r_plane, rest) = slot.split_at_mut(plane_len);
    let (g_plane, b_plane) = rest.split_at_mut(plane_len);
    let valid_len = image.height * pad_w;
    for plane in [&mut *r_plane, &mut *g_plane, &mut *b_plane] {
        plane[valid_len..].fill(zero);
    }
    let rows = r_plane
        .chunks_exact_mut(pad_w)
        .zip(g_plane.chunks_exact_mut(pad_w))
        .zip(b_plane.chunks_exact_mut(pad_w));
    for (row, ((r, g), b)) in image.data.chunks_exact(image.width * 3).zip(rows) {
        let (r, r_pad) = r.split_at_mut(image.width);
        let (g, g_pad) = g.split_at_mut(image.width);
        let (b, b_pad) = b.split_at_mut(image.width);
        // One loop over all three channels (a stride-3 group the compiler vectorises).
        for (px, (r, (g, b))) in row
            .chunks_exact(3)
            .zip(r.iter_mut().zip(g.iter_mut().zip(b.iter_mut())))
        {
            r.write(norm(px[0], 0));
            g.write(norm(px[1], 1));
            b.write(norm(px[2], 2));
        }
        for pad in [r_pad, g_pad, b_pad] {
            pad.fill(zero);
        }
    }
}

/// `[H, W]` padding mask of one image: false on its pixels, true on the padding.
/// Every element of `mask` is written.
fn write_mask(image: &SampleImage, mask: &mut [MaybeUninit<bool>], pad_w: usize) {
    let (valid, padding_rows) = mask.split_at_mut(image.height() * pad_w);
    for row in valid.chunks_exact_mut(pad_w) {
        let (pixels, padding) = row.split_at_mut(image.width());
        pixels.fill(MaybeUninit::new(false));
        padding.fill(MaybeUninit::new(true));
    }
    padding_rows.fill(MaybeUninit::new(true));
}

/// Recycled image and mask buffers of a pipeline's batches (see [`crate::pool`]).
#[derive(Clone)]
pub struct BatchPools {
    images: Arc<BufferPool<f32>>,
    mask: Arc<BufferPool<bool>>,
}

impl BatchPools {
    /// Pools that keep up to `max_idle` buffers of each kind.
    pub fn new(max_idle: usize) -> Self {
        BatchPools {
            images: BufferPool::new(max_idle),
            mask: BufferPool::new(max_idle),
        }
    }

    /// Idle image buffers (for tests).
    pub fn idle_images(&self) -> usize {
        self.images.idle()
    }
}

/// Collates samples into freshly allocated buffers (see [`collate_into`]).
pub fn collate(samples: Vec<Sample>) -> Batch {
    collate_into(samples, &BatchPools::new(0))
}

/// Collates samples into buffers from `pools`, on the calling thread (the pipeline runs many
/// collations at once); each image is normalised and padded into its own slot of the batch buffer,
/// written once, so the buffer is never zero-filled first.
pub fn collate_into(samples: Vec<Sample>, pools: &BatchPools) -> Batch {
    let n = samples.len();
    let pad_h = samples.iter().map(|s| s.image.height()).max().unwrap_or(0);
    let pad_w = samples.iter().map(|s| s.image.width()).max().unwrap_or(0);
    let slot_len = 3 * pad_h * pad_w;
    let mut images = pools.images.take(n * slot_len);
    let mut mask = pools.mask.take(n * pad_h * pad_w);
    if slot_len > 0 {
        let slots = images.spare_capacity_mut()[..n * slot_len].chunks_mut(slot_len);
        let masks = mask.spare_capacity_mut()[..n * pad_h * pad_w].chunks_mut(pad_h * pad_w);
        for ((slot, mask), s) in slots.zip(masks).zip(&samples) {
            write_image(&s.image, slot, pad_w);
            write_mask(&s.image, mask, pad_w);
        }
    }
    // SAFETY: `write_image` wrote all `slot_len` elements of each of the `n` slots and
    // `write_mask` all `pad_h * pad_w` elements of each of the `n` masks.
    unsafe {
        images.set_len(n * slot_len);
        mask.set_len(n * pad_h * pad_w);
    }
    let mut batch = Batch {
        shape: [n, 3, pad_h, pad_w],
        images,
        mask,
        ..Batch::default()
    };
    for s in samples {
        batch
            .sizes
            .push((s.image.height() as u32, s.image.width() as u32));
        // The pixels are in the batch now: their buffers go to the next decodes.
        match s.image {
            SampleImage::Rgb(image) => recycle(image.data),
            SampleImage::Pending(p) => recycle(p.source.data),
        }
        batch.boxes.extend(s.boxes.iter().flatten());
        batch.labels.extend(&s.labels);
        batch.counts.push(s.labels.len());
        batch.image_ids.push(s.image_id);
        batch.orig_sizes.push(s.orig_size);
        batch.paths.push(s.path);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(w: usize, h: usize, value: u8, nboxes: usize) -> Sample {
        Sample {
            image: RgbImage::new(w, h, vec![value; w * h * 3]).into(),
            boxes: vec![[0.5, 0.5, 0.2, 0.2]; nboxes],
            labels: vec![1; nboxes],
            image_id: w as i64,
            orig_size: (h as u32, w as u32),
            path: format!("{w}.jpg"),
            decisions: None,
        }
    }

    #[test]
    fn pads_to_largest_with_zeros_and_masks_padding() {
        let batch = collate(vec![sample(4, 2, 255, 1), sample(2, 3, 0, 2)]);
        assert_eq!(batch.shape, [2, 3, 3, 4]);
        let at =
            |b: usize, c: usize, y: usize, x: usize| batch.images[((b * 3 + c) * 3 + y) * 4 + x];
        let m = |b: usize, y: usize, x: usize| batch.mask[(b * 3 + y) * 4 + x];
        // Image 0 (white): valid region normalised, row 2 padded.
        assert!((at(0, 0, 1, 3) - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert_eq!(at(0, 2, 2, 0), 0.0);
        assert!(!m(0, 1, 3) && m(0, 2, 0));
        // Image 1 (black): columns 2..4 padded.
        assert!((at(1, 1, 2, 1) - (-0.456 / 0.224)).abs() < 1e-6);
        assert_eq!(at(1, 1, 2, 2), 0.0);
        assert!(!m(1, 2, 1) && m(1, 0, 2));
        assert_eq!(batch.counts, vec![1, 2]);
        assert_eq!(batch.boxes.len(), 12);
        assert_eq!(batch.sizes, vec![(2, 4), (3, 2)]);
    }

    #[test]
    fn pooled_buffers_are_recycled_and_fully_rewritten() {
        let pools = BatchPools::new(2);
        let first = collate_into(vec![sample(6, 5, 255, 0), sample(6, 5, 255, 0)], &pools);
        let address = first.images.as_ptr();
        drop(first);
        assert_eq!(pools.idle_images(), 1);
        // A smaller batch reuses the buffer; stale values of the first batch must not leak into
        // its padding or pixels.
        let second = collate_into(vec![sample(2, 1, 0, 0), sample(4, 3, 0, 0)], &pools);
        assert_eq!(second.images.as_ptr(), address);
        let fresh = collate(vec![sample(2, 1, 0, 0), sample(4, 3, 0, 0)]);
        assert_eq!(second.shape, fresh.shape);
        assert_eq!(*second.images, *fresh.images);
        assert_eq!(*second.mask, *fresh.mask);
    }

    #[test]
    fn channels_are_planar_in_rgb_order() {
        let mut s = sample(1, 1, 0, 0);
        s.image = RgbImage::new(1, 1, vec![255, 0, 255]).into();
        let batch = collate(vec![s]);
        let expected = [(1.0 - 0.485) / 0.229, -0.456 / 0.224, (1.0 - 0.406) / 0.225];
        for (v, e) in batch.images.iter().zip(expected) {
            assert!((v - e).abs() < 1e-6);
        }
    }
}
