//! Pillow's bilinear resize, specialised for the resizes the DETR transforms mostly do:
//! upscaling (scale factor ≤ 1 on both axes), where Pillow's triangle filter has at most two
//! taps per output pixel. Downscales keep the generic path (`transforms::resize_image`).
//!
//! The resize is staged: a [`PendingResize`] holds the decoded source and what to make of it, and
//! runs when the batch is collated, streaming: each source row needed is resized horizontally
//! (2-tap SIMD kernel over the interleaved RGB bytes, planar `u8` output, rounded as Pillow
//! rounds its intermediate image) into a two-row ring, and the vertical pass combines two such
//! rows, rounds to `u8` (as Pillow's output is) and writes ImageNet-normalised `f32` straight
//! into the batch slot, channel-planar. No resized image, intermediate image or normalise pass
//! exists. A horizontal flip before the resize is folded into the horizontal taps.
//!
//! Fixed point: 14-bit `i16` weights (Pillow uses 22-bit `i32`); values can differ from
//! Pillow's by one level where a result lies within 2^-14 of a rounding boundary.
use std::mem::MaybeUninit;

use crate::decode::RgbImage;

const PRECISION: u32 = 14;
const HALF: i32 = 1 << (PRECISION - 1);

const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// `(v / 255 - mean) / std` as `v * scale + offset` per channel (within 1e-6 of torchvision's
/// two divisions for every `v` in 0..=255).
pub fn normalise_coefficients() -> ([f32; 3], [f32; 3]) {
    let scale = std::array::from_fn(|c| (1.0 / (255.0 * STD[c])) as f32);
    let offset = std::array::from_fn(|c| (-MEAN[c] / STD[c]) as f32);
    (scale, offset)
}

/// Two-tap filter of one axis: output `i` is `(w0 * in[start] + w1 * in[start + step] + HALF)
/// >> PRECISION`, where `step` is 1 (0 for a 1-pixel input).
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    pub start: Vec<u32>,
    pub weights: Vec<[i16; 2]>,
    pub step: u32,
}

