//! Property test of the annotation parser on hostile input: random bytes and random mutations of a
//! valid COCO file (bytes flipped, cut, spliced; numbers replaced by extreme values) go through
//! `parse_coco` and both label mappings. None may panic; every refusal is an error value whose
//! message names the file.
use std::panic::{catch_unwind, AssertUnwindSafe};

use _loader::coco::{parse_coco, LabelMapping, Labels};
use _loader::rng::KeyedRng;

const NAME: &str = "fuzz.json";

/// A small but complete file: crowd and plain boxes, optional fields present and absent.
const VALID: &str = r#"{
 "images": [{"id": 3, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 1, "file_name": "sub/b.jpg", "width": 32, "height": 32}],
 "categories": [{"id": 1, "name": "circle"}, {"id": 7, "name": "star"}],
 "annotations": [
  {"id": 1, "image_id": 3, "category_id": 1, "bbox": [1.5, 2, 10, 12], "area": 120, "iscrowd": 0},
  {"id": 2, "image_id": 3, "category_id": 7, "bbox": [0, 0, 64, 48], "iscrowd": 1},
  {"image_id": 1, "category_id": 7, "bbox": [4, 4, 8, 8]}
 ]
}"#;

/// Numbers a mutation may substitute: the edges of every integer and float type in play.
const EXTREMES: &[&str] = &[
    "-1",
    "0",
    "4e9",
    "1e308",
    "-1e308",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "1e999",
    "NaN",
    "0.5",
    "true",
    "null",
    "\"7\"",
    "[]",
    "{}",
];

/// Runs one input; true when it parsed.
fn check(bytes: &[u8]) -> bool {
    let outcome = catch_unwind(AssertUnwindSafe(|| match parse_coco(bytes, NAME) {
        Ok(index) => {
            for mapping in [LabelMapping::Compact, LabelMapping::Raw] {
                match Labels::new(&index.categories, mapping, NAME) {
                    Ok(labels) => {
                        for ann in &index.annotations {
                            let class = labels.class_of(ann.category_id);
                            assert!(class >= 0 && (class as usize) < labels.num_classes());
                        }
                    }
                    Err(e) => assert!(e.to_string().contains(NAME), "{e}"),
                }
            }
            for i in 0..index.images.len() {
                let _ = index.annotations_of(i);
            }
            true
        }
        Err(e) => {
            assert!(
                e.to_string().contains(NAME),
                "error without the file name: {e}"
            );
            false
        }
    }));
    match outcome {
        Ok(parsed) => parsed,
        Err(_) => panic!(
            "panic on input: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(400)])
        ),
    }
}

/// One random edit of `text`: a byte changed, a span cut or doubled, or a number replaced.
fn mutate(text: &[u8], rng: &mut KeyedRng) -> Vec<u8> {
    let mut out = text.to_vec();
    let at = rng.below(out.len() as u64) as usize;
    match rng.below(4) {
        0 => out[at] = rng.below(256) as u8,
        1 => {
            let end = (at + 1 + rng.below(40) as usize).min(out.len());
            out.drain(at..end);
        }
        2 => {
            let end = (at + 1 + rng.below(40) as usize).min(out.len());
            let span = out[at..end].to_vec();
            out.splice(at..at, span);
        }
        _ => {
            let digits: Vec<usize> = (0..out.len())
                .filter(|&i| out[i].is_ascii_digit())
                .collect();
            let start = digits[rng.below(digits.len() as u64) as usize];
            let mut end = start;
            while end < out.len() && (out[end].is_ascii_digit() || out[end] == b'.') {
                end += 1;
            }
            let value = EXTREMES[rng.below(EXTREMES.len() as u64) as usize];
            out.splice(start..end, value.bytes());
        }
    }
    out
}

#[test]
fn the_valid_file_parses() {
    let index = parse_coco(VALID.as_bytes(), NAME).expect("valid");
    assert_eq!(index.images.len(), 2);
    assert_eq!(index.annotations.len(), 3);
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = KeyedRng::from_key(&[11, 1]);
    for _ in 0..2000 {
        let len = rng.below(300) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
        check(&bytes);
    }
}

#[test]
fn mutations_of_a_valid_file_never_panic() {
    let mut rng = KeyedRng::from_key(&[11, 2]);
    let mut parsed = 0;
    for _ in 0..4000 {
        let mut text = VALID.as_bytes().to_vec();
        for _ in 0..=rng.below(3) {
            text = mutate(&text, &mut rng);
        }
        parsed += usize::from(check(&text));
    }
    // Both sides of the parser are exercised: some edits keep the file valid, most do not.
    assert!(
        parsed > 100 && parsed < 3900,
        "{parsed} of 4000 mutated files parsed"
    );
}
