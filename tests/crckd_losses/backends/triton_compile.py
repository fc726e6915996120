"""Compiles the Triton kernels of ``backend="triton"`` ahead of time for NVIDIA GPUs, with no GPU:
Triton's own compiler and ``ptxas`` turn them into machine code for each target, so a kernel
that the GPU backend rejects (a type it cannot lower, an operation it lacks) fails here, on
any machine with Triton, and each kernel's registers and local memory (spills) are read from
its machine code with the ``cuobjdump`` that Triton ships. Run by
``tests/crckd_losses/backends/test_triton.py`` in a process of its own (with a fresh cache);
prints one JSON line.

    python tests/crckd_losses/backends/triton_compile.py 75 80 90 100 120
"""

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from crckd_losses.backends import triton_kernels as kernels

ROWS = {"memory_t": "*fp32", "memory_s": "*fp32", "index": "*i64"}
SIZES = {"batch": "i32", "width": "i32", "dim": "i32"}


def variants():
    """``(name, kernel, signature, constants)`` of every specialisation the library launches
    (each score dtype, each pair of needed gradients), at the paper's d = 128 and at d = 1024."""
    for block_j, block_d in ((32, 128), (4, 1024)):
        for rnd, anchor in ((0, "*fp32"), (1, "*bf16"), (2, "*fp16")):
            yield (f"scores ROUND={rnd} d={block_d}", kernels.scores,
                   {"anchor_s": anchor, "anchor_t": anchor, **ROWS, "raw": "*fp32", **SIZES,
                    "stride_anchor": "i32", "stride_memory": "i32"},
                   {"ROUND": rnd, "BLOCK_J": block_j, "BLOCK_D": block_d})
        for need in ((True, True), (True, False), (False, True)):
            yield (f"grad NEED={need} d={block_d}", kernels.grad,
                   {"factor": "*fp32", **ROWS, "coef": "*fp32", "partial": "*fp32", **SIZES,
                    "chunk": "i32", "stride_memory": "i32", "coef_k": "i32", "coef_b": "i32",
                    "coef_scale": "fp32"},
                   {"NEED_S": need[0], "NEED_T": need[1], "BLOCK_J": block_j,
                    "BLOCK_D": block_d})
    yield ("nce", kernels.nce,
           {"raw": "*fp32", "bias": "*fp32", "rows_out": "*fp32", "batch": "i32", "width": "i32",
            "num_positives": "i32", "scale": "fp32", "inv_positives": "fp32"}, {"BLOCK": 1024})


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


def resources(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``LOCAL``... of a kernel's machine code (``cuobjdump -res-usage``);
    empty where Triton ships no ``cuobjdump``."""
    if not os.path.exists(CUOBJDUMP):
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", usage)
            if key in ("REG", "STACK", "SHARED", "LOCAL")}


def main(capabilities: list[int]) -> None:
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        print(json.dumps({"skip": f"Triton {triton.__version__}'s ASTSource takes no constexprs "
                                  f"(the ahead-of-time API this check uses)"}))
        return
    report = {}
    for capability in capabilities:
        target = GPUTarget("cuda", capability, 32)
        for name, fn, signature, constants in variants():
            # In the kernel's parameter order: Triton 3.3 and older match types by position.
            signature = {arg: "constexpr" if arg in constants else signature[arg]
                         for arg in fn.arg_names}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature,
                                                constexprs=constants), target=target)
            report[f"sm_{capability} {name}"] = resources(compiled.asm["cubin"])
    print(json.dumps(report))


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]])
