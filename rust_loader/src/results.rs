//! COCO results files (a JSON list of box detections) read straight into columns.
//!
//! One pass over the bytes, no value tree and no heap object per entry: each detection's four
//! fields (`image_id`, `category_id`, `bbox`, `score`; any other key is skipped) are pushed onto
//! four columns. The verdicts and messages are those of Python's `json.load` followed by ddetr's
//! entry-by-entry check (`coco_eval.py` before this reader), so a file is refused with the same
//! one-line error it always was:
//! - the whole text is read first: a syntax error anywhere wins over a bad entry ("not valid JSON
//!   (<what> at line L, column C)", Python's wording and position);
//! - then the top level must be a list, and the first bad entry is named, its checks in this order:
//!   an object; has every field; `image_id` an integer of the ground truth; `category_id` a number;
//!   `bbox` four finite numbers, width and height >= 0; `score` a finite number.
//!
//! Like Python's parser it takes `NaN`, `Infinity` and `-Infinity` (which then fail the checks of a
//! finite number), keeps the last of duplicate keys, and reads integers of any size (one beyond
//! int64 cannot be an image id; as a coordinate it is a number while it fits a float64).
use std::collections::HashSet;
use std::fmt;
use std::path::Path;

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

impl Detections {
    pub fn len(&self) -> usize {
        self.image_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.image_id.is_empty()
    }
}

/// Why a results text is refused (the message without the file name).
#[derive(Debug, Error, PartialEq)]
pub enum ResultsError {
    #[error("cannot read (not UTF-8 text: invalid byte at position {offset})")]
    NotUtf8 { offset: usize },
    #[error("not valid JSON ({message} at line {line}, column {column})")]
    Syntax {
        message: &'static str,
        line: usize,
        column: usize,
    },
    #[error("a COCO results file must be a JSON list of detections")]
    NotAList,
    #[error("detection {index}{problem}")]
    Entry { index: usize, problem: Problem },
}

/// What is wrong with one detection, in the order the checks run.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    NotAnObject,
    Missing(&'static str),
    ImageIdNotAnInteger,
    /// The id as written in the file (it may be beyond int64).
    UnknownImage(String),
    CategoryIdNotANumber,
    BadBox,
    NegativeSize,
    BadScore,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotAnObject => write!(f, " is not an object"),
            Problem::Missing(key) => write!(f, " has no '{key}'"),
            Problem::ImageIdNotAnInteger => write!(f, ": image_id must be an integer"),
            Problem::UnknownImage(id) => {
                write!(f, ": image_id {id} is not an image of the ground truth")
            }
            Problem::CategoryIdNotANumber => write!(f, ": category_id must be an integer"),
            Problem::BadBox => write!(f, ": bbox must be [x, y, width, height] numbers"),
            Problem::NegativeSize => write!(f, ": bbox has a negative width or height"),
            Problem::BadScore => write!(f, ": score must be a finite number"),
        }
    }
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
    if let Err(e) = std::str::from_utf8(text) {
        return Err(ResultsError::NotUtf8 {
            offset: e.valid_up_to(),
        });
    }
    if text.starts_with("\u{feff}".as_bytes()) {
        return Err(ResultsError::Syntax {
            message: "Unexpected UTF-8 BOM (decode using utf-8-sig)",
            line: 1,
            column: 1,
        });
    }
    let mut reader = Reader {
        parser: Parser { text, pos: 0 },
        known_images,
        columns: Detections::default(),
        first_problem: None,
    };
    let is_list = reader
        .document()
        .map_err(|e| reader.parser.syntax_error(e))?;
    match (is_list, reader.first_problem) {
        (false, _) => Err(ResultsError::NotAList),
        (true, Some((index, problem))) => Err(ResultsError::Entry { index, problem }),
        (true, None) => Ok(reader.columns),
    }
}

/// A syntax error: Python's message, at byte offset `.1`.
struct Syntax(&'static str, usize);

const EXPECTING_VALUE: &str = "Expecting value";
const EXPECTING_COMMA: &str = "Expecting ',' delimiter";
const EXPECTING_COLON: &str = "Expecting ':' delimiter";
const EXPECTING_KEY: &str = "Expecting property name enclosed in double quotes";

/// A JSON number as Python reads it: an int (of any size) or a float.
#[derive(Clone, Copy)]
enum Number {
    Int(i64),
    /// An integer beyond int64, as the byte range of its digits.
    BigInt(usize, usize),
    Float(f64),
}

/// The fields of one detection read so far (`None`: absent; the last of duplicate keys wins).
#[derive(Default)]
struct Fields {
    image_id: Option<Option<Number>>,
    category_id: Option<Option<Number>>,
    bbox: Option<Option<[f64; 4]>>,
    score: Option<Option<Number>>,
}

enum Key {
    ImageId,
    CategoryId,
    Bbox,
    Score,
    Other,
}

struct Reader<'a> {
    parser: Parser<'a>,
    known_images: &'a HashSet<i64>,
    columns: Detections,
    first_problem: Option<(usize, Problem)>,
}

impl Reader<'_> {
    /// The whole text; true when its value is a list.
    fn document(&mut self) -> Result<bool, Syntax> {
        let p = &mut self.parser;
        p.skip_whitespace();
        let is_list = p.peek() == Some(b'[');
        if is_list {
            self.list()?;
        } else {
            p.skip_value()?;
        }
        let p = &mut self.parser;
        p.skip_whitespace();
        if p.pos < p.text.len() {
            return Err(Syntax("Extra data", p.pos));
        }
        Ok(is_list)
    }

    fn list(&mut self) -> Result<(), Syntax> {
        self.parser.pos += 1; // '['
        self.parser.skip_whitespace();
        if self.parser.eat(b']') {
            return Ok(());
        }
        for index in 0.. {
            self.detection(index)?;
            let p = &mut self.parser;
            p.skip_whitespace();
            if p.eat(b']') {
                break;
            }
            p.expect(b',', EXPECTING_COMMA)?;
        }
        Ok(())
    }

    /// One list entry: checked, and pushed onto the columns while no entry has been refused.
    fn detection(&mut self, index: usize) -> Result<(), Syntax> {
        self.parser.skip_whitespace();
        let verdict = if self.parser.peek() == Some(b'{') {
            let fields = self.fields()?;
            self.verdict(fields)
        } else {
            self.parser.skip_value()?;
            Err(Problem::NotAnObject)
        };
        if self.first_problem.is_none() {
            match verdict {
                Ok((image_id, category_id, bbox, score)) => {
                    let c = &mut self.columns;
                    c.image_id.push(image_id);
                    c.category_id.push(category_id);
                    c.bbox.extend_from_slice(&bbox);
                    c.score.push(score);
                }
                Err(problem) => self.first_problem = Some((index, problem)),
            }
        }
        Ok(())
    }

    /// The four fields of the object at the cursor.
    fn fields(&mut self) -> Result<Fields, Syntax> {
        let p = &mut self.parser;
        let mut fields = Fields::default();
        p.pos += 1; // '{'
        p.skip_whitespace();
        if p.eat(b'}') {
            return Ok(fields);
        }
        loop {
            let key = p.key()?;
            p.skip_whitespace();
            match key {
                Key::ImageId => fields.image_id = Some(p.number()?),
                Key::CategoryId => fields.category_id = Some(p.number()?),
                Key::Bbox => fields.bbox = Some(p.bbox()?),
                Key::Score => fields.score = Some(p.number()?),
                Key::Other => p.skip_value()?,
            }
            p.skip_whitespace();
            if p.eat(b'}') {
                return Ok(fields);
            }
            p.expect(b',', EXPECTING_COMMA)?;
            p.skip_whitespace();
        }
    }

    /// `(image_id, category_id, bbox, score)` of a detection, or the first check it fails.
    fn verdict(&self, fields: Fields) -> Result<(i64, f64, [f64; 4], f64), Problem> {
        let image_id = fields.image_id.ok_or(Problem::Missing("image_id"))?;
        let category_id = fields.category_id.ok_or(Problem::Missing("category_id"))?;
        let bbox = fields.bbox.ok_or(Problem::Missing("bbox"))?;
        let score = fields.score.ok_or(Problem::Missing("score"))?;
        let image_id = match image_id {
            Some(Number::Int(id)) if self.known_images.contains(&id) => id,
            Some(Number::Int(id)) => return Err(Problem::UnknownImage(id.to_string())),
            Some(Number::BigInt(start, end)) => {
                return Err(Problem::UnknownImage(
                    self.parser.ascii(start, end).to_string(),
                ))
            }
            Some(Number::Float(_)) | None => return Err(Problem::ImageIdNotAnInteger),
        };
        let category_id = category_id.ok_or(Problem::CategoryIdNotANumber)?;
        let bbox = bbox.ok_or(Problem::BadBox)?;
        if bbox[2] < 0.0 || bbox[3] < 0.0 {
            return Err(Problem::NegativeSize);
        }
        let score = score
            .map(|s| self.parser.to_f64(s))
            .filter(|s| s.is_finite())
            .ok_or(Problem::BadScore)?;
        Ok((image_id, self.parser.to_f64(category_id), bbox, score))
    }
}

/// A cursor over JSON text, with Python's `json` grammar: strict strings, numbers by the regex
/// `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`, and the constants NaN, Infinity, -Infinity.
struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.pos += usize::from(found);
        found
    }

    fn expect(&mut self, byte: u8, message: &'static str) -> Result<(), Syntax> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(Syntax(message, self.pos))
        }
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// `text[start..end]`, which the caller knows to be ASCII (a number token).
    fn ascii(&self, start: usize, end: usize) -> &str {
        std::str::from_utf8(&self.text[start..end]).unwrap_or_default()
    }

    fn to_f64(&self, number: Number) -> f64 {
        match number {
            Number::Int(i) => i as f64,
            // Correctly rounded, infinite beyond float64 as Python's int-to-float overflows.
            Number::BigInt(start, end) => self.ascii(start, end).parse().unwrap_or(f64::INFINITY),
            Number::Float(f) => f,
        }
    }

    /// Python's message and line/column (1-based, in characters) for a syntax error.
    fn syntax_error(&self, Syntax(message, pos): Syntax) -> ResultsError {
        let before = &self.text[..pos.min(self.text.len())];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let chars = before[line_start..]
            .iter()
            .filter(|&&b| b & 0xC0 != 0x80)
            .count();
        ResultsError::Syntax {
            message,
            line: 1 + before.iter().filter(|&&b| b == b'\n').count(),
            column: chars + 1,
        }
    }

    /// `"key"` then `:`, at the cursor (whitespace skipped before).
    fn key(&mut self) -> Result<Key, Syntax> {
        if self.peek() != Some(b'"') {
            return Err(Syntax(EXPECTING_KEY, self.pos));
        }
        let (raw, escaped) = self.string()?;
        let unescaped;
        let name = if escaped {
            unescaped = unescape_ascii(raw);
            unescaped.as_deref().unwrap_or_default()
        } else {
            raw
        };
        let key = match name {
            b"image_id" => Key::ImageId,
            b"category_id" => Key::CategoryId,
            b"bbox" => Key::Bbox,
            b"score" => Key::Score,
            _ => Key::Other,
        };
        self.skip_whitespace();
        self.expect(b':', EXPECTING_COLON)?;
        Ok(key)
    }

    /// Skips the string at the cursor; returns its raw contents (between the quotes) and whether
    /// they hold an escape.
    fn string(&mut self) -> Result<(&'a [u8], bool), Syntax> {
        let start = self.pos;
        self.pos += 1;
        let mut escaped = false;
        loop {
            match self.peek() {
                None => return Err(Syntax("Unterminated string starting at", start)),
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    self.escape(start)?;
                }
                Some(c) if c < 0x20 => {
                    return Err(Syntax("Invalid control character at", self.pos))
                }
                Some(_) => self.pos += 1,
            }
        }
        self.pos += 1;
        Ok((&self.text[start + 1..self.pos - 1], escaped))
    }

    /// Skips the escape at the cursor, in the string that starts at `start`.
    fn escape(&mut self, start: usize) -> Result<(), Syntax> {
        let at = self.pos;
        match self.text.get(at + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 2,
            Some(b'u') => {
                // Python wants a character after the four digits (a string ends there).
                let hex = self
                    .text
                    .get(at + 2..at + 6)
                    .filter(|_| at + 6 < self.text.len());
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return Err(Syntax("Invalid \\uXXXX escape", at + 1));
                }
                self.pos += 6;
            }
            None => return Err(Syntax("Unterminated string starting at", start)),
            Some(_) => return Err(Syntax("Invalid \\escape", at)),
        }
        Ok(())
    }

    /// The number at the cursor, or `None` after skipping any other value.
    fn number(&mut self) -> Result<Option<Number>, Syntax> {
        let number = self.number_if_any()?;
        if number.is_none() {
            self.skip_value()?;
        }
        Ok(number)
    }

    /// The number at the cursor, or `None` (nothing consumed) when no number starts there.
    fn number_if_any(&mut self) -> Result<Option<Number>, Syntax> {
        let rest = &self.text[self.pos..];
        let constant = [
            (&b"NaN"[..], f64::NAN),
            (b"Infinity", f64::INFINITY),
            (b"-Infinity", f64::NEG_INFINITY),
        ]
        .into_iter()
        .find(|(word, _)| rest.starts_with(word));
        if let Some((word, value)) = constant {
            self.pos += word.len();
            return Ok(Some(Number::Float(value)));
        }
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number_token().map(Some),
            _ => Ok(None),
        }
    }

    /// A number token (Python's regex); "Expecting value" for a '-' without digits.
    fn number_token(&mut self) -> Result<Number, Syntax> {
        let start = self.pos;
        let negative = self.eat(b'-');
        let digits = self.pos;
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return Err(Syntax(EXPECTING_VALUE, start)),
        }
        let int_end = self.pos;
        let mut is_float = false;
        if self.peek() == Some(b'.') && self.digit_at(self.pos + 1) {
            self.pos += 1;
            self.skip_digits();
            is_float = true;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(self.text.get(self.pos + 1), Some(b'+' | b'-')));
            if self.digit_at(self.pos + 1 + sign) {
                self.pos += 1 + sign;
                self.skip_digits();
                is_float = true;
            }
        }
        if is_float {
            let value = self.ascii(start, self.pos).parse().unwrap_or(f64::NAN);
            return Ok(Number::Float(value));
        }
        let magnitude = self.text[digits..int_end].iter().try_fold(0i64, |acc, &d| {
            let d = i64::from(d - b'0');
            // Accumulate negatively so that i64::MIN fits.
            acc.checked_mul(10)?.checked_sub(d)
        });
        let value = magnitude.and_then(|m| if negative { Some(m) } else { m.checked_neg() });
        Ok(value.map_or(Number::BigInt(start, int_end), Number::Int))
    }

    fn digit_at(&self, pos: usize) -> bool {
        self.text.get(pos).is_some_and(u8::is_ascii_digit)
    }

    fn skip_digits(&mut self) {
        while self.digit_at(self.pos) {
            self.pos += 1;
        }
    }

    /// A box: `Some` for a list of exactly four finite numbers, `None` for any other value.
    fn bbox(&mut self) -> Result<Option<[f64; 4]>, Syntax> {
        if !self.eat(b'[') {
            return self.skip_value().map(|()| None);
        }
        let mut bbox = [0.0; 4];
        let mut count = 0;
        let mut numbers = true;
        self.skip_whitespace();
        if self.eat(b']') {
            return Ok(None);
        }
        loop {
            self.skip_whitespace();
            let value = self
                .number()?
                .map(|n| self.to_f64(n))
                .filter(|v| v.is_finite());
            match value {
                Some(v) if count < 4 => bbox[count] = v,
                Some(_) => {}
                None => numbers = false,
            }
            count += 1;
            self.skip_whitespace();
            if self.eat(b']') {
                return Ok((numbers && count == 4).then_some(bbox));
            }
            self.expect(b',', EXPECTING_COMMA)?;
        }
    }

    /// Skips the value at the cursor (whitespace skipped before), checking its syntax. Iterative,
    /// so that deep nesting cannot overflow the stack.
    fn skip_value(&mut self) -> Result<(), Syntax> {
        let mut open: Vec<u8> = Vec::new(); // b']' or b'}' per container entered
        loop {
            // A value is expected here.
            self.skip_whitespace();
            match self.peek() {
                Some(b'[') => {
                    self.pos += 1;
                    self.skip_whitespace();
                    if !self.eat(b']') {
                        open.push(b']');
                        continue;
                    }
                }
                Some(b'{') => {
                    self.pos += 1;
                    self.skip_whitespace();
                    if !self.eat(b'}') {
                        self.key()?;
                        open.push(b'}');
                        continue;
                    }
                }
                _ => self.scalar()?,
            }
            // After a value: close containers until one continues with ','.
            loop {
                let Some(&close) = open.last() else {
                    return Ok(());
                };
                self.skip_whitespace();
                if self.eat(close) {
                    open.pop();
                    continue;
                }
                self.expect(b',', EXPECTING_COMMA)?;
                if close == b'}' {
                    self.skip_whitespace();
                    self.key()?;
                }
                break;
            }
        }
    }

    /// A string, number or constant at the cursor.
    fn scalar(&mut self) -> Result<(), Syntax> {
        let rest = &self.text[self.pos..];
        for word in [&b"true"[..], b"false", b"null"] {
            if rest.starts_with(word) {
                self.pos += word.len();
                return Ok(());
            }
        }
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            _ => match self.number_if_any()? {
                Some(_) => Ok(()),
                None => Err(Syntax(EXPECTING_VALUE, self.pos)),
            },
        }
    }
}

