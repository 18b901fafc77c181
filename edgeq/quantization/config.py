"""What to quantize with: ``QuantConfig`` and the calibration-data protocol."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from ..errors import EdgeqError, InputError
from ..manifest import Preprocess, TensorSpec

METHODS = ("minmax", "percentile", "entropy")
ACTIVATION_DTYPES = ("int8",)
#: ``--quantize auto``'s accuracy budget: top-1 percentage points the int8 model may lose.
DEFAULT_MAX_ACCURACY_DROP = 1.0
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: One calibration sample: ``{input name: tensor}``, one tensor (single-input models) or a
#: sequence of tensors in the model's input order. A batch dimension may be left out.
Sample = Union[Mapping[str, np.ndarray], np.ndarray, Sequence[np.ndarray]]
#: Calibration data: anything iterable over samples (a list, a generator, a class with __iter__).
Calibration = Iterable[Sample]


@dataclass(frozen=True)
class QuantConfig:
    """How a float model is calibrated and quantized.

    Activations are int8 per tensor (asymmetric, or symmetric with zero point 0 when ``symmetric``);
    weights are int8 symmetric per output channel; biases int32 with scale s_input * s_weight.
    Layers in ``float_layers`` keep float weights and compute in float between a DEQUANTIZE and a
    QUANTIZE; ``max_accuracy_drop`` chooses them automatically (``quantize(..., evaluation=...)``).
    """

    method: str = "minmax"  # "minmax": observed range; "percentile": clip the histogram's tails;
    # "entropy": clip |x| where KL(float distribution || its int8 version) is smallest (TensorRT)
    samples: int = 100  # calibration samples used at most
    symmetric: bool = False  # symmetric activations (zero point 0)
    activation_dtype: str = "int8"
    percentile: float = 99.999  # "percentile": keep this share (%) of each tensor's values
    bins: int = 2048  # "percentile", "entropy": histogram bins per tensor
    float_layers: frozenset[str] = frozenset()  # op output tensor names written in float (see fallback.py)
    # Accuracy budget: percentage points of top-1 the int8 model may lose against the float model on
    # the evaluation set; above it, the most sensitive layers return to float one at a time. None: off.
    max_accuracy_drop: float | None = None
    min_float_layers: int = 0  # with a budget: keep at least this many layers float (experiments, tests)
    max_float_layers: int | None = None  # with a budget: give up after this many float layers

    def __post_init__(self) -> None:
        if isinstance(self.float_layers, str):
            raise EdgeqError("float_layers takes a collection of op output tensor names, not one string")
        object.__setattr__(self, "float_layers", frozenset(self.float_layers))
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise EdgeqError(f"the accuracy budget must be 0..100 percentage points, not {self.max_accuracy_drop}")
        if self.min_float_layers < 0 or (self.max_float_layers is not None and self.max_float_layers < self.min_float_layers):
            raise EdgeqError("need 0 <= min_float_layers <= max_float_layers")
        if self.method not in METHODS:
            raise EdgeqError(f"calibration method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise EdgeqError(f"activation dtype must be one of {ACTIVATION_DTYPES}, not {self.activation_dtype!r}")
        if self.samples < 1:
            raise EdgeqError(f"samples must be at least 1, not {self.samples}")
        if not 50.0 < self.percentile <= 100.0:
            raise EdgeqError(f"percentile must be in (50, 100], not {self.percentile}")
        if self.bins < 16:
            raise EdgeqError(f"bins must be at least 16, not {self.bins}")

    def samples_to_read(self, evaluation_given: bool) -> int:
        """Calibration samples quantize() reads: ``samples``, and a third more when an accuracy budget
        without an evaluation set holds every 4th sample out for evaluation."""
        if self.max_accuracy_drop is None or evaluation_given:
            return self.samples
        return self.samples + (self.samples + 2) // 3


def as_feeds(sample: Sample, inputs: Sequence[TensorSpec]) -> Iterator[list[np.ndarray]]:
    """One calibration sample as input lists for the model (split along the batch when larger)."""
    if isinstance(sample, Mapping):
        missing = [spec.name for spec in inputs if spec.name not in sample]
        if missing and len(sample) == len(inputs):
            arrays = list(sample.values())  # names differ (e.g. without ':0'): take them in order
        elif missing:
            raise InputError(f"calibration sample lacks inputs {missing}; it has {sorted(sample)}")
        else:
            arrays = [sample[spec.name] for spec in inputs]
    elif isinstance(sample, np.ndarray):
        arrays = [sample]
    else:
        arrays = list(sample)
    if len(arrays) != len(inputs):
        raise InputError(f"calibration sample has {len(arrays)} tensors; the model has {len(inputs)} inputs")
    shaped = []
    for array, spec in zip(arrays, inputs):
        array = np.asarray(array, dtype=spec.dtype)
        if array.ndim == len(spec.shape) - 1:
            array = array[None]
        if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]):
            raise InputError(f"calibration tensor for {spec.name} has shape {array.shape}; the model wants {spec.shape}")
        shaped.append(array)
    batch = shaped[0].shape[0]
    step = max(spec.shape[0] for spec in inputs) or 1
    for start in range(0, batch, step):
        yield [np.ascontiguousarray(a[start : start + step]) for a in shaped]


def picture_files(folder: str | os.PathLike[str], role: str = "calibration") -> list[Path]:
    """The picture files in ``folder`` (recursively), sorted by path; ``role`` names the folder in errors."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{role} folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)
    if not files:
        raise InputError(f"{role} folder {root} holds no pictures ({', '.join(PICTURE_SUFFIXES)})")
    return files


@dataclass(frozen=True)
class PictureCalibration:
    """A folder of pictures as calibration data, through a bundle's own pre-processing.

    Iterating yields ``{input name: tensor}`` made by ``edgeq.preprocess.picture_to_tensor`` with
    the model's input spec and ``preprocess`` (the same call a bundle's ``predict`` makes).
    """

    files: tuple[Path, ...]
    spec: TensorSpec
    preprocess: Preprocess

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        from ..preprocess import picture_to_tensor

        for path in self.files:
            yield {self.spec.name: picture_to_tensor(path, self.spec, self.preprocess)}

    def __len__(self) -> int:
        return len(self.files)


def picture_calibration(
    folder: str | os.PathLike[str],
    model: str | os.PathLike[str] | TensorSpec,
    preprocess: Preprocess | None = None,
    limit: int | None = None,
) -> PictureCalibration:
    """Calibration data from a folder of pictures for a single-picture-input model.

    ``model`` is the .tflite path (its first input's spec is used) or that spec; ``preprocess``
    defaults to what ``edgeq package`` would record for the model. ``limit`` keeps the first N files.
    """
    if isinstance(model, TensorSpec):
        spec = model
        if preprocess is None:
            raise EdgeqError("picture_calibration needs a Preprocess when given a TensorSpec")
    else:
        from ..packager import default_preprocess
        from ..tflite_model import read_tflite

        parsed = read_tflite(model)
        if len(parsed.inputs) != 1 or len(parsed.inputs[0].shape) != 4:
            raise InputError(f"{Path(model).name} is not a single-picture-input model; pass tensors instead")
        spec = parsed.inputs[0]
        preprocess = preprocess or default_preprocess(parsed)
    files = picture_files(folder)
    return PictureCalibration(tuple(files[:limit] if limit else files), spec, preprocess)
