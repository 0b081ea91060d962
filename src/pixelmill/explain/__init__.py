"""Explanations: where a model looked, as class activation maps (torch-free at import).

Two paths give the same heatmap for a network whose head is global average pooling followed
by one linear layer (pixelmill's CNNs, resnets, efficientnets and most timm classifiers):

- PyTorch (``explain/gradcam.py``): Grad-CAM (Captum's ``LayerGradCam``) on the last 4-D
  feature map, for any network; ``--layer`` picks another one.
- ONNX Runtime (``heatmaps.py``): the bundle's optional ``cam`` output, the class activation
  maps ``sum_k w[c, k] * F_k`` computed inside the graph from the final feature map and the
  classifier's weights. For such a head Grad-CAM's channel weights are ``w[c, k] / (h * w)``,
  so after the ReLU and the normalisation below both paths give the same map; export checks
  it on real images (``CAM_TOLERANCE``).

A heatmap is ``relu(map)`` upsampled bilinearly (half-pixel centres) to the model's input size
and divided by its maximum: values in [0, 1], all zero where the class has no positive evidence.
"""

from __future__ import annotations

CAM_OUTPUT = "cam"  # the bundle's second output: (N, classes, h, w) raw class activation maps
CAM_TOLERANCE = 1e-3  # export refuses a bundle whose normalised ONNX maps differ from PyTorch's by more