impl Taps {
    /// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the bilinear filter on the
    /// source interval `[in0, in1)` of an axis of `in_size` pixels, resized to `out_size`;
    /// `None` when the filter needs more than two taps (downscaling) or the input is empty.
    pub fn bilinear(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Option<Taps> {
        let scale = (in1 - in0) / out_size as f64;
        // filterscale = max(scale, 1): for scale <= 1 the support is the filter's own, 1.
        if in_size == 0 || scale.is_nan() || scale > 1.0 {
            return None;
        }
        let step = u32::from(in_size > 1);
        let mut taps = Taps {
            start: Vec::with_capacity(out_size),
            weights: Vec::with_capacity(out_size),
            step,
        };
        let last = in_size as i64 - 1;
        for xx in 0..out_size {
            let center = in0 + (xx as f64 + 0.5) * scale;
            // C `(int)` truncation, as Pillow.
            let xmin = ((center - 1.0 + 0.5) as i64).max(0);
            let xmax = ((center + 1.0 + 0.5) as i64).min(in_size as i64);
            let count = (xmax - xmin).max(0) as usize;
            if count > 2 {
                return None;
            }
            let mut w = [0.0f64; 2];
            for (x, wx) in w.iter_mut().enumerate().take(count) {
                let t = ((x as i64 + xmin) as f64 - center + 0.5).abs();
                *wx = if t < 1.0 { 1.0 - t } else { 0.0 };
            }
            let ww = w[0] + w[1];
            if ww != 0.0 {
                w = [w[0] / ww, w[1] / ww];
            }
            let q = w.map(|v| (0.5 + v * f64::from(1 << PRECISION)) as i16);
            let (start, weights) = match count {
                2 => (xmin, q),
                // One tap: pair it with a neighbour of weight 0 that exists.
                1 if xmin < last || step == 0 => (xmin, [q[0], 0]),
                1 => (xmin - 1, [0, q[0]]),
                _ => (xmin.min(last - i64::from(step)).max(0), [0, 0]),
            };
            taps.start.push(start as u32);
            taps.weights.push(weights);
        }
        Some(taps)
    }

    /// The taps of the same resize applied to the mirrored input.
    pub fn mirrored(&self, in_size: usize) -> Taps {
        let last = in_size as u32 - 1;
        Taps {
            start: self.start.iter().map(|&s| last - s - self.step).collect(),
            weights: self.weights.iter().map(|&[a, b]| [b, a]).collect(),
            step: self.step,
        }
    }

    fn len(&self) -> usize {
        self.start.len()
    }
}

/// Eight outputs of the AVX2 horizontal kernel: two groups of four, each reading a 16-byte window
/// of the source row.
#[derive(Debug, Clone)]
struct Block {
    /// Source pixel where each group's window starts.
    base: [u32; 2],
    /// Bytes past the row start the windows read.
    end: usize,
    /// Byte shuffle that turns the red bytes of the windows into `(in[s], in[s + 1])` `i16` pairs.
    mask: [u8; 32],
    weights: [i16; 16],
}

/// The horizontal pass of one resize: taps plus precomputed SIMD blocks.
#[derive(Debug, Clone)]
struct Horizontal {
    taps: Taps,
    /// One entry per 8 outputs (`None`: the block's taps do not fit the windows).
    blocks: Vec<Option<Block>>,
}

impl Horizontal {
    fn new(taps: Taps) -> Self {
        let blocks = (0..taps.len() / 8)
            .map(|k| {
                if taps.step != 1 {
                    return None;
                }
                let mut block = Block {
                    base: [0; 2],
                    end: 0,
                    mask: [0; 32],
                    weights: [0; 16],
                };
                for g in 0..2 {
                    let xs = 8 * k + 4 * g..8 * k + 4 * g + 4;
                    let lo = *taps.start[xs.clone()].iter().min()?;
                    let hi = *taps.start[xs.clone()].iter().max()?;
                    // Red bytes of pixels lo..=hi + 1 and the blue one of hi + 1 must be in the
                    // 16-byte window: 3 * (hi + 1 - lo) + 2 <= 15.
                    if hi - lo > 3 {
                        return None;
                    }
                    block.base[g] = lo;
                    block.end = block.end.max(3 * lo as usize + 16);
                    for (o, x) in xs.enumerate() {
                        let rel = 3 * (taps.start[x] - lo) as u8;
                        let m = 16 * g + 4 * o;
                        block.mask[m..m + 4].copy_from_slice(&[rel, 0x80, rel + 3, 0x80]);
                        block.weights[8 * g + 2 * o..8 * g + 2 * o + 2]
                            .copy_from_slice(&taps.weights[x]);
                    }
                }
                Some(block)
            })
            .collect();
        Horizontal { taps, blocks }
    }

