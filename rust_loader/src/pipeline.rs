//! The loading pipeline: per-epoch shuffling and sharding, a worker pool that decodes and
//! augments images, and a bounded queue of collated batches.
//!
//! Memory is bounded by `prefetch`: at most that many batches are being built or wait to be
//! consumed. Results do not depend on the number of workers: every random draw is keyed by
//! `(seed, epoch, dataset index)` and batches are yielded in plan order.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::batch::{collate_into, Batch, BatchPools, Sample};
use crate::coco::{load_coco, CocoIndex, LabelMapping, Labels};
use crate::decode::{decode_image, RgbImage, DEFAULT_MAX_PIXELS};
use crate::error::{LoaderError, Result};
use crate::rng::KeyedRng;
use crate::transforms::{
    self, apply_train_staged, apply_val_staged, draw_train_decisions, AugmentConfig, Boxes,
};

const STREAM_SHUFFLE: u64 = 1;
const STREAM_AUGMENT: u64 = 2;

/// Something that turns a dataset index into a transformed sample.
pub trait Source: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn load(&self, index: usize, epoch: u64) -> Result<Sample>;
}

thread_local! {
    /// The file bytes of the image a worker decodes, kept for its next image (no allocation and
    /// no fresh pages per file).
    static FILE_BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads and decodes one image file, refusing images over `max_pixels` from their header.
fn read_and_decode(path: &Path, max_pixels: u64) -> Result<RgbImage> {
    let name = path.display().to_string();
    let mut bytes = FILE_BYTES.take();
    bytes.clear();
    let read = std::fs::File::open(path).and_then(|mut file| file.read_to_end(&mut bytes));
    let decoded = read
        .map_err(|source| LoaderError::Io {
            path: name.clone(),
            source,
        })
        .and_then(|_| {
            decode_image(&bytes, max_pixels)
                .map_err(|detail| LoaderError::Decode { path: name, detail })
        });
    // A rare giant file does not keep its buffer alive in every worker.
    if bytes.capacity() <= 16 << 20 {
        FILE_BYTES.set(bytes);
    }
    decoded
}

/// A COCO detection dataset with the official train or val transforms.
pub struct CocoSource {
    pub images_dir: PathBuf,
    pub index: CocoIndex,
    pub labels: Labels,
    pub train: bool,
    pub seed: u64,
    pub augment: AugmentConfig,
    /// Pixel budget per image (width x height), see [`crate::decode::DEFAULT_MAX_PIXELS`].
    pub max_pixels: u64,
}

impl CocoSource {
    pub fn open(
        images_dir: &Path,
        annotation_file: &Path,
        mapping: LabelMapping,
        train: bool,
        seed: u64,
        augment: AugmentConfig,
    ) -> Result<Self> {
        if !images_dir.is_dir() {
            return Err(LoaderError::Io {
                path: images_dir.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "images directory not found",
                ),
            });
        }
        let index = load_coco(annotation_file)?;
        let labels = Labels::new(
            &index.categories,
            mapping,
            &annotation_file.display().to_string(),
        )?;
        Ok(CocoSource {
            images_dir: images_dir.to_path_buf(),
            index,
            labels,
            train,
            seed,
            augment,
            max_pixels: DEFAULT_MAX_PIXELS,
        })
    }

    /// Official `ConvertCocoPolysToMask`: crowd objects dropped, `xywh -> xyxy`, clamped to the
    /// image, degenerate boxes removed.
    fn prepare_boxes(&self, index: usize, w: usize, h: usize) -> Boxes {
        let (wf, hf) = (w as f32, h as f32);
        let mut boxes = Boxes::default();
        for ann in self
            .index
            .annotations_of(index)
            .iter()
            .filter(|a| !a.iscrowd)
        {
            let [x, y, bw, bh] = ann.bbox;
            let b = [
                x.clamp(0.0, wf),
                y.clamp(0.0, hf),
                (x + bw).clamp(0.0, wf),
                (y + bh).clamp(0.0, hf),
            ];
            if b[3] > b[1] && b[2] > b[0] {
                boxes.xyxy.push(b);
                boxes.labels.push(self.labels.class_of(ann.category_id));
            }
        }
        boxes
    }
}

impl Source for CocoSource {
    fn len(&self) -> usize {
        self.index.images.len()
    }

