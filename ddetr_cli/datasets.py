"""Resolve `--data` to image folders and annotation files.

`--data` accepts three forms:

- `ROOT`, a COCO-layout directory: `ROOT/annotations/instances_<split>*.json` and the images in
  `ROOT/<split>2017`, `ROOT/<split>`, `ROOT/images/<split>2017` or `ROOT/images/<split>`;
- `dataset.yaml`, naming each split's images and annotations (relative paths resolve against
  `path:` when given, else against the YAML file's folder):

      path: /data/shapes          # optional
      train: {images: train, annotations: annotations/instances_train.json}
      val: {images: val, annotations: annotations/instances_val.json}
      names: [circle, square]     # optional: overrides the category names of the annotation file

- `synthetic`: the built-in generated dataset (`ddetr data synth` defaults), written to
  `data/synthetic` the first time it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddetr_cli.console import UserError, info

SYNTHETIC = "synthetic"
SYNTHETIC_DIR = Path("data/synthetic")
# The same defaults as `ddetr data synth`, so both commands share one generated copy.
SYNTHETIC_ARGS = {"num_train": 400, "num_val": 100, "image_size": (160, 224), "seed": 0}


@dataclass
class DataSplit:
    """One split of a dataset: where its images and its COCO annotation file are."""

    split: str
    images_dir: Path
    annotation_file: Path
    class_names: list[str] | None = None  # from dataset.yaml `names:`; None = the annotation file's


def synthetic_root(root: Path = SYNTHETIC_DIR) -> Path:
    """The built-in synthetic dataset, generated on first use.

    Written to a temporary folder and renamed into place, so an interrupted generation leaves
    nothing half-written and several processes (torchrun ranks) may race safely.
    """
    if (root / "annotations" / "instances_val.json").is_file():
        return root
    import os
    import shutil

    from ddetr_cli.synth import make_synthetic_coco

    info(f"Generating the synthetic dataset in {root} (first use) ...")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.{os.getpid()}.tmp"
    try:
        make_synthetic_coco(tmp, **SYNTHETIC_ARGS)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "annotations" / "instances_val.json").is_file():
                raise  # not another process's finished copy: a real problem
    except OSError as e:
        raise UserError(f"cannot write the synthetic dataset to {root}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_split(data: str, split: str) -> DataSplit:
    """`--data` + split name -> DataSplit, or a UserError naming what is missing."""
    if data == SYNTHETIC:
        return _from_root(synthetic_root(), split)
    path = Path(data)
    if not path.exists():
        raise UserError(f"--data: no such file or directory: {data}")
    if path.is_dir():
        return _from_root(path, split)
    if path.suffix.lower() in (".yaml", ".yml"):
        return _from_yaml(path, split)
    raise UserError(f"--data must be a dataset folder, a dataset.yaml or 'synthetic', got the file {data}")


def has_split(data: str, split: str) -> bool:
    try:
        resolve_split(data, split)
    except UserError:
        return False
    return True


def _from_root(root: Path, split: str) -> DataSplit:
    ann_dir = root / "annotations"
    candidates = [ann_dir / f"instances_{split}.json", ann_dir / f"instances_{split}2017.json"]
    candidates += sorted(ann_dir.glob(f"instances_{split}*.json"))
    annotation = next((c for c in candidates if c.is_file()), None)
    if annotation is None:
        raise UserError(f"{root}: no annotation file annotations/instances_{split}*.json for split '{split}'")
    stem = annotation.stem[len("instances_") :]  # e.g. "val2017"
    folders = [root / stem, root / f"{split}2017", root / split, root / "images" / stem]
    folders += [root / "images" / f"{split}2017", root / "images" / split]
    images = next((f for f in folders if f.is_dir()), None)
    if images is None:
        raise UserError(
            f"{root}: no image folder for split '{split}' (looked for {stem}/, {split}/, images/{split}/)"
        )
    return DataSplit(split, images, annotation)


def _from_yaml(path: Path, split: str) -> DataSplit:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from e
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with train:/val: entries")
    base = Path(spec["path"]) if spec.get("path") else path.parent
    if not base.is_absolute():
        base = path.parent / base
    entry = spec.get(split)
    if entry is None:
        raise UserError(f"{path}: no '{split}' entry")
    if not isinstance(entry, dict) or "images" not in entry or "annotations" not in entry:
        raise UserError(f"{path}: '{split}' must be a mapping with 'images' and 'annotations'")
    images = base / str(entry["images"])
    annotation = base / str(entry["annotations"])
    if not images.is_dir():
        raise UserError(f"{path}: {split} images folder not found: {images}")
    if not annotation.is_file():
        raise UserError(f"{path}: {split} annotation file not found: {annotation}")
    names = spec.get("names")
    if names is not None:
        if isinstance(names, dict):  # Ultralytics style {0: name, 1: name}
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise UserError(f"{path}: 'names' must be a list of class names")
        names = [str(n) for n in names]
    return DataSplit(split, images, annotation, names)
