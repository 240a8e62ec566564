"""On CPU, tests/conftest.py has turned Triton's interpreter on before these modules import the kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """Triton's interpreter keeps bf16 as uint16 bits and its tl.dot multiplies those bits
    (triton-lang/triton#11584, not planned to be fixed). Widen bf16 operands to fp32 first, which
    is exact and what the GPU's bf16 MMA with fp32 accumulation computes."""
    if torch.cuda.is_available():
        return
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args))
