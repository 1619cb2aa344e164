//! JPEG and PNG decoding to 8-bit RGB.
//!
//! Policy (matches `PIL.Image.open(p).convert("RGB")`, which the official pipeline uses):
//! grayscale is replicated to three channels, alpha is dropped (not composited), palettes are
//! expanded, CMYK is converted to RGB, EXIF orientation is ignored (the raw pixel order, which
//! COCO boxes refer to). 16-bit PNGs keep the high byte of each sample, as Pillow does for RGB and
//! gray+alpha; 16-bit grayscale (Pillow's mode `I;16`) is clipped to 0..255 like Pillow's
//! `convert("RGB")`. Where we are stricter than Pillow: truncated or corrupt files are errors,
//! never silently padded, and so is a JPEG whose entropy data ends early before an `FF D9`
//! (Pillow, like libjpeg, only warns and loads it with grey blocks after the cut).
//!
//! Memory: the header's size is checked against a pixel budget (`max_pixels`) before any pixel
//! buffer exists, and our pixel buffers are allocated fallibly, so a forged header is a one-line
//! error, never a multi-GB allocation or an out-of-memory abort.
use zune_core::bit_depth::ByteEndian;
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

/// [`pixel_buffer`] for sizes read from a file: an allocation failure is an error, not an abort.
pub fn try_pixel_buffer(len: usize) -> Result<Vec<u8>, String> {
    if let Some(mut buffer) = SPARE_PIXELS.take_idle(len) {
        buffer.resize(len, 0);
        return Ok(buffer);
    }
    zeroed(len).ok_or_else(|| format!("out of memory for {len} bytes of pixels"))
}

/// `vec![0; len]` that returns None when the allocation fails instead of aborting. Like `vec!`
/// it asks for zeroed memory (calloc): fresh pages are not touched until written.
fn zeroed(len: usize) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `len` u8s (the
    // layout a Vec<u8> of capacity `len` uses), and all `len` bytes are initialised (zero).
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Default pixel budget (width x height): 8000 x 8000, 192 MB as RGB. Real photos fit; a forged
/// header claiming 30000 x 30000 does not.
pub const DEFAULT_MAX_PIXELS: u64 = 8000 * 8000;

/// Largest side we accept (the decoders refuse larger ones before allocating).
const MAX_SIDE: usize = 1 << 16;

/// What an image file's header says, read without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub width: usize,
    pub height: usize,
    /// "jpeg" or "png".
    pub format: &'static str,
}

/// Reads the size of a JPEG or PNG held in memory (a prefix holding the headers is enough). The
/// error is a one-line reason.
pub fn read_header(bytes: &[u8]) -> Result<ImageHeader, String> {
    let header = match sniff(bytes)? {
        "jpeg" => {
            let mut decoder = JpegDecoder::new_with_options(bytes, options());
            decoder.decode_headers().map_err(|e| reason("JPEG", e))?;
            let info = decoder.info().ok_or("JPEG: missing header")?;
            (usize::from(info.width), usize::from(info.height), "jpeg")
        }
        _ => {
            let mut decoder = PngDecoder::new_with_options(bytes, options());
            decoder.decode_headers().map_err(|e| reason("PNG", e))?;
            let (w, h) = decoder.get_dimensions().ok_or("PNG: missing header")?;
            (w, h, "png")
        }
    };
    let (width, height, format) = header;
    Ok(ImageHeader {
        width,
        height,
        format,
    })
}

/// A decoder error as one line (their Debug output may hold newlines).
fn reason(format: &str, err: impl std::fmt::Debug) -> String {
    let text = format!("{err:?}");
    format!(
        "{format}: {}",
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// The format from the file's magic bytes.
fn sniff(bytes: &[u8]) -> Result<&'static str, String> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok("jpeg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok("png")
    } else if bytes.is_empty() {
        Err("empty file".to_string())
    } else {
        Err("unsupported format (only JPEG and PNG are read)".to_string())
    }
}

/// Refuses empty images and images over `max_pixels` (width x height).
pub fn check_budget(width: usize, height: usize, max_pixels: u64) -> Result<(), String> {
    let pixels = (width as u64).saturating_mul(height as u64);
    if pixels == 0 {
        return Err(format!("empty image ({width}x{height} pixels)"));
    }
    if pixels > max_pixels {
        return Err(format!(
            "{width}x{height} pixels exceed the budget of {max_pixels} pixels (raise max_pixels \
             to read it)"
        ));
    }
    Ok(())
}

