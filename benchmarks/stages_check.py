"""Does the 2-stage pipelined backward kernel fault at few tokens per program? Run each case in its
own process with CUDA_LAUNCH_BLOCKING=1 (a fault poisons the process):

    python benchmarks/stages_check.py M STAGES
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robuq.kernels import quant_ops  # noqa: E402
from robuq.kernels.quant_ops import rotate_quantize_backward  # noqa: E402
from robuq.kernels.rotation import rotation_layout  # noqa: E402

m, stages = int(sys.argv[1]), int(sys.argv[2])
quant_ops.NUM_STAGES["backward"] = stages
lay = rotation_layout(1152, "kronecker", None)
x = torch.randn(m, 1152, device="cuda", dtype=torch.bfloat16)
dy = torch.randn_like(x)
ref = None
for s in (1, stages):
    quant_ops.NUM_STAGES["backward"] = s
    dx, ga = rotate_quantize_backward(x, dy, torch.ones(1152, device="cuda"), lay, torch.full((1,), 0.5, device="cuda"),
                                      2, True, 1)
    torch.cuda.synchronize()
    ref = (dx, ga) if ref is None else ref
print(f"M={m} stages={stages}: ok, equal to 1 stage: {torch.equal(dx, ref[0]) and torch.equal(ga, ref[1])}")