    fn load(&self, index: usize, epoch: u64) -> Result<Sample> {
        let record = &self.index.images[index];
        let path = self.images_dir.join(&record.file_name);
        let image = read_and_decode(&path, self.max_pixels)?;
        let orig_size = (image.height as u32, image.width as u32);
        let mut boxes = self.prepare_boxes(index, image.width, image.height);
        let (image, decisions) = if self.train {
            let mut rng = KeyedRng::from_key(&[self.seed, epoch, index as u64, STREAM_AUGMENT]);
            let d = draw_train_decisions(
                &mut rng,
                image.width as u32,
                image.height as u32,
                &self.augment,
            );
            (
                apply_train_staged(image, &mut boxes, &d, &self.augment),
                Some(d),
            )
        } else {
            (apply_val_staged(image, &mut boxes, &self.augment), None)
        };
        Ok(Sample {
            boxes: transforms::normalize_boxes(&boxes, image.width(), image.height()),
            labels: boxes.labels,
            image_id: record.id,
            orig_size,
            path: path.display().to_string(),
            decisions,
            image,
        })
    }
}

/// Plain image files with the evaluation resize (for prediction).
pub struct ImageListSource {
    pub paths: Vec<PathBuf>,
    pub augment: AugmentConfig,
    /// Pixel budget per image (width x height).
    pub max_pixels: u64,
}

impl Source for ImageListSource {
    fn len(&self) -> usize {
        self.paths.len()
    }

    fn load(&self, index: usize, _epoch: u64) -> Result<Sample> {
        let path = &self.paths[index];
        let image = read_and_decode(path, self.max_pixels)?;
        let orig_size = (image.height as u32, image.width as u32);
        let image = apply_val_staged(image, &mut Boxes::default(), &self.augment);
        Ok(Sample {
            image,
            boxes: Vec::new(),
            labels: Vec::new(),
            image_id: index as i64,
            orig_size,
            path: path.display().to_string(),
            decisions: None,
        })
    }
}

/// What to do with an image that cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadImagePolicy {
    Error,
    Skip,
}

impl std::str::FromStr for BadImagePolicy {
    type Err = LoaderError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(BadImagePolicy::Error),
            "skip" => Ok(BadImagePolicy::Skip),
            other => Err(LoaderError::Config(format!(
                "on_bad_image must be 'error' or 'skip', got {other:?}"
            ))),
        }
    }
}

/// Order, sharding and batching settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
}

