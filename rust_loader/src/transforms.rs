//! The DETR augmentations, exactly as official `datasets/transforms.py` and
//! `datasets/coco.py::make_coco_transforms` define them.
//!
//! Boxes are absolute `xyxy` in `f32` while transforms run (as the official torch tensors are) and
//! become normalised `cxcywh` at the end (`Normalize`). Every random draw is made up front into a
//! [`Decisions`] record, so a Python reference can replay exactly the same augmentation.
use std::cell::RefCell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::decode::{recycle, RgbImage};
use crate::resample::{PendingResize, Resize, SampleImage};
use crate::rng::KeyedRng;

/// Boxes (absolute `xyxy`) and their class indices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Boxes {
    pub xyxy: Vec<[f32; 4]>,
    pub labels: Vec<i64>,
}

/// Settings of the train/val augmentations (defaults are the paper's).
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Shorter sides of the multi-scale resize (train).
    pub scales: Vec<u32>,
    /// Longest side after resizing.
    pub max_size: u32,
    /// Shorter side at evaluation.
    pub val_size: u32,
    /// Shorter sides of the resize before the random crop.
    pub crop_resize: Vec<u32>,
    /// `RandomSizeCrop(min, max)` side range.
    pub crop_size: (u32, u32),
    /// Probability of the crop branch (official `RandomSelect`: 0.5). Short schedules on small
    /// data (the demo) learn faster with fewer crops: crops cut large objects apart.
    pub crop_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            scales: (0..11).map(|k| 480 + 32 * k).collect(),
            max_size: 1333,
            val_size: 800,
            crop_resize: vec![400, 500, 600],
            crop_size: (384, 600),
            crop_prob: 0.5,
        }
    }
}

/// The random crop branch: resize the shorter side to `pre_size`, then crop `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropDecision {
    pub pre_size: u32,
    /// `(top, left, height, width)` in the image after the `pre_size` resize.
    pub region: (u32, u32, u32, u32),
}

/// Every random choice of one training augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decisions {
    pub flip: bool,
    pub crop: Option<CropDecision>,
    /// Shorter side of the final (multi-scale) resize, before the `max_size` cap.
    pub size: u32,
}

/// Official `get_size_with_aspect_ratio`: output `(h, w)` for shorter side `size`, longer side
/// capped at `max_size`. Python semantics kept: `round` is half-to-even, `int` truncates.
/// One departure: every side is at least 1 pixel. Officially an image more than `2 * max_size`
/// times longer than wide (3000x1) gets a shorter side of 0 and breaks the model and the batch.
pub fn get_size_with_aspect_ratio(w: u32, h: u32, size: u32, max_size: Option<u32>) -> (u32, u32) {
    let mut size = size.max(1);
    if let Some(max_size) = max_size {
        let min_original = f64::from(w.min(h));
        let max_original = f64::from(w.max(h));
        if max_original / min_original * f64::from(size) > f64::from(max_size) {
            let capped = (f64::from(max_size) * min_original / max_original).round_ties_even();
            size = (capped as u32).max(1);
        }
    }
    if (w <= h && w == size) || (h <= w && h == size) {
        return (h, w);
    }
    let longer = |long: u32, short: u32| {
        (((f64::from(size) * f64::from(long)) / f64::from(short)) as u32).max(1)
    };
    if w < h {
        (longer(h, w), size)
    } else {
        (size, longer(w, h))
    }
}

