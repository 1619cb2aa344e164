"""The Rust reader of COCO results files (rust_loader/src/results.rs) against what ddetr did before
it: Python's `json.loads`, made strict as serde_json is (no NaN or Infinity, numbers within
float64, `-0` and integers beyond 64 bits read as floats), and the entry-by-entry check of
`coco_eval.py`, kept here as the oracle. On hand-written and randomly mutated texts both must accept
the same detections, refuse the same bad entry with the same message, or both find the text not
valid JSON (the wording and position are serde_json's, not Python's)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from ddetr_cli._loader import DataError, parse_detections, read_detections

IMAGE_IDS = [1, 2, -3, 2**63 - 1]
SOURCE = "det.json"
KEYS = ("image_id", "category_id", "bbox", "score")


def _is_number(x) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float64
        return False


def _problem(det) -> str | None:
    """The former `coco_eval._check_detection`, returning its message instead of raising."""
    if not isinstance(det, dict):
        return " is not an object"
    for key in KEYS:
        if key not in det:
            return f" has no '{key}'"
    if not isinstance(det["image_id"], int) or isinstance(det["image_id"], bool):
        return ": image_id must be an integer"
    if det["image_id"] not in IMAGE_IDS:
        return f": image_id {det['image_id']} is not an image of the ground truth"
    if not isinstance(det["category_id"], (int, float)) or isinstance(det["category_id"], bool):
        return ": category_id must be an integer"
    bbox = det["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return ": bbox must be [x, y, width, height] numbers"
    if bbox[2] < 0 or bbox[3] < 0:
        return ": bbox has a negative width or height"
    if not _is_number(det["score"]):
        return ": score must be a finite number"
    return None


def _float(x) -> float:
    try:
        return float(x)
    except OverflowError:
        return math.inf


class NotStrictJson(ValueError):
    pass


def _strict_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotStrictJson("number out of range")
    return value


def _strict_int(text: str):
    value = int(text)
    return value if -(2**63) <= value < 2**64 and text != "-0" else _strict_float(text)


def _no_constant(text: str):
    raise NotStrictJson("NaN or Infinity")


def python_verdict(text: str):
    """(image_id, category_id, bbox, score) rows as ddetr read them before, or the error message."""
    try:
        data = json.loads(text, parse_float=_strict_float, parse_int=_strict_int, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        return f"{SOURCE}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    except NotStrictJson as e:
        return f"{SOURCE}: not valid JSON ({e}"
    if not isinstance(data, list):
        return f"{SOURCE}: a COCO results file must be a JSON list of detections"
    for i, det in enumerate(data):
        problem = _problem(det)
        if problem is not None:
            return f"{SOURCE}: detection {i}{problem}"
    return [
        (d["image_id"], _float(d["category_id"]), [float(v) for v in d["bbox"]], float(d["score"]))
        for d in data
    ]


def rust_verdict(text: str):
    try:
        image_id, category_id, bbox, score = parse_detections(text.encode(), SOURCE, IMAGE_IDS)
    except DataError as e:
        return str(e)
    return list(zip(image_id.tolist(), category_id.tolist(), bbox.tolist(), score.tolist()))


def assert_same_verdict(text: str) -> None:
    expected, got = python_verdict(text), rust_verdict(text)
    syntax = f"{SOURCE}: not valid JSON ("
    if isinstance(expected, str) and expected.startswith(syntax):
        assert isinstance(got, str) and got.startswith(syntax), (text, got)
        for kind in ("NaN or Infinity", "number out of range"):  # the first problem is the same
            assert kind not in expected or kind in got, (text, got)
        return
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected, text
        return
    assert len(got) == len(expected), text
    for g, e in zip(got, expected):  # NaN category ids compare equal here
        assert np.array_equal(
            np.hstack([g[0], g[1], g[2], g[3]]), np.hstack([e[0], e[1], e[2], e[3]]), equal_nan=True
        )


BASE = (
    '[{"image_id": 1, "category_id": 3, "bbox": [10.5, 2, 30, 4e1], "score": 0.875, "id": 7},\n'
    ' {"score": 1, "bbox": [0, 0, 0, 0], "category_id": 2.0, "image_id": -3,\n'
    '  "name": "d\\u00e9j\\u00e0 \\"vu\\""},\n'
    ' {"image_id": 2, "category_id": 90, "bbox": [1E2, 0.5, 1e-3, 7], "score": 1e-5,\n'
    '  "segmentation": [[1, 2, 3, 4]], "area": 1e-400, "é": {"x": [true, false, null]}}]'
)

HAND_WRITTEN = [
    BASE,
    "[]",
    " \n[ ] \n",
    "",
    "[",
    "]",
    "{}",
    '"text"',
    "null",
    "[1, 2]",
    "[[]]",
    "[{}]",
    "[{}, 1]",
    '[{"image_id": 1}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}, ]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1},]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1,}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}] [',
    '[{"image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}, {"a": }]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1, "score": "x"}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": "x", "score": 1}]',
    '[{"\\u0069mage_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}]',
    '[{"image_id": 1, "category_id": 1e999, "bbox": [1, 2, 3, 4], "score": -Infinity}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": -Infinity}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1, "area": NaN}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1, "x": 1Infinity}]',
    '[{"image_id": 1, "category_id": NaN, "bbox": [-1e308, 2, 1.7976931348623157e308, 4], "score": 0}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [-1e308, 2, 1.7976931348623157e308, 4], "score": 0}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.30000000000000004441}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1, "x": "\t"}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1, "x": "\\q"}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1, "x": "\\u12"}]',
    f'[{{"image_id": {2**63 - 1}, "category_id": {10**30}, "bbox": [1, 2, {10**308}, 4], "score": 1}}]',
    f'[{{"image_id": {2**63}, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}}]',
    f'[{{"image_id": {2**64}, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}}]',
    f'[{{"image_id": {-(2**63)}, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}}]',
    f'[{{"image_id": 1, "category_id": 3, "bbox": [1, 2, {10**309}, 4], "score": 1}}]',
    '[{"image_id": -0, "category_id": -0.0, "bbox": [1, 2, -0.0, 4], "score": 1}]',
    '[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}]\ufeff',
]

# Fragments a mutation inserts: JSON's punctuation, the constants, extreme numbers and escapes.
FRAGMENTS = [
    "[", "]", "{", "}", ",", ":", '"', "\\", " ", "\n", "-", ".", "e", "E", "+", "0", "7", "1e400",
    "NaN", "Infinity", "-Infinity", "true", "null", "9223372036854775808", '"bbox"', '"score": 1',
    "\\u0041", "é", "\t",
]  # fmt: skip


@pytest.mark.parametrize("text", HAND_WRITTEN)
def test_hand_written_texts(text):
    assert_same_verdict(text)


def test_random_mutations_of_a_valid_file():
    """Bytes deleted, fragments inserted, numbers and keys swapped, the text cut: 3,000 variants,
    a few hundred of them still valid JSON."""
    rng = random.Random(15)
    valid = 0
    for _ in range(3000):
        text = BASE
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            kind = rng.random()
            if kind < 0.3:
                text = text[:at] + text[at + rng.randint(1, 3) :]
            elif kind < 0.7:
                text = text[:at] + rng.choice(FRAGMENTS) + text[at:]
            elif kind < 0.9:
                old, new = rng.sample(["1", "3", "0.875", "2.0", "-3", "true", "[]", '"x"', "NaN", "-1"], 2)
                text = text.replace(old, new, 1)
            else:
                text = text[:at]
        valid += isinstance(python_verdict(text), list)
        assert_same_verdict(text)
    assert valid > 100


def test_columns_are_handed_over_without_a_copy_and_files_are_named(tmp_path):
    path = tmp_path / "det.json"
    path.write_text(BASE)
    image_id, category_id, bbox, score = read_detections(str(path), IMAGE_IDS)
    assert image_id.dtype == np.int64 and category_id.dtype == score.dtype == bbox.dtype == np.float64
    assert bbox.shape == (3, 4) and bbox.flags.c_contiguous
    for column in (image_id, category_id, bbox, score):
        assert not column.flags.owndata and column.base is not None  # NumPy views the Rust allocation
    assert image_id.tolist() == [1, -3, 2] and bbox[2].tolist() == [100, 0.5, 0.001, 7]
    path.write_text(BASE.replace("0.875", "null"))
    with pytest.raises(DataError, match=f"^{path}: detection 0: score must be a finite number$"):
        read_detections(str(path), IMAGE_IDS)
    path.write_text(BASE.replace("0.875", "NaN"))
    with pytest.raises(DataError, match=f"^{path}: not valid JSON \\(NaN or Infinity at line 1, column 73: "):
        read_detections(str(path), IMAGE_IDS)
    with pytest.raises(DataError, match="none.json: cannot read"):
        read_detections(str(tmp_path / "none.json"), IMAGE_IDS)
    path.write_bytes(b"[\xff]")
    with pytest.raises(DataError, match=f"^{path}: cannot read \\(not UTF-8"):
        read_detections(str(path), IMAGE_IDS)
