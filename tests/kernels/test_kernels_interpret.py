"""The Triton kernels' arithmetic, checked on CPU through Triton's interpreter (in a subprocess,
since TRITON_INTERPRET must be set before triton is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


# Two groups of about equal time (~100 and ~80 s on CI's 2 cores), run at once: the interpreter
# holds one core each.
GROUPS = [
    ["check_compiled_fused_path", "check_qat", "check_gemm_input_in_backward", "check_fused_qkv", "check_fused_gelu",
     "check_layouts", "check_bad_shapes"],
    ["check_qat_fused_norms", "check_fused_norm", "check_packed_gemm", "check_ternary", "check_gated_residual"],
]


def test_groups_hold_every_check():
    source = Path(__file__).with_name("interpret_checks.py").read_text()
    defined = {line[4:line.index("(")] for line in source.splitlines() if line.startswith("def check_")}
    assert sorted(sum(GROUPS, [])) == sorted(defined)


def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = str(Path(__file__).with_name("interpret_checks.py"))
    runs = [subprocess.Popen([sys.executable, script, *group], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for group in GROUPS]
    outputs = [p.communicate(timeout=900) for p in runs]  # both finish before either is judged
    for group, p, (out, err) in zip(GROUPS, runs, outputs):
        assert p.returncode == 0 and out.strip().endswith("OK"), f"{group}:\n" + out[-3000:] + err[-3000:]