    /// Resizes the source row starting at byte `row` of `data` (interleaved RGB) into `out`
    /// (three planes of `taps.len()` bytes).
    #[inline(always)]
    fn row(&self, data: &[u8], row: usize, out: &mut [u8], avx2: bool) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `avx2` is only true when the CPU supports AVX2 (see `Resize::new`).
            return unsafe { self.row_avx2(data, row, out) };
        }
        let _ = avx2;
        self.row_scalar(&data[row..], out, 0, self.taps.len());
    }

    /// Outputs `lo..hi` of a row, one at a time.
    #[inline(always)]
    fn row_scalar(&self, src: &[u8], out: &mut [u8], lo: usize, hi: usize) {
        let n = self.taps.len();
        let step = 3 * self.taps.step as usize;
        for x in lo..hi {
            let s = 3 * self.taps.start[x] as usize;
            let [w0, w1] = self.taps.weights[x].map(i32::from);
            for c in 0..3 {
                let v = (i32::from(src[s + c]) * w0 + i32::from(src[s + step + c]) * w1 + HALF)
                    >> PRECISION;
                out[c * n + x] = v.clamp(0, 255) as u8;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_avx2(&self, data: &[u8], row: usize, out: &mut [u8]) {
        use std::arch::x86_64::*;
        let n = self.taps.len();
        assert!(out.len() >= 3 * n && row <= data.len());
        let src = &data[row..];
        let half = _mm256_set1_epi32(HALF);
        let (one, two) = (_mm256_set1_epi8(1), _mm256_set1_epi8(2));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (k, block) in self.blocks.iter().enumerate() {
            let x0 = 8 * k;
            let Some(b) = block.as_ref().filter(|b| b.end <= src.len()) else {
                self.row_scalar(src, out, x0, x0 + 8);
                continue;
            };
            // SAFETY: both 16-byte windows end at or before `b.end <= src.len()`; the three
            // 8-byte stores at `c * n + x0` are inside `out` (planes of `n >= x0 + 8` bytes).
            unsafe {
                let lo = _mm_loadu_si128(src.as_ptr().add(3 * b.base[0] as usize).cast());
                let hi = _mm_loadu_si128(src.as_ptr().add(3 * b.base[1] as usize).cast());
                let window = _mm256_set_m128i(hi, lo);
                let mask = _mm256_loadu_si256(b.mask.as_ptr().cast());
                let weights = _mm256_loadu_si256(b.weights.as_ptr().cast());
                let channel = |mask| {
                    let pairs = _mm256_shuffle_epi8(window, mask);
                    let sum = _mm256_add_epi32(_mm256_madd_epi16(pairs, weights), half);
                    _mm256_srai_epi32::<{ PRECISION as i32 }>(sum)
                };
                let r = channel(mask);
                let g = channel(_mm256_add_epi8(mask, one));
                let bl = channel(_mm256_add_epi8(mask, two));
                // Lane 0: [r0-3 g0-3 b0-3 b0-3] bytes, lane 1: the same for outputs 4-7.
                let bytes =
                    _mm256_packus_epi16(_mm256_packs_epi32(r, g), _mm256_packs_epi32(bl, bl));
                let planar = _mm256_permutevar8x32_epi32(bytes, order);
                let rg = _mm256_castsi256_si128(planar);
                let dst = out.as_mut_ptr().add(x0);
                _mm_storel_epi64(dst.cast(), rg);
                _mm_storel_epi64(dst.add(n).cast(), _mm_unpackhi_epi64(rg, rg));
                _mm_storel_epi64(dst.add(2 * n).cast(), _mm256_extracti128_si256::<1>(planar));
            }
        }
        let done = 8 * self.blocks.len();
        self.row_scalar(src, out, done, n);
    }
}

/// A 2-tap bilinear resize of a source box of an image, ready to run.
#[derive(Debug, Clone)]
pub struct Resize {
    horizontal: Horizontal,
    vertical: Taps,
    in_w: usize,
    avx2: bool,
}

impl Resize {
    /// The resize of the box `(left, top, width, height)` of an `in_w x in_h` image to `out_w x
    /// out_h` (of the mirrored image when `flip`); `None` when it is not a 2-tap resize.
    pub fn new(
        (in_w, in_h): (usize, usize),
        (left, top, box_w, box_h): (f64, f64, f64, f64),
        (out_w, out_h): (usize, usize),
        flip: bool,
    ) -> Option<Resize> {
        let horizontal = Taps::bilinear(in_w, left, left + box_w, out_w)?;
        let vertical = Taps::bilinear(in_h, top, top + box_h, out_h)?;
        let horizontal = if flip {
            horizontal.mirrored(in_w)
        } else {
            horizontal
        };
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Some(Resize {
            horizontal: Horizontal::new(horizontal),
            vertical,
            in_w,
            avx2,
        })
    }

    pub fn out_w(&self) -> usize {
        self.horizontal.taps.len()
    }

    pub fn out_h(&self) -> usize {
        self.vertical.len()
    }

    /// The two horizontally resized source rows output row `y` combines, and their vertical
    /// weights: output row `y` of channel `c` combines `rows0[c * out_w..][..out_w]` with the
    /// same part of `rows1`. Rows are computed on demand into `ring` (rows are asked for in
    /// increasing order, so each source row is resized once).
    #[inline(always)]
    fn rows<'a>(
        &self,
        src: &RgbImage,
        ring: &'a mut Ring,
        y: usize,
    ) -> (&'a [u8], &'a [u8], [i32; 2]) {
        let r0 = self.vertical.start[y] as usize;
        let r1 = r0 + self.vertical.step as usize;
        for r in [r0, r1] {
            if ring.tags[r % 2] != r {
                assert!(r < src.height, "vertical taps inside the image");
                self.horizontal.row(
                    &src.data,
                    r * 3 * self.in_w,
                    &mut ring.rows[r % 2],
                    self.avx2,
                );
                ring.tags[r % 2] = r;
            }
        }
        let w = self.vertical.weights[y].map(i32::from);
        (&ring.rows[r0 % 2], &ring.rows[r1 % 2], w)
    }

    fn ring(&self, src: &RgbImage) -> Ring {
        assert_eq!(src.width, self.in_w, "source width");
        assert_eq!(src.data.len(), src.width * src.height * 3, "RgbImage size");
        let n = 3 * self.out_w();
        Ring {
            rows: [vec![0; n], vec![0; n]],
            tags: [usize::MAX; 2],
        }
    }

    /// The resized image as interleaved RGB.
    pub fn to_rgb(&self, src: &RgbImage) -> RgbImage {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: the CPU supports AVX2 (`self.avx2`).
            return unsafe { self.to_rgb_avx2(src) };
        }
        self.to_rgb_any(src)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn to_rgb_avx2(&self, src: &RgbImage) -> RgbImage {
        self.to_rgb_any(src)
    }

    #[inline(always)]
    fn to_rgb_any(&self, src: &RgbImage) -> RgbImage {
        let n = self.out_w();
        let mut ring = self.ring(src);
        let mut data = vec![0u8; n * self.out_h() * 3];
        let mut planes = vec![0u8; 3 * n];
        for (y, row) in data.chunks_exact_mut(3 * n).enumerate() {
            let (a, b, w) = self.rows(src, &mut ring, y);
            for ((out, &p), &q) in planes.iter_mut().zip(a).zip(b) {
                *out = vertical(p, q, w) as u8;
            }
            interleave(&planes, row, self.avx2);
        }
        RgbImage::new(n, self.out_h(), data)
    }

    /// Writes the resized image, normalised, channel-planar, into the top-left of a `[3, H,
    /// pad_w]` slot and zeros into the rest of it: every element of the slot is written once.
    pub fn write_normalised(&self, src: &RgbImage, slot: &mut [MaybeUninit<f32>], pad_w: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 (`self.avx2`) and FMA, checked just above.
            return unsafe { self.write_normalised_avx2(src, slot, pad_w) };
        }
        self.write_normalised_any(src, slot, pad_w);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn write_normalised_avx2(
        &self,
        src: &RgbImage,
        slot: &mut [MaybeUninit<f32>],
        pad_w: usize,
    ) {
        self.write_normalised_any(src, slot, pad_w);
    }

    /// No closures here: they would not inherit the caller's target features.
    #[inline(always)]
    fn write_normalised_any(&self, src: &RgbImage, slot: &mut [MaybeUninit<f32>], pad_w: usize) {
        let (n, out_h) = (self.out_w(), self.out_h());
        let plane_len = slot.len() / 3;
        assert!(n <= pad_w && out_h * pad_w <= plane_len && slot.len() == 3 * plane_len);
        let (scale, offset) = normalise_coefficients();
        let zero = MaybeUninit::new(0.0);
        let mut ring = self.ring(src);
        for y in 0..out_h {
            let (a, b, w) = self.rows(src, &mut ring, y);
            for c in 0..3 {
                let row = &mut slot[c * plane_len + y * pad_w..c * plane_len + (y + 1) * pad_w];
                let (pixels, padding) = row.split_at_mut(n);
                let (a, b) = (&a[c * n..(c + 1) * n], &b[c * n..(c + 1) * n]);
                for ((out, &p), &q) in pixels.iter_mut().zip(a).zip(b) {
                    out.write(vertical(p, q, w) as f32 * scale[c] + offset[c]);
                }
                for v in padding {
                    *v = zero;
                }
            }
        }
        for plane in slot.chunks_exact_mut(plane_len) {
            for v in &mut plane[out_h * pad_w..] {
                *v = zero;
            }
        }
    }
}

/// Two horizontally resized source rows (three planes each) and the source rows they hold.
struct Ring {
    rows: [Vec<u8>; 2],
    tags: [usize; 2],
}

/// Interleaves three planes (`planes` = r, g, b rows of `row.len() / 3` bytes) into RGB.
#[inline(always)]
fn interleave(planes: &[u8], row: &mut [u8], simd: bool) {
    let n = row.len() / 3;
    let (r, rest) = planes.split_at(n);
    let (g, b) = rest.split_at(n);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU supports AVX2 (hence SSSE3).
        done = unsafe { interleave_ssse3(r, g, b, row) };
    }
    let _ = simd;
    for (x, px) in row.chunks_exact_mut(3).enumerate().skip(done) {
        px.copy_from_slice(&[r[x], g[x], b[x]]);
    }
}