impl PlanConfig {
    /// Every index once, in order, on one rank, the last batch kept (inference, tests).
    pub fn in_order(batch_size: usize) -> Self {
        PlanConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            rank: 0,
            world_size: 1,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(LoaderError::Config("batch_size must be >= 1".into()));
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(LoaderError::Config(format!(
                "rank must be in [0, world_size), got rank={} world_size={}",
                self.rank, self.world_size
            )));
        }
        Ok(())
    }

    /// Dataset indices of this rank in this epoch, like `torch.utils.data.DistributedSampler`
    /// (drop_last=False): the (shuffled) order is padded by repeating its start so that every
    /// rank gets `ceil(n / world_size)` indices, then rank `r` takes positions `r, r + world, ...`.
    pub fn shard(&self, n: usize, epoch: u64) -> Vec<usize> {
        if n == 0 {
            return Vec::new();
        }
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            KeyedRng::from_key(&[self.seed, epoch, STREAM_SHUFFLE]).shuffle(&mut order);
        }
        let total = n.div_ceil(self.world_size) * self.world_size;
        let mut k = 0;
        while order.len() < total {
            order.push(order[k]);
            k += 1;
        }
        order
            .into_iter()
            .skip(self.rank)
            .step_by(self.world_size)
            .collect()
    }

    /// The batches of this rank in this epoch.
    pub fn batches(&self, n: usize, epoch: u64) -> Vec<Vec<usize>> {
        let mine = self.shard(n, epoch);
        mine.chunks(self.batch_size)
            .filter(|c| !self.drop_last || c.len() == self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    pub fn num_batches(&self, n: usize) -> usize {
        let per_rank = if n == 0 {
            0
        } else {
            n.div_ceil(self.world_size)
        };
        if self.drop_last {
            per_rank / self.batch_size
        } else {
            per_rank.div_ceil(self.batch_size)
        }
    }
}

struct Shared {
    source: Arc<dyn Source>,
    policy: BadImagePolicy,
    skipped: Mutex<Vec<(String, String)>>,
    pools: BatchPools,
}

impl Shared {
    fn record_skip(&self, err: &LoaderError) {
        let entry = (err.path().unwrap_or("?").to_string(), err.reason());
        let mut skipped = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
        if !skipped.iter().any(|(p, _)| *p == entry.0) {
            skipped.push(entry);
        }
    }

    /// Loads one image; a panic inside a decoder becomes an error for that image.
    fn load_guarded(&self, index: usize, epoch: u64) -> Result<Sample> {
        catch_unwind(AssertUnwindSafe(|| self.source.load(index, epoch)))
            .unwrap_or_else(|panic| Err(LoaderError::Internal(panic_message(&panic))))
    }

    /// Collates the loaded images of one batch (in plan order); `Ok(None)` when every image of
    /// it was skipped.
    fn finish(&self, loaded: Vec<Result<Sample>>) -> Result<Option<Batch>> {
        let mut samples = Vec::with_capacity(loaded.len());
        for item in loaded {
            match item {
                Ok(s) => samples.push(s),
                Err(e @ LoaderError::Internal(_)) => return Err(e),
                Err(e) if self.policy == BadImagePolicy::Skip => self.record_skip(&e),
                Err(e) => return Err(e),
            }
        }
        Ok((!samples.is_empty()).then(|| collate_into(samples, &self.pools)))
    }
}

/// One batch being built: each of its images is loaded by its own job, and the job that loads
/// the last one collates the batch. (No job waits on another: a rayon `join` inside a job would
/// let the waiting thread pick up later batches' work and hold back the batch the consumer
/// needs next.)
struct BatchInProgress {
    /// Plan position of the batch.
    position: usize,
    loaded: Mutex<Vec<Option<Result<Sample>>>>,
}

impl BatchInProgress {
    /// Stores image `slot`; returns all images, in order, when it was the last one.
    fn store(&self, slot: usize, sample: Result<Sample>) -> Option<Vec<Result<Sample>>> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loaded[slot] = Some(sample);
        loaded.iter().all(Option::is_some).then(|| {
            std::mem::take(&mut *loaded)
                .into_iter()
                .map(|s| s.expect("every image of the batch was stored"))
                .collect()
        })
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "worker panicked".to_string())
}

/// A reusable loader: a source, a batch plan and a worker pool.
pub struct Pipeline {
    shared: Arc<Shared>,
    plan: PlanConfig,
    pool: Arc<rayon::ThreadPool>,
    prefetch: usize,
}

