"""Float multiplies and adds stay apart (no FMA), so float bundles give the same bits on every CPU."""
from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te  # noqa: E402

from edgeq.schedules.float_exact import SeparateFloatMultiplyAdd, separate_multiply_add  # noqa: E402

FUSED = re.compile(r"\b(fmla|fmls|fmadd|fmsub|fnmadd|fnmsub|vfmadd\w*|vfmsub\w*|vfnmadd\w*)\b")
TARGETS = {
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"},
    "x86_64-fma": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
}


def _multiply_add():
    """d = a * b + c - a * c: two products an LLVM backend with FMA would fuse."""
    n = 64
    a, b, c = (te.placeholder((n,), name=x) for x in "abc")
    d = te.compute((n,), lambda i: a[i] * b[i] + c[i] - a[i] * c[i], name="d")
    return te.create_prim_func([a, b, c, d])


def _assembly(func, target: dict) -> str:
    return tvm.compile(func, target=tvm.target.Target(target)).mod.inspect_source("asm")


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_products_are_not_fused_into_fma(arch):
    func = _multiply_add()
    assert FUSED.search(_assembly(func, TARGETS[arch])), "the check must see LLVM fuse the unfenced code"
    assert not FUSED.search(_assembly(separate_multiply_add(func), TARGETS[arch]))


def test_fenced_function_computes_the_same_values():
    func = _multiply_add()
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(64).astype("float32") for _ in range(3))
    outputs = []
    for f in (func, separate_multiply_add(func)):
        lib = tvm.compile(f, target="llvm")
        d = tvm.runtime.tensor(np.zeros(64, "float32"))
        lib(*(tvm.runtime.tensor(x) for x in (a, b, c)), d)
        outputs.append(d.numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[1], (a * b + c) - (a * c))  # two roundings per product, as numpy


def test_integer_arithmetic_is_left_alone():
    n = 16
    a, b = te.placeholder((n,), "int32", name="a"), te.placeholder((n,), "int32", name="b")
    func = te.create_prim_func([a, b, te.compute((n,), lambda i: a[i] * b[i] + b[i], name="c")])
    mod = SeparateFloatMultiplyAdd()(tvm.IRModule({"main": func}))
    tvm.ir.assert_structural_equal(mod["main"], func)