/// Decodes a JPEG or PNG file held in memory, refusing images over `max_pixels` (width x height)
/// from their header. The error is a one-line reason.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    match sniff(bytes)? {
        "jpeg" => decode_jpeg(bytes, max_pixels),
        _ => decode_png(bytes, max_pixels),
    }
}

fn options() -> DecoderOptions {
    DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
}

fn jpeg_decoder(bytes: &[u8]) -> Result<JpegDecoder<&[u8]>, String> {
    let mut decoder =
        JpegDecoder::new_with_options(bytes, options().jpeg_set_out_colorspace(ColorSpace::RGB));
    decoder.decode_headers().map_err(|e| reason("JPEG", e))?;
    Ok(decoder)
}

fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    let eoi = jpeg_end_marker(bytes).ok_or("truncated JPEG (no end-of-image marker)")?;
    let sealed = with_ones_before_end(&bytes[..eoi]);
    let mut decoder = jpeg_decoder(&sealed)?;
    let info = decoder.info().ok_or("JPEG: missing header")?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    check_budget(width, height, max_pixels)?;
    let size = decoder.output_buffer_size().ok_or("JPEG: missing header")?;
    // A recycled buffer (see `recycle`): decode_into overwrites it, so it needs no zeroing.
    let mut data = try_pixel_buffer(size)?;
    decoder.decode_into(&mut data).map_err(|e| {
        // The 1-bits of `with_ones_before_end` read as a code (see there).
        if format!("{e:?}").contains("Code 0xFFFF") {
            "JPEG: image data ends early (file cut short?)".to_string()
        } else {
            reason("JPEG", e)
        }
    })?;
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
        ColorSpace::Luma => {
            let image = gray_to_rgb(width, height, &data, 1, |p| p[0]);
            recycle(data);
            image
        }
        other => Err(format!("JPEG: unsupported colour space {other:?}")),
    }
}

/// Position of the end-of-image marker (FF D9) that closes the file. Libjpeg-based readers
/// refuse files cut short; a file that was cut has no EOI near its end. Some trailing bytes
/// that cameras and editors append after EOI are allowed.
fn jpeg_end_marker(bytes: &[u8]) -> Option<usize> {
    let from = bytes.len().saturating_sub(64 * 1024);
    // From the end: EOI is normally the last two bytes, so this stops at once.
    bytes[from..]
        .windows(2)
        .rposition(|w| w == [0xFF, 0xD9])
        .map(|i| from + i)
}

/// `body` (a JPEG up to, not including, its final EOI) followed by 1-bits and EOI.
///
/// zune-jpeg treats a marker inside the entropy data as its end and decodes the missing blocks
/// from zero bits, silently: a file cut short with `FF D9` appended would give grey garbage. After
/// the real data we put 1-bits instead (`FF 00` is a stuffed 0xFF data byte): a complete file
/// never reads them (at most as look-ahead), while a file whose data ends early decodes its next
/// block from them, and no Huffman code is all ones, so the decoder reports a bad code.
fn with_ones_before_end(body: &[u8]) -> Vec<u8> {
    const ONES: [u8; 2] = [0xFF, 0x00];
    let mut sealed = Vec::with_capacity(body.len() + 2 * ONES_PAIRS + 2);
    sealed.extend_from_slice(body);
    for _ in 0..ONES_PAIRS {
        sealed.extend_from_slice(&ONES);
    }
    sealed.extend_from_slice(&[0xFF, 0xD9]);
    sealed
}

/// Bytes of 1-bits after the data: more than the decoder's 8-byte look-ahead and longer than any
/// Huffman code plus its extra bits.
const ONES_PAIRS: usize = 16;

/// RGB from pixels of `channels` bytes whose gray value `gray` picks.
fn gray_to_rgb(
    width: usize,
    height: usize,
    raw: &[u8],
    channels: usize,
    gray: impl Fn(&[u8]) -> u8,
) -> Result<RgbImage, String> {
    let mut data = try_pixel_buffer(width * height * 3)?;
    for (rgb, p) in data.chunks_exact_mut(3).zip(raw.chunks_exact(channels)) {
        rgb.fill(gray(p));
    }
    Ok(RgbImage::new(width, height, data))
}

