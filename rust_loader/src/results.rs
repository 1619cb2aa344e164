//! COCO results files (a JSON list of box detections) read straight into columns.
//!
//! serde_json streams the list: each entry is visited as a map whose four fields (`image_id`,
//! `category_id`, `bbox`, `score`) are kept as numbers or a box, the last of duplicate keys kept.
//! Every value is read by one visitor (other keys too, then dropped, so that a number is judged
//! alike wherever it stands): no value tree and no heap object per entry. Verdicts, in order:
//! - the whole text must be JSON: a syntax error anywhere wins over a bad entry ("not valid JSON
//!   (<serde_json's message> at line L, column C)"). JSON has no NaN or Infinity, which Python's
//!   `json.dump` writes unless told `allow_nan=False`: such a token gets its own message; a
//!   number beyond float64 (`1e400`) is out of range;
//! - then the top level must be a list, and the first bad entry is named, its checks in this order:
//!   an object; has every field; `image_id` an integer of the ground truth; `category_id` a number;
//!   `bbox` four numbers, width and height >= 0; `score` a number.
//!
//! Integers are those of 64 bits: serde_json reads a longer one, and `-0`, as a float, so such an
//! image id is "not an integer".
use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use thiserror::Error;

use crate::error::LoaderError;

/// `N` detections as columns.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Detections {
    /// `[N]`
    pub image_id: Vec<i64>,
    /// `[N]`; a float, as pycocotools takes `3.0` for category 3.
    pub category_id: Vec<f64>,
    /// `[N * 4]`, row-major `[x, y, width, height]`.
    pub bbox: Vec<f64>,
    /// `[N]`
    pub score: Vec<f64>,
}

/// Why a results text is refused (the message without the file name).
#[derive(Debug, Error, PartialEq)]
pub enum ResultsError {
    #[error("cannot read (not UTF-8 text: invalid byte at position {offset})")]
    NotUtf8 { offset: usize },
    #[error("not valid JSON ({message} at line {line}, column {column})")]
    Syntax {
        message: String,
        line: usize,
        column: usize,
    },
    #[error(
        "not valid JSON (NaN or Infinity at line {line}, column {column}: JSON has no such number; \
         Python's json.dump writes them unless given allow_nan=False)"
    )]
    NanOrInfinity { line: usize, column: usize },
    #[error("a COCO results file must be a JSON list of detections")]
    NotAList,
    #[error("detection {index}{problem}")]
    Entry { index: usize, problem: Problem },
}

/// What is wrong with one detection, in the order the checks run.
#[derive(Debug, PartialEq, Error)]
pub enum Problem {
    #[error(" is not an object")]
    NotAnObject,
    #[error(" has no '{0}'")]
    Missing(&'static str),
    #[error(": image_id must be an integer")]
    ImageIdNotAnInteger,
    /// The id as read (an i64 or a u64).
    #[error(": image_id {0} is not an image of the ground truth")]
    UnknownImage(i128),
    #[error(": category_id must be an integer")]
    CategoryIdNotANumber,
    #[error(": bbox must be [x, y, width, height] numbers")]
    BadBox,
    #[error(": bbox has a negative width or height")]
    NegativeSize,
    #[error(": score must be a finite number")]
    BadScore,
}

/// Reads and checks the results file `path`; detections must name an image of `known_images`.
pub fn read_detections(
    path: &Path,
    known_images: &HashSet<i64>,
) -> Result<Detections, LoaderError> {
    let name = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| LoaderError::Io {
        path: name.clone(),
        source,
    })?;
    parse_detections(&text, known_images)
        .map_err(|source| LoaderError::Results { path: name, source })
}

