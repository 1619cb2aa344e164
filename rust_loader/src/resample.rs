//! Pillow's bilinear resize for the resizes the DETR transforms do: upscales (scale factor ≤ 1,
//! two taps per output pixel) and moderate downscales (Pillow widens the triangle filter's
//! support to the scale factor: a window spans at most `ceil(2 * scale)` pixels, so up to a
//! scale of 3 there are at most [`MAX_TAPS`] = 6 taps).
//! Larger downscales keep the generic path (`transforms::resize_window_generic`).
//!
//! The resize is staged: a [`PendingResize`] holds the decoded source and what to make of it, and
//! runs when the batch is collated, streaming: each source row needed is resized horizontally
//! (SIMD kernel: per 8 outputs and channel, two 16-byte windows of the interleaved row, or of a
//! channel plane of it for more than two taps, one byte shuffle + one `madd` per pair of taps;
//! planar `u8` output,
//! rounded as Pillow rounds its intermediate image) into a ring of K rows (K = vertical taps),
//! and the vertical pass combines K such rows, rounds to `u8` (as Pillow's output is) and writes
//! ImageNet-normalised `f32` straight into the batch slot, channel-planar. No resized image,
//! intermediate image or normalise pass exists. A horizontal flip before the resize is folded
//! into the horizontal taps.
//!
//! Fixed point: 14-bit `i16` weights (Pillow uses 22-bit `i32`); values can differ from
//! Pillow's by one level where a result lies within a few 2^-14 of a rounding boundary.
use std::mem::MaybeUninit;

use crate::decode::{pixel_buffer, RgbImage};

const PRECISION: u32 = 14;
const HALF: i32 = 1 << (PRECISION - 1);

/// Most taps per output pixel the kernels take (a downscale by up to 3 per axis).
pub const MAX_TAPS: usize = 6;
/// Pairs of taps of the SIMD horizontal kernel (one `madd` each).
const MAX_PAIRS: usize = MAX_TAPS.div_ceil(2);
/// Zero bytes after each channel plane of a source row: SIMD windows may read past its end
/// (with weight 0).
const PLANE_PAD: usize = 16;

const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// `(v / 255 - mean) / std` as `v * scale + offset` per channel (within 1e-6 of torchvision's
/// two divisions for every `v` in 0..=255).
pub fn normalise_coefficients() -> ([f32; 3], [f32; 3]) {
    let scale = std::array::from_fn(|c| (1.0 / (255.0 * STD[c])) as f32);
    let offset = std::array::from_fn(|c| (-MEAN[c] / STD[c]) as f32);
    (scale, offset)
}

/// The filter of one axis, `k` taps per output: output `i` is `(sum_j weights[k * i + j] *
/// in[start[i] + j] + HALF) >> PRECISION`, with `start[i] + k <= in_size`.
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    pub start: Vec<u32>,
    pub weights: Vec<i16>,
    pub k: usize,
}

