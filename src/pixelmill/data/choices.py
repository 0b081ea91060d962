"""The values the ``data.*`` choice keys accept (``data.kind`` aside: the registered tasks), one list each.

Import-free on purpose: the config schema (which must stay light, no torch) builds its
``CHOICES`` from these, and the modules that act on the values use the same lists, among
them torch-free ones the serving process imports (``preprocess.py``).
"""

from __future__ import annotations

LAYOUTS: tuple[str, ...] = ("auto", "split", "flat", "csv")  # data.layout: data/scan.py
SAMPLERS: tuple[str, ...] = ("shuffle", "balanced")  # data.sampler: data/datamodule.py
LEAKAGE: tuple[str, ...] = ("warn", "error")  # data.leakage: data/scan.py check_leakage
CACHE_MODES: tuple[str, ...] = ("none", "memory", "disk")  # data.cache: data/cache.py
# data.interpolation: data/preprocess.py maps them to PIL filters; torchvision's InterpolationMode
# has the same names as its values (InterpolationMode("bicubic")).
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")
AUTO_AUGMENTS: tuple[str, ...] = ("none", "randaugment", "trivialaugment", "autoaugment")  # data.augment.auto_augment: data/transforms.py
