"""Official Deformable DETR <-> Hugging Face `DeformableDetrForObjectDetection`: keys and configs.

ddetr's model keeps the official module tree (fundamentalvision/Deformable-DETR), so official state
dicts load unchanged. Hugging Face checkpoints name the same tensors differently; this module renames
them both ways and translates `config.json`. Facts it relies on (transformers 4.x and 5.x):

- the backbone is timm's ResNet (`model.backbone.model.<torchvision names>`, older files:
  `model.backbone.conv_encoder.model.`) or Hugging Face's own ResNet (`embedder` / `encoder.stages`);
- the decoder's self-attention has separate q/k/v projections where the official code has one
  `nn.MultiheadAttention` (`in_proj_weight` = [q; k; v]);
- files saved by transformers 5.x omit tied copies of the heads (`class_embed.1..`, the top-level
  `bbox_embed.*` that `model.decoder.bbox_embed` shares, ...); files saved by 4.x hold every copy.
  The missing copies are filled from the tensors they were tied to, as `from_pretrained` does.

Everything here works on plain dicts of tensors; errors are ValueError with one line (the caller
adds the file name).
"""

from __future__ import annotations

import re
from typing import Any

import torch

Tensor = torch.Tensor

# (official name, Hugging Face name) templates: {n} is a layer index, {p} the rest of the name.
_RENAMES = [
    ("backbone.0.body.{p}", "model.backbone.model.{p}"),
    ("input_proj.{n}.{p}", "model.input_proj.{n}.{p}"),
    ("query_embed.weight", "model.query_position_embeddings.weight"),
    ("transformer.level_embed", "model.level_embed"),
    ("transformer.reference_points.{p}", "model.reference_points.{p}"),
    ("transformer.enc_output.{p}", "model.enc_output.{p}"),
    ("transformer.enc_output_norm.{p}", "model.enc_output_norm.{p}"),
    ("transformer.pos_trans.{p}", "model.pos_trans.{p}"),
    ("transformer.pos_trans_norm.{p}", "model.pos_trans_norm.{p}"),
    # Encoder layer: deformable self-attention, then the FFN.
    ("transformer.encoder.layers.{n}.self_attn.{p}", "model.encoder.layers.{n}.self_attn.{p}"),
    ("transformer.encoder.layers.{n}.norm1.{p}", "model.encoder.layers.{n}.self_attn_layer_norm.{p}"),
    ("transformer.encoder.layers.{n}.linear1.{p}", "model.encoder.layers.{n}.mlp.fc1.{p}"),
    ("transformer.encoder.layers.{n}.linear2.{p}", "model.encoder.layers.{n}.mlp.fc2.{p}"),
    ("transformer.encoder.layers.{n}.norm2.{p}", "model.encoder.layers.{n}.final_layer_norm.{p}"),
    # Decoder layer: self-attention (norm2), deformable cross-attention (norm1), FFN (norm3).
    (
        "transformer.decoder.layers.{n}.self_attn.out_proj.{p}",
        "model.decoder.layers.{n}.self_attn.o_proj.{p}",
    ),
    ("transformer.decoder.layers.{n}.norm2.{p}", "model.decoder.layers.{n}.self_attn_layer_norm.{p}"),
    ("transformer.decoder.layers.{n}.cross_attn.{p}", "model.decoder.layers.{n}.encoder_attn.{p}"),
    ("transformer.decoder.layers.{n}.norm1.{p}", "model.decoder.layers.{n}.encoder_attn_layer_norm.{p}"),
    ("transformer.decoder.layers.{n}.linear1.{p}", "model.decoder.layers.{n}.mlp.fc1.{p}"),
    ("transformer.decoder.layers.{n}.linear2.{p}", "model.decoder.layers.{n}.mlp.fc2.{p}"),
    ("transformer.decoder.layers.{n}.norm3.{p}", "model.decoder.layers.{n}.final_layer_norm.{p}"),
    # Heads (and the decoder's references to them for box refinement / two-stage proposals).
    ("class_embed.{n}.{p}", "class_embed.{n}.{p}"),
    ("bbox_embed.{n}.{p}", "bbox_embed.{n}.{p}"),
    ("transformer.decoder.class_embed.{n}.{p}", "model.decoder.class_embed.{n}.{p}"),
    ("transformer.decoder.bbox_embed.{n}.{p}", "model.decoder.bbox_embed.{n}.{p}"),
]

# Names written by older transformers versions (and by 5.x's save_pretrained) -> current names.
_HF_LEGACY = [
    (re.compile(r"^model\.backbone\.conv_encoder\."), "model.backbone."),
    (re.compile(r"\.self_attn\.out_proj\."), ".self_attn.o_proj."),
    (re.compile(r"\.layers\.(\d+)\.fc([12])\."), r".layers.\1.mlp.fc\2."),
]

