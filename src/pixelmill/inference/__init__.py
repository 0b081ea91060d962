"""Torch-free inference: ONNX Runtime sessions over bundles, and the ``Predictor`` facade.

Nothing in this package imports PyTorch at import time (an import-linter contract checks
it); ``Predictor.load(RUN_DIR)`` loads PyTorch only when asked to run a checkpoint.
"""

from pixelmill.inference.providers import choose_providers, parse_providers
from pixelmill.inference.session import Prediction, array_to_image, open_onnx_file, open_session, prepare_image, to_predictions

__all__ = ["Prediction", "array_to_image", "choose_providers", "open_onnx_file", "open_session", "parse_providers", "prepare_image", "to_predictions"]
