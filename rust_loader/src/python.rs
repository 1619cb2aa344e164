//! The thin PyO3 binding layer over the pure-Rust core (`ddetr_cli._loader`).
//!
//! Heavy work runs with the GIL released; arrays are handed to NumPy without copying (the NumPy
//! array owns the Rust allocation); Rust errors become Python exceptions and worker panics are
//! caught in the core, so nothing unwinds across the FFI boundary.

// pyo3 0.22's #[pyfunction] expansion converts PyErr into PyErr (a known false positive).
#![allow(clippy::useless_conversion)]
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use numpy::ndarray::{Array2, Array3, ArrayD, ArrayView, Dimension, IntoDimension, IxDyn};
use numpy::{Element, IntoPyArray, PyArray};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::batch::{Batch, Sample};
use crate::coco::{load_coco, LabelMapping};
use crate::decode::{RgbImage, DEFAULT_MAX_PIXELS};
use crate::error::LoaderError;
use crate::pipeline::{
    BadImagePolicy, CocoSource, EpochIter, ImageListSource, Pipeline, PlanConfig, Source,
};
use crate::pool::PooledVec;
use crate::results::Detections;
use crate::transforms::AugmentConfig;

// pyo3 0.22's macro checks a `gil-refs` feature this crate does not declare.
#[allow(unexpected_cfgs)]
mod exceptions {
    pyo3::create_exception!(
        _loader,
        DataError,
        pyo3::exceptions::PyValueError,
        "Bad input data (annotation file, image file); the message names the file."
    );
}
use exceptions::DataError;

fn to_py_err(err: LoaderError) -> PyErr {
    match err {
        LoaderError::Config(_) => PyValueError::new_err(err.to_string()),
        LoaderError::Internal(_) => PyRuntimeError::new_err(err.to_string()),
        _ => DataError::new_err(err.to_string()),
    }
}

fn image_to_py<'py>(py: Python<'py>, image: RgbImage) -> Bound<'py, PyAny> {
    let (h, w) = (image.height, image.width);
    Array3::from_shape_vec((h, w, 3), image.data)
        .expect("RgbImage buffer matches its size")
        .into_pyarray_bound(py)
        .into_any()
}

fn boxes_to_py<'py>(py: Python<'py>, boxes: Vec<f32>) -> Bound<'py, PyAny> {
    let n = boxes.len() / 4;
    Array2::from_shape_vec((n, 4), boxes)
        .expect("four numbers per box")
        .into_pyarray_bound(py)
        .into_any()
}

/// The owner of a pooled batch buffer that NumPy arrays view: when the last array over it is
/// garbage, Python drops this object and the buffer goes back to its pool.
#[pyclass(module = "ddetr_cli._loader", frozen)]
struct BatchBuffer {
    _buffer: PooledBuffer,
}

// The buffers are only held, to be dropped (returned to their pool) with their owner.
#[allow(dead_code)]
enum PooledBuffer {
    F32(PooledVec<f32>),
    Bool(PooledVec<bool>),
}

/// A NumPy array of shape `dim` over `buffer`, without a copy; the array keeps the buffer alive.
fn pooled_array<'py, T: Element, D: Dimension>(
    py: Python<'py>,
    buffer: PooledVec<T>,
    dim: D,
    wrap: fn(PooledVec<T>) -> PooledBuffer,
) -> PyResult<Bound<'py, PyAny>> {
    assert_eq!(dim.size(), buffer.len(), "shape matches buffer");
    // The heap block does not move when the vector moves into its owner below.
    let data = buffer.as_ptr();
    // SAFETY: `data` points to `dim.size()` initialised elements of `buffer`, a contiguous
    // row-major block.
    let view = unsafe { ArrayView::from_shape_ptr(dim, data) };
    let owner = Bound::new(
        py,
        BatchBuffer {
            _buffer: wrap(buffer),
        },
    )?;
    // SAFETY: `owner` becomes the array's base object, so it outlives the array, and it never
    // touches (let alone reallocates) the buffer before it is dropped.
    Ok(unsafe { PyArray::borrow_from_array_bound(&view, owner.into_any()) }.into_any())
}

/// `(images, mask, boxes, labels, counts, image_ids, orig_sizes, sizes, paths, images_address)`.
fn batch_to_py(py: Python<'_>, mut batch: Batch) -> PyResult<PyObject> {
    let [b, c, h, w] = batch.shape;
    let address = batch.images.as_ptr() as usize;
    let images = std::mem::take(&mut batch.images);
    let mask = std::mem::take(&mut batch.mask);
    let items: Vec<PyObject> = vec![
        pooled_array(py, images, (b, c, h, w).into_dimension(), PooledBuffer::F32)?.unbind(),
        pooled_array(py, mask, (b, h, w).into_dimension(), PooledBuffer::Bool)?.unbind(),
        boxes_to_py(py, batch.boxes).unbind(),
        batch.labels.into_pyarray_bound(py).into_any().unbind(),
        batch.counts.into_py(py),
        batch.image_ids.into_py(py),
        batch.orig_sizes.into_py(py),
        batch.sizes.into_py(py),
        batch.paths.into_py(py),
        address.into_py(py),
    ];
    Ok(PyTuple::new_bound(py, items).into_any().unbind())
}

fn sample_to_py(py: Python<'_>, sample: Sample) -> PyResult<PyObject> {
    let d = PyDict::new_bound(py);
    d.set_item("size", (sample.image.height(), sample.image.width()))?;
    d.set_item("image", image_to_py(py, sample.image.into_rgb()))?;
    d.set_item(
        "boxes",
        boxes_to_py(py, sample.boxes.into_iter().flatten().collect()),
    )?;
    d.set_item("labels", sample.labels.into_pyarray_bound(py))?;
    d.set_item("image_id", sample.image_id)?;
    d.set_item("orig_size", sample.orig_size)?;
    d.set_item("path", sample.path)?;
    let decisions = PyDict::new_bound(py);
    if let Some(dec) = sample.decisions {
        decisions.set_item("flip", dec.flip)?;
        decisions.set_item("size", dec.size)?;
        let crop = dec
            .crop
            .map(|c| (c.pre_size, c.region.0, c.region.1, c.region.2, c.region.3));
        decisions.set_item("crop", crop)?;
        d.set_item("decisions", decisions)?;
    } else {
        d.set_item("decisions", py.None())?;
    }
    Ok(d.into_any().unbind())
}

/// Iterator over one epoch's batches (see `Pipeline::epoch`).
#[pyclass(module = "ddetr_cli._loader")]
struct BatchIter {
    inner: EpochIter,
}

#[pymethods]
impl BatchIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(mut slf: PyRefMut<'_, Self>, py: Python<'_>) -> PyResult<Option<PyObject>> {
        let inner = &mut slf.inner;
        match py.allow_threads(|| inner.next()) {
            None => Ok(None),
            Some(Ok(batch)) => batch_to_py(py, batch).map(Some),
            Some(Err(e)) => Err(to_py_err(e)),
        }
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

/// A COCO detection dataset with the official Deformable DETR transforms.
#[pyclass(module = "ddetr_cli._loader", frozen)]
struct CocoLoaderCore {
    pipeline: Pipeline,
    source: Arc<CocoSource>,
}

#[allow(clippy::too_many_arguments)]
#[pymethods]
impl CocoLoaderCore {
    #[new]
    #[pyo3(signature = (images_dir, annotation_file, train, batch_size, workers=2, seed=0, rank=0,
        world_size=1, drop_last=None, shuffle=None, label_mapping="compact", on_bad_image="error",
        scales=None, max_size=1333, val_size=800, crop_resize=None, crop_size=(384, 600), prefetch=None, crop_prob=0.5,
        max_pixels=DEFAULT_MAX_PIXELS))]
    fn new(
        py: Python<'_>,
        images_dir: PathBuf,
        annotation_file: PathBuf,
        train: bool,
        batch_size: usize,
        workers: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
        drop_last: Option<bool>,
        shuffle: Option<bool>,
        label_mapping: &str,
        on_bad_image: &str,
        scales: Option<Vec<u32>>,
        max_size: u32,
        val_size: u32,
        crop_resize: Option<Vec<u32>>,
        crop_size: (u32, u32),
        prefetch: Option<usize>,
        crop_prob: f64,
        max_pixels: u64,
    ) -> PyResult<Self> {
        let mapping: LabelMapping = label_mapping.parse().map_err(to_py_err)?;
        let policy: BadImagePolicy = on_bad_image.parse().map_err(to_py_err)?;
        let defaults = AugmentConfig::default();
        let augment = AugmentConfig {
            scales: scales.unwrap_or(defaults.scales),
            max_size,
            val_size,
            crop_resize: crop_resize.unwrap_or(defaults.crop_resize),
            crop_size,
            crop_prob,
        };
        if augment.scales.is_empty()
            || augment.crop_resize.is_empty()
            || crop_size.0 == 0
            || crop_size.0 > crop_size.1
            || !(0.0..=1.0).contains(&crop_prob)
        {
            return Err(PyValueError::new_err(
                "scales and crop_resize must be non-empty, 0 < crop_size[0] <= crop_size[1] and \
                 0 <= crop_prob <= 1",
            ));
        }
        let plan = PlanConfig {
            batch_size,
            shuffle: shuffle.unwrap_or(train),
            // The official training loop drops the last partial batch; evaluation keeps it.
            drop_last: drop_last.unwrap_or(train),
            seed,
            rank,
            world_size,
        };
        let source = py
            .allow_threads(|| {
                CocoSource::open(&images_dir, &annotation_file, mapping, train, seed, augment)
            })
            .map_err(to_py_err)?;
        let source = Arc::new(CocoSource {
            max_pixels,
            ..source
        });
        let prefetch = prefetch.unwrap_or(2 * workers.max(1));
        let pipeline = Pipeline::new(
            source.clone() as Arc<dyn Source>,
            plan,
            workers,
            prefetch,
            policy,
        )
        .map_err(to_py_err)?;
        Ok(CocoLoaderCore { pipeline, source })
    }

    fn __len__(&self) -> usize {
        self.pipeline.num_batches()
    }

    #[getter]
    fn num_images(&self) -> usize {
        self.source.len()
    }

    #[getter]
    fn num_classes(&self) -> usize {
        self.source.labels.num_classes()
    }

    #[getter]
    fn category_ids(&self) -> Vec<i64> {
        self.source.labels.category_ids.clone()
    }

    #[getter]
    fn class_names(&self) -> Vec<String> {
        self.source.labels.class_names.clone()
    }

    #[getter]
    fn image_ids(&self) -> Vec<i64> {
        self.source.index.images.iter().map(|im| im.id).collect()
    }

    fn skipped(&self) -> Vec<(String, String)> {
        self.pipeline.skipped()
    }

    /// Starts epoch `epoch` at batch `start_batch` of its plan (0: the whole epoch) and returns
    /// its batch iterator; skipped batches are not decoded.
    #[pyo3(signature = (epoch, start_batch=0))]
    fn epoch(&self, epoch: u64, start_batch: usize) -> BatchIter {
        BatchIter {
            inner: self.pipeline.epoch_from(epoch, start_batch),
        }
    }

    /// Dataset indices of each batch of epoch `epoch` on this rank.
    fn plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        self.pipeline.plan().batches(self.source.len(), epoch)
    }

    /// One transformed sample with the augmentation decisions drawn for it in `epoch`.
    fn sample(&self, py: Python<'_>, index: usize, epoch: u64) -> PyResult<PyObject> {
        let sample = py
            .allow_threads(|| self.pipeline.sample(index, epoch))
            .map_err(to_py_err)?;
        sample_to_py(py, sample)
    }
}

