//! COCO `instances_*.json` parsing with serde.
//!
//! Only what detection training needs is kept: image ids, file names, boxes, categories and
//! `iscrowd`. Everything else real files contain (`info`, `licenses`, polygon or RLE
//! `segmentation`, extra fields) is skipped by the parser without being materialised, which is
//! what makes parsing fast and lean next to `json.load`.
//!
//! A file gets the same verdict here as in the Python validator `ddetr_cli/annotations.py`
//! (used by evaluation): `area` and `iscrowd` may be missing, annotation ids may be missing;
//! ids must be unique, boxes 4 numbers with width and height >= 0, `area` a number >= 0, and
//! every annotation must name a listed image and category.
use std::collections::HashMap;
use std::path::{Component, Path};

use serde::{Deserialize, Deserializer};

use crate::error::{LoaderError, Result};

#[derive(Deserialize)]
struct RawCoco {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: i64,
    file_name: String,
}

#[derive(Deserialize)]
struct RawAnnotation {
    #[serde(default)]
    id: Option<i64>,
    image_id: i64,
    category_id: i64,
    bbox: [f64; 4],
    #[serde(default, deserialize_with = "crowd_flag")]
    iscrowd: bool,
    /// Only checked (a number >= 0 when present, as the evaluator needs it); not kept.
    #[serde(default, deserialize_with = "present_number")]
    area: Option<f64>,
}

#[derive(Deserialize)]
struct RawCategory {
    id: i64,
    #[serde(default)]
    name: String,
}

/// `iscrowd` is 0/1 in COCO; some tools write booleans.
fn crowd_flag<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "iscrowd must be 0, 1 or a boolean")]
    enum Flag {
        Int(i64),
        Bool(bool),
    }
    Ok(match Flag::deserialize(d)? {
        Flag::Int(v) => v != 0,
        Flag::Bool(v) => v,
    })
}

/// A field that may be missing but not `null`: `Option<f64>` alone would take `null` as missing.
fn present_number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    f64::deserialize(d).map(Some)
}

/// One object: `bbox` is COCO `[x, y, w, h]` in pixels of the original image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Annotation {
    pub bbox: [f32; 4],
    pub category_id: i64,
    pub iscrowd: bool,
}

/// One image and the range of its annotations in [`CocoIndex::annotations`].
#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub id: i64,
    pub file_name: String,
    pub ann_start: usize,
    pub ann_end: usize,
}

/// A category as listed in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Category {
    pub id: i64,
    pub name: String,
}

/// The parsed annotation file. Images are sorted by id, as in the official `CocoDetection`
/// (`self.ids = sorted(coco.imgs.keys())`); each image's annotations keep file order.
#[derive(Debug, Clone)]
pub struct CocoIndex {
    pub images: Vec<ImageRecord>,
    pub annotations: Vec<Annotation>,
    /// Sorted by category id.
    pub categories: Vec<Category>,
}

impl CocoIndex {
    /// The annotations of image `index` (position in `images`).
    pub fn annotations_of(&self, index: usize) -> &[Annotation] {
        let rec = &self.images[index];
        &self.annotations[rec.ann_start..rec.ann_end]
    }
}