impl Pipeline {
    pub fn new(
        source: Arc<dyn Source>,
        plan: PlanConfig,
        workers: usize,
        prefetch: usize,
        policy: BadImagePolicy,
    ) -> Result<Self> {
        plan.validate()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers.max(1))
            .thread_name(|i| format!("ddetr-loader-{i}"))
            // Jobs catch their own panics; this only keeps a stray one from aborting Python.
            .panic_handler(|_| {})
            .build()
            .map_err(|e| LoaderError::Config(format!("cannot start worker threads: {e}")))?;
        Ok(Pipeline {
            shared: Arc::new(Shared {
                source,
                policy,
                skipped: Mutex::new(Vec::new()),
                // Enough idle buffers for every batch that can be in flight, plus the two the
                // consumer holds (a `for` loop keeps the previous batch until `next` returns);
                // fewer would drop a buffer at every epoch end and fault in a new one after.
                pools: BatchPools::new(prefetch.max(1) + 2),
            }),
            plan,
            pool: Arc::new(pool),
            prefetch: prefetch.max(1),
        })
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.shared.source
    }

    pub fn plan(&self) -> &PlanConfig {
        &self.plan
    }

    /// Number of batches per epoch on this rank.
    pub fn num_batches(&self) -> usize {
        self.plan.num_batches(self.shared.source.len())
    }

    /// Images that were skipped so far (`on_bad_image = skip`), as `(file, reason)`.
    pub fn skipped(&self) -> Vec<(String, String)> {
        self.shared
            .skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads one sample directly (no batching), with the same augmentation draw as in epoch
    /// `epoch`, its pixels computed (`SampleImage::Rgb`); used to replay decisions in tests.
    pub fn sample(&self, index: usize, epoch: u64) -> Result<Sample> {
        if index >= self.shared.source.len() {
            return Err(LoaderError::Config(format!("index {index} out of range")));
        }
        self.pool.install(|| {
            let mut sample = self.shared.load_guarded(index, epoch)?;
            // Run a pending resize here (worker thread, panics caught), not in the caller.
            catch_unwind(AssertUnwindSafe(move || {
                sample.image = sample.image.into_rgb().into();
                sample
            }))
            .map_err(|panic| LoaderError::Internal(panic_message(&panic)))
        })
    }

    /// Starts iterating epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// Starts iterating epoch `epoch` at batch `start_batch` of its plan (mid-epoch resume): the
    /// batches before it are neither decoded nor yielded, the rest are exactly those of a full
    /// epoch. A `start_batch` at or past the end gives an empty iterator.
    pub fn epoch_from(&self, epoch: u64, start_batch: usize) -> EpochIter {
        let mut plan = self.plan.batches(self.shared.source.len(), epoch);
        plan.drain(..start_batch.min(plan.len()));
        let (tx, rx) = channel();
        EpochIter {
            shared: Arc::clone(&self.shared),
            pool: Arc::clone(&self.pool),
            plan,
            epoch,
            prefetch: self.prefetch,
            next_submit: 0,
            next_yield: 0,
            tx,
            rx,
            ready: BTreeMap::new(),
            cancelled: Arc::new(AtomicBool::new(false)),
            failed: false,
        }
    }
}

type BatchResult = Result<Option<Batch>>;

/// Iterator over one epoch's batches, in plan order. Up to `prefetch` batches are built ahead.
pub struct EpochIter {
    shared: Arc<Shared>,
    pool: Arc<rayon::ThreadPool>,
    plan: Vec<Vec<usize>>,
    epoch: u64,
    prefetch: usize,
    next_submit: usize,
    next_yield: usize,
    tx: Sender<(usize, BatchResult)>,
    rx: Receiver<(usize, BatchResult)>,
    ready: BTreeMap<usize, BatchResult>,
    cancelled: Arc<AtomicBool>,
    failed: bool,
}