impl Taps {
    /// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the bilinear filter on the
    /// source interval `[in0, in1)` of an axis of `in_size` pixels, resized to `out_size`;
    /// `None` when the filter needs more than [`MAX_TAPS`] taps or the input is empty.
    pub fn bilinear(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Option<Taps> {
        let scale = (in1 - in0) / out_size as f64;
        if in_size == 0 || !scale.is_finite() {
            return None;
        }
        // The triangle filter's support (1) widened by the downscale factor.
        let filterscale = scale.max(1.0);
        let (support, ss) = (filterscale, 1.0 / filterscale);
        // Centre and source window of output `xx` (C `(int)` truncation, as Pillow).
        let window = |xx: usize| {
            let center = in0 + (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            (center, xmin, (xmax - xmin).max(0) as usize)
        };
        let k = (0..out_size)
            .map(|xx| window(xx).2)
            .max()
            .unwrap_or(0)
            .max(1);
        if k > MAX_TAPS {
            return None;
        }
        let mut taps = Taps {
            start: Vec::with_capacity(out_size),
            weights: Vec::with_capacity(out_size * k),
            k,
        };
        for xx in 0..out_size {
            let (center, xmin, count) = window(xx);
            let mut w = [0.0f64; MAX_TAPS];
            for (x, wx) in w.iter_mut().enumerate().take(count) {
                let t = (((x as i64 + xmin) as f64 - center + 0.5) * ss).abs();
                *wx = if t < 1.0 { 1.0 - t } else { 0.0 };
            }
            // Only the window's `count` weights are non-zero (divisions are this loop's cost).
            let ww: f64 = w[..count].iter().sum();
            if ww != 0.0 {
                w[..count].iter_mut().for_each(|v| *v /= ww);
            }
            // Windows near the end start earlier (`start + k <= in_size`), padded with zeros.
            let start = xmin.min((in_size - k) as i64) as usize;
            let at = xmin as usize - start;
            let mut q = [0i16; MAX_TAPS];
            // (A window past the input's end, `count == 0`, may have `at > k`.)
            for (qx, &wx) in q.iter_mut().skip(at).zip(&w[..count]) {
                *qx = (0.5 + wx * f64::from(1 << PRECISION)) as i16;
            }
            taps.start.push(start as u32);
            taps.weights.extend_from_slice(&q[..k]);
        }
        Some(taps)
    }

    /// The taps of the same resize applied to the mirrored input.
    pub fn mirrored(&self, in_size: usize) -> Taps {
        let end = (in_size - self.k) as u32;
        let mut weights = self.weights.clone();
        for w in weights.chunks_exact_mut(self.k) {
            w.reverse();
        }
        Taps {
            start: self.start.iter().map(|&s| end - s).collect(),
            weights,
            k: self.k,
        }
    }

    fn len(&self) -> usize {
        self.start.len()
    }

    /// The weights of output `i`.
    #[inline(always)]
    fn of(&self, i: usize) -> &[i16] {
        &self.weights[i * self.k..(i + 1) * self.k]
    }
}

/// Where the horizontal kernel reads channel `c` of source pixel `p`: byte `c * channel + p *
/// pixel` of the source it is given.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Layout {
    pixel: usize,
    channel: usize,
}

/// Eight outputs of the AVX2 horizontal kernel: two groups of four, each reading a 16-byte window
/// of the source.
#[derive(Debug, Clone)]
struct Block {
    /// Byte of the source (of channel 0) where each group's window starts.
    base: [u32; 2],
    /// Bytes past the source start the windows read.
    end: usize,
    /// Byte shuffle that turns the windows into `(in[s], in[s + 1])` `i16` pairs of channel 0 and
    /// the first pair of taps (interleaved: channel `c` reads `c` bytes further; pair `j` reads
    /// `2 * j` pixels further).
    mask: [u8; 32],
}

/// The horizontal pass of one resize: taps plus precomputed SIMD blocks. Two-tap filters read
/// the interleaved RGB row directly (the windows of a block fit in 16 bytes); filters with more
/// taps read the row split into three channel planes first (four outputs of a channel then fit
/// a 16-byte window up to a scale of 3).
#[derive(Debug, Clone)]
struct Horizontal {
    taps: Taps,
    in_w: usize,
    /// Whether the kernel reads channel planes (else the interleaved row).
    planar: bool,
    /// One entry per 8 outputs (`None`: the block's taps do not fit the windows).
    blocks: Vec<Option<Block>>,
    /// Per block, per pair of taps: the weights of the pairs, in the order of the mask's pairs.
    weights: Vec<[i16; 16]>,
}

impl Horizontal {
    fn new(taps: Taps, in_w: usize) -> Self {
        let pairs = taps.k.div_ceil(2);
        let interleaved = Self::blocks(&taps, pairs, Self::INTERLEAVED);
        let planar = !interleaved.iter().all(Option::is_some);
        let blocks = if planar {
            Self::blocks(&taps, pairs, Self::planes_layout(in_w))
        } else {
            interleaved
        };
        let mut weights = vec![[0i16; 16]; blocks.len() * pairs];
        for (k, block) in weights.chunks_exact_mut(pairs).enumerate() {
            for x in 8 * k..8 * k + 8 {
                let at = 2 * (x - 8 * k);
                for (j, pair) in taps.of(x).chunks(2).enumerate() {
                    block[j][at..at + pair.len()].copy_from_slice(pair);
                }
            }
        }
        Horizontal {
            taps,
            in_w,
            planar,
            blocks,
            weights,
        }
    }

    const INTERLEAVED: Layout = Layout {
        pixel: 3,
        channel: 1,
    };

    /// The layout of a row split by [`deinterleave`] into planes of `in_w + PLANE_PAD` bytes.
    fn planes_layout(in_w: usize) -> Layout {
        Layout {
            pixel: 1,
            channel: in_w + PLANE_PAD,
        }
    }

    fn layout(&self) -> Layout {
        if self.planar {
            Self::planes_layout(self.in_w)
        } else {
            Self::INTERLEAVED
        }
    }

    /// The SIMD blocks of `taps` (`pairs` pairs of taps) reading a source of layout `layout`.
    fn blocks(taps: &Taps, pairs: usize, layout: Layout) -> Vec<Option<Block>> {
        let px = layout.pixel;
        // Interleaved windows hold all three channels: the last one's bytes come 2 later.
        let channels = if layout.channel == 1 { 2 } else { 0 };
        (0..taps.len() / 8)
            .map(|k| {
                let mut block = Block {
                    base: [0; 2],
                    end: 0,
                    mask: [0; 32],
                };
                for g in 0..2 {
                    let xs = 8 * k + 4 * g..8 * k + 4 * g + 4;
                    let lo = *taps.start[xs.clone()].iter().min()? as usize;
                    let hi = *taps.start[xs.clone()].iter().max()? as usize;
                    // The last byte read (second tap of the last pair, last channel) must be in
                    // the 16-byte window.
                    if px * (hi - lo + 2 * pairs - 1) + channels > 15 {
                        return None;
                    }
                    block.base[g] = (px * lo) as u32;
                    block.end = block.end.max(px * lo + 16);
                    for (o, x) in xs.enumerate() {
                        let rel = (px * (taps.start[x] as usize - lo)) as u8;
                        let m = 16 * g + 4 * o;
                        let next = rel + px as u8;
                        block.mask[m..m + 4].copy_from_slice(&[rel, 0x80, next, 0x80]);
                    }
                }
                Some(block)
            })
            .collect()
    }