/// Parses and checks a results text (see the module doc); detections must name an image of
/// `known_images`.
pub fn parse_detections(
    text: &[u8],
    known_images: &HashSet<i64>,
) -> Result<Detections, ResultsError> {
    let text = std::str::from_utf8(text).map_err(|e| ResultsError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let seed = ValueSeed { known_images };
    let mut columns = Columns {
        seed,
        detections: Detections::default(),
        first_problem: None,
    };
    let is_list = text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('[');
    let mut json = serde_json::Deserializer::from_str(text);
    let parsed = if is_list {
        json.deserialize_seq(&mut columns)
    } else {
        seed.deserialize(&mut json).map(drop)
    };
    parsed
        .and_then(|()| json.end())
        .map_err(|e| syntax_error(text, &e))?;
    match (is_list, columns.first_problem) {
        (false, _) => Err(ResultsError::NotAList),
        (true, Some((index, problem))) => Err(ResultsError::Entry { index, problem }),
        (true, None) => Ok(columns.detections),
    }
}

/// serde_json's error as ours; NaN and Infinity, where serde stops at them, named as such.
fn syntax_error(text: &str, e: &serde_json::Error) -> ResultsError {
    let (line, column) = (e.line(), e.column());
    // serde's column is that of the offending byte: `N`, `I`, or the `I` after a `-`.
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let at = (line_start + column).saturating_sub(1);
    let word_at = |i: usize, word: &str| {
        text.as_bytes()
            .get(i..)
            .is_some_and(|b| b.starts_with(word.as_bytes()))
    };
    if word_at(at, "NaN") || word_at(at, "Infinity") || at > 0 && word_at(at - 1, "-Infinity") {
        return ResultsError::NanOrInfinity { line, column };
    }
    let message = e.to_string();
    let message = message.strip_suffix(&format!(" at line {line} column {column}"));
    ResultsError::Syntax {
        message: message.unwrap_or_default().to_string(),
        line,
        column,
    }
}

/// The top-level list, read into `detections` until the first bad entry.
struct Columns<'a> {
    seed: ValueSeed<'a>,
    detections: Detections,
    first_problem: Option<(usize, Problem)>,
}

impl<'de> Visitor<'de> for &mut Columns<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of detections")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let mut index = 0;
        while let Some(entry) = entries.next_element_seed(self.seed)? {
            let row = match entry {
                Value::Object(row) => row,
                _ => Err(Problem::NotAnObject),
            };
            match row {
                _ if self.first_problem.is_some() => {}
                Ok((image_id, category_id, bbox, score)) => {
                    let d = &mut self.detections;
                    d.image_id.push(image_id);
                    d.category_id.push(category_id);
                    d.bbox.extend_from_slice(&bbox);
                    d.score.push(score);
                }
                Err(problem) => self.first_problem = Some((index, problem)),
            }
            index += 1;
        }
        Ok(())
    }
}

/// A detection's `(image_id, category_id, bbox, score)`.
type Row = (i64, f64, [f64; 4], f64);

/// A JSON value, as far as a detection cares.
enum Value {
    /// An integer as serde_json reads one (an i64 or a u64).
    Int(i128),
    Float(f64),
    /// A list of exactly four numbers.
    Box([f64; 4]),
    /// An object, read as a detection: its row or the first check it fails.
    Object(Result<Row, Problem>),
    Other,
}

impl Value {
    fn number(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            _ => None,
        }
    }
}

/// Reads any value; an object is checked as a detection that must name one of `known_images`.
#[derive(Clone, Copy)]
struct ValueSeed<'a> {
    known_images: &'a HashSet<i64>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Other)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Other)
    }

    /// A box when the list holds exactly four numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Value, A::Error> {
        let (mut bbox, mut count, mut numbers) = ([0.0; 4], 0, true);
        while let Some(item) = items.next_element_seed(self)? {
            match item.number() {
                Some(v) if count < 4 => bbox[count] = v,
                Some(_) => {}
                None => numbers = false,
            }
            count += 1;
        }
        Ok(if numbers && count == 4 {
            Value::Box(bbox)
        } else {
            Value::Other
        })
    }

    /// Every value is read, other keys' too, so that a number is judged alike wherever it stands;
    /// the last of duplicate keys wins.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields: [Option<Value>; 4] = Default::default();
        while let Some(key) = map.next_key::<Key>()? {
            let value = map.next_value_seed(self)?;
            if let Some(field) = fields.get_mut(key as usize) {
                *field = Some(value);
            }
        }
        Ok(Value::Object(self.detection(fields)))
    }
}

