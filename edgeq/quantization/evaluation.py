"""Evaluation sets for the accuracy budget: labelled (or unlabelled) pictures and top-1 accuracy.

A folder of pictures is read through the bundle's own pre-processing. Pictures in a sub-folder are
labelled by the sub-folder's name: a class index (``3/``) or a label name found in the model's
labels (``cat/``). Pictures directly in the folder are unlabelled: their accuracy is the top-1
agreement with the float model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from ..manifest import Preprocess, TensorSpec
from .config import picture_files


@dataclass(frozen=True)
class EvalSample:
    """One evaluation input and its class, when known."""

    inputs: dict[str, np.ndarray]  # model input name -> pre-processed tensor (batch 1)
    label: int | None  # class index, None when the folder is unlabelled


def _class_index(name: str, labels: Sequence[str], folder: Path) -> int:
    if name.isdigit():
        return int(name)
    lowered = [label.strip().lower() for label in labels]
    if name.strip().lower() in lowered:
        return lowered.index(name.strip().lower())
    known = f"the model's labels are {', '.join(labels[:8])}{'...' if len(labels) > 8 else ''}" if labels else (
        "the model has no labels (give them with --labels)")
    raise InputError(
        f"evaluation sub-folder {folder / name} is neither a class index nor a label name ({known}); "
        f"name sub-folders by class index or label, or put unlabelled pictures directly in {folder}"
    )


def labelled_pictures(
    folder: str | os.PathLike[str],
    input_spec: TensorSpec,
    preprocess: Preprocess,
    labels: Sequence[str] = (),
    limit: int | None = None,
) -> list[EvalSample]:
    """Pictures of FOLDER through the bundle's pre-processing. Labels come from sub-folder names
    (a class index, or a label name found in ``labels``); pictures directly in FOLDER are unlabelled.

    Pictures in deeper folders take the label of their top sub-folder. Files are read in sorted
    order; ``limit`` keeps the first N.

    Raises:
        InputError: the folder is missing, holds no pictures, a sub-folder name is not a class,
            or a picture cannot be read.
    """
    from ..preprocess import picture_to_tensor

    root = Path(folder)
    files = picture_files(root, role="evaluation")
    files = files[:limit] if limit else files
    samples = []
    for path in files:
        parts = path.relative_to(root).parts
        label = _class_index(parts[0], labels, root) if len(parts) > 1 else None
        samples.append(EvalSample({input_spec.name: picture_to_tensor(path, input_spec, preprocess)}, label))
    return samples


def top1_accuracy(
    predict: Callable[[dict[str, np.ndarray]], np.ndarray],
    samples: Sequence[EvalSample],
    reference_top1: Sequence[int] | None = None,
) -> float:
    """Percent of samples whose top-1 equals the label, or, for unlabelled samples, reference_top1 (the float model's).

    ``predict`` returns the model's (first) output for one sample's inputs: scores of shape
    (1, classes) or (classes,).
    """
    if not samples:
        raise InputError("the evaluation set is empty")
    if reference_top1 is not None and len(reference_top1) != len(samples):
        raise InputError(f"{len(reference_top1)} reference classes for {len(samples)} evaluation samples")
    hits = 0
    for number, sample in enumerate(samples):
        expected = sample.label
        if expected is None:
            if reference_top1 is None:
                raise InputError("unlabelled evaluation samples need the float model's top-1 (reference_top1)")
            expected = reference_top1[number]
        hits += int(top1(predict(sample.inputs)) == expected)
    return 100.0 * hits / len(samples)


def top1(scores: np.ndarray) -> int:
    """The index of the highest score of a single-sample output."""
    return int(np.asarray(scores).reshape(-1).argmax())


def metric_name(samples: Sequence[EvalSample]) -> str:
    """How ``top1_accuracy`` scores these samples, for reports."""
    labelled = sum(sample.label is not None for sample in samples)
    if labelled == len(samples):
        return f"top-1 accuracy on {len(samples)} labelled pictures"
    if labelled == 0:
        return f"top-1 agreement with the float model on {len(samples)} pictures"
    return (f"top-1 accuracy on {labelled} labelled pictures and agreement with the float model "
            f"on {len(samples) - labelled} unlabelled ones")
