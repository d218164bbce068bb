"""Two CPU processes with Lightning DDP (gloo): distinct data per rank, identical quantizer steps and EMA."""

import json
import subprocess
import sys
from pathlib import Path


def test_two_process_ddp_keeps_ranks_consistent(tmp_path, tiny_teacher):
    out = tmp_path / "ranks.json"
    script = Path(__file__).with_name("ddp_check.py")
    proc = subprocess.run([sys.executable, str(script), tiny_teacher, str(out)], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = json.loads(out.read_text())
    assert ranks["world_size"] == 2
    steps0, steps1 = ranks["steps"]
    assert steps0 == steps1 and len(steps0) == 7  # the 7 quantized linears of one block
    assert ranks["ema"][0] == ranks["ema"][1]
    batches0, batches1 = ranks["batches"]
    assert len(batches0) == 3 and all(a != b for a, b in zip(batches0, batches1))  # distinct samples
