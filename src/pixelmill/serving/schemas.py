"""Request and response bodies of the native API and of the Open Inference Protocol v2."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    error: str


class TopK(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    """One image's result, as ``pixelmill predict`` writes it, plus the file it came from."""

    file: str
    label: str
    confidence: float
    top_k: list[TopK]
    probabilities: dict[str, float]
    threshold: Optional[float] = Field(None, description="Binary models: the probability of positive_class at which label is positive_class.")
    positive_class: Optional[str] = None


class LabelSetImagePrediction(BaseModel):
    """One image's result from a multi-label model: the labels at or above their thresholds, and every probability."""

    file: str
    labels: list[str]
    label: str = Field(description="The most probable label (whether or not it reaches its threshold).")
    confidence: float
    top_k: list[TopK]
    probabilities: dict[str, float]
    thresholds: dict[str, float] = Field(description="The threshold applied to each label.")


class LabelSetPredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[LabelSetImagePrediction]


class RecordPrediction(BaseModel):
    """One record's result (tabular models): its index in ``records`` and the prediction."""

    record: int
    label: str
    confidence: float
    top_k: list[TopK]
    probabilities: dict[str, float]
    threshold: Optional[float] = Field(None, description="Binary models: the probability of positive_class at which label is positive_class.")
    positive_class: Optional[str] = None


class RecordsPredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[RecordPrediction]


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[ImagePrediction]


class PngHeatmap(BaseModel):
    """One explained class (``/explain?output=png``): its probability and its heatmap over the image."""

    label: str
    probability: float
    heatmap_png: str = Field(
        description="Base64 PNG at the model's input size: the heatmap in colour (red: most evidence for the class) over the image as the model saw it."
    )


class GridHeatmap(BaseModel):
    """One explained class (``/explain?output=grid``): its probability and its heatmap averaged down to a grid."""

    label: str
    probability: float
    grid: list[list[float]] = Field(description="cells x cells values in [0, 1], row by row from the top left; 1 is the heatmap's peak.")


Heatmap = Union[PngHeatmap, GridHeatmap]


class ImageExplanation(ImagePrediction):
    """One image's prediction, as ``/predict`` answers it, and the heatmap of each explained class."""

    explanations: list[Heatmap] = Field(description="The class asked for (?class=), else the predicted class.")


class LabelSetImageExplanation(LabelSetImagePrediction):
    """One image's multi-label prediction, as ``/predict`` answers it, and the heatmap of each explained label."""

    explanations: list[Heatmap] = Field(description="The class asked for (?class=), else each predicted label (the most probable one when none is).")


class ImageFailure(BaseModel):
    """An image of an ``/explain`` request that could not be read (the request's other images are answered)."""

    file: str
    error: str


class ExplainResponse(BaseModel):
    model: str
    version: str
    predictions: list[Union[ImageExplanation, ImageFailure]] = Field(description="One entry per image, in the request's order.")


class LabelSetExplainResponse(BaseModel):
    model: str
    version: str
    predictions: list[Union[LabelSetImageExplanation, ImageFailure]] = Field(description="One entry per image, in the request's order.")


class Base64Image(BaseModel):
    b64: str


class InstancesRequest(BaseModel):
    """``{"instances": ["<base64 image>", {"b64": "<base64 image>"}, ...]}``; data URLs are accepted too."""

    model_config = ConfigDict(extra="forbid")

    instances: list[Union[str, Base64Image]]


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelInfo(BaseModel):
    """``GET /model``: what is served and how to feed it."""

    name: str
    version: str
    model_name: Optional[str] = None
    classes: list[str]
    input: dict[str, Any]
    input_size: list[int] = Field(description="[height, width, channels] of one image after preprocessing.")
    output: dict[str, Any]
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, Any]
    sha256: Optional[str] = None
    kind: str = Field(description="The task that made the model (data.kind): image, tabular, ...")
    inputs: Optional[list[dict[str, Any]]] = Field(None, description="Tabular models: one named input per column.")
    table_schema: Optional[dict[str, Any]] = Field(
        None, serialization_alias="schema", description="Tabular models: the run's schema.json (columns, types, categories, classes)."
    )
    thresholds: Optional[dict[str, float]] = Field(None, description="Multi-label models: each label's decision threshold.")
    threshold: Optional[float] = Field(None, description="Binary models: the decision threshold on the probability of positive_class.")
    positive_class: Optional[str] = None
    explain: Optional[dict[str, Any]] = Field(
        None, description="Whether POST /explain answers for this model: bundle.json's explain block (available, and the reason when not)."
    )
    providers: list[str] = Field([], description="The ONNX Runtime execution providers the session runs on, in order.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str] = Field(description="The ONNX Runtime execution providers the session runs on, in order.")


class ReadyResponse(BaseModel):
    name: Optional[str] = None
    ready: bool


class LiveResponse(BaseModel):
    live: bool


class InferInput(BaseModel):
    """An input tensor: ``data`` inline (flat or nested, row-major), or ``parameters.binary_data_size`` bytes."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Optional[Any] = None


class InferRequestedOutput(BaseModel):
    """``parameters``: ``binary_data`` (bool) and ``classification`` (top-k count) are understood."""

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    """The JSON part of a v2 infer request (the binary tensor extension appends raw bytes after it)."""

    id: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InferInput]
    outputs: Optional[list[InferRequestedOutput]] = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: Optional[dict[str, Any]] = None
    data: Optional[list[Any]] = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: Optional[str] = None
    outputs: list[InferOutput]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, for ``openapi_extra`` request bodies."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)