impl ValueSeed<'_> {
    /// The row of an object with these fields (in `Key` order), or the first check it fails.
    fn detection(self, fields: [Option<Value>; 4]) -> Result<Row, Problem> {
        let [image_id, category_id, bbox, score] = fields;
        let image_id = image_id.ok_or(Problem::Missing("image_id"))?;
        let category_id = category_id.ok_or(Problem::Missing("category_id"))?;
        let bbox = bbox.ok_or(Problem::Missing("bbox"))?;
        let score = score.ok_or(Problem::Missing("score"))?;
        let Value::Int(id) = image_id else {
            return Err(Problem::ImageIdNotAnInteger);
        };
        let image_id = i64::try_from(id)
            .ok()
            .filter(|id| self.known_images.contains(id))
            .ok_or(Problem::UnknownImage(id))?;
        let category_id = category_id.number().ok_or(Problem::CategoryIdNotANumber)?;
        let Value::Box(bbox) = bbox else {
            return Err(Problem::BadBox);
        };
        if bbox[2] < 0.0 || bbox[3] < 0.0 {
            return Err(Problem::NegativeSize);
        }
        let score = score.number().ok_or(Problem::BadScore)?;
        Ok((image_id, category_id, bbox, score))
    }
}

/// An object's key, escapes resolved; the first four index a detection's fields.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Key {
    ImageId,
    CategoryId,
    Bbox,
    Score,
    #[serde(other)]
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Detections, ResultsError> {
        parse_detections(text.as_bytes(), &[1, 2, -3, i64::MAX].into_iter().collect())
    }

    fn message(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const GOOD: &str = r#"{"image_id": 1, "category_id": 2, "bbox": [1, 2.5, 3, 4], "score": 0.5}"#;

    /// `GOOD` with `field` replaced by `value` ("" removes it), as detection 1 of a list.
    fn second(field: &str, value: &str) -> String {
        let entry: Vec<String> = [
            ("image_id", "1"),
            ("category_id", "2"),
            ("bbox", "[1, 2.5, 3, 4]"),
            ("score", "0.5"),
        ]
        .iter()
        .map(|&(key, default)| (key, if key == field { value } else { default }))
        .filter(|(_, v)| !v.is_empty())
        .map(|(key, v)| format!("\"{key}\": {v}"))
        .collect();
        format!("[{GOOD}, {{{}}}, {GOOD}]", entry.join(", "))
    }

    #[test]
    fn reads_columns_and_ignores_other_keys() {
        let text = r#" [
            {"image_id": 1, "category_id": 3.0, "bbox": [0, 1e1, 2.25, -0.0], "score": 1,
             "segmentation": {"counts": "x\"y\\u00e9", "size": [2, [3, {}]]}, "id": -5},
            {"score": 0.125, "bbox": [1, 2, 3, 4], "image_id": -3, "category_id": 7, "score": 0.25}
        ] "#;
        let d = parse(text).unwrap();
        assert_eq!(d.image_id, vec![1, -3]);
        assert_eq!(d.category_id, vec![3.0, 7.0]);
        assert_eq!(d.bbox, vec![0.0, 10.0, 2.25, -0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(d.score, vec![1.0, 0.25]); // the last of duplicate keys
        assert_eq!(parse(" [ ] ").unwrap(), Detections::default());
        // Keys are compared unescaped.
        let text = r#"[{"\u0069mage_id": 2, "category_id": 1, "\bbox": [0, 0, 1, 1], "score": 1}]"#;
        assert_eq!(message(text), "detection 0 has no 'bbox'");
    }

    #[test]
    fn numbers_as_serde_json_reads_them() {
        assert_eq!(
            parse(&second("image_id", "9223372036854775807"))
                .unwrap()
                .image_id[1],
            i64::MAX
        );
        let wide = format!("[0, 0, 1{}, 1]", "0".repeat(300));
        assert_eq!(parse(&second("bbox", &wide)).unwrap().bbox[6], 1e300);
        let category = format!("1{}", "0".repeat(30));
        assert_eq!(
            parse(&second("category_id", &category))
                .unwrap()
                .category_id[1],
            1e30
        );
        // Correctly rounded (serde_json's float_roundtrip), as Python reads it.
        let score = parse(&second("score", "0.30000000000000004441"))
            .unwrap()
            .score[1];
        assert_eq!(score, 0.30000000000000004);
    }

    #[test]
    fn each_bad_entry_is_named_with_its_first_problem() {
        let cases = [
            (
                "image_id",
                "9223372036854775808",
                ": image_id 9223372036854775808 is not an image",
            ),
            (
                "image_id",
                "-9223372036854775808",
                ": image_id -9223372036854775808 is not an image",
            ),
            (
                "image_id",
                "7",
                ": image_id 7 is not an image of the ground truth",
            ),
            // serde_json reads -0 and integers beyond 64 bits as floats.
            ("image_id", "-0", ": image_id must be an integer"),
            (
                "image_id",
                "18446744073709551616",
                ": image_id must be an integer",
            ),
            ("image_id", "1.0", ": image_id must be an integer"),
            ("image_id", "1e2", ": image_id must be an integer"),
            ("image_id", "true", ": image_id must be an integer"),
            ("image_id", "\"1\"", ": image_id must be an integer"),
            ("image_id", GOOD, ": image_id must be an integer"),
            ("image_id", "", " has no 'image_id'"),
            ("score", "", " has no 'score'"),
            ("category_id", "true", ": category_id must be an integer"),
            ("category_id", "[2]", ": category_id must be an integer"),
            (
                "bbox",
                "[1, 2, 3]",
                ": bbox must be [x, y, width, height] numbers",
            ),
            ("bbox", "[1, 2, 3, 4, 5]", ": bbox must be"),
            ("bbox", "[]", ": bbox must be"),
            ("bbox", "[1, 2, \"3\", 4]", ": bbox must be"),
            ("bbox", "[1, 2, 3, [4]]", ": bbox must be"),
            ("bbox", "[1, 2, 3, true]", ": bbox must be"),
            ("bbox", "{\"x\": 1}", ": bbox must be"),
            (
                "bbox",
                "[1, 2, 3, -0.5]",
                ": bbox has a negative width or height",
            ),
            ("score", "null", ": score must be a finite number"),
            ("score", "true", ": score must be a finite number"),
            ("score", "{}", ": score must be a finite number"),
        ];
        for (field, value, expected) in cases {
            let got = message(&second(field, value));
            assert!(
                got.starts_with(&format!("detection 1{expected}")),
                "{field} {value}: {got}"
            );
        }
        assert_eq!(message("[1, 2]"), "detection 0 is not an object");
        assert_eq!(
            message(&format!("[{GOOD}, [{GOOD}]]")),
            "detection 1 is not an object"
        );
        assert_eq!(message(r#"[{"bbox": 1}]"#), "detection 0 has no 'image_id'");
        // The checks' order: an unknown image before a bad category; a missing key before all.
        let text = r#"[{"image_id": 9, "category_id": null, "bbox": 1, "score": 1},
                       {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]"#;
        assert_eq!(
            message(text),
            "detection 0: image_id 9 is not an image of the ground truth"
        );
        let text = r#"[{"image_id": null, "category_id": 1, "bbox": [0, 0, -1, 1]}]"#;
        assert_eq!(message(text), "detection 0 has no 'score'");
    }

    #[test]
    fn syntax_errors_win_over_bad_entries_with_serdes_position() {
        let cases = [
            ("", "EOF while parsing a value at line 1, column 0"),
            ("[1, 2", "EOF while parsing a list at line 1, column 5"),
            ("[1,\n 2,]", "trailing comma at line 2, column 4"),
            ("[{\"a\" 1}]", "expected `:` at line 1, column 7"),
            ("[{\"é\": 1, 2}]", "key must be a string at line 1, column 12"),
            ("[1] x", "trailing characters at line 1, column 5"),
            ("[\"ab", "EOF while parsing a string at line 1, column 4"),
            ("[\"a\\x\"]", "invalid escape at line 1, column 5"),
            ("[\"a\tb\"]", "control character (\\u0000-\\u001F) found while parsing a string at line 1, column 4"),
            ("[-]", "invalid number at line 1, column 3"),
            ("[01]", "invalid number at line 1, column 3"),
            ("[1e400]", "number out of range at line 1, column 6"),
            ("\u{feff}[]", "expected value at line 1, column 1"),
            ("{\"a\": ", "EOF while parsing a value at line 1, column 6"),
        ];
        for (text, expected) in cases {
            assert_eq!(
                message(text),
                format!("not valid JSON ({expected})"),
                "{text:?}"
            );
        }
        // After a bad entry, and in a key the reader skips.
        assert!(message(&format!("[1, {GOOD}, ]")).contains("trailing comma"));
        assert!(
            message(&second("x", "").replace("\"score\"", "\"s\\q\"")).contains("invalid escape")
        );
        let deep = format!("[{}{}]", "[".repeat(200_000), "]".repeat(200_000));
        assert!(message(&deep).starts_with("not valid JSON (recursion limit exceeded"));
        let valid = format!("[{GOOD}, {GOOD}]");
        for cut in 0..valid.len() {
            assert!(message(&valid[..cut]).starts_with("not valid JSON"));
        }
        let not_utf8 = parse_detections(b"[\"\xff\"]", &HashSet::new()).unwrap_err();
        assert_eq!(not_utf8, ResultsError::NotUtf8 { offset: 2 });
    }

    #[test]
    fn nan_and_infinity_are_named() {
        for (text, line) in [
            (second("score", "NaN"), 1),
            (second("bbox", "[1, 2, Infinity, 4]"), 1),
            (second("score", "-Infinity"), 1),
            ("[1,\n {\"area\": NaN}]".to_string(), 2),
            ("NaN".to_string(), 1),
            ("[1,\nNaN]".to_string(), 2),
            ("[1,\n-Infinity]".to_string(), 2),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(
                matches!(err, ResultsError::NanOrInfinity { line: l, .. } if l == line),
                "{text}: {err}"
            );
        }
        assert!(message("[NaN]").contains("NaN or Infinity at line 1, column 2: JSON has no such"));
        assert!(message("[-Infinity]").contains("NaN or Infinity at line 1, column 3: "));
        assert!(message("[Nope]").starts_with("not valid JSON (expected value"));
    }

    #[test]
    fn the_top_level_must_be_a_list() {
        for text in [
            "{}",
            "{\"a\": [1, {\"b\": null}]}",
            "3",
            "\"x\"",
            " \n\tnull ",
        ] {
            assert_eq!(
                message(text),
                "a COCO results file must be a JSON list of detections"
            );
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("ddetr-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, known) = (dir.join("det.json"), [1].into_iter().collect());
        std::fs::write(&path, second("score", "\"x\"")).unwrap();
        let err = read_detections(&path, &known).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: detection 1: score must be a finite number",
                path.display()
            )
        );
        std::fs::write(&path, format!("[{GOOD}]")).unwrap();
        assert_eq!(read_detections(&path, &known).unwrap().score, vec![0.5]);
        let missing = read_detections(&dir.join("none.json"), &known).unwrap_err();
        assert!(missing.to_string().contains("none.json: cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
