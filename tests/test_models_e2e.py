"""Every shared TFLite model, packaged for x86_64 and run by the thin runtime, agrees with TFLite.

The reference is TFLite's reference kernels (see edgeq.reference). Quantized models must match
them bit for bit in >= 99.9% of output elements, never by more than one step, with the same
top-1; float models within 1e-4 relative error.
"""
from __future__ import annotations

import numpy as np
import pytest

import edgeq
from bundles import OUTPUT_KIND, PICTURES, PREPROCESS, output_difference, pictures_for
from conftest import shared_path
from edgeq.reference import ReferenceInterpreter


@pytest.fixture(scope="module", params=sorted(PICTURES))
def packaged(request, tmp_path_factory):
    name = request.param
    model = shared_path("models", "tflite", name)
    out = tmp_path_factory.mktemp("bundles") / f"{model.stem}.edgeq"
    options = edgeq.PackageOptions(device="x86_64", preprocess=PREPROCESS.get(name, {}))
    result = edgeq.package(model, out, options)
    return name, model, edgeq.load(result.path)


def test_raw_outputs_agree_with_reference(packaged):
    name, model, predictor = packaged
    reference = ReferenceInterpreter(model)
    pictures = pictures_for(name)
    assert pictures, f"no pictures for {name}"
    kind = OUTPUT_KIND[name]
    for picture in pictures:
        inputs = predictor.preprocess(picture)
        ours, theirs = predictor.run(inputs), reference.run(inputs)
        assert len(ours) == len(theirs)
        for got, want in zip(ours, theirs):
            assert got.shape == want.shape and got.dtype == want.dtype, picture.name
            diff = output_difference(kind, got, want)
            if kind == "float":
                assert diff.max() <= 1e-4, f"{picture.name}: relative error {diff.max():.2e}"
                continue
            steps = diff
            assert np.argmax(got) == np.argmax(want), f"{picture.name}: top-1 differs"
            assert steps.max() <= 1.0 + 1e-6, f"{picture.name}: {steps.max():.2f} steps apart"
            assert (steps < 1e-6).mean() >= 0.999, f"{picture.name}: only {np.mean(steps < 1e-6):.2%} identical"


def test_efficientnet_predicts_bull_mastiff(tmp_path):
    model = shared_path("models", "tflite", "efficientnet_lite0_uint8.tflite")
    result = edgeq.package(model, tmp_path / "eff.edgeq")
    top = edgeq.load(result.path).predict(shared_path("data", "imagenet-samples", "imagenet_00_243.jpg")).top
    assert (top.index, top.label) == (243, "bull mastiff")