/// Interleaves 16 pixels at a time with byte shuffles; returns how many pixels it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn interleave_ssse3(r: &[u8], g: &[u8], b: &[u8], row: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    // Output byte k of a 48-byte group is channel k % 3 of pixel k / 3.
    let mask = |chunk: usize, channel: usize| {
        let bytes: [u8; 16] = std::array::from_fn(|k| {
            let k = 16 * chunk + k;
            if k % 3 == channel {
                (k / 3) as u8
            } else {
                0x80
            }
        });
        // SAFETY: reading 16 bytes from a 16-byte array.
        unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
    };
    let masks: [[__m128i; 3]; 3] = std::array::from_fn(|k| std::array::from_fn(|c| mask(k, c)));
    let n = row.len() / 3;
    assert!(r.len() >= n && g.len() >= n && b.len() >= n);
    let mut x = 0;
    while x + 16 <= n {
        // SAFETY: 16 bytes are read from each plane at `x + 16 <= n` and 48 written to `row`
        // at `3 * x + 48 <= row.len()`.
        unsafe {
            let v = [
                _mm_loadu_si128(r.as_ptr().add(x).cast()),
                _mm_loadu_si128(g.as_ptr().add(x).cast()),
                _mm_loadu_si128(b.as_ptr().add(x).cast()),
            ];
            for (k, m) in masks.iter().enumerate() {
                let out = _mm_or_si128(
                    _mm_or_si128(_mm_shuffle_epi8(v[0], m[0]), _mm_shuffle_epi8(v[1], m[1])),
                    _mm_shuffle_epi8(v[2], m[2]),
                );
                _mm_storeu_si128(row.as_mut_ptr().add(3 * x + 16 * k).cast(), out);
            }
        }
        x += 16;
    }
    x
}