    /// Bytes of each channel plane of `planes`, the scratch [`Horizontal::row`] splits a source
    /// row into for multi-tap filters.
    fn plane_stride(&self) -> usize {
        self.in_w + PLANE_PAD
    }

    /// Resizes the source row at the start of `data` (interleaved RGB, `in_w` pixels; `data`
    /// may go on with the rows after it) into `out` (three planes of `taps.len()` bytes), using
    /// `planes` (`3 * plane_stride()` bytes, zero-initialised) as scratch.
    #[inline(always)]
    fn row(&self, data: &[u8], planes: &mut [u8], out: &mut [u8], avx2: bool) {
        let stride = self.plane_stride();
        assert!(data.len() >= 3 * self.in_w && planes.len() == 3 * stride);
        let src = if self.planar {
            deinterleave(&data[..3 * self.in_w], planes, stride, avx2);
            &*planes
        } else {
            data
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `avx2` is only true when the CPU supports AVX2 (see `Resize::new`).
            return unsafe {
                match (self.taps.k.div_ceil(2), self.planar) {
                    (1, false) => self.row_avx2::<1, false>(src, out),
                    (1, true) => self.row_avx2::<1, true>(src, out),
                    (2, true) => self.row_avx2::<2, true>(src, out),
                    (MAX_PAIRS, true) => self.row_avx2::<MAX_PAIRS, true>(src, out),
                    _ => self.row_scalar(src, out, 0, self.taps.len()),
                }
            };
        }
        self.row_scalar(src, out, 0, self.taps.len());
    }

    /// Outputs `lo..hi` of a row from its source (see [`Horizontal::layout`]), one at a time.
    #[inline(always)]
    fn row_scalar(&self, src: &[u8], out: &mut [u8], lo: usize, hi: usize) {
        let n = self.taps.len();
        let Layout { pixel, channel } = self.layout();
        for x in lo..hi {
            let s = pixel * self.taps.start[x] as usize;
            let w = self.taps.of(x);
            for c in 0..3 {
                let sum = w.iter().enumerate().fold(HALF, |acc, (j, &w)| {
                    acc + i32::from(src[c * channel + s + pixel * j]) * i32::from(w)
                });
                out[c * n + x] = (sum >> PRECISION).clamp(0, 255) as u8;
            }
        }
    }

    /// The SIMD row for filters of `2 * PAIRS - 1` or `2 * PAIRS` taps from a source of the
    /// layout `PLANAR` says.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_avx2<const PAIRS: usize, const PLANAR: bool>(&self, src: &[u8], out: &mut [u8]) {
        use std::arch::x86_64::*;
        let n = self.taps.len();
        let Layout { pixel, channel } = self.layout();
        assert!(out.len() >= 3 * n && PAIRS == self.taps.k.div_ceil(2) && PLANAR == self.planar);
        assert_eq!(self.weights.len(), PAIRS * self.blocks.len());
        let half = _mm256_set1_epi32(HALF);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        // Planes: channel c reads its own plane; interleaved: the same window, c bytes further.
        let (plane_bytes, mask_bytes) = if PLANAR { (channel, 0) } else { (0, 1) };
        // Windows of a block read up to `b.end + 2 * plane_bytes` (the last channel's).
        let limit = src.len().saturating_sub(2 * plane_bytes);
        for (k, block) in self.blocks.iter().enumerate() {
            let x0 = 8 * k;
            let b = match block {
                Some(b) if b.end <= limit => b,
                _ => {
                    self.outputs_scalar(src, out, x0, x0 + 8);
                    continue;
                }
            };
            let weights = &self.weights[PAIRS * k..PAIRS * k + PAIRS];
            // SAFETY: each window reads 16 bytes from `c * plane_bytes + base`, ending at or
            // before `b.end + 2 * plane_bytes <= src.len()`; the three 8-byte stores at `c * n +
            // x0` are inside `out` (planes of `n >= x0 + 8` bytes).
            unsafe {
                // (No closures: they would not be inlined with this function's features.)
                let mask = _mm256_loadu_si256(b.mask.as_ptr().cast());
                let mut w = [_mm256_setzero_si256(); PAIRS];
                for (w, pair) in w.iter_mut().zip(weights) {
                    *w = _mm256_loadu_si256(pair.as_ptr().cast());
                }
                let mut window = _mm256_setzero_si256();
                let mut sums = [half; 3];
                for (c, sum) in sums.iter_mut().enumerate() {
                    if PLANAR || c == 0 {
                        let at = src.as_ptr().add(c * plane_bytes);
                        let lo = _mm_loadu_si128(at.add(b.base[0] as usize).cast());
                        let hi = _mm_loadu_si128(at.add(b.base[1] as usize).cast());
                        window = _mm256_set_m128i(hi, lo);
                    }
                    for (j, w) in w.iter().enumerate() {
                        let shift = (c * mask_bytes + 2 * j * pixel) as i8;
                        let m = _mm256_add_epi8(mask, _mm256_set1_epi8(shift));
                        let pairs = _mm256_shuffle_epi8(window, m);
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, *w));
                    }
                    *sum = _mm256_srai_epi32::<{ PRECISION as i32 }>(*sum);
                }
                let [r, g, bl] = sums;
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
        self.outputs_scalar(src, out, done, n);
    }

