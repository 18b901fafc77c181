"""Device side: ``load(bundle)`` verifies a bundle and returns a Predictor that runs it.

Imports only numpy, Pillow, cffi and edgeq's own device modules - never tvm.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import Bundle, read_bundle
from .compat import check_runs_here
from .detection import Detections, detect, generate_anchors
from .errors import GpuUnavailableError, InputError, RuntimeFailure
from .manifest import Manifest, TargetInfo
from .postprocess import Classification, classify
from .preprocess import ImageLike, InputMapping, picture_to_tensor_mapped
from .runtime import RelaxVM, TVMError, load_runtime

RUNTIME_DIR = "runtime"
# The user's own TVM_NUM_THREADS (edgeq sets the variable itself when it loads a bundle).
_USER_TVM_NUM_THREADS = os.environ.get("TVM_NUM_THREADS", "")
DETECTION_KINDS = ("ssd_anchors", "detection_postprocess")


class Predictor:
    """A loaded bundle: raw tensor runs, picture predictions and timing."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None, gpu: int | None = None) -> None:
        self.manifest: Manifest = bundle.manifest
        self.path = bundle.path
        self._anchors: np.ndarray | None = None
        check_runs_here(self.manifest)
        self.gpu_name: str | None = None  # the GPU a GPU bundle runs on
        gpu_index = self._pick_gpu(gpu) if self.manifest.gpu is not None else None
        self.num_threads = _thread_count(num_threads, self.manifest.target)
        # TVM sizes its worker pool from TVM_NUM_THREADS when the pool first starts (by default
        # it would use half the cores on x86); later loads can only lower the count.
        os.environ["TVM_NUM_THREADS"] = str(self.num_threads)
        workdir = Path(tempfile.mkdtemp(prefix="edgeq-"))
        try:
            bundle.extract(workdir)
            try:
                runtime = load_runtime(workdir / RUNTIME_DIR, self.manifest.runtime.sha256)
                if gpu_index is None:
                    self._vm = RelaxVM(runtime, workdir / self.manifest.library)
                else:
                    self._vm = self._load_on_gpu(runtime, workdir, gpu_index)
            except (TVMError, OSError, RuntimeError) as error:
                raise RuntimeFailure(f"cannot load {self.path}: {error}") from None
        finally:
            # The libraries stay mapped after dlopen; the files are no longer needed.
            shutil.rmtree(workdir, ignore_errors=True)
        self._vm.set_num_threads(self.num_threads)

    # -- GPU bundles -------------------------------------------------------------------------
    def _pick_gpu(self, requested: int | None) -> int:
        """The index of the GPU to run on, after checking driver and chip; never the CPU."""
        from .runtime.cuda import CudaUnavailable, pick_device, probe_driver

        info = self.manifest.gpu
        try:
            device = pick_device(probe_driver(), info.arch, requested)
        except CudaUnavailable as error:
            raise GpuUnavailableError(
                f"cannot run {self.path} (compiled for an NVIDIA GPU, {info.arch}): {error}"
            ) from None
        self.gpu_name = f"{device.name} ({device.arch})"
        return device.index

    def _load_on_gpu(self, runtime, workdir: Path, index: int) -> RelaxVM:
        from .runtime import abi
        from .runtime.cuda import CudaUnavailable, enable_cuda

        kernels = {key: (workdir / member).read_bytes() for key, member in self.manifest.gpu.kernels.items()}
        try:
            enable_cuda(runtime, workdir / RUNTIME_DIR, kernels)
        except CudaUnavailable as error:
            raise GpuUnavailableError(f"cannot run {self.path} on the GPU: {error}") from None
        return RelaxVM(runtime, workdir / self.manifest.library, device_type=abi.DEVICE_CUDA, device_id=index)

    # -- raw tensors -------------------------------------------------------------------------
    def run(self, tensors: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run raw input tensors exactly as the source model takes them; returns raw outputs."""
        if isinstance(tensors, np.ndarray):
            tensors = [tensors]
        specs = self.manifest.inputs
        if len(tensors) != len(specs):
            raise InputError(f"the model takes {len(specs)} input(s), got {len(tensors)}")
        arrays = []
        for tensor, spec in zip(tensors, specs):
            array = np.asarray(tensor)
            if tuple(array.shape) != spec.shape or array.dtype != np.dtype(spec.dtype):
                raise InputError(
                    f"input {spec.name!r} must be {spec.dtype}{list(spec.shape)}, "
                    f"got {array.dtype}{list(array.shape)}"
                )
            arrays.append(array)
        try:
            outputs = self._vm.run(arrays)
        except TVMError as error:
            raise RuntimeFailure(f"the model failed while running: {error}") from None
        return [self._as_declared(out, spec) for out, spec in zip(outputs, self.manifest.outputs)]

    @staticmethod
    def _as_declared(output: np.ndarray, spec) -> np.ndarray:
        if output.size != int(np.prod(spec.shape)) or output.dtype != np.dtype(spec.dtype):
            raise RuntimeFailure(
                f"output {spec.name!r} came back as {output.dtype}{list(output.shape)}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
        return output.reshape(spec.shape)

    # -- pictures ----------------------------------------------------------------------------
    def preprocess(self, image: ImageLike) -> list[np.ndarray]:
        """The input tensors for one picture, as the manifest's pre-processing makes them."""
        return self._preprocess_mapped(image)[0]

    def _preprocess_mapped(self, image: ImageLike) -> tuple[list[np.ndarray], InputMapping]:
        if len(self.manifest.inputs) != 1:
            raise InputError("predict() handles single-input models; use run() with tensors")
        tensor, mapping = picture_to_tensor_mapped(image, self.manifest.inputs[0], self.manifest.preprocess)
        return [tensor], mapping

    def predict(self, image: ImageLike, top_k: int | None = None) -> Classification | Detections:
        """Classify one picture, or detect objects in it (path, bytes, PIL image or HxWxC uint8 array).

        Classifiers give a Classification (top-k classes); detectors give Detections in the
        original picture's pixel coordinates (at most ``top_k`` of them when given).
        """
        tensors, mapping = self._preprocess_mapped(image)
        outputs = self.run(tensors)
        post = self.manifest.postprocess
        if post.kind in DETECTION_KINDS:
            if self._anchors is None and post.kind == "ssd_anchors" and post.anchors is not None:
                self._anchors = generate_anchors(post.anchors)
            result = detect(outputs, self.manifest.outputs, post, self.manifest.labels,
                            mapping.normalized_to_original, mapping.image_size, self._anchors)
            return Detections(result.detections[:top_k], result.image_size) if top_k else result
        if post.kind != "classification":
            raise InputError(f"this bundle's post-processing is {post.kind!r}; use run() for raw outputs")
        return classify(outputs, self.manifest.outputs, post, self.manifest.labels, top_k)

    def benchmark(self, repeat: int = 50, warmup: int = 5) -> list[float]:
        """Latencies in seconds of ``repeat`` runs on zero inputs, after ``warmup`` runs."""
        inputs = [np.zeros(s.shape, s.dtype) for s in self.manifest.inputs]
        for _ in range(warmup):
            self._vm.run(inputs)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self._vm.run(inputs)
            times.append(time.perf_counter() - start)
        return times


def _thread_count(requested: int | None, target: TargetInfo) -> int:
    """Threads to run with: the caller's choice, else TVM_NUM_THREADS, else the machine's cores
    (at most the device's)."""
    if requested is not None:
        if requested < 1:
            raise InputError(f"num_threads must be at least 1, got {requested}")
        return int(requested)
    from_env = _USER_TVM_NUM_THREADS
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(available or 1, target.num_cores or available or 1)


def load(bundle: str | os.PathLike[str], num_threads: int | None = None, gpu: int | None = None) -> Predictor:
    """Verify ``bundle`` (checksums, format, architecture) and load it for this machine.

    GPU bundles run on the first NVIDIA GPU that can run their kernels, or on GPU ``gpu``;
    without one they raise GpuUnavailableError (they never fall back to the CPU).
    """
    return Predictor(read_bundle(bundle), num_threads=num_threads, gpu=gpu)
