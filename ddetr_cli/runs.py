"""Run directories, crash-safe file writes and the state a run needs to continue exactly.

Run directories follow the Ultralytics convention users know: `runs/train/exp`, then `exp2`,
`exp3`, ... unless `--exist-ok`. Every file a run depends on (checkpoints, metrics) is written to
a temporary file in the same directory, flushed and fsynced, then renamed over the old one with
`os.replace`, which is atomic on POSIX and Windows: a crash or a full disk mid-write leaves the
previous file intact.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable


def increment_path(project: str | os.PathLike, name: str, exist_ok: bool = False) -> Path:
    """`project/name`, or the first free `project/name2`, `name3`, ... when it exists already."""
    base = Path(project) / name
    if exist_ok or not base.exists():
        return base
    taken = set()
    pattern = re.compile(rf"^{re.escape(name)}(\d+)$")
    if base.parent.is_dir():
        for child in base.parent.iterdir():
            match = pattern.match(child.name)
            if match:
                taken.add(int(match.group(1)))
    n = 2
    while n in taken or (base.parent / f"{name}{n}").exists():
        n += 1
    return base.parent / f"{name}{n}"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)`, atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented JSON atomically; an unwritable path is a one-line user error."""
    import json

    from ddetr_cli.console import UserError

    path = Path(path)
    try:
        return atomic_write_text(path, json.dumps(obj, indent=1))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Fail early, before hours of work, when `path` could not be written later (one-line user error)."""
    from ddetr_cli.console import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option}: {path} is a directory, not a file")
    try:
        atomic_write(path.parent / f".{path.name}.probe", lambda f: None).unlink()
    except OSError as e:
        raise UserError(f"{option}: cannot write {path}: {e.strerror or e}") from None


def latest_checkpoint(project: str | os.PathLike) -> Path | None:
    """The most recently written `*/weights/last.pt` under `project` (for a bare `--resume`)."""
    candidates = list(Path(project).glob("*/weights/last.pt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The small top-level fields of a ddetr training checkpoint (e.g. `imgsz`, `train_args`),
    or {} for anything else (official .pth, Hugging Face folders, unreadable files).

    Memory-maps the file so the weights are not read; loading stays weights_only.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours or not readable: load_model reports the real problem
        return {}
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ddetr":
        return {}
    return {k: v for k, v in ckpt.items() if k in ("imgsz", "train_args", "epoch", "best_ap")}


def rng_state() -> dict:
    """Every random stream training draws from (torch, CUDA, Python, NumPy), as weights_only-safe types."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_metrics_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """metrics.csv (one row per epoch; columns in first-seen order), written atomically."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """metrics.csv rows with numbers parsed (empty cells stay '')."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                row[key] = int(value) if key == "epoch" else float(value)
    return rows