    /// [`Horizontal::row_scalar`] for the few outputs the SIMD kernel leaves (kept out of its
    /// loop).
    #[cold]
    #[inline(never)]
    fn outputs_scalar(&self, src: &[u8], out: &mut [u8], lo: usize, hi: usize) {
        self.row_scalar(src, out, lo, hi);
    }
}

/// Calls `f::<K>(args)` for the tap count `k` (1..=MAX_TAPS) known at run time, so that each
/// vertical loop is compiled for its tap count.
macro_rules! with_taps {
    ($k:expr, $f:ident($($arg:expr),*)) => {
        match $k {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            _ => $f::<MAX_TAPS>($($arg),*),
        }
    };
}

/// A bilinear resize (at most [`MAX_TAPS`] taps per axis) of a source box of an image, ready to
/// run.
#[derive(Debug, Clone)]
pub struct Resize {
    horizontal: Horizontal,
    vertical: Taps,
    avx2: bool,
}

impl Resize {
    /// The resize of the box `(left, top, width, height)` of an `in_w x in_h` image to `out_w x
    /// out_h` (of the mirrored image when `flip`); `None` when an axis needs more than
    /// [`MAX_TAPS`] taps.
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
            horizontal: Horizontal::new(horizontal, in_w),
            vertical,
            avx2,
        })
    }

    pub fn out_w(&self) -> usize {
        self.horizontal.taps.len()
    }

    pub fn out_h(&self) -> usize {
        self.vertical.len()
    }

    /// Makes sure `ring` holds the horizontally resized source rows output row `y` combines
    /// (`vertical.start[y]..+ vertical.k`, row `r` in `ring.rows[r % k]`). Starts do not
    /// decrease, so each source row is resized at most once, and rows no output needs are not.
    #[inline(always)]
    fn fill(&self, src: &RgbImage, ring: &mut Ring, y: usize) {
        let (k, s) = (self.vertical.k, self.vertical.start[y] as usize);
        let row_len = 3 * self.horizontal.in_w;
        assert!(s + k >= ring.next, "vertical starts do not decrease");
        for r in ring.next.max(s)..s + k {
            let source = &src.data[r * row_len..];
            let out = &mut ring.rows[r % k];
            self.horizontal
                .row(source, &mut ring.planes, out, self.avx2);
        }
        ring.next = ring.next.max(s + k);
    }

    fn ring(&self, src: &RgbImage) -> Ring {
        assert_eq!(src.width, self.horizontal.in_w, "source width");
        assert_eq!(src.data.len(), src.width * src.height * 3, "RgbImage size");
        let n = 3 * self.out_w();
        Ring {
            rows: vec![vec![0; n]; self.vertical.k],
            next: 0,
            planes: vec![0; 3 * self.horizontal.plane_stride()],
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
        with_taps!(self.vertical.k, to_rgb_k(self, src))
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

    #[inline(always)]
    fn write_normalised_any(&self, src: &RgbImage, slot: &mut [MaybeUninit<f32>], pad_w: usize) {
        with_taps!(self.vertical.k, write_normalised_k(self, src, slot, pad_w))
    }
}

/// [`Resize::to_rgb`] for `K` vertical taps.
#[inline(always)]
fn to_rgb_k<const K: usize>(r: &Resize, src: &RgbImage) -> RgbImage {
    let n = r.out_w();
    let mut ring = r.ring(src);
    // Every byte is written below: a recycled buffer needs no zeroing.
    let mut data = pixel_buffer(n * r.out_h() * 3);
    let mut planes = vec![0u8; 3 * n];
    for (y, row) in data.chunks_exact_mut(3 * n).enumerate() {
        r.fill(src, &mut ring, y);
        let (s, w) = (r.vertical.start[y] as usize, r.vertical.of(y));
        for (c, out) in planes.chunks_exact_mut(n).enumerate() {
            combine_u8::<K>(&ring, s, c, w, out);
        }
        interleave(&planes, row, r.avx2);
    }
    RgbImage::new(n, r.out_h(), data)
}

/// [`Resize::write_normalised`] for `K` vertical taps. No closures here: they would not inherit
/// the caller's target features.
#[inline(always)]
fn write_normalised_k<const K: usize>(
    r: &Resize,
    src: &RgbImage,
    slot: &mut [MaybeUninit<f32>],
    pad_w: usize,
) {
    let (n, out_h) = (r.out_w(), r.out_h());
    let plane_len = slot.len() / 3;
    assert!(n <= pad_w && out_h * pad_w <= plane_len && slot.len() == 3 * plane_len);
    let (scale, offset) = normalise_coefficients();
    let zero = MaybeUninit::new(0.0);
    let mut ring = r.ring(src);
    for y in 0..out_h {
        r.fill(src, &mut ring, y);
        let (s, w) = (r.vertical.start[y] as usize, r.vertical.of(y));
        for c in 0..3 {
            let row = &mut slot[c * plane_len + y * pad_w..c * plane_len + (y + 1) * pad_w];
            let (pixels, padding) = row.split_at_mut(n);
            combine_normalised::<K>(&ring, s, c, w, pixels, scale[c], offset[c]);
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

/// Horizontally resized source rows (three planes each; source row `r` in `rows[r % k]`, rows
/// `next - k..next` there) and the channel planes of the source row being resized.
struct Ring {
    rows: Vec<Vec<u8>>,
    next: usize,
    planes: Vec<u8>,
}

impl Ring {
    /// Channel `c` of the `K` rows from source row `start` on, each `n` bytes.
    #[inline(always)]
    fn window<const K: usize>(&self, start: usize, c: usize, n: usize) -> [&[u8]; K] {
        assert_eq!(K, self.rows.len(), "ring of K rows");
        std::array::from_fn(|j| &self.rows[(start + j) % K][c * n..(c + 1) * n])
    }
}

/// One output value of the vertical pass: `K` taps, rounded and clamped to `u8` range.
#[inline(always)]
fn vertical<const K: usize>(rows: &[&[u8]; K], w: &[i32; K], x: usize) -> i32 {
    let mut sum = HALF;
    for (row, &w) in rows.iter().zip(w) {
        sum += i32::from(row[x]) * w;
    }
    (sum >> PRECISION).clamp(0, 255)
}

/// The weights of one output of a `K`-tap filter as `i32`.
#[inline(always)]
fn weights_i32<const K: usize>(w: &[i16]) -> [i32; K] {
    std::array::from_fn(|j| i32::from(w[j]))
}

/// Channel `c` of an output row of the vertical pass (source rows from `start` on, weights `w`)
/// into `out` as `u8`.
#[inline(always)]
fn combine_u8<const K: usize>(ring: &Ring, start: usize, c: usize, w: &[i16], out: &mut [u8]) {
    let rows = ring.window::<K>(start, c, out.len());
    let w = weights_i32::<K>(w);
    for (x, v) in out.iter_mut().enumerate() {
        *v = vertical(&rows, &w, x) as u8;
    }
}

/// Channel `c` of an output row of the vertical pass into `out`, normalised: `v * scale +
/// offset`.
#[inline(always)]
fn combine_normalised<const K: usize>(
    ring: &Ring,
    start: usize,
    c: usize,
    w: &[i16],
    out: &mut [MaybeUninit<f32>],
    scale: f32,
    offset: f32,
) {
    let rows = ring.window::<K>(start, c, out.len());
    let w = weights_i32::<K>(w);
    for (x, v) in out.iter_mut().enumerate() {
        v.write(vertical(&rows, &w, x) as f32 * scale + offset);
    }
}

/// Byte shuffles of SSSE3 interleaving: `INTERLEAVE[chunk][channel]` picks, for the 16 bytes
/// of `chunk` (0..3) of a 48-byte group of 16 RGB pixels, the bytes of `channel` from its plane's
/// 16 bytes (0x80: none).
const INTERLEAVE: [[[u8; 16]; 3]; 3] = {
    let mut masks = [[[0x80u8; 16]; 3]; 3];
    let mut k = 0;
    while k < 48 {
        masks[k / 16][k % 3][k % 16] = (k / 3) as u8;
        k += 1;
    }
    masks
};

/// The inverse shuffles: `DEINTERLEAVE[chunk][channel]` picks, for the 16 bytes of a plane, the
/// bytes of `chunk` that hold them (0x80: another chunk).
const DEINTERLEAVE: [[[u8; 16]; 3]; 3] = {
    let mut masks = [[[0x80u8; 16]; 3]; 3];
    let mut k = 0;
    while k < 48 {
        masks[k / 16][k % 3][k / 3] = (k % 16) as u8;
        k += 1;
    }
    masks
};

/// Splits the RGB row `row` into three planes: channel `c` of pixel `x` goes to `planes[c *
/// stride + x]`.
#[inline(always)]
fn deinterleave(row: &[u8], planes: &mut [u8], stride: usize, simd: bool) {
    let n = row.len() / 3;
    assert!(n <= stride && planes.len() >= 3 * stride);
    let (r, rest) = planes.split_at_mut(stride);
    let (g, b) = rest.split_at_mut(stride);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU supports AVX2 (hence SSSE3).
        done = unsafe { deinterleave_ssse3(row, r, g, b) };
    }
    let _ = simd;
    for (x, px) in row.chunks_exact(3).enumerate().skip(done) {
        (r[x], g[x], b[x]) = (px[0], px[1], px[2]);
    }
}

/// A `[chunk][channel]` table of byte shuffles as SSE registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn load_masks(table: &[[[u8; 16]; 3]; 3]) -> [[std::arch::x86_64::__m128i; 3]; 3] {
    // SAFETY: each load reads one 16-byte array.
    std::array::from_fn(|k| {
        std::array::from_fn(|c| unsafe {
            std::arch::x86_64::_mm_loadu_si128(table[k][c].as_ptr().cast())
        })
    })
}

/// `shuffle(v[0], m[0]) | shuffle(v[1], m[1]) | shuffle(v[2], m[2])`: gathers 16 bytes from
/// three registers (the step of both interleaving directions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn shuffle_or3(
    v: [std::arch::x86_64::__m128i; 3],
    m: [std::arch::x86_64::__m128i; 3],
) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    _mm_or_si128(
        _mm_or_si128(_mm_shuffle_epi8(v[0], m[0]), _mm_shuffle_epi8(v[1], m[1])),
        _mm_shuffle_epi8(v[2], m[2]),
    )
}