fn decode_png(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    // IHDR (always first, checked by decode_headers): bit depth at byte 24, colour type at 25.
    let gray16 = bytes.get(24..26) == Some(&[16, 0]);
    // Pillow reads 16-bit grayscale as mode I;16 and clips it to 0..255 in convert("RGB"); the
    // other 16-bit kinds it reads by their high byte.
    let opts = options()
        .png_set_strip_to_8bit(!gray16)
        .png_set_add_alpha_channel(false)
        .set_byte_endian(ByteEndian::BE);
    let mut decoder = PngDecoder::new_with_options(bytes, opts);
    decoder.decode_headers().map_err(|e| reason("PNG", e))?;
    let (width, height) = decoder.get_dimensions().ok_or("PNG: missing header")?;
    check_budget(width, height, max_pixels)?;
    let colorspace = decoder.get_colorspace().ok_or("PNG: missing header")?;
    let size = decoder.output_buffer_size().ok_or("PNG: missing header")?;
    let mut raw = try_pixel_buffer(size)?;
    decoder
        .decode_into(&mut raw)
        .map_err(|e| reason("PNG", e))?;
    let channels = colorspace.num_components();
    if gray16 {
        // Luma, or LumaA when a tRNS chunk is present; big-endian samples.
        let clip = |p: &[u8]| u16::from_be_bytes([p[0], p[1]]).min(255) as u8;
        let image = gray_to_rgb(width, height, &raw, 2 * channels, clip);
        recycle(raw);
        return image;
    }
    let image = match colorspace {
        ColorSpace::RGB => return Ok(RgbImage::new(width, height, raw)),
        ColorSpace::RGBA => {
            let mut data = try_pixel_buffer(width * height * 3)?;
            for (rgb, p) in data.chunks_exact_mut(3).zip(raw.chunks_exact(4)) {
                rgb.copy_from_slice(&p[..3]);
            }
            Ok(RgbImage::new(width, height, data))
        }
        ColorSpace::Luma | ColorSpace::LumaA => {
            gray_to_rgb(width, height, &raw, channels, |p| p[0])
        }
        other => Err(format!("PNG: unsupported colour type {other:?}")),
    };
    recycle(raw);
    image
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
        let img = decode_image(&fixture(name), DEFAULT_MAX_PIXELS)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
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
            "gray_alpha16.png",
        ] {
            let mad = mean_abs_diff_to_reference(name);
            assert!(mad == 0.0, "{name}: mean abs diff {mad}");
        }
    }

    #[test]
    fn fallible_buffers_are_zeroed_or_refused() {
        assert_eq!(zeroed(5), Some(vec![0; 5]));
        assert_eq!(zeroed(0), Some(Vec::new()));
        assert!(zeroed(usize::MAX / 2).is_none());
        assert!(try_pixel_buffer(usize::MAX / 2)
            .unwrap_err()
            .starts_with("out of memory"));
    }

    #[test]
    fn recycled_buffers_give_the_same_pixels() {
        let jpeg = fixture("rgb.jpg");
        let first = decode_image(&jpeg, DEFAULT_MAX_PIXELS).unwrap();
        for _ in 0..3 {
            recycle(vec![0xAB; 200 * 1024]);
            assert_eq!(decode_image(&jpeg, DEFAULT_MAX_PIXELS).unwrap(), first);
            let gray = decode_image(&fixture("gray.jpg"), DEFAULT_MAX_PIXELS).unwrap();
            assert_eq!(gray.data.len(), 24 * 16 * 3);
        }
    }

    #[test]
    fn truncated_corrupt_and_unknown_files_are_errors() {
        let jpeg = fixture("rgb.jpg");
        assert!(decode_image(&jpeg[..jpeg.len() / 2], DEFAULT_MAX_PIXELS)
            .unwrap_err()
            .contains("truncated"));
        let png = fixture("rgb.png");
        assert!(decode_image(&png[..png.len() - 20], DEFAULT_MAX_PIXELS).is_err());
        let mut corrupt = jpeg.clone();
        for b in corrupt.iter_mut().skip(2).take(200) {
            *b = 0x5A;
        }
        assert!(decode_image(&corrupt, DEFAULT_MAX_PIXELS).is_err());
        assert!(decode_image(b"GIF89a....", DEFAULT_MAX_PIXELS)
            .unwrap_err()
            .contains("unsupported"));
        assert!(decode_image(b"", DEFAULT_MAX_PIXELS)
            .unwrap_err()
            .contains("empty"));
    }

    /// `bytes` with the first SOF (JPEG) or IHDR (PNG) size replaced by `w x h`.
    fn with_forged_size(bytes: &[u8], w: u32, h: u32) -> Vec<u8> {
        let mut forged = bytes.to_vec();
        if bytes.starts_with(b"\x89PNG") {
            forged[16..20].copy_from_slice(&w.to_be_bytes());
            forged[20..24].copy_from_slice(&h.to_be_bytes());
            let crc = crc32(&forged[12..29]);
            forged[29..33].copy_from_slice(&crc.to_be_bytes());
            return forged;
        }
        let sof = bytes
            .windows(2)
            .position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1]))
            .expect("a SOF marker");
        forged[sof + 5..sof + 7].copy_from_slice(&(h as u16).to_be_bytes());
        forged[sof + 7..sof + 9].copy_from_slice(&(w as u16).to_be_bytes());
        forged
    }

    /// PNG's CRC-32 (bitwise; tests only).
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    #[test]
    fn forged_sizes_are_refused_from_the_header() {
        for name in ["rgb.jpg", "progressive.jpg", "rgb.png", "gray16.png"] {
            let forged = with_forged_size(&fixture(name), 30000, 30000);
            let err = decode_image(&forged, DEFAULT_MAX_PIXELS)
                .err()
                .unwrap_or_default();
            assert!(
                err.contains("30000x30000 pixels exceed the budget"),
                "{name}: {err}"
            );
            let header = read_header(&forged).unwrap();
            assert_eq!((header.width, header.height), (30000, 30000));
            assert_eq!(check_budget(30000, 30000, DEFAULT_MAX_PIXELS), Err(err));
        }
        // The budget is the caller's: a small one refuses the real 24x16 file too.
        let err = decode_image(&fixture("rgb.jpg"), 24 * 16 - 1).unwrap_err();
        assert!(
            err.contains("24x16 pixels exceed the budget of 383"),
            "{err}"
        );
        assert!(decode_image(&fixture("rgb.jpg"), 24 * 16).is_ok());
        let empty = with_forged_size(&fixture("rgb.png"), 0, 16);
        assert!(decode_image(&empty, DEFAULT_MAX_PIXELS).is_err());
    }

    #[test]
    fn headers_give_size_and_format_without_decoding() {
        let header = read_header(&fixture("rgb.jpg")).unwrap();
        assert_eq!(
            (header.width, header.height, header.format),
            (24, 16, "jpeg")
        );
        let header = read_header(&fixture("palette.png")).unwrap();
        assert_eq!(
            (header.width, header.height, header.format),
            (24, 16, "png")
        );
        assert!(read_header(b"GIF89a").is_err());
        let png = fixture("rgb.png");
        let err = read_header(&png[..20]).unwrap_err();
        assert!(err.starts_with("PNG: ") && !err.contains('\n'), "{err:?}");
    }

    #[test]
    fn jpeg_cut_short_with_an_end_marker_is_an_error() {
        for name in ["noise64.jpg", "noise64_progressive.jpg"] {
            cut_short_with_an_end_marker_is_an_error(&fixture(name));
        }
    }

    fn cut_short_with_an_end_marker_is_an_error(jpeg: &[u8]) {
        assert_eq!(decode_image(jpeg, DEFAULT_MAX_PIXELS).unwrap().width, 64);
        // Appended bytes after EOI (cameras do this) are still fine.
        let mut trailing = jpeg.to_vec();
        trailing.extend_from_slice(&[0u8; 300]);
        assert!(decode_image(&trailing, DEFAULT_MAX_PIXELS).is_ok());
        for keep in [jpeg.len() / 3, jpeg.len() / 2, jpeg.len() * 3 / 4] {
            let mut cut = jpeg[..keep].to_vec();
            cut.extend_from_slice(&[0xFF, 0xD9]);
            let err = decode_image(&cut, DEFAULT_MAX_PIXELS)
                .err()
                .unwrap_or_default();
            assert_eq!(
                err, "JPEG: image data ends early (file cut short?)",
                "cut at {keep}"
            );
        }
    }
}
