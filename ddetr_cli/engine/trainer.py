"""The training loop (the engine behind `ddetr train`).

Python API:
    result = train(data="data/coco", epochs=50, batch_size=2, device="cuda", project="runs/train")
    result.run_dir, result.best, result.best_ap

The run directory (`runs/train/exp`, `exp2`, ...) holds `args.yaml` (the resolved settings),
`weights/last.pt` and `weights/best.pt` (best val AP), `metrics.csv` (one row per epoch: every loss
term, lr, the 12 COCO numbers), `train_log.jsonl` (losses every `log_interval` iterations) and
`results.png`.

Checkpoints are the ddetr checkpoint format (`model_checkpoint`: format, version, config, model)
plus everything needed to continue exactly: optimizer, scheduler, AMP scaler, epoch, iteration,
batch position in the epoch, RNG states, the epoch's running loss sums, history and arguments.
The data order and augmentation depend only on (seed, epoch, index) (`loader.set_epoch`), so on
the CPU a resumed run reproduces the uninterrupted run's losses exactly. Ctrl-C stops at the end
of the current iteration and saves (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddetr_cli.console import UserError, console, info, progress, warn
from ddetr_cli.distributed import any_rank
from ddetr_cli.engine.resume import resume_settings
from ddetr_cli.engine.settings import plain, resolve_settings
from ddetr_cli.engine.stop import StopRequest
from ddetr_cli.runs import rng_state, set_rng_state, write_metrics_csv


class NonFiniteLoss(RuntimeError):
    """Training diverged; the message says where and which checkpoint is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    last: Path
    best: Path
    best_ap: float | None
    metrics: dict | None  # the last evaluation's metrics
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False


def train(
    data: str | None = None,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lr_backbone: float | None = None,
    lr_linear_proj_mult: float | None = None,
    weight_decay: float | None = None,
    lr_drop: int | None = None,
    clip_max_norm: float | None = None,
    variant: str | None = None,
    backbone: str | None = None,
    pretrained_backbone: str | Path | None = None,
    weights: str | Path | None = None,
    hidden_dim: int | None = None,
    nheads: int | None = None,
    enc_layers: int | None = None,
    dec_layers: int | None = None,
    dim_feedforward: int | None = None,
    num_queries: int | None = None,
    num_feature_levels: int | None = None,
    enc_n_points: int | None = None,
    dec_n_points: int | None = None,
    dropout: float | None = None,
    imgsz: int | None = None,
    scales: list[int] | None = None,
    crop_prob: float | None = None,
    amp: str | None = None,
    device: str | None = None,
    workers: int | None = None,
    seed: int | None = None,
    eval_interval: int | None = None,
    log_interval: int | None = None,
    label_mapping: str | None = None,
    max_pixels: int | None = None,
    preset: str | None = None,
    project: str | Path = "runs/train",
    name: str = "exp",
    exist_ok: bool = False,
    resume: str | Path | None = None,
) -> TrainResult:
    """Train a Deformable DETR; see the module docstring. None means: the preset's, else the paper's."""
    options = {k: v for k, v in locals().items()}
    from ddetr_cli import distributed

    ctx = distributed.setup(device)
    try:
        return _Trainer(options, ctx).run()
    finally:
        distributed.cleanup()


class _Trainer:
    def __init__(self, options: dict, ctx):
        self.options = options
        self.ctx = ctx

    # -- setup -------------------------------------------------------------------------------

    def _settings(self):
        """(model overrides, settings, checkpoint to resume or None, data spec)."""
        opts = self.options
        if opts["resume"] is None:
            model_over, settings = resolve_settings(opts)
            return model_over, settings, None, opts["data"] or "synthetic"
        self.resume_path, ckpt, settings = resume_settings(opts)
        return {}, settings, ckpt, ckpt["train_args"]["data"]

    def run(self) -> TrainResult:
        import torch

        from ddetr_cli.datasets import has_split, resolve_split

        ctx = self.ctx
        model_over, s, ckpt, data = self._settings()
        self.s, self.data = s, data
        train_split = resolve_split(data, "train")
        val_split = resolve_split(data, "val") if has_split(data, "val") else None
        if val_split is None:
            warn(f"{data}: no val split; training without evaluation (best.pt = last.pt)")

        if ckpt is None:
            random.seed(s["seed"] + ctx.rank)
            torch.manual_seed(s["seed"] + ctx.rank)
            import numpy as np

            np.random.seed((s["seed"] + ctx.rank) % 2**32)

        self.train_loader = self._loader(train_split, train=True)
        if len(self.train_loader) == 0:
            raise UserError(
                f"{train_split.annotation_file}: {self.train_loader.num_images} training images, fewer "
                f"than one batch ({s['batch_size']} per process x {ctx.world_size}); lower --batch-size"
            )
        self.val_loader = self._loader(val_split, train=False) if val_split is not None else None
        self.val_annotation = val_split.annotation_file if val_split is not None else None
        if self.val_annotation is not None and ctx.is_main:  # validated up front, not after an epoch
            from ddetr_cli import coco_eval

            self._gt = coco_eval.load_ground_truth(self.val_annotation)
        model = self._model(model_over, ckpt, train_split)
        self.model = model
        from ddetr_cli.model import build_criterion, param_groups

        self.criterion = build_criterion(model.config)
        groups = param_groups(model, s["lr"], s["lr_backbone"], s["lr_linear_proj_mult"])
        on_cpu = ctx.device.type == "cpu"
        # On the CPU one fused kernel for all parameters instead of ~10 ops per tensor; with the
        # channels_last CNN below the tiny preset's step is ~1.1x faster (benchmarks/train_step.py).
        self.optimizer = torch.optim.AdamW(
            groups, lr=s["lr"], weight_decay=s["weight_decay"], fused=True if on_cpu else None
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, s["lr_drop"])
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=s["amp"] == "fp16")

        self.epoch, self.iteration, self.batch_in_epoch = 0, 0, 0
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        self.history: list[dict] = []
        self.best_ap: float | None = None
        self.last_metrics: dict | None = None
        if ckpt is not None:
            self._restore(ckpt)
            run_dir = self.resume_path.parent.parent
        else:
            run_dir = self._new_run_dir()
        self.run_dir = run_dir
        self.last = run_dir / "weights" / "last.pt"
        self.best = run_dir / "weights" / "best.pt"
        from ddetr_cli.engine.recipe import print_recipe, training_recipe

        self.recipe = training_recipe(model, s, self.optimizer, ctx.world_size, self.backbone_weights)
        if ckpt is None and ctx.is_main:
            self._write_args(data, model)
        if self.epoch >= s["epochs"]:
            raise UserError(
                f"--resume: this run already trained {self.epoch} of {s['epochs']} epochs (raise --epochs)"
            )

        self.ddp_model = model
        if ctx.distributed:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                # Every parameter gets a gradient unless auxiliary losses are off (then the
                # intermediate class heads do not); the official code runs without the search.
                find_unused_parameters=not model.config.aux_loss,
            )
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info(
            f"Training {_variant(model.config)} Deformable DETR ({model.config.backbone}, "
            f"{n_params / 1e6:.2f}M trainable parameters, {model.config.num_classes} classes) on "
            f"{self.train_loader.num_images} images, {ctx.world_size} process(es) on {ctx.device}; "
            f"run directory {run_dir}"
        )
        if ctx.is_main:
            print_recipe(self.recipe)
        interrupted = self._loop()
        if ctx.is_main and not interrupted:
            if not self.best.exists():  # never evaluated: the final weights are the best we know
                from ddetr_cli.runs import atomic_save

                atomic_save(self._checkpoint(), self.best)
            self._summary()
        return TrainResult(
            run_dir, self.last, self.best, self.best_ap, self.last_metrics, self.history, interrupted
        )

    def _loader(self, split, train: bool):
        from ddetr_cli.data import CocoLoader

        s = self.s
        kwargs = {"max_size": s["max_size"], "val_size": s["val_size"]}
        if s["max_pixels"] is not None:
            kwargs["max_pixels"] = s["max_pixels"]
        if train:
            kwargs["crop_prob"] = s["crop_prob"]
            for key in ("scales", "crop_resize", "crop_size"):
                if s[key] is not None:
                    kwargs[key] = tuple(s[key])
        return CocoLoader(
            str(split.images_dir),
            str(split.annotation_file),
            train=train,
            batch_size=s["batch_size"],
            workers=s["workers"],
            seed=s["seed"],
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            label_mapping=s["label_mapping"],
            on_bad_image="skip",
            **kwargs,
        )

    def _model(self, model_over: dict, ckpt: dict | None, split):
        import torch

        from ddetr_cli.engine.starting_weights import backbone_start, finetune_start
        from ddetr_cli.model import DeformableDetrConfig, build_model

        loader = self.train_loader
        names = list(split.class_names) if split.class_names is not None else list(loader.class_names)
        if len(names) != loader.num_classes:
            raise UserError(
                f"dataset.yaml names {len(names)} classes, {split.annotation_file} has {loader.num_classes}"
            )
        meta = {"class_names": names, "category_ids": [int(c) for c in loader.category_ids]}
        self.class_transfer = None
        if ckpt is not None:
            self.backbone_weights = {"source": "resumed checkpoint", "file": str(self.resume_path)}
            config = DeformableDetrConfig.from_dict({**ckpt["config"], "pretrained_backbone": None})
            if config.num_classes != loader.num_classes:
                raise UserError(
                    f"--resume: the checkpoint has {config.num_classes} classes, the data has "
                    f"{loader.num_classes}"
                )
            model = build_model(config)
            model.load_state_dict(ckpt["model"])
        elif self.options["weights"] is not None:
            # The checkpoint decides the architecture; only training-time settings carry over.
            overrides = {k: v for k, v in model_over.items() if k == "dropout"}
            ignored = sorted(set(model_over) - set(overrides) - {"pretrained_backbone"})
            if ignored:
                warn(f"--weights decides the architecture; ignoring {', '.join(ignored)}")
            model, self.class_transfer = finetune_start(
                self.options["weights"], names, meta, overrides, self.s["label_mapping"]
            )
            self.backbone_weights = {"source": "detector checkpoint", "file": str(self.options["weights"])}
        else:
            model_over, self.backbone_weights = backbone_start(model_over, self.ctx)
            try:
                config = DeformableDetrConfig(**{**model_over, "num_classes": loader.num_classes, **meta})
            except (TypeError, ValueError) as e:
                raise UserError(str(e)) from e
            model = build_model(config)
        model = model.to(self.ctx.device).train()
        self.image_format = torch.contiguous_format
        if self.ctx.device.type == "cpu":
            # oneDNN's convolutions (forward and above all backward) run faster on NHWC; measured on
            # the CPU only, so the GPU keeps PyTorch's default layout.
            self.image_format = torch.channels_last
            model.backbone[0].to(memory_format=torch.channels_last)
        return model

    def _new_run_dir(self) -> Path:
        from ddetr_cli import distributed
        from ddetr_cli.runs import increment_path

        opts = self.options
        run_dir = None
        if self.ctx.is_main:
            run_dir = increment_path(opts["project"], opts["name"], opts["exist_ok"])
            try:
                (run_dir / "weights").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from e
        return Path(distributed.broadcast_object(str(run_dir) if run_dir else None, self.ctx))

    def _write_args(self, data, model) -> None:
        import yaml

        from ddetr_cli.runs import atomic_write_text

        args = {
            "data": str(data),
            "weights": plain(self.options["weights"]),
            "preset": self.options["preset"],
            "world_size": self.ctx.world_size,
            "train": plain(self.s),
            "model": plain(model.config.to_dict()),
            "start": {"backbone": self.backbone_weights, "class_transfer": self.class_transfer},
            "recipe": self.recipe,
        }
        atomic_write_text(self.run_dir / "args.yaml", yaml.safe_dump(args, sort_keys=False))

    def _restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt["iteration"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.epoch_sums = dict(ckpt.get("epoch_sums", {}))
        self.epoch_count = int(ckpt.get("epoch_count", 0))
        self.history = [dict(r) for r in ckpt.get("history", [])]
        self.best_ap = ckpt.get("best_ap")
        if self.ctx.rank == 0:
            set_rng_state(ckpt["rng"])
        else:  # other ranks' streams were not saved; derive them from the restored position
            import torch

            torch.manual_seed(self.s["seed"] + self.ctx.rank + 1000 * self.iteration)
        where = f"epoch {self.epoch + 1}" + (f", batch {self.batch_in_epoch}" if self.batch_in_epoch else "")
        info(f"Resuming {self.resume_path} at {where} (iteration {self.iteration})")

    def _checkpoint(self) -> dict:
        from ddetr_cli.model import model_checkpoint

        ckpt = model_checkpoint(self.model)
        ckpt.update(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            epoch=self.epoch,
            iteration=self.iteration,
            batch_in_epoch=self.batch_in_epoch,
            epoch_sums=dict(self.epoch_sums),
            epoch_count=self.epoch_count,
            rng=rng_state(),
            history=[dict(r) for r in self.history],
            best_ap=self.best_ap,
            imgsz=int(self.s["val_size"]),
            class_names=list(self.model.config.class_names or []),
            category_ids=list(self.model.config.category_ids or []),
            loader={"seed": self.s["seed"], "epoch": self.epoch, "batch": self.batch_in_epoch},
            train_args={
                "data": str(self.data),
                "settings": plain(self.s),
                "world_size": self.ctx.world_size,
            },
        )
        return ckpt

    def _save_last(self, best: bool = False) -> None:
        from ddetr_cli.runs import atomic_save

        if not self.ctx.is_main:
            return
        ckpt = self._checkpoint()
        atomic_save(ckpt, self.last)
        if best:
            atomic_save(ckpt, self.best)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> bool:
        """Train until `epochs`; True when stopped by Ctrl-C (after saving)."""
        s, ctx = self.s, self.ctx
        log_file = self._open_log() if ctx.is_main else None
        try:
            with StopRequest() as stop, progress(disable=not ctx.is_main) as bar:
                while self.epoch < s["epochs"]:
                    if self._train_epoch(bar, stop, log_file):
                        self._save_last()
                        if ctx.is_main:
                            warn(
                                f"interrupted: saved {self.last} (epoch {self.epoch + 1}, batch "
                                f"{self.batch_in_epoch}); continue with: ddetr train --resume {self.last}"
                            )
                        return True
                    self._end_epoch(bar)
        finally:
            if log_file is not None:
                log_file.close()
        return False

    def _open_log(self):
        """train_log.jsonl: new for a new run; for a resumed one, cut back to the checkpoint's
        iteration so that iterations logged after it (and then redone) appear once."""
        path = self.run_dir / "train_log.jsonl"
        if self.options["resume"] is None or not path.exists():
            return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by _loop
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["iteration"] <= self.iteration:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        from ddetr_cli.runs import atomic_write_text

        atomic_write_text(path, "".join(kept))
        return open(path, "a", encoding="utf-8")  # noqa: SIM115

    def _train_epoch(self, bar, stop, log_file) -> bool:
        """One epoch (from `batch_in_epoch` when resuming mid-epoch); True if Ctrl-C stopped it."""
        import torch

        from ddetr_cli.distributed import autocast, mean_over_ranks

        s, ctx = self.s, self.ctx
        loader = self.train_loader
        loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)  # resuming: earlier batches not decoded
        self.ddp_model.train()
        self.criterion.train()
        total = len(loader)
        task = bar.add_task(f"epoch {self.epoch + 1}/{s['epochs']}", total=total, status="")
        bar.update(task, completed=self.batch_in_epoch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for index, (images, mask, targets) in enumerate(loader, start=self.batch_in_epoch):
            images = images.to(ctx.device, non_blocking=True, memory_format=self.image_format)
            mask = mask.to(ctx.device, non_blocking=True)
            targets = [{k: v.to(ctx.device) for k, v in t.items()} for t in targets]
            with autocast(ctx.device, s["amp"]):
                outputs = self.ddp_model(images, mask)
            losses = self.criterion(_to_float(outputs), targets)
            names = list(losses)  # one device->host copy for every term, not one per term
            values = dict(zip(names, torch.stack([losses[n].detach().float() for n in names]).tolist()))
            values["_stop"] = 1.0 if stop.requested else 0.0
            values = mean_over_ranks(values, ctx)
            if not math.isfinite(values["loss"]):
                self._diverged(values)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            if s["clip_max_norm"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, s["clip_max_norm"], foreach=True)
            self.scaler.step(self.optimizer)
            self.scaler.update()

            stop_now = values.pop("_stop") > 0
            self.iteration += 1
            self.batch_in_epoch = index + 1
            for k, v in values.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
            self.epoch_count += 1
            lr = self.optimizer.param_groups[0]["lr"]
            if log_file is not None and (self.iteration % s["log_interval"] == 0 or index == 0):
                record = {"epoch": self.epoch + 1, "iteration": self.iteration, "batch": index + 1, "lr": lr}
                log_file.write(json.dumps({**record, **values}) + "\n")
                log_file.flush()
            bar.update(task, advance=1, status=f"loss {values['loss']:.4f}  lr {lr:.2e}")
            if stop_now:
                return True
        return False

    def _diverged(self, values: dict) -> None:
        terms = ", ".join(
            f"{k}={v:.4g}" for k, v in values.items() if k.startswith("loss") and not math.isfinite(v)
        )
        where = f"epoch {self.epoch + 1}, iteration {self.iteration + 1}"
        intact = (
            f"last good checkpoint: {self.last}" if self.last.exists() else "no checkpoint was written yet"
        )
        raise NonFiniteLoss(
            f"non-finite loss at {where} ({terms}); training stopped, {intact}. "
            "Try a lower --lr, --amp off, or check the data's boxes."
        )

    def _end_epoch(self, bar) -> None:
        s, ctx = self.s, self.ctx
        if any_rank(self.epoch_count == 0, ctx):
            self._no_usable_images()
        lr = self.optimizer.param_groups[0]["lr"]
        row: dict[str, Any] = {"epoch": self.epoch + 1, "lr": lr}
        for name, total in sorted(self.epoch_sums.items(), key=_loss_order):
            row[f"train/{name}"] = total / self.epoch_count
        self.scheduler.step()
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums, self.epoch_count = {}, 0
        self._report_skipped()
        if ctx.is_main:
            self.history.append(row)
            self._save_last()  # before evaluating (as the official code): a failed evaluation loses no epoch

        due = self.epoch % s["eval_interval"] == 0 or self.epoch == s["epochs"]
        if self.val_loader is not None and due:
            metrics = self._evaluate(bar)
            if ctx.is_main:
                row.update({f"val/{k}": v for k, v in metrics.items() if k != "per_class"})
                self.last_metrics = metrics
                improved = self.best_ap is None or metrics["AP"] > self.best_ap
                if improved:
                    self.best_ap = metrics["AP"]
                info(
                    f"epoch {self.epoch}: loss {row['train/loss']:.4f}, AP {metrics['AP']:.4f}, "
                    f"AP50 {metrics['AP50']:.4f}" + (" (best)" if improved else "")
                )
                self._save_last(best=improved)  # again, with the metrics and the best AP
        elif ctx.is_main:
            info(f"epoch {self.epoch}: loss {row['train/loss']:.4f}")
        if ctx.is_main:
            write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        if ctx.is_main and due:
            # At evaluation epochs and the last one (~0.4 s a plot); metrics.csv has every epoch.
            from ddetr_cli.plots import plot_results

            plot_results(self.history, self.run_dir / "results.png")

    def _no_usable_images(self) -> None:
        """An epoch in which the loader could read no image: stop with the cause, not a missing loss."""
        from ddetr_cli.engine.inference import skipped_summary

        skipped = self.train_loader.skipped
        cause = skipped_summary(skipped, "training images") if skipped else "no batch was produced"
        raise UserError(f"epoch {self.epoch + 1}: no training image could be read ({cause})")

    def _report_skipped(self) -> None:
        """One warning per epoch for the unreadable training images the loader newly left out."""
        from ddetr_cli.engine.inference import skipped_summary

        skipped = self.train_loader.skipped
        new = skipped[getattr(self, "_skipped_reported", 0) :]
        self._skipped_reported = len(skipped)
        if new and self.ctx.is_main:
            warn(f"epoch {self.epoch}: {skipped_summary(new, 'training images')}")

    def _evaluate(self, bar) -> dict:
        from ddetr_cli.engine.evaluation import score_run
        from ddetr_cli.engine.inference import TorchDetector, dataset_detections

        detector = TorchDetector(self.model, self.ctx.device, self.s["amp"])
        run = dataset_detections(detector, self.val_loader, self.ctx, description="  val", bar=bar)
        if not self.ctx.is_main:
            return {}
        return score_run(self._gt, run, self.val_annotation)[1]

    def _summary(self) -> None:
        from rich.table import Table

        table = Table(title=f"Training finished: {self.run_dir}", show_header=False)
        table.add_row("epochs", str(self.epoch))
        if self.best_ap is not None:
            table.add_row("best AP", f"{self.best_ap:.4f}")
        if self.last_metrics:
            table.add_row("last AP50", f"{self.last_metrics['AP50']:.4f}")
        for label, path in (("last", self.last), ("best", self.best)):
            table.add_row(label, str(path))
        table.add_row("metrics", str(self.run_dir / "metrics.csv"))
        table.add_row("plot", str(self.run_dir / "results.png"))
        console.print(table)


def _variant(config) -> str:
    return "two-stage" if config.two_stage else ("box-refine" if config.with_box_refine else "plain")


def _loss_order(item) -> tuple:
    """loss first, then final-layer terms, then aux layers in order, then encoder terms."""
    key = item[0]
    return (key != "loss", key.count("_") > 1, key)


def _to_float(outputs):
    """Model outputs (possibly half precision under autocast) -> float32 for the loss."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float(v) for v in outputs]
    return outputs
