//! Header scan of many image files (for `ddetr data check`): size, format and the first problem
//! of each file, without decoding pixels.
use std::fs::File;
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use rayon::prelude::*;

use crate::decode::{check_budget, read_header, ImageHeader};
use crate::error::{LoaderError, Result};

/// What the header scan found for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedImage {
    /// Size from the header (0 when the header could not be read).
    pub width: usize,
    pub height: usize,
    /// "jpeg", "png", or "" when unknown.
    pub format: &'static str,
    /// Why the loader would refuse the file (unreadable, not an image, over the pixel budget).
    pub error: Option<String>,
    /// File size in bytes (0 when the file cannot be read).
    pub file_size: u64,
}

/// Headers are normally in the first few KB; files with larger metadata are read whole.
const PREFIX: u64 = 16 * 1024;

/// Scans every file in parallel on `workers` threads, in input order. O(1) work per file unless
/// its headers are longer than 16 KB.
pub fn scan_images<P: AsRef<Path> + Sync>(
    paths: &[P],
    max_pixels: u64,
    workers: usize,
) -> Result<Vec<ScannedImage>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers.max(1))
        .thread_name(|i| format!("ddetr-scan-{i}"))
        .build()
        .map_err(|e| LoaderError::Config(format!("cannot start worker threads: {e}")))?;
    Ok(pool.install(|| {
        paths
            .par_iter()
            .map(|path| scan_guarded(path.as_ref(), max_pixels))
            .collect()
    }))
}

/// [`scan_image`] with a decoder panic turned into that file's error.
fn scan_guarded(path: &Path, max_pixels: u64) -> ScannedImage {
    catch_unwind(AssertUnwindSafe(|| scan_image(path, max_pixels))).unwrap_or_else(|_| {
        ScannedImage {
            width: 0,
            height: 0,
            format: "",
            error: Some("internal error while reading the header".to_string()),
            file_size: 0,
        }
    })
}

/// Reads the header of one file.
pub fn scan_image(path: &Path, max_pixels: u64) -> ScannedImage {
    let mut scanned = ScannedImage {
        width: 0,
        height: 0,
        format: "",
        error: None,
        file_size: 0,
    };
    let result = File::open(path).and_then(|mut file| {
        scanned.file_size = file.metadata()?.len();
        let mut bytes = Vec::new();
        (&mut file).take(PREFIX).read_to_end(&mut bytes)?;
        match read_header(&bytes) {
            Err(_) if scanned.file_size > PREFIX => {
                file.read_to_end(&mut bytes)?;
                Ok(read_header(&bytes))
            }
            first => Ok(first),
        }
    });
    match result {
        Err(e) => scanned.error = Some(format!("cannot read file: {e}")),
        Ok(Err(reason)) => scanned.error = Some(format!("cannot decode image: {reason}")),
        Ok(Ok(ImageHeader {
            width,
            height,
            format,
        })) => {
            (scanned.width, scanned.height, scanned.format) = (width, height, format);
            // An oversized image still reports its size: the budget is its only problem.
            if let Err(reason) = check_budget(width, height, max_pixels) {
                scanned.error = Some(format!("cannot decode image: {reason}"));
            }
        }
    }
    scanned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DEFAULT_MAX_PIXELS;

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn scans_sizes_formats_and_problems_in_order() {
        let dir = std::env::temp_dir().join(format!("ddetr-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.jpg");
        std::fs::write(&text, b"not an image").unwrap();
        let paths = vec![
            fixture("rgb.jpg"),
            fixture("palette.png"),
            text.display().to_string(),
            fixture("missing.jpg"),
        ];
        let scanned = scan_images(&paths, DEFAULT_MAX_PIXELS, 2).unwrap();
        let jpeg_size = std::fs::metadata(&paths[0]).unwrap().len();
        assert_eq!(
            scanned[0],
            ScannedImage {
                width: 24,
                height: 16,
                format: "jpeg",
                error: None,
                file_size: jpeg_size,
            }
        );
        assert_eq!((scanned[1].width, scanned[1].format), (24, "png"));
        let not_image = scanned[2].error.as_deref().unwrap();
        assert!(not_image.contains("unsupported format"), "{not_image}");
        assert_eq!(scanned[2].file_size, 12);
        assert!(scanned[3]
            .error
            .as_deref()
            .unwrap()
            .starts_with("cannot read file"));
        // Over a budget: the error, and the size from the header.
        let small = scan_images(&paths[..1], 100, 1).unwrap();
        assert_eq!((small[0].width, small[0].height), (24, 16));
        assert!(small[0]
            .error
            .as_deref()
            .unwrap()
            .contains("exceed the budget of 100"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