impl EpochIter {
    /// Batches this iterator covers (from its start batch to the end of the epoch).
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.is_empty()
    }

    /// Dataset indices of every batch this iterator yields (from its start batch on).
    pub fn plan(&self) -> &[Vec<usize>] {
        &self.plan
    }

    fn submit_ahead(&mut self) {
        while self.next_submit < self.plan.len()
            && self.next_submit - self.next_yield < self.prefetch
        {
            let k = self.next_submit;
            let indices = &self.plan[k];
            if indices.is_empty() {
                let _ = self.tx.send((k, Ok(None)));
            }
            let batch = Arc::new(BatchInProgress {
                position: k,
                loaded: Mutex::new((0..indices.len()).map(|_| None).collect()),
            });
            for (slot, &index) in indices.iter().enumerate() {
                let (shared, tx, cancelled, batch, epoch) = (
                    Arc::clone(&self.shared),
                    self.tx.clone(),
                    Arc::clone(&self.cancelled),
                    Arc::clone(&batch),
                    self.epoch,
                );
                self.pool.spawn(move || {
                    // Queued jobs of an abandoned epoch return without decoding.
                    if cancelled.load(Ordering::Relaxed) {
                        return;
                    }
                    let sample = shared.load_guarded(index, epoch);
                    let Some(loaded) = batch.store(slot, sample) else {
                        return;
                    };
                    let result = catch_unwind(AssertUnwindSafe(|| shared.finish(loaded)))
                        .unwrap_or_else(|panic| Err(LoaderError::Internal(panic_message(&panic))));
                    // The receiver is gone when the iterator was dropped; nothing to do then.
                    let _ = tx.send((batch.position, result));
                });
            }
            self.next_submit += 1;
        }
    }

    fn wait_for(&mut self, k: usize) -> BatchResult {
        loop {
            if let Some(result) = self.ready.remove(&k) {
                return result;
            }
            match self.rx.recv() {
                Ok((j, result)) => {
                    self.ready.insert(j, result);
                }
                Err(_) => return Err(LoaderError::Internal("worker channel closed".into())),
            }
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    /// Blocks until the next batch is ready. Batches whose images were all skipped are passed
    /// over; after an error the iterator is exhausted.
    fn next(&mut self) -> Option<Result<Batch>> {
        while !self.failed && self.next_yield < self.plan.len() {
            self.submit_ahead();
            let k = self.next_yield;
            let result = self.wait_for(k);
            self.next_yield += 1;
            self.submit_ahead();
            match result {
                Ok(Some(batch)) => return Some(Ok(batch)),
                Ok(None) => continue,
                Err(e) => {
                    self.failed = true;
                    self.cancelled.store(true, Ordering::Relaxed);
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Queued jobs of an abandoned epoch return without decoding.
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn plan(rank: usize, world: usize, shuffle: bool, drop_last: bool) -> PlanConfig {
        PlanConfig {
            batch_size: 3,
            shuffle,
            drop_last,
            seed: 5,
            rank,
            world_size: world,
        }
    }

    #[test]
    fn shards_are_disjoint_equal_and_cover_everything() {
        let n = 10;
        let shards: Vec<Vec<usize>> = (0..3)
            .map(|r| plan(r, 3, true, false).shard(n, 1))
            .collect();
        assert!(shards.iter().all(|s| s.len() == 4));
        let all: HashSet<usize> = shards.iter().flatten().copied().collect();
        assert_eq!(all.len(), n);
        // 12 slots for 10 images: exactly two repeats (DistributedSampler padding).
        assert_eq!(shards.iter().map(Vec::len).sum::<usize>(), 12);
    }

    #[test]
    fn shuffle_is_seeded_per_epoch() {
        let p = plan(0, 1, true, false);
        assert_eq!(p.shard(50, 3), p.shard(50, 3));
        assert_ne!(p.shard(50, 3), p.shard(50, 4));
        assert_eq!(plan(0, 1, false, false).shard(5, 9), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn batching_and_drop_last() {
        let keep = plan(0, 1, false, false);
        assert_eq!(
            keep.batches(7, 0),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
        assert_eq!(keep.num_batches(7), 3);
        let drop = plan(0, 1, false, true);
        assert_eq!(drop.batches(7, 0).len(), 2);
        assert_eq!(drop.num_batches(7), 2);
        assert_eq!(drop.num_batches(0), 0);
        assert!(plan(2, 2, false, false).validate().is_err());
    }

    /// A source of solid images; index 3 is "corrupt" and index 4 panics.
    struct Synthetic;
    impl Source for Synthetic {
        fn len(&self) -> usize {
            8
        }
        fn load(&self, index: usize, _epoch: u64) -> Result<Sample> {
            match index {
                3 => Err(LoaderError::Decode {
                    path: "3.jpg".into(),
                    detail: "corrupt".into(),
                }),
                4 => panic!("decoder bug"),
                _ => Ok(Sample {
                    image: RgbImage::new(index + 1, 2, vec![index as u8; (index + 1) * 6]).into(),
                    boxes: vec![],
                    labels: vec![],
                    image_id: index as i64,
                    orig_size: (2, index as u32 + 1),
                    path: format!("{index}.jpg"),
                    decisions: None,
                }),
            }
        }
    }

    fn run(
        policy: BadImagePolicy,
        batch_size: usize,
        workers: usize,
    ) -> (Vec<Result<Batch>>, Pipeline) {
        let cfg = PlanConfig::in_order(batch_size);
        let p = Pipeline::new(Arc::new(Synthetic), cfg, workers, 2, policy).unwrap();
        let out = p.epoch(0).collect();
        (out, p)
    }

    #[test]
    fn skip_policy_skips_and_records_bad_images_and_panics_are_errors() {
        let (out, p) = run(BadImagePolicy::Skip, 1, 2);
        let ok: Vec<i64> = out
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .flat_map(|b| b.image_ids.clone())
            .collect();
        assert_eq!(ok, vec![0, 1, 2]);
        assert!(matches!(out[3], Err(LoaderError::Internal(ref m)) if m.contains("decoder bug")));
        assert_eq!(out.len(), 4); // exhausted after the error
        assert_eq!(
            p.skipped(),
            vec![(
                "3.jpg".to_string(),
                "cannot decode image: corrupt".to_string()
            )]
        );
    }

    #[test]
    fn error_policy_stops_at_first_bad_image_in_order() {
        let (out, _) = run(BadImagePolicy::Error, 2, 3);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().unwrap().image_ids, vec![0, 1]);
        assert_eq!(
            out[1].as_ref().unwrap_err().to_string(),
            "3.jpg: cannot decode image: corrupt"
        );
    }

    #[test]
    fn work_ahead_is_bounded_by_prefetch() {
        use std::sync::atomic::AtomicUsize;
        struct Counting(AtomicUsize);
        impl Source for Counting {
            fn len(&self) -> usize {
                100
            }
            fn load(&self, index: usize, epoch: u64) -> Result<Sample> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Synthetic.load(index % 3, epoch)
            }
        }
        let source = Arc::new(Counting(AtomicUsize::new(0)));
        let cfg = PlanConfig::in_order(2);
        let p = Pipeline::new(source.clone(), cfg, 2, 3, BadImagePolicy::Error).unwrap();
        let mut it = p.epoch(0);
        assert!(it.next().unwrap().is_ok());
        std::thread::sleep(std::time::Duration::from_millis(200));
        // One batch consumed, at most `prefetch` = 3 more built or in flight: 4 batches of 2.
        assert!(
            source.0.load(Ordering::SeqCst) <= 8,
            "{}",
            source.0.load(Ordering::SeqCst)
        );
        drop(it);
    }

    #[test]
    fn batches_come_in_plan_order_whatever_the_worker_count() {
        struct Good;
        impl Source for Good {
            fn len(&self) -> usize {
                23
            }
            fn load(&self, index: usize, epoch: u64) -> Result<Sample> {
                Synthetic.load(index % 3, epoch).map(|mut s| {
                    s.image_id = index as i64;
                    s
                })
            }
        }
        let ids = |workers| {
            let cfg = PlanConfig {
                batch_size: 4,
                shuffle: true,
                drop_last: false,
                seed: 1,
                rank: 0,
                world_size: 1,
            };
            let p = Pipeline::new(Arc::new(Good), cfg, workers, 3, BadImagePolicy::Error).unwrap();
            p.epoch(2).map(|b| b.unwrap().image_ids).collect::<Vec<_>>()
        };
        let one = ids(1);
        assert_eq!(one.len(), 6);
        assert_eq!(one, ids(4));
    }

    #[test]
    fn starting_mid_epoch_yields_the_tail_and_loads_nothing_before_it() {
        struct Recording(Mutex<Vec<usize>>);
        impl Source for Recording {
            fn len(&self) -> usize {
                20
            }
            fn load(&self, index: usize, epoch: u64) -> Result<Sample> {
                self.0.lock().unwrap().push(index);
                Synthetic.load(index % 3, epoch).map(|mut s| {
                    s.image_id = index as i64;
                    s
                })
            }
        }
        let cfg = PlanConfig {
            batch_size: 3,
            shuffle: true,
            drop_last: true,
            seed: 7,
            rank: 0,
            world_size: 1,
        };
        let source = Arc::new(Recording(Mutex::new(Vec::new())));
        let p = Pipeline::new(source.clone(), cfg, 2, 2, BadImagePolicy::Error).unwrap();
        let full: Vec<Vec<i64>> = p.epoch(3).map(|b| b.unwrap().image_ids).collect();
        assert_eq!(full.len(), 6);
        source.0.lock().unwrap().clear();
        let tail = p.epoch_from(3, 4);
        assert_eq!(tail.len(), 2);
        assert_eq!(tail.plan(), &p.plan().batches(20, 3)[4..]);
        let tail: Vec<Vec<i64>> = tail.map(|b| b.unwrap().image_ids).collect();
        assert_eq!(tail, full[4..]);
        let mut loaded = source.0.lock().unwrap().clone();
        loaded.sort_unstable();
        let mut expected: Vec<usize> = full[4..].iter().flatten().map(|&i| i as usize).collect();
        expected.sort_unstable();
        assert_eq!(loaded, expected, "only the tail's images are decoded");
        assert_eq!(p.epoch_from(3, 6).count(), 0);
        assert_eq!(p.epoch_from(3, 99).count(), 0);
    }
}