/// A string's raw contents with its escapes resolved, when that is ASCII (the four keys are).
fn unescape_ascii(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let (byte, width) = match (raw[i], raw.get(i + 1)) {
            (b'\\', Some(b'u')) => {
                let hex = std::str::from_utf8(&raw[i + 2..i + 6]).ok()?;
                (u8::try_from(u32::from_str_radix(hex, 16).ok()?).ok()?, 6)
            }
            (b'\\', Some(&c)) => {
                let byte = match c {
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    other => other, // " \ /
                };
                (byte, 2)
            }
            (c, _) => (c, 1),
        };
        if !byte.is_ascii() {
            return None;
        }
        out.push(byte);
        i += width;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> HashSet<i64> {
        [1, 2, -3, i64::MAX].into_iter().collect()
    }

    fn parse(text: &str) -> Result<Detections, ResultsError> {
        parse_detections(text.as_bytes(), &known())
    }

    fn message(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const GOOD: &str = r#"{"image_id": 1, "category_id": 2, "bbox": [1, 2.5, 3, 4], "score": 0.5}"#;

    /// `GOOD` with `field` replaced by `value` ("" removes it), as detection 1 of a list.
    fn second(field: &str, value: &str) -> String {
        let mut entry: Vec<String> = vec![];
        for (key, default) in [
            ("image_id", "1"),
            ("category_id", "2"),
            ("bbox", "[1, 2.5, 3, 4]"),
            ("score", "0.5"),
        ] {
            let v = if key == field { value } else { default };
            if !v.is_empty() {
                entry.push(format!("\"{key}\": {v}"));
            }
        }
        format!("[{GOOD}, {{{}}}, {GOOD}]", entry.join(", "))
    }

    #[test]
    fn reads_columns_and_ignores_other_keys() {
        let text = r#" [
            {"image_id": 1, "category_id": 3.0, "bbox": [0, 1e1, 2.25, -0.0], "score": 1,
             "segmentation": {"counts": "x\"y\\u00e9", "size": [2, [3, {}]]}, "id": -5, "area": NaN},
            {"score": 0.125, "bbox": [1, 2, 3, 4], "image_id": -3, "category_id": 7, "score": 0.25}
        ] "#;
        let d = parse(text).unwrap();
        assert_eq!(d.image_id, vec![1, -3]);
        assert_eq!(d.category_id, vec![3.0, 7.0]);
        assert_eq!(d.bbox, vec![0.0, 10.0, 2.25, -0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(d.score, vec![1.0, 0.25]); // the last of duplicate keys
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn escaped_keys_are_read_as_python_reads_them() {
        let text = r#"[{"\u0069mage_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1,
                        "\bbox": "not the box", "\/": 0}]"#;
        assert_eq!(parse(text).unwrap().image_id, vec![2]);
        let text = r#"[{"image_id": 2, "category_id": 1, "\bbox": [0, 0, 1, 1], "score": 1}]"#;
        assert_eq!(message(text), "detection 0 has no 'bbox'");
    }

    #[test]
    fn empty_list() {
        assert!(parse(" [ ] ").unwrap().is_empty());
    }

    #[test]
    fn huge_integers() {
        assert_eq!(
            parse(&second("image_id", "9223372036854775807"))
                .unwrap()
                .image_id[1],
            i64::MAX
        );
        let beyond = "9223372036854775808";
        assert_eq!(
            message(&second("image_id", beyond)),
            format!("detection 1: image_id {beyond} is not an image of the ground truth")
        );
        assert_eq!(
            message(&second("image_id", "-9223372036854775809")),
            "detection 1: image_id -9223372036854775809 is not an image of the ground truth"
        );
        assert_eq!(
            message(&second("image_id", "7")),
            "detection 1: image_id 7 is not an image of the ground truth"
        );
        // A coordinate is a number while it fits a float64.
        let wide = format!("[0, 0, 1{}, 1]", "0".repeat(300));
        assert_eq!(parse(&second("bbox", &wide)).unwrap().bbox[6], 1e300);
        let huge = format!("[0, 0, 1{}, 1]", "0".repeat(400));
        assert!(
            message(&second("bbox", &huge)).ends_with("bbox must be [x, y, width, height] numbers")
        );
        let category = format!("1{}", "0".repeat(30));
        assert_eq!(
            parse(&second("category_id", &category))
                .unwrap()
                .category_id[1],
            1e30
        );
    }

    #[test]
    fn each_bad_entry_is_named_with_its_first_problem() {
        let cases = [
            ("[1, 2]".to_string(), "detection 0 is not an object"),
            (format!("[{GOOD}, null]"), "detection 1 is not an object"),
            (second("score", ""), "detection 1 has no 'score'"),
            (second("image_id", ""), "detection 1 has no 'image_id'"),
            (
                r#"[{"bbox": 1}]"#.to_string(),
                "detection 0 has no 'image_id'",
            ),
            (
                second("image_id", "1.0"),
                "detection 1: image_id must be an integer",
            ),
            (
                second("image_id", "1e2"),
                "detection 1: image_id must be an integer",
            ),
            (
                second("image_id", "true"),
                "detection 1: image_id must be an integer",
            ),
            (
                second("image_id", "\"1\""),
                "detection 1: image_id must be an integer",
            ),
            (
                second("category_id", "true"),
                "detection 1: category_id must be an integer",
            ),
            (
                second("category_id", "[2]"),
                "detection 1: category_id must be an integer",
            ),
            (
                second("bbox", "[1, 2, 3]"),
                "detection 1: bbox must be [x, y, width, height] numbers",
            ),
            (
                second("bbox", "[1, 2, 3, 4, 5]"),
                "detection 1: bbox must be",
            ),
            (second("bbox", "[]"), "detection 1: bbox must be"),
            (
                second("bbox", "[1, 2, \"3\", 4]"),
                "detection 1: bbox must be",
            ),
            (
                second("bbox", "[1, 2, 3, NaN]"),
                "detection 1: bbox must be",
            ),
            (
                second("bbox", "[1, 2, 3, true]"),
                "detection 1: bbox must be",
            ),
            (
                second("bbox", "[1, 2, 3, 1e400]"),
                "detection 1: bbox must be",
            ),
            (second("bbox", "{\"x\": 1}"), "detection 1: bbox must be"),
            (
                second("bbox", "[1, 2, 3, -0.5]"),
                "detection 1: bbox has a negative width or height",
            ),
            (
                second("score", "null"),
                "detection 1: score must be a finite number",
            ),
            (
                second("score", "Infinity"),
                "detection 1: score must be a finite number",
            ),
            (
                second("score", "-Infinity"),
                "detection 1: score must be a finite number",
            ),
            (
                second("score", "NaN"),
                "detection 1: score must be a finite number",
            ),
            (
                second("score", "true"),
                "detection 1: score must be a finite number",
            ),
            (
                second("score", "1e999"),
                "detection 1: score must be a finite number",
            ),
        ];
        for (text, expected) in cases {
            let got = message(&text);
            assert!(got.starts_with(expected), "{text}: {got}");
        }
    }

    #[test]
    fn checks_run_in_order_and_the_first_bad_entry_wins() {
        // Unknown image before a bad category; a missing key before everything.
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
    fn syntax_errors_win_over_bad_entries_with_pythons_position() {
        let cases = [
            ("", "not valid JSON (Expecting value at line 1, column 1)"),
            ("[1, 2", "not valid JSON (Expecting ',' delimiter at line 1, column 6)"),
            ("[1,\n 2,]", "not valid JSON (Expecting value at line 2, column 4)"),
            (
                "[{\"a\" 1}]",
                "not valid JSON (Expecting ':' delimiter at line 1, column 7)",
            ),
            (
                "[{\"é\": 1, 2}]",
                "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 11)",
            ),
            ("[1] x", "not valid JSON (Extra data at line 1, column 5)"),
            // Python's own wording, which ends in "at", as `annotations.read_json` shows it.
            ("[\"ab", "not valid JSON (Unterminated string starting at at line 1, column 2)"),
            ("[\"a\\x\"]", "not valid JSON (Invalid \\escape at line 1, column 4)"),
            ("[\"a\tb\"]", "not valid JSON (Invalid control character at at line 1, column 4)"),
            ("[-]", "not valid JSON (Expecting value at line 1, column 2)"),
            ("[01]", "not valid JSON (Expecting ',' delimiter at line 1, column 3)"),
            ("[nul]", "not valid JSON (Expecting value at line 1, column 2)"),
        ];
        for (text, expected) in cases {
            assert_eq!(message(text), expected, "{text:?}");
        }
        assert!(message(&format!("[1, {GOOD}, ]")).contains("Expecting value"));
    }

    #[test]
    fn the_top_level_must_be_a_list() {
        for text in ["{}", "{\"a\": [1, {\"b\": null}]}", "3", "\"x\"", "NaN"] {
            assert_eq!(
                message(text),
                "a COCO results file must be a JSON list of detections"
            );
        }
        assert!(message("{\"a\": ").starts_with("not valid JSON"));
    }

    #[test]
    fn deep_nesting_and_hostile_bytes_do_not_crash() {
        let deep = format!("[{}{}]", "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(message(&deep), "detection 0 is not an object");
        assert_eq!(
            parse_detections(b"[\xff]", &known()).unwrap_err(),
            ResultsError::NotUtf8 { offset: 1 }
        );
        let valid = format!("[{GOOD}, {GOOD}]");
        for cut in 0..valid.len() {
            assert!(parse(&valid[..cut]).is_err());
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("ddetr-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("det.json");
        std::fs::write(&path, second("score", "NaN")).unwrap();
        let err = read_detections(&path, &known()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: detection 1: score must be a finite number",
                path.display()
            )
        );
        std::fs::write(&path, format!("[{GOOD}]")).unwrap();
        assert_eq!(read_detections(&path, &known()).unwrap().score, vec![0.5]);
        let missing = read_detections(&dir.join("none.json"), &known()).unwrap_err();
        assert!(missing.to_string().contains("none.json: cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