/// One vertical tap pair, rounded and clamped to `u8` range.
#[inline(always)]
fn vertical(p: u8, q: u8, [w0, w1]: [i32; 2]) -> i32 {
    ((i32::from(p) * w0 + i32::from(q) * w1 + HALF) >> PRECISION).clamp(0, 255)
}

/// A resize decided but not yet run (it runs when the batch is collated, see the module doc).
#[derive(Debug, Clone)]
pub struct PendingResize {
    pub source: RgbImage,
    pub resize: Resize,
}

/// The image of a sample: ready pixels, or a pending resize of its source.
#[derive(Debug, Clone)]
pub enum SampleImage {
    Rgb(RgbImage),
    Pending(Box<PendingResize>),
}

impl From<RgbImage> for SampleImage {
    fn from(image: RgbImage) -> Self {
        SampleImage::Rgb(image)
    }
}

impl SampleImage {
    pub fn width(&self) -> usize {
        match self {
            SampleImage::Rgb(im) => im.width,
            SampleImage::Pending(p) => p.resize.out_w(),
        }
    }

    pub fn height(&self) -> usize {
        match self {
            SampleImage::Rgb(im) => im.height,
            SampleImage::Pending(p) => p.resize.out_h(),
        }
    }

    /// The pixels (runs a pending resize).
    pub fn into_rgb(self) -> RgbImage {
        match self {
            SampleImage::Rgb(im) => im,
            SampleImage::Pending(p) => p.resize.to_rgb(&p.source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::{hflip, resize_window_generic, Boxes};

    /// A deterministic pseudo-random image (no smooth gradients: rounding differences show).
    fn noise(w: usize, h: usize, seed: u32) -> RgbImage {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        let data = (0..w * h * 3)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 7) as u8
            })
            .collect();
        RgbImage::new(w, h, data)
    }

