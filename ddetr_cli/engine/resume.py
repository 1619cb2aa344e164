"""--resume: find the checkpoint, read it, and the settings the continued run trains with.

A resumed run keeps its saved settings; only RESUME_OVERRIDABLE ones (and the device) may change,
and any other setting given is a one-line error instead of being ignored without a word.
"""

from __future__ import annotations

from pathlib import Path

from ddetr_cli.console import UserError
from ddetr_cli.engine.settings import (
    RESUME_ALSO_FREE,
    RESUME_AUTO,
    RESUME_OVERRIDABLE,
    TRAIN_DEFAULTS,
    check_settings,
)


def resume_settings(options: dict) -> tuple[Path, dict, dict]:
    """train() options with `resume` set -> (checkpoint path, checkpoint, settings to train with)."""
    refuse_changes_on_resume(options)
    path = options["resume"]
    if str(path) == RESUME_AUTO:
        from ddetr_cli.runs import latest_checkpoint

        path = latest_checkpoint(options["project"])
        if path is None:
            raise UserError(f"--resume: no */weights/last.pt under {options['project']}")
    ckpt = load_training_checkpoint(Path(path))
    # Settings added after the checkpoint was written take their defaults.
    settings = {**TRAIN_DEFAULTS, **ckpt["train_args"]["settings"]}
    for key in RESUME_OVERRIDABLE:
        if options.get(key) is not None:
            settings[key] = options[key]
    check_settings(settings)
    return Path(path), ckpt, settings


def load_training_checkpoint(path: Path) -> dict:
    """A ddetr training checkpoint (weights_only), or a UserError saying why it cannot resume."""
    from ddetr_cli.model.checkpoint import CheckpointError, read_file

    if not path.is_file():
        raise UserError(f"--resume: no such checkpoint: {path}")
    try:
        ckpt = read_file(path)
    except CheckpointError as e:
        raise UserError(f"--resume: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ddetr" or "optimizer" not in ckpt:
        raise UserError(f"--resume: {path} is not a ddetr training checkpoint (use --weights to fine-tune)")
    return ckpt


def refuse_changes_on_resume(options: dict) -> None:
    """--resume continues a run with its saved settings: any other setting given is a user error
    (it would otherwise be ignored without a word); only RESUME_OVERRIDABLE ones and the device apply."""
    free = {*RESUME_OVERRIDABLE, *RESUME_ALSO_FREE}
    given = [k for k, v in options.items() if v is not None and k not in free]
    if given:
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in (*RESUME_OVERRIDABLE, "device"))
        raise UserError(
            f"--{given[0].replace('_', '-')} cannot change when resuming (the run keeps its saved settings; "
            f"a resumed run may change only {allowed}); start a new run or fine-tune with --weights"
        )