/// Splits 16 pixels at a time with byte shuffles; returns how many pixels it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn deinterleave_ssse3(row: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let masks = load_masks(&DEINTERLEAVE);
    let n = row.len() / 3;
    assert!(r.len() >= n && g.len() >= n && b.len() >= n);
    let mut x = 0;
    while x + 16 <= n {
        // SAFETY: 48 bytes are read from `row` at `3 * x + 48 <= row.len()` and 16 written to
        // each plane at `x + 16 <= n`.
        unsafe {
            let v: [__m128i; 3] =
                std::array::from_fn(|k| _mm_loadu_si128(row.as_ptr().add(3 * x + 16 * k).cast()));
            for (c, plane) in [&mut *r, &mut *g, &mut *b].into_iter().enumerate() {
                let out = shuffle_or3(v, [masks[0][c], masks[1][c], masks[2][c]]);
                _mm_storeu_si128(plane.as_mut_ptr().add(x).cast(), out);
            }
        }
        x += 16;
    }
    x
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
    let masks = load_masks(&INTERLEAVE);
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
            for (k, &m) in masks.iter().enumerate() {
                let out = shuffle_or3(v, m);
                _mm_storeu_si128(row.as_mut_ptr().add(3 * x + 16 * k).cast(), out);
            }
        }
        x += 16;
    }
    x
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

    /// Straightforward f64 Pillow bilinear (support widened to the downscale factor) for one
    /// axis, as a reference.
    fn reference_taps(in_size: usize, in0: f64, in1: f64, out: usize) -> Vec<Vec<(usize, f64)>> {
        let scale = (in1 - in0) / out as f64;
        let support = scale.max(1.0);
        (0..out)
            .map(|i| {
                let center = in0 + (i as f64 + 0.5) * scale;
                let lo = ((center - support + 0.5) as i64).max(0) as usize;
                let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let w: Vec<(usize, f64)> = (lo..hi)
                    .map(|x| {
                        let t = ((x as f64 - center + 0.5) / support).abs();
                        (x, (1.0 - t).max(0.0))
                    })
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
        // Exact ties (common: weights such as 1/2 and 1/4) round up, as in Pillow's fixed
        // point; the f64 sums of a tie can land a hair below it.
        let round = |v: f64| (v + 0.5 + 1e-9).floor().clamp(0.0, 255.0);
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
    fn whole_image_resizes_match_the_reference_and_the_generic_path() {
        type Size = (usize, usize);
        let cases: &[(Size, Size)] = &[
            // Upscales (two taps).
            ((37, 29), (61, 53)),
            ((64, 48), (1066, 800)),
            ((17, 3), (40, 9)),
            ((33, 21), (33, 21)),
            ((9, 9), (16, 16)),
            ((1, 1), (5, 3)),
            ((1, 7), (9, 11)),
            ((6, 1), (13, 2)),
            ((2, 2), (19, 19)),
            // Downscales (more taps) and mixed.
            ((640, 480), (533, 400)),
            ((640, 427), (599, 400)),
            ((101, 77), (96, 73)),
            ((99, 61), (50, 31)),
            ((97, 53), (39, 22)),
            ((61, 45), (59, 23)),
            ((1, 40), (1, 19)),
            ((40, 1), (21, 1)),
            ((2, 9), (1, 4)),
            ((37, 29), (61, 15)),
        ];
        for (k, &((w, h), (ow, oh))) in cases.iter().enumerate() {
            let img = noise(w, h, k as u32);
            let mut mirrored = img.clone();
            hflip(&mut mirrored, &mut Boxes::default());
            for flip in [false, true] {
                // Flip folded into the taps == resize of the mirrored image.
                let r = Resize::new((w, h), whole(&img), (ow, oh), flip).expect("few taps");
                let source = if flip { &mirrored } else { &img };
                let refd = reference(source, whole(&img), ow, oh);
                let what = format!("{w}x{h} -> {ow}x{oh} flip {flip}");
                assert!(max_diff(&r.to_rgb(&img), &refd) <= 1, "{what}");
                assert_rows_agree(&r, &img, &what);
            }
            let ours = Resize::new((w, h), whole(&img), (ow, oh), false)
                .expect("few taps")
                .to_rgb(&img);
            let generic = resize_window_generic(&img, whole(&img), ow, oh);
            assert!(
                max_diff(&ours, &generic) <= 1,
                "{w}x{h} -> {ow}x{oh} generic"
            );
            if (w, h) == (ow, oh) {
                assert_eq!(ours, img, "identity resize is exact");
            }
        }
    }

    #[test]
    fn crop_boxes_and_flips_match() {
        let img = noise(57, 43, 9);
        let mut mirrored = img.clone();
        hflip(&mut mirrored, &mut Boxes::default());
        for (bx, (ow, oh)) in [
            // Upscaled windows.
            ((3.25, 5.5, 30.0, 20.0), (47, 31)),
            ((0.0, 0.0, 57.0, 43.0), (100, 77)),
            ((10.0, 2.0, 47.0, 41.0), (47, 41)),
            ((56.0, 42.0, 1.0, 1.0), (4, 4)),
            // Downscaled windows (the crop branch's resize to a shorter side of 400).
            ((3.25, 5.5, 50.0, 37.0), (39, 23)),
            ((10.0, 2.0, 47.0, 41.0), (30, 33)),
            ((0.5, 0.0, 56.5, 43.0), (28, 40)),
            ((55.0, 36.0, 2.0, 7.0), (1, 3)),
        ] {
            for flip in [false, true] {
                let r = Resize::new((57, 43), bx, (ow, oh), flip).expect("few taps");
                let source = if flip { &mirrored } else { &img };
                let refd = reference(source, bx, ow, oh);
                assert!(max_diff(&r.to_rgb(&img), &refd) <= 1, "{bx:?} flip {flip}");
                let generic = resize_window_generic(source, bx, ow, oh);
                assert!(
                    max_diff(&r.to_rgb(&img), &generic) <= 1,
                    "{bx:?} flip {flip}"
                );
            }
        }
    }

    /// Rows of the SIMD kernel (where the CPU has one) equal the scalar kernel's.
    fn assert_rows_agree(r: &Resize, img: &RgbImage, what: &str) {
        let h = &r.horizontal;
        let n = r.out_w();
        let mut planes = vec![0u8; 3 * h.plane_stride()];
        let (mut a, mut b) = (vec![0u8; 3 * n], vec![0u8; 3 * n]);
        for y in 0..img.height {
            let row = &img.data[3 * img.width * y..];
            h.row(row, &mut planes, &mut a, r.avx2);
            h.row(row, &mut planes, &mut b, false);
            assert_eq!(a, b, "{what} row {y}");
        }
    }

    #[test]
    fn simd_and_scalar_rows_agree() {
        for (w, ow, flip) in [
            (40, 67, false),
            (40, 67, true),
            (480, 1066, true),
            (9, 9, false),
            (1, 17, false),
            (640, 600, true),
            (640, 400, false),
            (611, 300, true),
            (333, 134, false),
            (47, 19, true),
        ] {
            let img = noise(w, 2, w as u32);
            let r = Resize::new((w, 2), whole(&img), (ow, 3), flip).expect("few taps");
            if ow >= 8 {
                assert!(
                    r.horizontal.blocks.iter().any(Option::is_some),
                    "{w} -> {ow}"
                );
            }
            // Two-tap filters read the interleaved row, the others its channel planes.
            assert_eq!(r.horizontal.planar, r.horizontal.taps.k > 2, "{w} -> {ow}");
            assert_rows_agree(&r, &img, &format!("{w} -> {ow} flip {flip}"));
        }
    }

    #[test]
    fn scale_factors_up_to_the_tap_limit_match_the_reference() {
        let img = noise(257, 31, 3);
        for step in 0..=30 {
            let scale = 1.0 + 0.0667 * f64::from(step);
            let ow = (257.0 / scale).round() as usize;
            let r = Resize::new((257, 31), whole(&img), (ow, 29), step % 2 == 1);
            let r = r.unwrap_or_else(|| panic!("scale {scale}"));
            assert!(r.horizontal.taps.k <= (2.0 * scale).ceil() as usize);
            // Every block of 8 outputs fits the SIMD windows.
            assert!(
                r.horizontal.blocks.iter().all(Option::is_some),
                "scale {scale}"
            );
            let mut source = img.clone();
            if step % 2 == 1 {
                hflip(&mut source, &mut Boxes::default());
            }
            let refd = reference(&source, whole(&img), ow, 29);
            assert!(max_diff(&r.to_rgb(&img), &refd) <= 1, "scale {scale}");
            assert_rows_agree(&r, &img, &format!("scale {scale}"));
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
    fn taps_cover_downscales_up_to_the_limit() {
        let taps = Taps::bilinear(100, 0.0, 100.0, 100).expect("identity");
        assert_eq!(taps.k, 2);
        let taps = Taps::bilinear(100, 0.0, 100.0, 97).expect("slight downscale");
        assert_eq!(taps.k, 3);
        // Halving: centres on pixel edges, taps at distances 0.5 and 1.5 (weights 3/8, 1/8).
        let taps = Taps::bilinear(100, 0.0, 100.0, 50).expect("halving");
        assert_eq!(taps.k, 4);
        assert_eq!(taps.of(10), [2048, 6144, 6144, 2048]);
        assert_eq!(Taps::bilinear(100, 0.0, 100.0, 45).map(|t| t.k), Some(5));
        // A window spans at most ceil(2 * scale) pixels: 6 up to a scale of 3.
        assert_eq!(Taps::bilinear(100, 0.0, 100.0, 40).map(|t| t.k), Some(5));
        assert_eq!(
            Taps::bilinear(100, 0.0, 100.0, 34).map(|t| t.k),
            Some(MAX_TAPS)
        );
        assert!(Taps::bilinear(100, 0.0, 100.0, 30).is_none());
        assert!(Taps::bilinear(0, 0.0, 0.0, 3).is_none());
        assert!(Taps::bilinear(5, 0.0, 5.0, 0).is_none());
        // A box reaching past the input (callers clamp theirs) gives zero taps there.
        let past = Taps::bilinear(10, 8.0, 14.0, 3).expect("taps");
        assert_eq!(past.of(2), [0, 0, 0]);
        // Every window lies inside the input and the weights of each output sum to ~1.
        for out in [7, 33, 40, 41, 50, 77, 99, 100, 160] {
            if let Some(t) = Taps::bilinear(100, 0.0, 100.0, out) {
                for i in 0..out {
                    assert!(t.start[i] as usize + t.k <= 100);
                    let sum: i32 = t.of(i).iter().map(|&w| i32::from(w)).sum();
                    assert!((sum - (1 << PRECISION)).abs() <= t.k as i32, "{out} {i}");
                }
            }
        }
    }

    #[test]
    fn deinterleave_matches_scalar() {
        for n in [0, 1, 15, 16, 17, 40, 100] {
            let row: Vec<u8> = (0..3 * n).map(|i| (i * 7 % 251) as u8).collect();
            let stride = n + PLANE_PAD;
            let (mut a, mut b) = (vec![0u8; 3 * stride], vec![0u8; 3 * stride]);
            #[cfg(target_arch = "x86_64")]
            deinterleave(&row, &mut a, stride, is_x86_feature_detected!("avx2"));
            #[cfg(not(target_arch = "x86_64"))]
            deinterleave(&row, &mut a, stride, false);
            deinterleave(&row, &mut b, stride, false);
            assert_eq!(a, b, "{n}");
            for x in 0..n {
                for c in 0..3 {
                    assert_eq!(a[c * stride + x], row[3 * x + c]);
                }
            }
        }
    }

    #[test]
    fn normalised_output_matches_rgb_output_and_zeroes_padding() {
        // An upscale and a 4-tap downscale.
        for ((w, h), (ow, oh)) in [((23, 17), (41, 30)), ((61, 47), (41, 30))] {
            check_normalised(&noise(w, h, 4), (ow, oh));
        }
    }

    fn check_normalised(img: &RgbImage, (ow, oh): (usize, usize)) {
        let r = Resize::new((img.width, img.height), whole(img), (ow, oh), true).expect("taps");
        let rgb = r.to_rgb(img);
        let (pad_h, pad_w) = (33, 45);
        // A dirty slot, as the buffer pool hands out.
        let mut slot = vec![MaybeUninit::new(f32::NAN); 3 * pad_h * pad_w];
        r.write_normalised(img, &mut slot, pad_w);
        let slot: Vec<f32> = slot.iter().map(|v| unsafe { v.assume_init() }).collect();
        for c in 0..3 {
            for y in 0..pad_h {
                for x in 0..pad_w {
                    let v = slot[(c * pad_h + y) * pad_w + x];
                    if y < oh && x < ow {
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