/// Reads and parses `path`; errors name the file and, for JSON errors, the line and column.
pub fn load_coco(path: &Path) -> Result<CocoIndex> {
    let bytes = std::fs::read(path).map_err(|source| LoaderError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_coco(&bytes, &path.display().to_string())
}

/// Parses COCO JSON held in memory; `name` is used in error messages.
pub fn parse_coco(bytes: &[u8], name: &str) -> Result<CocoIndex> {
    let raw: RawCoco = serde_json::from_slice(bytes).map_err(|e| LoaderError::Json {
        path: name.to_string(),
        line: e.line(),
        column: e.column(),
        detail: e.to_string(),
    })?;
    build_index(raw, name)
}

fn annotation_error(name: &str, detail: String) -> LoaderError {
    LoaderError::Annotation {
        path: name.to_string(),
        detail,
    }
}

/// True for a plain relative path that stays inside the images directory.
pub fn is_safe_relative_path(file_name: &str) -> bool {
    let path = Path::new(file_name);
    !file_name.is_empty()
        && !file_name.starts_with('/')
        && !file_name.starts_with('\\')
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && !file_name.split(['/', '\\']).any(|part| part == "..")
}

fn build_index(raw: RawCoco, name: &str) -> Result<CocoIndex> {
    let mut categories: Vec<Category> = raw
        .categories
        .into_iter()
        .map(|c| Category {
            id: c.id,
            name: c.name,
        })
        .collect();
    categories.sort_by_key(|c| c.id);
    if let Some(pair) = categories.windows(2).find(|p| p[0].id == p[1].id) {
        return Err(annotation_error(
            name,
            format!("duplicate category id {}", pair[0].id),
        ));
    }

    let mut images = raw.images;
    images.sort_by_key(|im| im.id);
    if let Some(pair) = images.windows(2).find(|p| p[0].id == p[1].id) {
        return Err(annotation_error(
            name,
            format!("duplicate image id {}", pair[0].id),
        ));
    }
    for im in &images {
        if !is_safe_relative_path(&im.file_name) {
            return Err(annotation_error(
                name,
                format!(
                    "image {} has unsafe file_name {:?} (absolute paths and '..' are rejected)",
                    im.id, im.file_name
                ),
            ));
        }
    }
    let position: HashMap<i64, usize> = images
        .iter()
        .enumerate()
        .map(|(i, im)| (im.id, i))
        .collect();

    // Counting sort of annotations by image position keeps each image's file order.
    let mut owner = Vec::with_capacity(raw.annotations.len());
    let mut counts = vec![0usize; images.len() + 1];
    let mut ann_ids: HashMap<i64, usize> = HashMap::with_capacity(raw.annotations.len());
    for (k, ann) in raw.annotations.iter().enumerate() {
        let fail = |problem: String| {
            let place = ann.id.map_or_else(
                || format!("annotations[{k}]"),
                |id| format!("annotations[{k}] (id {id})"),
            );
            Err(annotation_error(name, format!("{place}: {problem}")))
        };
        if let Some(id) = ann.id {
            if let Some(first) = ann_ids.insert(id, k) {
                return fail(format!(
                    "duplicate annotation id {id} (also annotations[{first}])"
                ));
            }
        }
        let Some(&pos) = position.get(&ann.image_id) else {
            return fail(format!("image_id {} is not in 'images'", ann.image_id));
        };
        if categories
            .binary_search_by_key(&ann.category_id, |c| c.id)
            .is_err()
        {
            return fail(format!(
                "category_id {} is not in 'categories'",
                ann.category_id
            ));
        }
        if ann.bbox[2] < 0.0 || ann.bbox[3] < 0.0 {
            return fail(format!(
                "bbox has a negative width or height: {:?}",
                ann.bbox
            ));
        }
        if ann.area.is_some_and(|a| a < 0.0) {
            return fail(format!("area must be a number >= 0, got {:?}", ann.area));
        }
        owner.push(pos);
        counts[pos + 1] += 1;
    }
    for i in 1..counts.len() {
        counts[i] += counts[i - 1];
    }
    let starts = counts.clone();
    let mut cursor = counts;
    let mut annotations = vec![
        Annotation {
            bbox: [0.0; 4],
            category_id: 0,
            iscrowd: false
        };
        raw.annotations.len()
    ];
    for (ann, &pos) in raw.annotations.iter().zip(&owner) {
        annotations[cursor[pos]] = Annotation {
            // torch.as_tensor(boxes, dtype=torch.float32) in the official code.
            bbox: ann.bbox.map(|v| v as f32),
            category_id: ann.category_id,
            iscrowd: ann.iscrowd,
        };
        cursor[pos] += 1;
    }
    let images = images
        .into_iter()
        .enumerate()
        .map(|(i, im)| ImageRecord {
            id: im.id,
            file_name: im.file_name,
            ann_start: starts[i],
            ann_end: starts[i + 1],
        })
        .collect();
    Ok(CocoIndex {
        images,
        annotations,
        categories,
    })
}

/// How category ids become class indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelMapping {
    /// Contiguous 0..K-1 in sorted category-id order (custom datasets).
    Compact,
    /// The raw category id is the class index (official Deformable DETR; COCO has 91 classes).
    Raw,
}

impl std::str::FromStr for LabelMapping {
    type Err = LoaderError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "compact" => Ok(LabelMapping::Compact),
            "raw" => Ok(LabelMapping::Raw),
            other => Err(LoaderError::Config(format!(
                "label_mapping must be 'compact' or 'raw', got {other:?}"
            ))),
        }
    }
}

/// The largest class count a `Raw` mapping may create (LVIS has 1203 categories): the model gets
/// one output per id up to the largest, so a stray huge id would otherwise ask for a table of
/// billions of classes.
pub const MAX_RAW_CLASSES: i64 = 100_000;