_QKV = ("q_proj", "k_proj", "v_proj")
_IN_PROJ = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$")
_HF_QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")

# Hugging Face ResNet (transformers' own backbone) <-> torchvision names inside the backbone.
_HFRES_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$")
_HFRES_BLOCK = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:shortcut\.(convolution|normalization)|"
    r"layer\.(\d+)\.(convolution|normalization))\.(.+)$"
)
_TV_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(?:downsample\.([01])|(conv|bn)(\d))\.(.+)$")

RESNET_LAYOUTS = {  # (blocks per stage, bottleneck) -> torchvision name
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
}
_RESNET_WIDTHS = {False: [64, 128, 256, 512], True: [256, 512, 1024, 2048]}
_RESNET_NAMES = set(RESNET_LAYOUTS.values())


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>.+)")
    return re.compile(pattern + "$")


_OFFICIAL_TO_HF = [(_compile(official), hf) for official, hf in _RENAMES]
_HF_TO_OFFICIAL = [(_compile(hf), official) for official, hf in _RENAMES]


def _rename(key: str, rules) -> str:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return key  # unknown keys pass through and are reported by the caller's fit check


def is_hf_layout(keys) -> bool:
    """Whether a state dict's keys use Hugging Face's names (`model.encoder.layers...`)."""
    return any(
        k.startswith(("model.encoder.layers.", "model.level_embed", "model.input_proj.")) for k in keys
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face -> official


def hf_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a `DeformableDetrForObjectDetection` state dict (any transformers version, timm or
    Hugging Face ResNet backbone) to the official layout, tied head copies included."""
    state = {_legacy_to_current(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _HF_QKV.match(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        if key.startswith("model.backbone.model."):
            key = "model.backbone.model." + _hf_resnet_to_torchvision(key[len("model.backbone.model.") :])
        out[_rename(key, _HF_TO_OFFICIAL)] = value
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"decoder layer {layer} self-attention lacks some of q/k/v_proj.{kind}")
        out[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], 0
        )
    return complete_heads(out)


def _legacy_to_current(key: str) -> str:
    for pattern, replacement in _HF_LEGACY:
        key = pattern.sub(replacement, key)
    return key


def _hf_resnet_to_torchvision(name: str) -> str:
    match = _HFRES_STEM.match(name)
    if match:
        kind, rest = match.groups()
        return f"{'conv1' if kind == 'convolution' else 'bn1'}.{rest}"
    match = _HFRES_BLOCK.match(name)
    if match:
        stage, block, shortcut, index, kind, rest = match.groups()
        prefix = f"layer{int(stage) + 1}.{block}"
        if shortcut:
            return f"{prefix}.downsample.{0 if shortcut == 'convolution' else 1}.{rest}"
        return f"{prefix}.{'conv' if kind == 'convolution' else 'bn'}{int(index) + 1}.{rest}"
    return name  # timm names are torchvision's already


def layer_indices(keys, prefix: str) -> list[int]:
    """Sorted distinct N among keys that start with `prefix` + "N."."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for m in map(pattern.match, keys) if m})


def complete_heads(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add the head copies the official module tree shares but a file may omit.

    The official model has one class/box head per decoder layer (+1 for two-stage proposals), the
    same module repeated unless box refinement is on; with box refinement
    `transformer.decoder.bbox_embed` *is* `bbox_embed`, with two-stage `transformer.decoder.class_embed`
    *is* `class_embed`. A missing entry is taken from the copy it is tied to, else from head 0 (the
    shared module). Raises ValueError when two copies that must be one tensor differ.
    """
    state = dict(state)
    keys = list(state)
    num_dec = len(layer_indices(keys, "transformer.decoder.layers."))
    two_stage = "transformer.enc_output.weight" in state
    box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)
    num_pred = num_dec + (1 if two_stage else 0)
    if num_dec == 0:
        return state
    for head, in_decoder in (("class_embed", two_stage), ("bbox_embed", box_refine)):
        pattern = re.compile(rf"^(?:transformer\.decoder\.)?{head}\.\d+\.(.+)$")
        suffixes = sorted({m.group(1) for m in map(pattern.match, keys) if m})
        for i in range(num_pred):
            for suffix in suffixes:
                top, dec = f"{head}.{i}.{suffix}", f"transformer.decoder.{head}.{i}.{suffix}"
                if top not in state:
                    source = dec if dec in state else f"{head}.0.{suffix}"
                    if source in state:
                        state[top] = state[source]
                if in_decoder and top in state:
                    if dec in state and not torch.equal(state[dec], state[top]):
                        raise ValueError(
                            f"{top} and {dec} differ, but the official model uses one tensor for both"
                        )
                    state[dec] = state[top]
    return state


# ---------------------------------------------------------------------------------------------
# official -> Hugging Face


def official_to_hf(state: dict[str, Tensor], backbone_layout: str = "timm") -> dict[str, Tensor]:
    """Rename an official-layout state dict to `DeformableDetrForObjectDetection`'s current names.

    `backbone_layout` is "timm" (what the published checkpoints use) or "hf" (transformers' ResNet).
    Every tied copy is written, so the result loads with `load_state_dict(strict=True)`.
    """
    if backbone_layout not in ("timm", "hf"):
        raise ValueError(f"backbone_layout must be 'timm' or 'hf', got {backbone_layout!r}")
    out: dict[str, Tensor] = {}
    for key, value in complete_heads(state).items():
        if key.endswith("num_batches_tracked"):
            continue
        match = _IN_PROJ.match(key)
        if match:
            layer, kind = match.groups()
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"model.decoder.layers.{layer}.self_attn.{name}.{kind}"] = part
            continue
        new = _rename(key, _OFFICIAL_TO_HF)
        if backbone_layout == "hf" and new.startswith("model.backbone.model."):
            new = "model.backbone.model." + _torchvision_to_hf_resnet(new[len("model.backbone.model.") :])
        out[new] = value
    return out


def _torchvision_to_hf_resnet(name: str) -> str:
    match = _TV_STEM.match(name)
    if match:
        kind, rest = match.groups()
        return f"embedder.embedder.{'convolution' if kind == 'conv1' else 'normalization'}.{rest}"
    match = _TV_BLOCK.match(name)
    if match:
        layer, block, downsample, kind, index, rest = match.groups()
        prefix = f"encoder.stages.{int(layer) - 1}.layers.{block}"
        if downsample is not None:
            return f"{prefix}.shortcut.{'convolution' if downsample == '0' else 'normalization'}.{rest}"
        return (
            f"{prefix}.layer.{int(index) - 1}.{'convolution' if kind == 'conv' else 'normalization'}.{rest}"
        )
    return name


# ---------------------------------------------------------------------------------------------
# configs


def hf_config_to_ddetr(hf: dict[str, Any]) -> dict[str, Any]:
    """Translate a Hugging Face `config.json` (a dict) into DeformableDetrConfig fields.

    Raises ValueError (one line) for settings the official architecture does not have.
    """
    if hf.get("model_type") not in (None, "deformable_detr"):
        raise ValueError(f"config.json is for model_type {hf.get('model_type')!r}, not deformable_detr")

    def get(name: str, default: Any) -> Any:
        value = hf.get(name)
        return default if value is None else value

    problems = []
    if get("position_embedding_type", "sine") != "sine":
        problems.append(
            f"position_embedding_type {hf['position_embedding_type']!r} (only 'sine' exists officially)"
        )
    if get("activation_function", "relu") != "relu":
        problems.append(f"activation_function {hf['activation_function']!r} (the official model uses relu)")
    if get("encoder_attention_heads", 8) != get("decoder_attention_heads", 8):
        problems.append("different encoder and decoder attention heads (the official model has one nheads)")
    if get("encoder_ffn_dim", 1024) != get("decoder_ffn_dim", 1024):
        problems.append(
            "different encoder and decoder FFN sizes (the official model has one dim_feedforward)"
        )
    two_stage = bool(get("two_stage", False))
    num_feature_levels = int(get("num_feature_levels", 4))
    backbone, dilation, backbone_problem = _hf_backbone(hf, num_feature_levels)
    if backbone_problem:
        problems.append(backbone_problem)
    if problems:
        raise ValueError("unsupported Hugging Face config: " + "; ".join(problems))

    id2label = hf.get("id2label") or {}
    num_classes = int(hf.get("num_labels") or len(id2label) or 91)
    names = [str(id2label.get(str(i), id2label.get(i, ""))) for i in range(num_classes)]
    generic = all(re.fullmatch(r"LABEL_\d+", n) for n in names) or not all(names)
    return {
        "backbone": backbone,
        "dilation": dilation,
        "num_feature_levels": num_feature_levels,
        "hidden_dim": int(get("d_model", 256)),
        "nheads": int(get("encoder_attention_heads", 8)),
        "enc_layers": int(get("encoder_layers", 6)),
        "dec_layers": int(get("decoder_layers", 6)),
        "dim_feedforward": int(get("encoder_ffn_dim", 1024)),
        "dropout": float(get("dropout", 0.1)),
        "enc_n_points": int(get("encoder_n_points", 4)),
        "dec_n_points": int(get("decoder_n_points", 4)),
        "num_queries": int(get("two_stage_num_proposals", 300) if two_stage else get("num_queries", 300)),
        "num_classes": num_classes,
        "with_box_refine": bool(get("with_box_refine", False)),
        "two_stage": two_stage,
        "class_names": None if generic else names,
    }


def _hf_backbone(hf: dict[str, Any], num_feature_levels: int) -> tuple[str, bool, str | None]:
    """(torchvision ResNet name, dilation, problem or None) from a Hugging Face config."""
    sub = hf.get("backbone_config") or {}
    wanted = [2, 3, 4] if num_feature_levels > 1 else [4]
    if sub.get("model_type") == "resnet":
        depths = tuple(sub.get("depths") or (3, 4, 6, 3))
        bottleneck = (sub.get("layer_type") or "bottleneck") == "bottleneck"
        name = RESNET_LAYOUTS.get((depths, bottleneck))
        if name is None:
            return "", False, f"Hugging Face ResNet with depths {list(depths)} is not a torchvision ResNet"
        if (
            sub.get("hidden_sizes", _RESNET_WIDTHS[bottleneck]) != _RESNET_WIDTHS[bottleneck]
            or sub.get("embedding_size", 64) != 64
        ):
            return "", False, "Hugging Face ResNet with non-standard widths is not a torchvision ResNet"
        if sub.get("downsample_in_bottleneck") or sub.get("downsample_in_first_stage"):
            return "", False, "Hugging Face ResNet that strides in the 1x1 conv is not a torchvision ResNet"
        stages = sub.get("out_features") or ["stage4"]
        if stages != [f"stage{i}" for i in wanted]:
            return (
                "",
                False,
                f"backbone outputs {stages} (Deformable DETR uses {[f'stage{i}' for i in wanted]})",
            )
        return name, bool(hf.get("dilation")), None
    if sub and sub.get("model_type") not in (None, "timm_backbone"):
        return "", False, f"backbone model_type {sub.get('model_type')!r} (only ResNets are supported)"
    name = sub.get("backbone") or hf.get("backbone") or "resnet50"
    if name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        return "", False, f"backbone {name!r} (supported: resnet18, resnet34, resnet50, resnet101)"
    out_indices = sub.get("out_indices")
    if out_indices is not None and list(out_indices) != wanted:
        return "", False, f"backbone out_indices {list(out_indices)} (Deformable DETR uses {wanted})"
    dilation = bool(hf.get("dilation")) or sub.get("output_stride") == 16
    return name, dilation, None


def ddetr_config_to_hf(config: dict[str, Any], backbone_layout: str = "timm") -> dict[str, Any]:
    """A Hugging Face `config.json` (as a dict) for a DeformableDetrConfig given as `to_dict()`."""
    if config["backbone"] not in _RESNET_NAMES:
        raise ValueError(f"backbone {config['backbone']!r} has no Hugging Face equivalent")
    levels = config["num_feature_levels"]
    num_classes = config["num_classes"]
    names = config.get("class_names") or [f"LABEL_{i}" for i in range(num_classes)]
    wanted = [2, 3, 4] if levels > 1 else [4]
    if backbone_layout == "timm":
        backbone_config: dict[str, Any] = {
            "model_type": "timm_backbone",
            "backbone": config["backbone"],
            "num_channels": 3,
            "features_only": True,
            "use_pretrained_backbone": False,
            "out_indices": wanted,
        }
        if config["dilation"]:
            backbone_config["output_stride"] = 16
    elif backbone_layout == "hf":
        if config["dilation"]:
            raise ValueError("Hugging Face's ResNet backbone has no dilation; use backbone_layout='timm'")
        depths, bottleneck = next(k for k, v in RESNET_LAYOUTS.items() if v == config["backbone"])
        backbone_config = {
            "model_type": "resnet",
            "depths": list(depths),
            "layer_type": "bottleneck" if bottleneck else "basic",
            "hidden_sizes": _RESNET_WIDTHS[bottleneck],
            "embedding_size": 64,
            "out_features": [f"stage{i}" for i in wanted],
        }
    else:
        raise ValueError(f"backbone_layout must be 'timm' or 'hf', got {backbone_layout!r}")
    return {
        "model_type": "deformable_detr",
        "architectures": ["DeformableDetrForObjectDetection"],
        "backbone_config": backbone_config,
        "use_pretrained_backbone": False,
        "dilation": bool(config["dilation"]),
        "num_feature_levels": levels,
        "d_model": config["hidden_dim"],
        "encoder_layers": config["enc_layers"],
        "decoder_layers": config["dec_layers"],
        "encoder_ffn_dim": config["dim_feedforward"],
        "decoder_ffn_dim": config["dim_feedforward"],
        "encoder_attention_heads": config["nheads"],
        "decoder_attention_heads": config["nheads"],
        "encoder_n_points": config["enc_n_points"],
        "decoder_n_points": config["dec_n_points"],
        "num_queries": config["num_queries"],
        "two_stage_num_proposals": config["num_queries"],
        "with_box_refine": bool(config["with_box_refine"]),
        "two_stage": bool(config["two_stage"]),
        "dropout": config["dropout"],
        "position_embedding_type": "sine",
        "activation_function": "relu",
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }
