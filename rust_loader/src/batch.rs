//! Collation: ImageNet normalisation into one zero-padded `[B, 3, H, W]` f32 buffer, a padding
//! mask, and targets as flat arrays (the layout `util.misc.nested_tensor_from_tensor_list` makes).
use rayon::prelude::*;

use crate::decode::RgbImage;
use crate::transforms::Decisions;

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One transformed image with its target, ready for collation.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: RgbImage,
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
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub shape: [usize; 4],
    pub images: Vec<f32>,
    pub mask: Vec<bool>,
    pub boxes: Vec<f32>,
    pub labels: Vec<i64>,
    pub counts: Vec<usize>,
    pub image_ids: Vec<i64>,
    pub orig_sizes: Vec<(u32, u32)>,
    pub sizes: Vec<(u32, u32)>,
    pub paths: Vec<String>,
}

/// `(v / 255 - mean) / std` per channel, computed in f32 exactly as `to_tensor` + `normalize`.
fn normalisation_table() -> [[f32; 256]; 3] {
    let mut lut = [[0.0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            *out = (v as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    lut
}

/// Writes one HWC u8 image as normalised CHW f32 into the top-left of a `[3, H, W]` slot.
fn write_normalised(
    image: &RgbImage,
    slot: &mut [f32],
    pad_h: usize,
    pad_w: usize,
    lut: &[[f32; 256]; 3],
) {
    let plane = pad_h * pad_w;
    let (r_plane, rest) = slot.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    for (y, row) in image.data.chunks_exact(image.width * 3).enumerate() {
        let range = y * pad_w..y * pad_w + image.width;
        let (r, g, b) = (
            &mut r_plane[range.clone()],
            &mut g_plane[range.clone()],
            &mut b_plane[range],
        );
        // Zipped iterators: no bounds checks in the hot loop (u8 indices into 256-entry tables).
        for (px, (r, (g, b))) in row
            .chunks_exact(3)
            .zip(r.iter_mut().zip(g.iter_mut().zip(b.iter_mut())))
        {
            *r = lut[0][px[0] as usize];
            *g = lut[1][px[1] as usize];
            *b = lut[2][px[2] as usize];
        }
    }
}

/// Collates samples; images are normalised in parallel (one task per image).
pub fn collate(samples: Vec<Sample>) -> Batch {
    let n = samples.len();
    let pad_h = samples.iter().map(|s| s.image.height).max().unwrap_or(0);
    let pad_w = samples.iter().map(|s| s.image.width).max().unwrap_or(0);
    let lut = normalisation_table();
    let mut images = vec![0.0f32; n * 3 * pad_h * pad_w];
    if pad_h * pad_w > 0 {
        images
            .par_chunks_mut(3 * pad_h * pad_w)
            .zip(samples.par_iter())
            .for_each(|(slot, s)| write_normalised(&s.image, slot, pad_h, pad_w, &lut));
    }
    let mut mask = vec![true; n * pad_h * pad_w];
    let mut batch = Batch {
        shape: [n, 3, pad_h, pad_w],
        ..Batch::default()
    };
    for (b, s) in samples.into_iter().enumerate() {
        for y in 0..s.image.height {
            let start = (b * pad_h + y) * pad_w;
            mask[start..start + s.image.width].fill(false);
        }
        batch.boxes.extend(s.boxes.iter().flatten());
        batch.labels.extend(&s.labels);
        batch.counts.push(s.labels.len());
        batch.image_ids.push(s.image_id);
        batch.orig_sizes.push(s.orig_size);
        batch
            .sizes
            .push((s.image.height as u32, s.image.width as u32));
        batch.paths.push(s.path);
    }
    batch.images = images;
    batch.mask = mask;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(w: usize, h: usize, value: u8, nboxes: usize) -> Sample {
        Sample {
            image: RgbImage::new(w, h, vec![value; w * h * 3]),
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
    fn channels_are_planar_in_rgb_order() {
        let mut s = sample(1, 1, 0, 0);
        s.image.data = vec![255, 0, 255];
        let batch = collate(vec![s]);
        let expected = [(1.0 - 0.485) / 0.229, -0.456 / 0.224, (1.0 - 0.406) / 0.225];
        for (v, e) in batch.images.iter().zip(expected) {
            assert!((v - e).abs() < 1e-6);
        }
    }
}