/// Class index <-> category id tables for one mapping.
#[derive(Debug, Clone)]
pub struct Labels {
    /// class index -> category id (identity for `Raw`).
    pub category_ids: Vec<i64>,
    /// class index -> name ("N/A" for ids absent from a `Raw` mapping).
    pub class_names: Vec<String>,
    lookup: HashMap<i64, i64>,
}

impl Labels {
    pub fn new(categories: &[Category], mapping: LabelMapping, name: &str) -> Result<Self> {
        let (category_ids, class_names): (Vec<i64>, Vec<String>) = match mapping {
            LabelMapping::Compact => categories.iter().map(|c| (c.id, c.name.clone())).unzip(),
            LabelMapping::Raw => {
                if let Some(c) = categories.iter().find(|c| c.id < 0) {
                    return Err(annotation_error(
                        name,
                        format!(
                            "category id {} is negative; use label_mapping='compact'",
                            c.id
                        ),
                    ));
                }
                if let Some(c) = categories.iter().find(|c| c.id >= MAX_RAW_CLASSES) {
                    return Err(annotation_error(
                        name,
                        format!(
                            "category id {} is too large for label_mapping='raw' (one class per \
                             id up to the largest; ids must be < {MAX_RAW_CLASSES}); use \
                             label_mapping='compact'",
                            c.id
                        ),
                    ));
                }
                let num = categories.last().map_or(0, |c| c.id + 1);
                let mut names = vec!["N/A".to_string(); num as usize];
                for c in categories {
                    names[c.id as usize] = c.name.clone();
                }
                ((0..num).collect(), names)
            }
        };
        let lookup = match mapping {
            LabelMapping::Compact => category_ids
                .iter()
                .enumerate()
                .map(|(i, &id)| (id, i as i64))
                .collect(),
            LabelMapping::Raw => categories.iter().map(|c| (c.id, c.id)).collect(),
        };
        Ok(Labels {
            category_ids,
            class_names,
            lookup,
        })
    }

    pub fn num_classes(&self) -> usize {
        self.category_ids.len()
    }

    /// Class index of a category id known to be in the file.
    pub fn class_of(&self, category_id: i64) -> i64 {
        self.lookup[&category_id]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL_LOOKING: &str = r#"{
      "info": {"description": "COCO 2017", "year": 2017},
      "licenses": [{"id": 1, "name": "CC", "url": "http://x"}],
      "images": [
        {"id": 42, "file_name": "b.jpg", "width": 640, "height": 480, "license": 1, "coco_url": "u"},
        {"id": 7, "file_name": "sub/a.jpg", "width": 320, "height": 240},
        {"id": 9, "file_name": "empty.jpg", "width": 10, "height": 10}
      ],
      "annotations": [
        {"id": 1, "image_id": 42, "category_id": 90, "bbox": [1, 2, 3, 4], "area": 12.0,
         "iscrowd": 0, "segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0.5, 0.5, 10, 10], "area": 100,
         "iscrowd": 1, "segmentation": {"counts": [0, 5, 3], "size": [240, 320]}},
        {"id": 3, "image_id": 42, "category_id": 1, "bbox": [5, 6, 7, 8], "iscrowd": false,
         "segmentation": {"counts": "abc", "size": [480, 640]}, "extra": {"nested": [1, 2]}}
      ],
      "categories": [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
                     {"id": 1, "name": "person", "supercategory": "person"}]
    }"#;

