"""The preprocessing an image network dictates (timm's ``pretrained_cfg``), with the config's overrides."""

from __future__ import annotations

from typing import Any

from pixelmill.data.choices import INTERPOLATIONS
from pixelmill.data.preprocess import Preprocessing


def resolve_preprocessing(cfg: Any, net: Any) -> Preprocessing:
    """The model's preprocessing (timm ``pretrained_cfg`` style), with config overrides applied."""
    from pixelmill.models import model_data_config

    defaults = model_data_config(net, cfg.model.name)
    interpolation = cfg.data.interpolation or defaults.get("interpolation", "bilinear")
    return Preprocessing(
        channels=cfg.model.in_chans,
        size=int(cfg.data.image_size or defaults["input_size"][-1]),
        crop_pct=float(cfg.data.crop_pct or defaults.get("crop_pct", 1.0)),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",  # timm nets may name others (lanczos)
        mean=tuple(defaults["mean"]),
        std=tuple(defaults["std"]),
    )
