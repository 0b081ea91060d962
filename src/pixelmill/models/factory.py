"""One `create_model(name)` over pixelmill's own nets, timm and torchvision.

Names resolve in that order unless a prefix picks the source: `pixelmill:small_cnn`,
`timm:resnet18`, `tv:resnet18` (or `torchvision:resnet18`). Weights come from the hub
(`pretrained=True`, needs a network) or from a local file (`weights=PATH`, never unpickled).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import pickle
import re
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixelmill.data.choices import INTERPOLATIONS
from pixelmill.errors import ModelError
from pixelmill.models import nets
from pixelmill.models.names import split_prefix

__all__ = ["create_model", "enable_grad_checkpointing", "list_models", "load_weights", "model_data_config"]

log = logging.getLogger(__name__)

SOURCES = ("pixelmill", "timm", "torchvision")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PROBE_TIMEOUT_S = 3.0
_STATE_DICT_PREFIXES = ("", "model.", "net.", "module.", "model.module.")


# ----------------------------------------------------------------------------- names


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _tv_names() -> list[str]:
    import torchvision

    # classification models only (the top-level module), not detection/segmentation/video/quantized
    return torchvision.models.list_models(module=torchvision.models)


_NAME_LISTS: dict[str, Callable[[], list[str]]] = {
    "pixelmill": nets.list_nets,
    "timm": _timm_names,
    "torchvision": _tv_names,
}


def _is_timm(name: str) -> bool:
    import timm

    if not timm.is_model(name):
        return False
    try:  # 'resnet18.a1_in1k' is a model, 'resnet18.bogus' is not
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return False
    return True


def _is_tv(name: str) -> bool:
    return name in _tv_names()


_IS_MODEL: dict[str, Callable[[str], bool]] = {"pixelmill": nets.is_model, "timm": _is_timm, "torchvision": _is_tv}


def resolve_model_name(name: str) -> tuple[str, str]:
    """Map a user-facing model name to (source, bare name); ModelError listing close matches if unknown."""
    source, bare = split_prefix(name.strip())
    for src in [source] if source else SOURCES:
        if _IS_MODEL[src](bare):
            return src, bare
    candidates = sorted({n for src in ([source] if source else SOURCES) for n in _NAME_LISTS[src]()})
    lowered = {n.lower(): n for n in candidates}
    close = [lowered[n] for n in difflib.get_close_matches(bare.lower(), list(lowered), n=5, cutoff=0.6)]
    hint = f"close matches: {', '.join(close)}" if close else "no close matches"
    raise ModelError(f"unknown model '{name}'; {hint} (run 'pixelmill models PATTERN' to list)")


def list_models(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, source) of every known model, own nets first, then timm, then torchvision, each sorted.

    `pattern` is an fnmatch pattern ("resnet*"), matched case-insensitively; a pattern without
    wildcards matches as a substring. A source prefix ("tv:resnet*") limits the listing to it.
    """
    sources: tuple[str, ...] = SOURCES
    if pattern:
        source, pattern = split_prefix(pattern)
        sources = (source,) if source else SOURCES
        pattern = pattern.lower()
        if not any(c in pattern for c in "*?["):
            pattern = f"*{pattern}*"
    out = []
    for src in sources:
        names = sorted(_NAME_LISTS[src]())
        out += [(n, src) for n in names if not pattern or fnmatch.fnmatchcase(n.lower(), pattern)]
    return out


# ----------------------------------------------------------------------------- create


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    in_chans: int = 3,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    freeze_backbone: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier network by name with `num_classes` outputs and `in_chans` input channels.

    `pretrained=True` downloads hub weights (ModelError when offline); `weights=PATH` loads a
    local .safetensors / state-dict file instead (head keys whose shapes differ are skipped).
    `freeze_backbone=True` leaves only the classifier head trainable. `drop_path_rate` (stochastic
    depth) is timm's option; other sources refuse it. Extra `kwargs` go to pixelmill's own nets
    (e.g. `in_features`, `hidden_sizes`, `activation` for `mlp`).
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ModelError(f"in_chans must be >= 1, got {in_chans}")
    source, bare = resolve_model_name(name)
    if weights is not None and pretrained:
        log.info("model.weights is set; loading %s instead of downloading pretrained weights", weights)
        pretrained = False
    if kwargs and source != "pixelmill":
        raise ModelError(f"model options {', '.join(sorted(kwargs))} apply to pixelmill's own nets only, not {source} '{bare}'")
    if drop_path_rate is not None:
        if source != "timm":  # pixelmill's nets have no residual blocks to skip; torchvision names it per model
            raise ModelError(f"model.drop_path_rate applies to timm models (stochastic depth), not {source} '{bare}'; leave it unset")
        kwargs["drop_path_rate"] = drop_path_rate
    model = _BUILDERS[source](bare, num_classes, pretrained, in_chans, drop_rate, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    if freeze_backbone:
        _freeze_backbone(model)
    return model


def _create_own(
    name: str, num_classes: int, pretrained: bool, in_chans: int, drop_rate: float | None, **options: Any
) -> nn.Module:
    if pretrained:
        raise ModelError(
            f"pixelmill net '{name}' has no pretrained weights; "
            "set model.weights=PATH to a local file, or model.pretrained=false"
        )
    kwargs: dict[str, Any] = {} if drop_rate is None else {"drop_rate": drop_rate}
    return nets.model_entrypoint(name)(num_classes=num_classes, in_chans=in_chans, **kwargs, **options)


def _create_timm(
    name: str, num_classes: int, pretrained: bool, in_chans: int, drop_rate: float | None, **options: Any
) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, **options)
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.has_weights:
        raise _no_weights(name)
    cached = _timm_cached_file(cfg)
    if cached is not None:
        # load from the local cache directly so an offline machine does not wait on hub retries
        kwargs["pretrained_cfg_overlay"] = {"file": cached, "custom_load": cfg.custom_load}
    else:
        _require_network(name, _hf_endpoint() if cfg.hf_hub_id else cfg.url)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any hub/IO failure becomes one actionable line
        raise _download_error(name, e) from e


def _create_tv(name: str, num_classes: int, pretrained: bool, in_chans: int, drop_rate: float | None) -> nn.Module:
    import torchvision

    if pretrained:
        try:
            url = torchvision.models.get_model_weights(name).DEFAULT.url
        except (ValueError, AttributeError, KeyError) as e:
            raise _no_weights(name) from e
        if not (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)).is_file():
            _require_network(name, url)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except Exception as e:  # noqa: BLE001
        if pretrained:
            raise _download_error(name, e) from e
        raise
    _tv_replace_head(model, name, num_classes, drop_rate)
    if in_chans != 3:
        _tv_adapt_first_conv(model, in_chans)
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "pixelmill": _create_own,
    "timm": _create_timm,
    "torchvision": _create_tv,
}


# ----------------------------------------------------------------------------- pretrained downloads


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _timm_cached_file(cfg: Any) -> str | None:
    """Path of already-downloaded weights for a timm pretrained cfg, or None."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            hit = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def _offline_reason(url: str) -> str | None:
    """Why `url`'s host cannot be reached (None if a TCP connection opens within a few seconds)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    parts = urllib.parse.urlparse(url)
    host, port = parts.hostname or "", parts.port or 443
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlparse(proxy)
        host, port = proxy_parts.hostname or host, proxy_parts.port or 80
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot reach {host}: {e.strerror or e}")

    # a thread bounds DNS resolution too, which socket timeouts do not cover
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S + 1.0)
    return result[0] if result else f"cannot reach {host}: timed out"


def _require_network(name: str, url: str) -> None:
    reason = _offline_reason(url)
    if reason:
        raise _download_error(name, reason)


def _download_error(name: str, reason: object) -> ModelError:
    short = str(reason).strip().splitlines()[0][:200] if str(reason).strip() else type(reason).__name__
    return ModelError(
        f"could not download pretrained weights for '{name}' (offline?): {short}; "
        "set model.weights=PATH to a local .safetensors or state-dict file, or model.pretrained=false"
    )


def _no_weights(name: str) -> ModelError:
    return ModelError(f"model '{name}' has no pretrained weights; set model.pretrained=false or model.weights=PATH")


# ----------------------------------------------------------------------------- torchvision surgery


def _tv_head(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, layer) of a torchvision model's final Linear (or 1x1 Conv for SqueezeNet)."""
    for attr in ("fc", "classifier", "heads", "head"):
        module = getattr(model, attr, None)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return model, attr, module
        if isinstance(module, nn.Sequential):
            for child_name, child in reversed(list(module.named_children())):
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    return module, child_name, child
    raise ModelError(f"cannot find the classifier head of {type(model).__name__}; pick another model")


def _tv_replace_head(model: nn.Module, name: str, num_classes: int, drop_rate: float | None) -> None:
    parent, attr, old = _tv_head(model)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:  # SqueezeNet's 1x1 conv classifier
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    setattr(parent, attr, new)
    # Inception v3 / GoogLeNet auxiliary classifiers (used in training mode) need the same classes
    for aux_name, fc_name in (("AuxLogits", "fc"), ("aux1", "fc2"), ("aux2", "fc2")):
        aux_fc = getattr(getattr(model, aux_name, None), fc_name, None)
        if isinstance(aux_fc, nn.Linear):
            setattr(getattr(model, aux_name), fc_name, nn.Linear(aux_fc.in_features, num_classes))
    if drop_rate is not None:
        dropouts = [m for m in getattr(model, "classifier", nn.Identity()).modules() if isinstance(m, nn.Dropout)]
        for m in dropouts:
            m.p = drop_rate
        if not dropouts:
            log.warning("drop_rate ignored: torchvision model '%s' has no dropout in its head", name)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name, module
    return None


def _tv_adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    from timm.models import adapt_input_conv

    found = _first_conv(model)
    if found is None:
        raise ModelError(f"cannot adapt {type(model).__name__} to in_chans={in_chans}; use in_chans=3")
    path, old = found
    new = nn.Conv2d(
        in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
        old.dilation, old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        # keep pretrained filters: sum RGB for 1 channel, repeat and rescale otherwise
        new.weight.copy_(adapt_input_conv(in_chans, old.weight.detach()))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)
    if getattr(model, "transform_input", False):  # Inception/GoogLeNet re-normalise 3 RGB channels
        model.transform_input = False


# ----------------------------------------------------------------------------- heads and freezing


def _classifier(model: nn.Module) -> list[nn.Module]:
    """The head layer(s) that stay trainable when the backbone is frozen."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        return list(head) if isinstance(head, (tuple, list)) else [head]
    return [_tv_head(model)[2]]


def _freeze_backbone(model: nn.Module) -> None:
    model.requires_grad_(False)
    for head in _classifier(model):
        head.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"{type(model).__name__} has no trainable head; use model.freeze_backbone=false")


# ----------------------------------------------------------------------------- gradient checkpointing


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """Recompute activations in the backward pass (timm's ``set_grad_checkpointing``); ModelError where the model lacks it."""
    setter = getattr(model, "set_grad_checkpointing", None)
    refused = f"model '{name}' does not support gradient checkpointing (timm models with set_grad_checkpointing do); set model.grad_checkpointing=false"
    if setter is None:
        raise ModelError(refused)
    try:
        setter(True)
    except (AssertionError, NotImplementedError):  # timm's way of saying "not for this architecture"
        raise ModelError(refused) from None


# ----------------------------------------------------------------------------- local weights


def _read_weight_file(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"weights file not found: '{path}'; set model.weights to an existing file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot read '{path}' as safetensors: {_first_line(e)}") from e
    try:
        # weights_only: tensors and plain containers only; a pickle payload never runs
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(f"refusing to load '{path}': not a plain tensor file ({_unpickler_reason(e)})") from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file at all, ...
        raise ModelError(f"cannot read weights from '{path}': {_first_line(e)}") from e


def _unpickler_reason(e: BaseException) -> str:
    """The useful part of torch's long weights_only error, e.g. 'Unsupported global: GLOBAL io.open ...'."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(e), flags=re.DOTALL)
    return found.group(1).strip()[:200] if found else _first_line(e)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Plain state dict, Lightning checkpoint ({'state_dict': ...}) or {'model': ...} -> tensors by key."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ModelError(f"'{path}' holds no state dict (expected tensors by name, 'state_dict' or 'model')")
    return tensors


def _strip_prefix(state: dict[str, torch.Tensor], own_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop the wrapper prefix ('model.', 'net.', 'module.') that matches the most model keys."""

    def hits(prefix: str) -> int:
        return sum(k.startswith(prefix) and k[len(prefix):] in own_keys for k in state)

    best = max(_STATE_DICT_PREFIXES, key=hits)
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def _preview(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    """Load a local .safetensors / torch state-dict file into `model` (in place, returned).

    Keys whose shapes differ (e.g. a head for another number of classes) are skipped with a
    warning; ModelError if the file is missing, unsafe, unreadable or matches no key at all.
    """
    path = Path(weights).expanduser()
    own = model.state_dict()
    state = _strip_prefix(_unwrap_state_dict(_read_weight_file(path), path), set(own))
    matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not matched:
        raise ModelError(
            f"no weight in '{path}' fits {type(model).__name__} (file keys: {_preview(sorted(state))}); "
            "is it a checkpoint of the same model.name?"
        )
    mismatched = sorted(k for k in state if k in own and k not in matched)
    if mismatched:
        log.warning(
            "skipped %d weight(s) from '%s' whose shapes differ (trained from scratch): %s",
            len(mismatched), path, _preview(mismatched),
        )
    missing = sorted(k for k in own if k not in matched and k not in mismatched)
    if missing:
        log.warning("%d weight(s) not in '%s' (left as initialised): %s", len(missing), path, _preview(missing))
    model.load_state_dict(matched, strict=False)
    log.info("loaded %d/%d weights from '%s'", len(matched), len(own), path)
    return model


# ----------------------------------------------------------------------------- preprocessing config


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    mean = sum(values) / len(values)
    return (mean,) * channels  # grayscale (or other counts): average the RGB statistics


def _input_channels(model: nn.Module, default: int) -> int:
    found = _first_conv(model)
    return found[1].in_channels if found else default


def _own_data_config(model: nn.Module, name: str) -> dict[str, Any]:
    cfg = getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict):
        raise ModelError(f"pixelmill net '{name}' has no default_cfg")
    return dict(cfg)


def _timm_data_config(model: nn.Module, name: str) -> dict[str, Any]:
    from timm.data import resolve_data_config

    return resolve_data_config(model=model)


def _tv_data_config(model: nn.Module, name: str) -> dict[str, Any]:
    import torchvision

    cfg: dict[str, Any] = dict(
        input_size=(3, 224, 224), mean=_IMAGENET_MEAN, std=_IMAGENET_STD, interpolation="bilinear", crop_pct=0.875
    )
    try:
        tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except Exception:  # noqa: BLE001 - models without published weights keep the ImageNet defaults
        return cfg
    crop, resize = tf.crop_size[0], tf.resize_size[0]
    cfg.update(
        input_size=(3, crop, crop), mean=tuple(tf.mean), std=tuple(tf.std),
        interpolation=tf.interpolation.value, crop_pct=crop / resize,
    )
    return cfg


_DATA_CONFIGS: dict[str, Callable[[nn.Module, str], dict[str, Any]]] = {
    "pixelmill": _own_data_config,
    "timm": _timm_data_config,
    "torchvision": _tv_data_config,
}


def model_data_config(model: nn.Module, name: str) -> dict[str, Any]:
    """Preprocessing the model expects: input_size (C, H, W), mean, std, interpolation, crop_pct.

    mean/std have one value per input channel of `model` (RGB statistics averaged for grayscale).
    """
    source, bare = resolve_model_name(name)
    cfg = _DATA_CONFIGS[source](model, bare)
    _, height, width = cfg["input_size"]
    channels = _input_channels(model, default=cfg["input_size"][0])
    interpolation = str(cfg.get("interpolation", "bilinear"))
    return {
        "input_size": (channels, int(height), int(width)),
        "mean": _per_channel(cfg["mean"], channels),
        "std": _per_channel(cfg["std"], channels),
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
    }