/// Image files resized for evaluation (prediction input); unreadable files are skipped.
#[pyclass(module = "ddetr_cli._loader", frozen)]
struct ImageListCore {
    pipeline: Pipeline,
}

#[pymethods]
impl ImageListCore {
    #[new]
    #[pyo3(signature = (paths, batch_size, workers=2, val_size=800, max_size=1333, prefetch=None,
        max_pixels=DEFAULT_MAX_PIXELS))]
    fn new(
        paths: Vec<PathBuf>,
        batch_size: usize,
        workers: usize,
        val_size: u32,
        max_size: u32,
        prefetch: Option<usize>,
        max_pixels: u64,
    ) -> PyResult<Self> {
        let augment = AugmentConfig {
            val_size,
            max_size,
            ..AugmentConfig::default()
        };
        let plan = PlanConfig::in_order(batch_size);
        let source = Arc::new(ImageListSource {
            paths,
            augment,
            max_pixels,
        });
        let prefetch = prefetch.unwrap_or(2 * workers.max(1));
        let pipeline = Pipeline::new(source, plan, workers, prefetch, BadImagePolicy::Skip)
            .map_err(to_py_err)?;
        Ok(ImageListCore { pipeline })
    }

    fn __len__(&self) -> usize {
        self.pipeline.num_batches()
    }

    fn skipped(&self) -> Vec<(String, String)> {
        self.pipeline.skipped()
    }

    fn epoch(&self) -> BatchIter {
        BatchIter {
            inner: self.pipeline.epoch(0),
        }
    }
}

/// Decodes one JPEG/PNG file to a `uint8 [H, W, 3]` array (the loader's decoder).
#[pyfunction]
#[pyo3(signature = (path, max_pixels=DEFAULT_MAX_PIXELS))]
fn decode_file(py: Python<'_>, path: PathBuf, max_pixels: u64) -> PyResult<PyObject> {
    let image = py
        .allow_threads(|| {
            let name = path.display().to_string();
            let bytes = std::fs::read(&path).map_err(|source| LoaderError::Io {
                path: name.clone(),
                source,
            })?;
            crate::decode::decode_image(&bytes, max_pixels)
                .map_err(|detail| LoaderError::Decode { path: name, detail })
        })
        .map_err(to_py_err)?;
    Ok(image_to_py(py, image).unbind())
}