/// Draws the official train augmentation's choices for an image of `w x h`:
/// `RandomHorizontalFlip()`, then `RandomSelect(RandomResize(scales, max), Compose([
/// RandomResize(crop_resize), RandomSizeCrop(min, max), RandomResize(scales, max)]))`.
pub fn draw_train_decisions(rng: &mut KeyedRng, w: u32, h: u32, cfg: &AugmentConfig) -> Decisions {
    let flip = rng.uniform() < 0.5;
    // One uniform draw either way (later draws do not depend on crop_prob); crop_prob = 0.5
    // gives the same decisions as before the option existed.
    let crop = if rng.uniform() < 1.0 - cfg.crop_prob {
        None
    } else {
        let pre_size = rng.choice(&cfg.crop_resize);
        let (ph, pw) = get_size_with_aspect_ratio(w, h, pre_size, None);
        // random.randint(min_size, min(img.width, max_size)); images narrower than min_size
        // (impossible with the default sizes) crop their full extent instead of raising.
        let (lo, hi) = cfg.crop_size;
        let cw = rng.randint(lo.min(pw), pw.min(hi).max(lo.min(pw)));
        let ch = rng.randint(lo.min(ph), ph.min(hi).max(lo.min(ph)));
        // T.RandomCrop.get_params: top in [0, H - h], left in [0, W - w].
        let top = rng.randint(0, ph - ch);
        let left = rng.randint(0, pw - cw);
        Some(CropDecision {
            pre_size,
            region: (top, left, ch, cw),
        })
    };
    let size = rng.choice(&cfg.scales);
    Decisions { flip, crop, size }
}

/// Official `hflip`: mirrors the image and maps `x -> w - x`.
pub fn hflip(image: &mut RgbImage, boxes: &mut Boxes) {
    let w = image.width;
    if w > 1 {
        let mut mirrored = vec![0u8; w * 3];
        for row in image.data.chunks_exact_mut(w * 3) {
            mirror_row(row, &mut mirrored);
            row.copy_from_slice(&mirrored);
        }
    }
    flip_boxes(boxes, w);
}

/// The box part of official `hflip` for an image `w` pixels wide.
fn flip_boxes(boxes: &mut Boxes, w: usize) {
    let wf = w as f32;
    for b in &mut boxes.xyxy {
        *b = [-b[2] + wf, b[1], -b[0] + wf, b[3]];
    }
}

/// Writes the pixels of the RGB row `src` into `dst` in reverse order. 5 pixels (15 bytes) per
/// SSSE3 byte shuffle where available: ~10x faster than reversing `[u8; 3]` elements.
fn mirror_row(src: &[u8], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU supports SSSE3, checked just above.
        return unsafe { mirror_row_ssse3(src, dst) };
    }
    mirror_pixels(src, dst);
}

