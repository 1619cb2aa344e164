//! JPEG and PNG decoding to 8-bit RGB.
//!
//! Policy (matches `PIL.Image.open(p).convert("RGB")`, which the official pipeline uses):
//! grayscale is replicated to three channels, alpha is dropped (not composited), palettes are
//! expanded, CMYK is converted to RGB, EXIF orientation is ignored. 16-bit PNGs keep the high
//! byte of each sample (Pillow does the same for RGB; for 16-bit grayscale Pillow clips to 255,
//! which we do not copy). Truncated or corrupt files are errors, never silently padded.
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;
use zune_png::PngDecoder;

use crate::pool::BufferPool;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height * 3);
        RgbImage {
            width,
            height,
            data,
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let o = (y * self.width + x) * 3;
        [self.data[o], self.data[o + 1], self.data[o + 2]]
    }
}

/// Idle pixel buffers of consumed images, reused by later decodes: a fresh buffer of a decoded
/// image (about 1 MB) costs a memset and, often, page faults.
static SPARE_PIXELS: BufferPool<u8> = BufferPool::new_static(16);

/// Hands the pixel buffer of an image that is no longer needed back for reuse by decodes.
pub fn recycle(buffer: Vec<u8>) {
    // Small buffers gain nothing; huge ones (rare giant images) would be kept idle for long.
    if (64 << 10..=64 << 20).contains(&buffer.capacity()) {
        SPARE_PIXELS.put(buffer);
    }
}

/// A buffer of `len` initialised bytes (of unspecified value): the smallest idle one that holds
/// `len` bytes, or a new one.
pub fn pixel_buffer(len: usize) -> Vec<u8> {
    match SPARE_PIXELS.take_idle(len) {
        Some(mut buffer) => {
            // Keeps the old bytes; only a length beyond the old one is zero-filled.
            buffer.resize(len, 0);
            buffer
        }
        None => vec![0; len],
    }
}

/// Largest side we accept; protects workers from decompression bombs.
const MAX_SIDE: usize = 1 << 15;

/// Decodes a JPEG or PNG file held in memory. The error is a one-line reason.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes)
    } else if bytes.is_empty() {
        Err("empty file".to_string())
    } else {
        Err("unsupported format (only JPEG and PNG are read)".to_string())
    }
}

fn options() -> DecoderOptions {
    DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    if !has_jpeg_end_marker(bytes) {
        return Err("truncated JPEG (no end-of-image marker)".to_string());
    }
    let mut decoder =
        JpegDecoder::new_with_options(bytes, options().jpeg_set_out_colorspace(ColorSpace::RGB));
    decoder
        .decode_headers()
        .map_err(|e| format!("JPEG: {e:?}"))?;
    let size = decoder.output_buffer_size().ok_or("JPEG: missing header")?;
    // A recycled buffer (see `recycle`): decode_into overwrites it, so it needs no zeroing.
    let mut data = pixel_buffer(size);
    decoder
        .decode_into(&mut data)
        .map_err(|e| format!("JPEG: {e:?}"))?;
    let info = decoder.info().ok_or("JPEG: missing header")?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    let colorspace = decoder
        .get_output_colorspace()
        .unwrap_or(ColorSpace::Unknown);
    let expected = width * height * colorspace.num_components();
    // The buffer was sized for RGB; a single-channel JPEG fills only the start of it.
    data.truncate(expected);
    if data.len() != expected {
        return Err(format!(
            "JPEG: {} bytes of pixel data, expected {expected}",
            data.len()
        ));
    }
    match colorspace {
        ColorSpace::RGB => Ok(RgbImage::new(width, height, data)),
        // zune-jpeg keeps single-channel JPEGs as luma.
        ColorSpace::Luma => Ok(RgbImage::new(
            width,
            height,
            data.iter().flat_map(|&v| [v, v, v]).collect(),
        )),
        other => Err(format!("JPEG: unsupported colour space {other:?}")),
    }
}

/// Libjpeg-based readers (Pillow) refuse files whose entropy data stops early; zune-jpeg may fill
/// the rest with grey. A file that was cut short has no EOI marker (FF D9) near its end; allow
/// some trailing bytes that cameras and editors append after EOI.
fn has_jpeg_end_marker(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64 * 1024)..];
    // From the end: EOI is normally the last two bytes, so this stops at once.
    tail.windows(2).rev().any(|w| w == [0xFF, 0xD9])
}

fn decode_png(bytes: &[u8]) -> Result<RgbImage, String> {
    let opts = options()
        .png_set_strip_to_8bit(true)
        .png_set_add_alpha_channel(false);
    let mut decoder = PngDecoder::new_with_options(bytes, opts);
    decoder
        .decode_headers()
        .map_err(|e| format!("PNG: {e:?}"))?;
    let (width, height) = decoder.get_dimensions().ok_or("PNG: missing header")?;
    let colorspace = decoder.get_colorspace().ok_or("PNG: missing header")?;
    let raw = match decoder.decode().map_err(|e| format!("PNG: {e:?}"))? {
        zune_core::result::DecodingResult::U8(v) => v,
        _ => return Err("PNG: unexpected 16-bit output".to_string()),
    };
    let channels = colorspace.num_components();
    if raw.len() != width * height * channels {
        return Err(format!(
            "PNG: truncated pixel data ({} of {} bytes)",
            raw.len(),
            width * height * channels
        ));
    }
    let data = match colorspace {
        ColorSpace::RGB => raw,
        ColorSpace::RGBA => raw
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        ColorSpace::Luma => raw.iter().flat_map(|&v| [v, v, v]).collect(),
        ColorSpace::LumaA => raw
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        other => return Err(format!("PNG: unsupported colour type {other:?}")),
    };
    Ok(RgbImage::new(width, height, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Mean absolute difference against the RGB bytes Pillow produced (see make_fixtures.py).
    fn mean_abs_diff_to_reference(name: &str) -> f64 {
        let img = decode_image(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((img.width, img.height), (24, 16), "{name}");
        let reference = fixture(&format!("{name}.rgb"));
        assert_eq!(reference.len(), img.data.len());
        let total: u64 = img
            .data
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| u64::from(a.abs_diff(b)))
            .sum();
        total as f64 / reference.len() as f64
    }

    #[test]
    fn jpeg_variants_match_pillow() {
        for name in [
            "rgb.jpg",
            "gray.jpg",
            "progressive.jpg",
            "cmyk.jpg",
            "subsampled420.jpg",
        ] {
            let mad = mean_abs_diff_to_reference(name);
            assert!(mad <= 1.0, "{name}: mean abs diff {mad}");
        }
    }

    #[test]
    fn png_variants_match_expected_rgb() {
        for name in [
            "rgb.png",
            "rgba.png",
            "palette.png",
            "gray.png",
            "gray_alpha.png",
            "rgb16.png",
            "gray16.png",
        ] {
            let mad = mean_abs_diff_to_reference(name);
            assert!(mad == 0.0, "{name}: mean abs diff {mad}");
        }
    }

    #[test]
    fn recycled_buffers_give_the_same_pixels() {
        let jpeg = fixture("rgb.jpg");
        let first = decode_image(&jpeg).unwrap();
        for _ in 0..3 {
            recycle(vec![0xAB; 200 * 1024]);
            assert_eq!(decode_image(&jpeg).unwrap(), first);
            let gray = decode_image(&fixture("gray.jpg")).unwrap();
            assert_eq!(gray.data.len(), 24 * 16 * 3);
        }
    }

    #[test]
    fn truncated_corrupt_and_unknown_files_are_errors() {
        let jpeg = fixture("rgb.jpg");
        assert!(decode_image(&jpeg[..jpeg.len() / 2])
            .unwrap_err()
            .contains("truncated"));
        let png = fixture("rgb.png");
        assert!(decode_image(&png[..png.len() - 20]).is_err());
        let mut corrupt = jpeg.clone();
        for b in corrupt.iter_mut().skip(2).take(200) {
            *b = 0x5A;
        }
        assert!(decode_image(&corrupt).is_err());
        assert!(decode_image(b"GIF89a....")
            .unwrap_err()
            .contains("unsupported"));
        assert!(decode_image(b"").unwrap_err().contains("empty"));
    }
}
