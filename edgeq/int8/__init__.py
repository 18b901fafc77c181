"""Integer ("real int8") import of quantized TFLite models into Relax, bit-exact with TFLite's reference kernels.

    from edgeq.int8 import import_integer
    mod, report = import_integer("model.tflite")   # main(inputs...) -> tuple of outputs
    print(report.summary())
"""
from .converter import LOWERINGS, import_integer
from .report import IntegerReport

__all__ = ["import_integer", "IntegerReport", "LOWERINGS"]