fn mirror_pixels(src: &[u8], dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(3).rev()) {
        d.copy_from_slice(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
fn mirror_row_ssse3(src: &[u8], dst: &mut [u8]) {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_setr_epi8, _mm_shuffle_epi8, _mm_storeu_si128,
    };
    assert_eq!(src.len(), dst.len());
    let n = src.len();
    // Block k of `dst` (bytes 15k..15k+15) holds the 5 pixels that end at byte n - 15k of `src`,
    // in reverse order. We load the 16 bytes ending there (the 5 pixels are bytes 1..16) and
    // store 16 bytes (the 16th is overwritten by the next block or the scalar tail).
    let reverse5 = _mm_setr_epi8(13, 14, 15, 10, 11, 12, 7, 8, 9, 4, 5, 6, 1, 2, 3, 0);
    let mut k = 0;
    while 15 * k + 16 <= n {
        let end = n - 15 * k;
        // SAFETY: end - 16 >= 0 (since n - 15k >= 16) and end <= n: the load is inside `src`;
        // 15k + 16 <= n: the store is inside `dst`.
        unsafe {
            let v = _mm_loadu_si128(src.as_ptr().add(end - 16) as *const __m128i);
            _mm_storeu_si128(
                dst.as_mut_ptr().add(15 * k) as *mut __m128i,
                _mm_shuffle_epi8(v, reverse5),
            );
        }
        k += 1;
    }
    let done = 15 * k;
    mirror_pixels(&src[..n - done], &mut dst[done..]);
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Bilinear resize with Pillow's antialiasing (support widened when downscaling), the filter
/// `torchvision.transforms.functional.resize` applies to PIL images.
pub fn resize_image(image: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    if (out_w, out_h) == (image.width, image.height) {
        return image.clone();
    }
    let whole = (0.0, 0.0, image.width as f64, image.height as f64);
    resize_window_generic(image, whole, out_w, out_h)
}

/// Resize of `image` (mirrored first when `flip`) to `out_w x out_h`: a pending streaming resize
/// when [`Resize`] takes it (upscales and downscales by up to 3), otherwise done now by the
/// generic path.
fn resize_staged(mut image: RgbImage, out_w: usize, out_h: usize, flip: bool) -> SampleImage {
    let whole = (0.0, 0.0, image.width as f64, image.height as f64);
    match Resize::new((image.width, image.height), whole, (out_w, out_h), flip) {
        Some(resize) => SampleImage::Pending(Box::new(PendingResize {
            source: image,
            resize,
        })),
        None => {
            if flip {
                hflip(&mut image, &mut Boxes::default());
            }
            SampleImage::Rgb(resize_image(&image, out_w, out_h))
        }
    }
}

/// The window `region = (top, left, height, width)` of `image` resized to `resized_w x resized_h`,
/// computed without building the whole resized image: resizing the matching source box to the
/// window's size uses the same filter centres and taps (Pillow's `resize(size, box=...)`
/// semantics, which fast_image_resize follows), so this is resize-then-crop minus the pixels the
/// crop throws away and minus a copy.
pub fn resize_window(
    image: &RgbImage,
    resized_w: usize,
    resized_h: usize,
    region: (u32, u32, u32, u32),
    flip: bool,
) -> RgbImage {
    let (top, left, h, w) = region;
    let sx = image.width as f64 / resized_w as f64;
    let sy = image.height as f64 / resized_h as f64;
    // Products are clamped to the image so float rounding cannot push the box outside it.
    let (box_left, box_top) = (f64::from(left) * sx, f64::from(top) * sy);
    let box_w = (f64::from(w) * sx).min(image.width as f64 - box_left);
    let box_h = (f64::from(h) * sy).min(image.height as f64 - box_top);
    let src_box = (box_left, box_top, box_w, box_h);
    let (w, h) = (w as usize, h as usize);
    match Resize::new((image.width, image.height), src_box, (w, h), flip) {
        Some(resize) => resize.to_rgb(image),
        None if flip => {
            let mut mirrored = image.clone();
            hflip(&mut mirrored, &mut Boxes::default());
            resize_window_generic(&mirrored, src_box, w, h)
        }
        None => resize_window_generic(image, src_box, w, h),
    }
}

/// The source box `(left, top, width, height)` of `image` resized to `out_w x out_h` by
/// fast_image_resize's bilinear convolution (any scale; [`crate::resample`] is the faster path
/// for scales up to 3). fast_image_resize runs the vertical pass first for u8 images; when the
/// image grows vertically that makes the (costlier, for 3-channel pixels) horizontal pass run
/// over the many output rows, so then we run the two passes ourselves, horizontal first, as
/// Pillow does (measured 10-25% faster for the multi-scale upscales).
pub fn resize_window_generic(
    image: &RgbImage,
    src_box: (f64, f64, f64, f64),
    out_w: usize,
    out_h: usize,
) -> RgbImage {
    let (left, top, box_w, box_h) = src_box;
    let (out_w, out_h) = (out_w as u32, out_h as u32);
    let src = ImageRef::new(
        image.width as u32,
        image.height as u32,
        &image.data,
        PixelType::U8x3,
    )
    .expect("RgbImage buffer matches its size");
    let bilinear = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    let mut dst = Image::new(out_w, out_h, PixelType::U8x3);
    RESIZER.with(|r| {
        let mut resizer = r.borrow_mut();
        if f64::from(out_h) > box_h {
            let mut rows = Image::new(out_w, image.height as u32, PixelType::U8x3);
            let horizontal = bilinear.crop(left, 0.0, box_w, image.height as f64);
            resizer
                .resize(&src, &mut rows, &horizontal)
                .expect("crop box lies inside the image");
            let vertical = bilinear.crop(0.0, top, f64::from(out_w), box_h);
            resizer.resize(&rows, &mut dst, &vertical)
        } else {
            resizer.resize(&src, &mut dst, &bilinear.crop(left, top, box_w, box_h))
        }
        .expect("crop box lies inside the image")
    });
    RgbImage::new(out_w as usize, out_h as usize, dst.into_vec())
}

/// Official `resize(image, target, size, max_size)` for a scalar `size`: boxes scaled now, the
/// pixels (mirrored first when `flip`) resized now or left pending (see [`resize_staged`]).
pub fn resize(
    image: RgbImage,
    boxes: &mut Boxes,
    size: u32,
    max_size: Option<u32>,
    flip: bool,
) -> SampleImage {
    let (w, h) = (image.width as u32, image.height as u32);
    let (oh, ow) = get_size_with_aspect_ratio(w, h, size, max_size);
    scale_boxes(boxes, (w, h), (ow, oh));
    resize_staged(image, ow as usize, oh as usize, flip)
}

/// The box part of official `resize`: from an image of `from = (w, h)` to `to = (w, h)`.
fn scale_boxes(boxes: &mut Boxes, from: (u32, u32), to: (u32, u32)) {
    // Ratios are Python floats, multiplied into float32 boxes.
    let rw = (f64::from(to.0) / f64::from(from.0)) as f32;
    let rh = (f64::from(to.1) / f64::from(from.1)) as f32;
    for b in &mut boxes.xyxy {
        *b = [b[0] * rw, b[1] * rh, b[2] * rw, b[3] * rh];
    }
}

/// Official `crop(image, target, (top, left, h, w))`: boxes shifted, clipped to the region and
/// dropped when empty.
pub fn crop(image: &RgbImage, boxes: &mut Boxes, region: (u32, u32, u32, u32)) -> RgbImage {
    let (top, left, h, w) = (
        region.0 as usize,
        region.1 as usize,
        region.2 as usize,
        region.3 as usize,
    );
    let mut data = Vec::with_capacity(w * h * 3);
    for y in top..top + h {
        let start = (y * image.width + left) * 3;
        data.extend_from_slice(&image.data[start..start + w * 3]);
    }
    crop_boxes(boxes, region);
    RgbImage::new(w, h, data)
}

/// The box part of official `crop`: shifted, clipped to the region, dropped when empty.
fn crop_boxes(boxes: &mut Boxes, region: (u32, u32, u32, u32)) {
    let (top, left, h, w) = region;
    let (jf, if_, wf, hf) = (left as f32, top as f32, w as f32, h as f32);
    let mut kept = Boxes::default();
    for (b, &label) in boxes.xyxy.iter().zip(&boxes.labels) {
        let c = [
            (b[0] - jf).min(wf).max(0.0),
            (b[1] - if_).min(hf).max(0.0),
            (b[2] - jf).min(wf).max(0.0),
            (b[3] - if_).min(hf).max(0.0),
        ];
        if c[2] > c[0] && c[3] > c[1] {
            kept.xyxy.push(c);
            kept.labels.push(label);
        }
    }
    *boxes = kept;
}

/// Applies a training augmentation given its decisions.
pub fn apply_train(
    image: RgbImage,
    boxes: &mut Boxes,
    d: &Decisions,
    cfg: &AugmentConfig,
) -> RgbImage {
    apply_train_staged(image, boxes, d, cfg).into_rgb()
}

/// [`apply_train`] with the last resize left pending when it is a streaming one (it then runs
/// when the batch is collated, writing normalised values straight into the batch).
pub fn apply_train_staged(
    image: RgbImage,
    boxes: &mut Boxes,
    d: &Decisions,
    cfg: &AugmentConfig,
) -> SampleImage {
    let mut image = image;
    // The flip is folded into the next resize (the crop window's, else the final one): the
    // boxes flip now, the pixels are read mirrored by that resize.
    let mut flip_pending = d.flip;
    if d.flip {
        flip_boxes(boxes, image.width);
    }
    if let Some(c) = d.crop {
        // Official order (resize to `pre_size`, then crop) for the boxes; the pixels of the
        // crop window are resized directly.
        let (w, h) = (image.width as u32, image.height as u32);
        let (ph, pw) = get_size_with_aspect_ratio(w, h, c.pre_size, None);
        scale_boxes(boxes, (w, h), (pw, ph));
        crop_boxes(boxes, c.region);
        let window = resize_window(&image, pw as usize, ph as usize, c.region, flip_pending);
        flip_pending = false;
        recycle(std::mem::replace(&mut image, window).data);
    }
    resize(image, boxes, d.size, Some(cfg.max_size), flip_pending)
}

/// The evaluation transform: `RandomResize([val_size], max_size)`.
pub fn apply_val(image: &RgbImage, boxes: &mut Boxes, cfg: &AugmentConfig) -> RgbImage {
    apply_val_staged(image.clone(), boxes, cfg).into_rgb()
}

/// [`apply_val`] with the resize left pending when it is a streaming one.
pub fn apply_val_staged(image: RgbImage, boxes: &mut Boxes, cfg: &AugmentConfig) -> SampleImage {
    resize(image, boxes, cfg.val_size, Some(cfg.max_size), false)
}

/// Official `Normalize` for boxes: `xyxy` absolute -> `cxcywh` divided by `(w, h, w, h)`.
pub fn normalize_boxes(boxes: &Boxes, w: usize, h: usize) -> Vec<[f32; 4]> {
    let (wf, hf) = (w as f32, h as f32);
    boxes
        .xyxy
        .iter()
        .map(|b| {
            let cxcywh = [
                (b[0] + b[2]) / 2.0,
                (b[1] + b[3]) / 2.0,
                b[2] - b[0],
                b[3] - b[1],
            ];
            [
                cxcywh[0] / wf,
                cxcywh[1] / hf,
                cxcywh[2] / wf,
                cxcywh[3] / hf,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let data = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, 7]))
            .collect();
        RgbImage::new(w, h, data)
    }

    fn one_box(b: [f32; 4]) -> Boxes {
        Boxes {
            xyxy: vec![b],
            labels: vec![3],
        }
    }

    #[test]
    fn size_rule_matches_official_examples() {
        // 640x480 -> shorter 800, longer 1066 (int truncation).
        assert_eq!(
            get_size_with_aspect_ratio(640, 480, 800, Some(1333)),
            (800, 1066)
        );
        // Very wide: shorter side round(1333 * 200 / 1000) = 267; the longer side may then
        // exceed max_size slightly (int(267 * 1000 / 200) = 1335), as in the official code.
        assert_eq!(
            get_size_with_aspect_ratio(1000, 200, 800, Some(1333)),
            (267, 1335)
        );
        // Shorter side already equal: unchanged.
        assert_eq!(
            get_size_with_aspect_ratio(800, 1200, 800, Some(1333)),
            (1200, 800)
        );
        // Portrait.
        assert_eq!(get_size_with_aspect_ratio(480, 640, 512, None), (682, 512));
        // Ties round to even like Python's round(): 5 * 1 / 2 = 2.5 -> 2 (not 3).
        assert_eq!(get_size_with_aspect_ratio(2, 1, 3, Some(5)), (2, 4));
    }

    #[test]
    fn extreme_aspect_ratios_keep_every_side_at_least_one_pixel() {
        // Officially round(1333 / 3000) = 0: a 0-pixel side.
        assert_eq!(
            get_size_with_aspect_ratio(3000, 1, 800, Some(1333)),
            (1, 3000)
        );
        assert_eq!(
            get_size_with_aspect_ratio(1, 3000, 800, Some(1333)),
            (3000, 1)
        );
        assert_eq!(
            get_size_with_aspect_ratio(3000, 2, 800, Some(1333)),
            (1, 1500)
        );
        assert_eq!(get_size_with_aspect_ratio(5, 5, 0, None), (1, 1));
        let cfg = AugmentConfig::default();
        for (w, h) in [(3000, 1), (1, 3000), (3000, 2), (1, 1), (2, 2999)] {
            let image = gradient(w, h);
            let out = apply_val(&image, &mut Boxes::default(), &cfg);
            assert!(out.width >= 1 && out.height >= 1, "{w}x{h} -> {out:?}");
            for seed in 0..20 {
                let mut rng = KeyedRng::from_key(&[seed, w as u64, h as u64]);
                let d = draw_train_decisions(&mut rng, w as u32, h as u32, &cfg);
                let out = apply_train(image.clone(), &mut Boxes::default(), &d, &cfg);
                assert!(out.width >= 1 && out.height >= 1, "{w}x{h} {d:?}");
                assert_eq!(out.data.len(), out.width * out.height * 3);
            }
        }
    }

    #[test]
    fn mirror_row_matches_reversing_pixels_for_every_width() {
        for w in 1..40 {
            let src: Vec<u8> = (0..w * 3).map(|i| (i * 7 + 1) as u8).collect();
            let mut expected = src.clone();
            expected.as_chunks_mut::<3>().0.reverse();
            let mut dst = vec![0; w * 3];
            mirror_row(&src, &mut dst);
            assert_eq!(dst, expected, "width {w}");
            mirror_pixels(&src, &mut dst);
            assert_eq!(dst, expected, "width {w} (portable)");
        }
    }

    #[test]
    fn hflip_mirrors_pixels_and_boxes() {
        let mut img = gradient(5, 2);
        let mut b = one_box([1.0, 0.0, 2.0, 1.0]);
        hflip(&mut img, &mut b);
        assert_eq!(img.pixel(0, 0), [4, 0, 7]);
        assert_eq!(img.pixel(4, 1), [0, 1, 7]);
        assert_eq!(b.xyxy[0], [3.0, 0.0, 4.0, 1.0]);
    }

    #[test]
    fn resize_scales_boxes_and_keeps_constant_images_constant() {
        let img = RgbImage::new(40, 30, vec![123; 40 * 30 * 3]);
        let mut b = one_box([4.0, 3.0, 20.0, 15.0]);
        let out = resize(img, &mut b, 60, None, false).into_rgb();
        assert_eq!((out.width, out.height), (80, 60));
        assert!(out.data.iter().all(|&v| v == 123));
        assert_eq!(b.xyxy[0], [8.0, 6.0, 40.0, 30.0]);
        let same = resize(out.clone(), &mut b, 60, None, false).into_rgb();
        assert_eq!(same, out);
    }

    #[test]
    fn downscale_is_antialiased_like_pillow() {
        // Alternating columns: Pillow's antialiased bilinear averages them to ~mid grey, a
        // plain two-tap bilinear would keep extremes.
        let data = (0..8)
            .flat_map(|_| (0..64).flat_map(|x| [if x % 2 == 0 { 0u8 } else { 255 }; 3]))
            .collect();
        let out = resize_image(&RgbImage::new(64, 8, data), 8, 1);
        assert!(
            out.data.iter().all(|&v| (120..=135).contains(&v)),
            "{:?}",
            out.data
        );
    }

    #[test]
    fn resize_window_matches_resize_then_crop() {
        let data = (0..37 * 29)
            .flat_map(|i| [(i * 7 % 256) as u8, (i * 13 % 256) as u8, (i % 256) as u8])
            .collect();
        let img = RgbImage::new(37, 29, data);
        let mut mirrored = img.clone();
        hflip(&mut mirrored, &mut Boxes::default());
        for (rw, rh, region) in [
            (50, 40, (3, 5, 30, 41)), // upscale
            (25, 19, (2, 1, 15, 20)), // downscale
            (37, 29, (4, 6, 20, 20)), // plain crop
            (50, 40, (0, 0, 40, 50)), // whole image
            (9, 7, (1, 2, 5, 6)),     // downscale beyond the streaming kernel (generic path)
        ] {
            for flip in [false, true] {
                // Official order: flip, resize, crop.
                let source = if flip { &mirrored } else { &img };
                let full = resize_image(source, rw, rh);
                let cropped = crop(&full, &mut Boxes::default(), region);
                let window = resize_window(&img, rw, rh, region, flip);
                assert_eq!(
                    (window.width, window.height),
                    (cropped.width, cropped.height)
                );
                let max_diff = window
                    .data
                    .iter()
                    .zip(&cropped.data)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max();
                assert!(
                    max_diff <= Some(1),
                    "{rw}x{rh} {region:?} flip {flip}: {max_diff:?}"
                );
            }
        }
    }

    #[test]
    fn crop_clips_and_drops_boxes() {
        let img = gradient(10, 10);
        let mut b = Boxes {
            xyxy: vec![
                [1.0, 1.0, 4.0, 4.0],
                [6.0, 6.0, 9.0, 9.0],
                [0.0, 0.0, 1.5, 9.0],
            ],
            labels: vec![1, 2, 3],
        };
        let out = crop(&img, &mut b, (2, 3, 5, 4));
        assert_eq!((out.width, out.height), (4, 5));
        assert_eq!(out.pixel(0, 0), [3, 2, 7]);
        assert_eq!(b.labels, vec![1, 2]);
        assert_eq!(b.xyxy[0], [0.0, 0.0, 1.0, 2.0]);
        assert_eq!(b.xyxy[1], [3.0, 4.0, 4.0, 5.0]);
    }

    #[test]
    fn normalize_gives_cxcywh_fractions() {
        let n = normalize_boxes(&one_box([10.0, 20.0, 30.0, 60.0]), 100, 200);
        assert_eq!(n[0], [0.2, 0.2, 0.2, 0.2]);
    }

    #[test]
    fn decisions_respect_official_ranges() {
        let cfg = AugmentConfig::default();
        let (mut flips, mut crops) = (0, 0);
        for i in 0..400 {
            let d = draw_train_decisions(&mut KeyedRng::from_key(&[i]), 640, 480, &cfg);
            assert!(cfg.scales.contains(&d.size));
            flips += d.flip as u32;
            if let Some(c) = d.crop {
                crops += 1;
                assert!(cfg.crop_resize.contains(&c.pre_size));
                let (ph, pw) = get_size_with_aspect_ratio(640, 480, c.pre_size, None);
                let (top, left, h, w) = c.region;
                assert!((384..=600.min(pw)).contains(&w) && (384..=600.min(ph)).contains(&h));
                assert!(top + h <= ph && left + w <= pw);
            }
        }
        assert!(
            (150..250).contains(&flips) && (150..250).contains(&crops),
            "{flips} {crops}"
        );
    }

    #[test]
    fn crop_prob_sets_the_crop_rate_and_keeps_other_draws() {
        let draw = |crop_prob: f64, i: u64| {
            let cfg = AugmentConfig {
                crop_prob,
                ..AugmentConfig::default()
            };
            draw_train_decisions(&mut KeyedRng::from_key(&[i]), 640, 480, &cfg)
        };
        let crops = |p: f64| (0..400).filter(|&i| draw(p, i).crop.is_some()).count();
        assert_eq!(crops(0.0), 0);
        assert_eq!(crops(1.0), 400);
        assert!((40..120).contains(&crops(0.2)), "{}", crops(0.2));
        for i in 0..50 {
            let (never, half) = (draw(0.0, i), draw(0.5, i));
            assert_eq!(never.flip, half.flip);
            if half.crop.is_none() {
                assert_eq!(never.size, half.size);
            }
        }
    }

    #[test]
    fn train_and_val_outputs_have_official_sizes() {
        let cfg = AugmentConfig::default();
        let img = gradient(64, 48);
        let mut b = one_box([0.0, 0.0, 64.0, 48.0]);
        let d = Decisions {
            flip: true,
            crop: None,
            size: 480,
        };
        let out = apply_train(img.clone(), &mut b, &d, &cfg);
        assert_eq!((out.width, out.height), (640, 480));
        assert_eq!(b.xyxy[0], [0.0, 0.0, 640.0, 480.0]);
        let d = Decisions {
            flip: false,
            crop: Some(CropDecision {
                pre_size: 400,
                region: (0, 0, 384, 400),
            }),
            size: 512,
        };
        let mut b = one_box([0.0, 0.0, 64.0, 48.0]);
        let out = apply_train(img.clone(), &mut b, &d, &cfg);
        assert_eq!((out.width, out.height), (533, 512));
        let mut b = one_box([0.0, 0.0, 64.0, 48.0]);
        let out = apply_val(&img, &mut b, &cfg);
        assert_eq!((out.width, out.height), (1066, 800));
    }
}
