//! Property test of the image path on hostile input: random bytes and random mutations of valid
//! JPEG/PNG files go through decoding, the train and val transforms and collation, in process and
//! through the worker pipeline. None may panic, and memory stays bounded (a counting allocator
//! measures each input's peak).
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use _loader::batch::{collate, Sample};
use _loader::decode::{decode_image, RgbImage};
use _loader::pipeline::{BadImagePolicy, ImageListSource, Pipeline, PlanConfig};
use _loader::rng::KeyedRng;
use _loader::transforms::{apply_train_staged, apply_val_staged, draw_train_decisions};
use _loader::transforms::{AugmentConfig, Boxes};
use _loader::LoaderError;

/// Counts live heap bytes and their peak (reset per input).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counters are process-wide: the tests take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Augmentation sizes scaled down (the debug build is slow) but with every branch: upscales,
/// downscales, crops, the max-size cap.
fn small_config() -> AugmentConfig {
    AugmentConfig {
        scales: vec![32, 48, 64],
        max_size: 96,
        val_size: 64,
        crop_resize: vec![40, 50, 60],
        crop_size: (24, 60),
        crop_prob: 0.5,
    }
}

/// Pixel budget of the test: small, so that forged sizes under it still decode quickly.
const MAX_PIXELS: u64 = 256 * 256;
/// Allowed peak heap growth per input: a few copies of the budget's RGB image (192 KB) and the
/// f32 batch, with room to spare; a header that could make us allocate by its claimed size
/// instead (up to 65535 x 65535) would exceed it by far.
const PEAK_BYTES: usize = 16 << 20;

/// xorshift64*: a tiny deterministic generator (no dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn fixtures() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("jpg" | "png")))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "fixtures missing in {}", dir.display());
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// One hostile input: a mutated fixture or random bytes behind a real magic number.
fn hostile(rng: &mut XorShift, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = seeds[rng.below(seeds.len())].clone();
    match rng.below(7) {
        // A few random bytes changed.
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
        }
        // Cut short, maybe with an end-of-image marker appended.
        1 => {
            bytes.truncate(rng.below(bytes.len()));
            if rng.below(2) == 0 {
                bytes.extend_from_slice(&[0xFF, 0xD9]);
            }
        }
        // Header sizes (the first 40 bytes) overwritten with large values.
        2 => {
            for _ in 0..2 {
                let i = rng.below(bytes.len().min(40) - 1);
                bytes[i] = 0xFF;
                bytes[i + 1] = rng.next() as u8;
            }
        }
        // A random run inserted.
        3 => {
            let at = rng.below(bytes.len());
            let run: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            bytes.splice(at..at, run);
        }
        // A span duplicated (repeated segments and chunks).
        4 => {
            let from = rng.below(bytes.len());
            let to = (from + rng.below(256)).min(bytes.len());
            let span = bytes[from..to].to_vec();
            bytes.splice(from..from, span);
        }
        // Random bytes behind a JPEG or PNG signature.
        5 => {
            let magic: &[u8] = if rng.below(2) == 0 {
                &[0xFF, 0xD8, 0xFF]
            } else {
                b"\x89PNG\r\n\x1a\n"
            };
            bytes = magic.to_vec();
            bytes.extend((0..rng.below(2048)).map(|_| rng.next() as u8));
        }
        // Plain random bytes.
        _ => bytes = (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
    }
    bytes
}

fn sample(image: _loader::resample::SampleImage) -> Sample {
    Sample {
        image,
        boxes: vec![],
        labels: vec![],
        image_id: 0,
        orig_size: (0, 0),
        path: String::new(),
        decisions: None,
    }
}

/// Decode, both transforms and a collation with a 1x1 neighbour; checks shapes. Returns what
/// was decoded, for failure messages.
fn exercise(bytes: &[u8], seed: u64, cfg: &AugmentConfig) -> String {
    let decoded = decode_image(bytes, MAX_PIXELS);
    let grown = PEAK.load(Ordering::Relaxed);
    let Ok(image) = decoded else {
        return format!("not decoded, decoder peak {grown}");
    };
    let (w, h) = (image.width, image.height);
    assert!(w >= 1 && h >= 1 && (w * h) as u64 <= MAX_PIXELS);
    assert_eq!(image.data.len(), w * h * 3);
    let val = apply_val_staged(image.clone(), &mut Boxes::default(), cfg);
    let mut rng = KeyedRng::from_key(&[seed]);
    let d = draw_train_decisions(&mut rng, w as u32, h as u32, cfg);
    let train = apply_train_staged(image, &mut Boxes::default(), &d, cfg);
    let tiny = RgbImage::new(1, 1, vec![7; 3]);
    let batch = collate(vec![sample(val), sample(train), sample(tiny.into())]);
    assert!(batch.shape.iter().all(|&s| s >= 1), "{:?}", batch.shape);
    format!(
        "{w}x{h}, decoder peak {grown}, {d:?}, batch {:?}",
        batch.shape
    )
}

#[test]
fn hostile_inputs_never_panic_and_stay_within_memory() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let seeds = fixtures();
    let cfg = small_config();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut decoded = 0;
    for round in 0..3000u64 {
        let bytes = hostile(&mut rng, &seeds);
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let what = exercise(&bytes, round, &cfg);
        let grown = PEAK.load(Ordering::Relaxed) - before;
        assert!(
            grown <= PEAK_BYTES,
            "round {round}: peak {grown} bytes; {what}"
        );
        decoded += usize::from(!what.starts_with("not decoded"));
    }
    // Enough mutants decode for the transforms and the collation to be exercised too.
    assert!(decoded >= 300, "only {decoded} of 3000 inputs decoded");
}

#[test]
fn hostile_files_through_the_pipeline_are_skips_never_internal_errors() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let seeds = fixtures();
    let dir = std::env::temp_dir().join(format!("ddetr-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    let paths: Vec<PathBuf> = (0..120)
        .map(|i| {
            let path = dir.join(format!("{i}.img"));
            std::fs::write(&path, hostile(&mut rng, &seeds)).unwrap();
            path
        })
        .collect();
    let source = ImageListSource {
        paths: paths.clone(),
        augment: small_config(),
        max_pixels: MAX_PIXELS,
    };
    let pipeline = Pipeline::new(
        Arc::new(source),
        PlanConfig::in_order(4),
        2,
        2,
        BadImagePolicy::Skip,
    )
    .unwrap();
    let mut loaded = 0;
    for batch in pipeline.epoch(0) {
        match batch {
            Ok(b) => loaded += b.image_ids.len(),
            Err(e @ LoaderError::Internal(_)) => panic!("a worker panicked: {e}"),
            Err(e) => panic!("skip policy returned an error: {e}"),
        }
    }
    let skipped = pipeline.skipped();
    assert_eq!(loaded + skipped.len(), paths.len());
    assert!(skipped.iter().all(|(_, reason)| !reason.contains('\n')));
    std::fs::remove_dir_all(&dir).unwrap();
}