    #[test]
    fn parses_real_coco_fields_sorted_by_image_id() {
        let idx = parse_coco(REAL_LOOKING.as_bytes(), "x.json").unwrap();
        let ids: Vec<i64> = idx.images.iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![7, 9, 42]);
        assert_eq!(idx.annotations_of(0).len(), 1);
        assert!(idx.annotations_of(0)[0].iscrowd);
        assert!(idx.annotations_of(1).is_empty());
        let anns42 = idx.annotations_of(2);
        assert_eq!(anns42.len(), 2);
        assert_eq!(anns42[0].category_id, 90); // file order kept
        assert_eq!(anns42[1].bbox, [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(idx.categories[0].id, 1);
    }

    #[test]
    fn label_mappings_compact_and_raw() {
        let idx = parse_coco(REAL_LOOKING.as_bytes(), "x.json").unwrap();
        let compact = Labels::new(&idx.categories, LabelMapping::Compact, "x").unwrap();
        assert_eq!(compact.category_ids, vec![1, 90]);
        assert_eq!(compact.class_of(90), 1);
        assert_eq!(compact.class_names, vec!["person", "toothbrush"]);
        let raw = Labels::new(&idx.categories, LabelMapping::Raw, "x").unwrap();
        assert_eq!(raw.num_classes(), 91);
        assert_eq!(raw.class_of(90), 90);
        assert_eq!(raw.class_names[0], "N/A");
        assert_eq!(raw.class_names[90], "toothbrush");
    }

    #[test]
    fn json_errors_name_file_and_position() {
        let err = parse_coco(b"{\n  \"images\": [\n    {\"id\": 1,}\n", "bad.json").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("bad.json: invalid COCO"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        let err =
            parse_coco(br#"{"images": [{"id": 1}], "categories": []}"#, "m.json").unwrap_err();
        assert!(
            err.to_string().contains("missing field `file_name`"),
            "{err}"
        );
    }

    #[test]
    fn rejects_unsafe_paths_and_dangling_references() {
        for bad in ["/etc/passwd", "../x.jpg", "a/../../x.jpg", ""] {
            let json =
                format!(r#"{{"images": [{{"id": 1, "file_name": {bad:?}}}], "categories": []}}"#);
            let err = parse_coco(json.as_bytes(), "p.json").unwrap_err();
            assert!(err.to_string().contains("unsafe file_name"), "{bad}: {err}");
        }
        let json = r#"{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}],
                       "annotations": [{"id": 5, "image_id": 2, "category_id": 1, "bbox": [0,0,1,1]}]}"#;
        assert!(parse_coco(json.as_bytes(), "d.json")
            .unwrap_err()
            .to_string()
            .contains("image_id 2"));
        let json = r#"{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}],
                       "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [0,0,1,1]}]}"#;
        assert!(parse_coco(json.as_bytes(), "d.json")
            .unwrap_err()
            .to_string()
            .contains("category_id 3"));
        assert!(is_safe_relative_path("dir/./a.jpg"));
    }

    fn with_annotation(ann: &str) -> String {
        format!(
            r#"{{"images": [{{"id": 1, "file_name": "a.jpg"}}], "categories": [{{"id": 1}}],
                "annotations": [{{"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}},
                                {ann}]}}"#
        )
    }

    #[test]
    fn missing_area_iscrowd_and_id_are_accepted() {
        let json = with_annotation(r#"{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}"#);
        let idx = parse_coco(json.as_bytes(), "a.json").unwrap();
        assert_eq!(idx.annotations.len(), 2);
        assert!(!idx.annotations[1].iscrowd);
    }

    #[test]
    fn rejects_what_the_python_validator_rejects() {
        let cases = [
            (
                r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}"#,
                "length 3",
            ),
            (
                r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": null}"#,
                "null",
            ),
            (
                r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2, "3", 4]}"#,
                "string",
            ),
            (
                r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]}"#,
                "negative",
            ),
            (
                r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "area": null}"#,
                "null",
            ),
            (
                r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "area": -1}"#,
                "area",
            ),
            (
                r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": null}"#,
                "iscrowd",
            ),
            (
                r#"{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}"#,
                "duplicate annotation id 7",
            ),
            (
                r#"{"id": 8, "image_id": 1, "bbox": [1, 2, 3, 4]}"#,
                "category_id",
            ),
            (
                r#"{"id": 8, "image_id": 1.0, "category_id": 1, "bbox": [1, 2, 3, 4]}"#,
                "floating",
            ),
        ];
        for (ann, expected) in cases {
            let err = parse_coco(with_annotation(ann).as_bytes(), "v.json").unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("v.json: "), "{msg}");
            assert!(msg.contains(expected), "{ann}: {msg}");
        }
        let err = parse_coco(
            with_annotation(r#"{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]}"#)
                .as_bytes(),
            "v.json",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("annotations[1] (id 8): bbox"),
            "{err}"
        );
    }

    #[test]
    fn raw_mapping_refuses_huge_category_ids_without_allocating() {
        for id in [4_000_000_000_i64, i64::MAX, MAX_RAW_CLASSES] {
            let categories = [Category {
                id,
                name: "x".into(),
            }];
            let err = Labels::new(&categories, LabelMapping::Raw, "h.json").unwrap_err();
            assert!(err.to_string().contains("too large"), "{err}");
            let compact = Labels::new(&categories, LabelMapping::Compact, "h.json").unwrap();
            assert_eq!(compact.class_of(id), 0);
        }
        let largest = [Category {
            id: MAX_RAW_CLASSES - 1,
            name: "x".into(),
        }];
        let raw = Labels::new(&largest, LabelMapping::Raw, "h.json").unwrap();
        assert_eq!(raw.num_classes(), MAX_RAW_CLASSES as usize);
    }
}