    /// Straightforward f64 Pillow bilinear (2-tap case) for one axis, as a reference.
    fn reference_taps(in_size: usize, in0: f64, in1: f64, out: usize) -> Vec<Vec<(usize, f64)>> {
        let scale = (in1 - in0) / out as f64;
        (0..out)
            .map(|i| {
                let center = in0 + (i as f64 + 0.5) * scale;
                let lo = ((center - 0.5) as i64).max(0) as usize;
                let hi = ((center + 1.5) as i64).min(in_size as i64) as usize;
                let w: Vec<(usize, f64)> = (lo..hi)
                    .map(|x| (x, (1.0 - (x as f64 - center + 0.5).abs()).max(0.0)))
                    .collect();
                let total: f64 = w.iter().map(|p| p.1).sum();
                w.into_iter().map(|(x, v)| (x, v / total)).collect()
            })
            .collect()
    }

    /// Two-pass reference resize with u8 rounding after each pass (Pillow's scheme) in f64.
    fn reference(img: &RgbImage, bx: (f64, f64, f64, f64), ow: usize, oh: usize) -> RgbImage {
        let hx = reference_taps(img.width, bx.0, bx.0 + bx.2, ow);
        let vy = reference_taps(img.height, bx.1, bx.1 + bx.3, oh);
        let round = |v: f64| (v + 0.5).floor().clamp(0.0, 255.0);
        let mut tmp = vec![0.0f64; img.height * ow * 3];
        for y in 0..img.height {
            for (x, taps) in hx.iter().enumerate() {
                for c in 0..3 {
                    let v: f64 = taps
                        .iter()
                        .map(|&(i, w)| w * f64::from(img.data[(y * img.width + i) * 3 + c]))
                        .sum();
                    tmp[(y * ow + x) * 3 + c] = round(v);
                }
            }
        }
        let mut data = vec![0u8; ow * oh * 3];
        for (y, taps) in vy.iter().enumerate() {
            for x in 0..ow {
                for c in 0..3 {
                    let v: f64 = taps
                        .iter()
                        .map(|&(i, w)| w * tmp[(i * ow + x) * 3 + c])
                        .sum();
                    data[(y * ow + x) * 3 + c] = round(v) as u8;
                }
            }
        }
        RgbImage::new(ow, oh, data)
    }

    fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
        assert_eq!((a.width, a.height), (b.width, b.height));
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0)
    }

    fn whole(img: &RgbImage) -> (f64, f64, f64, f64) {
        (0.0, 0.0, img.width as f64, img.height as f64)
    }

    #[test]
    fn upscales_match_the_reference_and_the_generic_path() {
        type Size = (usize, usize);
        let cases: &[(Size, Size)] = &[
            ((37, 29), (61, 53)),
            ((64, 48), (1066, 800)),
            ((17, 3), (40, 9)),
            ((33, 21), (33, 21)),
            ((9, 9), (16, 16)),
            ((1, 1), (5, 3)),
            ((1, 7), (9, 11)),
            ((6, 1), (13, 2)),
            ((2, 2), (19, 19)),
        ];
        for (k, &((w, h), (ow, oh))) in cases.iter().enumerate() {
            let img = noise(w, h, k as u32);
            let r = Resize::new((w, h), whole(&img), (ow, oh), false).expect("2-tap");
            let ours = r.to_rgb(&img);
            let refd = reference(&img, whole(&img), ow, oh);
            assert!(max_diff(&ours, &refd) <= 1, "{w}x{h} -> {ow}x{oh}");
            let generic = resize_window_generic(&img, whole(&img), ow, oh);
            assert!(max_diff(&ours, &generic) <= 1, "{w}x{h} -> {ow}x{oh}");
            if (w, h) == (ow, oh) {
                assert_eq!(ours, img, "identity resize is exact");
            }
        }
    }

    #[test]
    fn crop_boxes_and_flips_match() {
        let img = noise(57, 43, 9);
        for (bx, (ow, oh)) in [
            ((3.25, 5.5, 30.0, 20.0), (47, 31)),
            ((0.0, 0.0, 57.0, 43.0), (100, 77)),
            ((10.0, 2.0, 47.0, 41.0), (47, 41)),
            ((56.0, 42.0, 1.0, 1.0), (4, 4)),
        ] {
            let r = Resize::new((57, 43), bx, (ow, oh), false).expect("2-tap");
            let refd = reference(&img, bx, ow, oh);
            assert!(max_diff(&r.to_rgb(&img), &refd) <= 1, "{bx:?}");
            // Flip folded into the taps == resize of the mirrored image.
            let mut mirrored = img.clone();
            hflip(&mut mirrored, &mut Boxes::default());
            let flipped = Resize::new((57, 43), bx, (ow, oh), true).expect("2-tap");
            let refd = reference(&mirrored, bx, ow, oh);
            assert!(
                max_diff(&flipped.to_rgb(&img), &refd) <= 1,
                "{bx:?} flipped"
            );
        }
    }

    #[test]
    fn simd_and_scalar_rows_agree() {
        for (w, ow, flip) in [
            (40, 67, false),
            (40, 67, true),
            (480, 1066, true),
            (9, 9, false),
        ] {
            let img = noise(w, 2, w as u32);
            let r = Resize::new((w, 2), whole(&img), (ow, 3), flip).expect("2-tap");
            assert!(r.horizontal.blocks.iter().any(Option::is_some));
            let (mut a, mut b) = (vec![0u8; 3 * ow], vec![0u8; 3 * ow]);
            for row in [0, 3 * w] {
                r.horizontal.row(&img.data, row, &mut a, r.avx2);
                r.horizontal.row_scalar(&img.data[row..], &mut b, 0, ow);
                assert_eq!(a, b, "{w} -> {ow} flip {flip} row {row}");
            }
        }
    }

    #[test]
    fn interleave_matches_scalar() {
        for n in [0, 1, 15, 16, 17, 40, 100] {
            let planes: Vec<u8> = (0..3 * n).map(|i| (i * 7 % 251) as u8).collect();
            let (mut a, mut b) = (vec![0u8; 3 * n], vec![0u8; 3 * n]);
            #[cfg(target_arch = "x86_64")]
            interleave(&planes, &mut a, is_x86_feature_detected!("avx2"));
            #[cfg(not(target_arch = "x86_64"))]
            interleave(&planes, &mut a, false);
            interleave(&planes, &mut b, false);
            assert_eq!(a, b, "{n}");
            for x in 0..n {
                assert_eq!(
                    a[3 * x..3 * x + 3],
                    [planes[x], planes[n + x], planes[2 * n + x]]
                );
            }
        }
    }

    #[test]
    fn downscales_are_not_two_tap() {
        assert!(Taps::bilinear(100, 0.0, 100.0, 99).is_none());
        assert!(Taps::bilinear(100, 0.0, 100.0, 100).is_some());
        assert!(Taps::bilinear(0, 0.0, 0.0, 3).is_none());
    }

    #[test]
    fn normalised_output_matches_rgb_output_and_zeroes_padding() {
        let img = noise(23, 17, 4);
        let r = Resize::new((23, 17), whole(&img), (41, 30), true).expect("2-tap");
        let rgb = r.to_rgb(&img);
        let (pad_h, pad_w) = (33, 45);
        // A dirty slot, as the buffer pool hands out.
        let mut slot = vec![MaybeUninit::new(f32::NAN); 3 * pad_h * pad_w];
        r.write_normalised(&img, &mut slot, pad_w);
        let slot: Vec<f32> = slot.iter().map(|v| unsafe { v.assume_init() }).collect();
        for c in 0..3 {
            for y in 0..pad_h {
                for x in 0..pad_w {
                    let v = slot[(c * pad_h + y) * pad_w + x];
                    if y < 30 && x < 41 {
                        let p = f64::from(rgb.pixel(x, y)[c]);
                        let e = (p / 255.0 - MEAN[c]) / STD[c];
                        assert!((f64::from(v) - e).abs() < 2e-6, "{c} {y} {x}");
                    } else {
                        assert_eq!(v, 0.0, "padding {c} {y} {x}");
                    }
                }
            }
        }
    }
}
