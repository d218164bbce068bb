"""GPU check of the ImageNet path: `prepare` (random tiny 8x VAE, random 256 px images) -> a
random-init DiT-XL/2 teacher -> a few steps of configs/imagenet_dit_xl2_w158a2.yaml on one GPU.
Speed does not depend on weight values, so random weights are fine.

    python scripts/gpu_xl_smoke.py WORKDIR [--steps 6] [more train.py arguments]

WORKDIR's data and teacher are made once and reused. Prints the wall time of the `fit` call, so
two calls with different --steps give the time per step (e.g. with and without
--model.compile_blocks true); the Throughput callback prints the median step time as well, e.g.

    python scripts/gpu_xl_smoke.py /tmp/xl --steps 30 --model.cuda_graph true --trainer.val_check_interval 1000
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from PIL import Image

from robuq.data.prepare import prepare
from robuq.models import DIT_XL_2_256

work = Path(sys.argv[1])
steps = sys.argv[sys.argv.index("--steps") + 1] if "--steps" in sys.argv else "6"
extra = [a for i, a in enumerate(sys.argv[2:], 2) if a != "--steps" and sys.argv[i - 1] != "--steps"]
if not (work / "dit_xl2").is_dir():
    images = work / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (images / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(160):  # 9 batches of 32 per epoch: epoch boundaries stay out of the step times
            Image.fromarray(rng.integers(0, 255, (288, 320, 3), dtype=np.uint8)).save(images / f"class{c}" / f"{i}.png")
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(work / "vae")
    summary = prepare(str(images), str(work / "latents"), vae=str(work / "vae"), image_size=256, shard_size=32,
                      batch_size=32, num_workers=2, device="cuda")
    print("prepare:", summary)
    DiTTransformer2DModel(**DIT_XL_2_256).save_pretrained(work / "dit_xl2")
cmd = [sys.executable, "train.py", "fit", "--config", "configs/imagenet_dit_xl2_w158a2.yaml",
       "--model.teacher", str(work / "dit_xl2"), "--model.teacher_subfolder", "null",
       "--data.init_args.root", str(work / "latents"), "--data.init_args.expected_vae", str(work / "vae"),
       "--data.init_args.num_workers", "2", "--data.init_args.val_fraction", "0.1",
       "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.max_steps", steps,
       "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
       "--trainer.default_root_dir", str(work / "run")] + extra
print(" ".join(cmd), flush=True)
t0 = time.perf_counter()
subprocess.run(cmd, check=True)
print(f"fit wall s: {time.perf_counter() - t0:.1f} (steps {steps}, extra {extra})")
print("peak GPU memory of this process (GiB):", torch.cuda.max_memory_allocated() / 2**30)