/// `(width, height, format, error, file_size)` of one scanned file.
type ScanRow = (usize, usize, &'static str, Option<String>, u64);

/// `(width, height, format, error, file_size)` of every image file, from its header only (no
/// pixels decoded), in input order; `workers` threads (default: one per CPU), the GIL released.
#[pyfunction]
#[pyo3(signature = (paths, max_pixels=DEFAULT_MAX_PIXELS, workers=None))]
fn scan_images(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    max_pixels: u64,
    workers: Option<usize>,
) -> PyResult<Vec<ScanRow>> {
    let workers =
        workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let scanned = py
        .allow_threads(|| crate::scan::scan_images(&paths, max_pixels, workers))
        .map_err(to_py_err)?;
    Ok(scanned
        .into_iter()
        .map(|s| (s.width, s.height, s.format, s.error, s.file_size))
        .collect())
}

/// Parses a COCO annotation file; returns counts (for benchmarks and validation).
#[pyfunction]
fn parse_annotations(py: Python<'_>, path: PathBuf) -> PyResult<PyObject> {
    let index = py.allow_threads(|| load_coco(&path)).map_err(to_py_err)?;
    let d = PyDict::new_bound(py);
    d.set_item("images", index.images.len())?;
    d.set_item("annotations", index.annotations.len())?;
    d.set_item("categories", index.categories.len())?;
    Ok(d.into_any().unbind())
}

/// `(image_id int64 [N], category_id float64 [N], bbox float64 [N, 4], score float64 [N])`, the
/// columns' own allocations handed to NumPy.
fn detections_to_py(py: Python<'_>, d: Detections) -> PyObject {
    let items: Vec<PyObject> = vec![
        d.image_id.into_pyarray_bound(py).into_any().unbind(),
        d.category_id.into_pyarray_bound(py).into_any().unbind(),
        Array2::from_shape_vec((d.score.len(), 4), d.bbox)
            .expect("four numbers per box")
            .into_pyarray_bound(py)
            .into_any()
            .unbind(),
        d.score.into_pyarray_bound(py).into_any().unbind(),
    ];
    PyTuple::new_bound(py, items).into_any().unbind()
}

/// The checked columns of the COCO results file `path` (see `results.rs`); every detection must
/// name one of `image_ids`. Read and parsed with the GIL released.
#[pyfunction]
fn read_detections(py: Python<'_>, path: PathBuf, image_ids: Vec<i64>) -> PyResult<PyObject> {
    let known: HashSet<i64> = image_ids.into_iter().collect();
    let detections = py
        .allow_threads(|| crate::results::read_detections(&path, &known))
        .map_err(to_py_err)?;
    Ok(detections_to_py(py, detections))
}

/// `read_detections` of a results text already in memory; errors name it `source`.
#[pyfunction]
fn parse_detections(
    py: Python<'_>,
    text: &[u8],
    source: &str,
    image_ids: Vec<i64>,
) -> PyResult<PyObject> {
    let known: HashSet<i64> = image_ids.into_iter().collect();
    let detections = py
        .allow_threads(|| crate::results::parse_detections(text, &known))
        .map_err(|e| {
            to_py_err(LoaderError::Results {
                path: source.to_string(),
                source: e,
            })
        })?;
    Ok(detections_to_py(py, detections))
}

/// A zero-copy check helper: a fresh array over a Rust allocation and that allocation's address.
#[pyfunction]
fn _rust_owned_array(py: Python<'_>, n: usize) -> (PyObject, usize) {
    let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let address = data.as_ptr() as usize;
    let array = ArrayD::from_shape_vec(IxDyn(&[n]), data).expect("1-d");
    (
        PyArray::from_owned_array_bound(py, array)
            .into_any()
            .unbind(),
        address,
    )
}

#[pymodule]
fn _loader(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DataError", m.py().get_type_bound::<DataError>())?;
    m.add("DEFAULT_MAX_PIXELS", DEFAULT_MAX_PIXELS)?;
    m.add_class::<CocoLoaderCore>()?;
    m.add_class::<ImageListCore>()?;
    m.add_class::<BatchIter>()?;
    m.add_class::<BatchBuffer>()?;
    m.add_function(wrap_pyfunction!(decode_file, m)?)?;
    m.add_function(wrap_pyfunction!(parse_annotations, m)?)?;
    m.add_function(wrap_pyfunction!(scan_images, m)?)?;
    m.add_function(wrap_pyfunction!(read_detections, m)?)?;
    m.add_function(wrap_pyfunction!(parse_detections, m)?)?;
    m.add_function(wrap_pyfunction!(_rust_owned_array, m)?)?;
    Ok(())
}
