"""prepare: images -> VAE latents in safetensors shards + index.json (format: docs/DATA.md).

    python -m robuq.data.prepare --config configs/prepare_imagenet.yaml [--batch_size 128 ...]

Images are centre-cropped as DiT does, scaled to [-1, 1] and encoded by a diffusers
AutoencoderKL. Shard k holds input images [k*shard_size, (k+1)*shard_size) of the sorted list,
minus unreadable ones (reported by name). Shards are written under a temporary name and renamed,
and index.json is rewritten after each, so an interrupted run resumes: a rerun keeps every valid
shard and writes the rest.
"""

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from safetensors.torch import save_file

from robuq.data.latents import INDEX, check_shard

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop, as in DiT's train.py: BOX-halve while the short side is >= 2x the
    target, BICUBIC-resize the short side to it, crop the centre. Returns uint8 [S, S, C]."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def list_folder(root: str) -> tuple[list[str], list[int], list[str], int]:
    """Sorted image paths, labels and class names of a folder with one sub-folder per class,
    and the number of non-image files ignored."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} not found")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    paths, labels, ignored = [], [], 0
    for label, name in enumerate(classes):
        found = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, name)) for f in files]
        images = sorted(p for p in found if os.path.splitext(p)[1].lower() in IMAGE_EXTS)
        ignored += len(found) - len(images)
        paths += images
        labels += [label] * len(images)
    return paths, labels, classes, ignored


def load_hf(data: str, split: str, image_column: str, label_column: str):
    """A Hugging Face dataset (an imagefolder directory or a name in the HF cache) with its image
    column left undecoded, and its class names."""
    import datasets

    try:
        if os.path.isdir(data):
            ds = datasets.load_dataset("imagefolder", data_dir=data, split=split)
        else:
            ds = datasets.load_dataset(data, split=split)
    except Exception as e:
        raise RuntimeError(f"cannot load the Hugging Face dataset {data!r}, split {split!r} ({e}). Give an "
                           "imagefolder directory or a dataset already in your HF cache (with "
                           "HF_DATASETS_OFFLINE=1 when there is no network)") from e
    for column in (image_column, label_column):
        if column not in ds.features:
            raise ValueError(f"{data!r} has no column {column!r}; its columns are {list(ds.features)}")
    feature = ds.features[label_column]
    names = feature.names if hasattr(feature, "names") else [str(i) for i in range(max(ds[label_column]) + 1)]
    return ds.cast_column(image_column, datasets.Image(decode=False)), names


class Images(torch.utils.data.Dataset):
    """Item i -> (i, uint8 [3, S, S] or None, label, error or None); decoding runs in workers."""

    def __init__(self, image_size, paths=None, labels=None, hf=None, image_column="image", label_column="label"):
        self.image_size, self.paths, self.labels, self.hf = image_size, paths, labels, hf
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.paths) if self.hf is None else len(self.hf)

    def name(self, i: int) -> str:
        if self.hf is None:
            return self.paths[i]
        return self.hf[i][self.image_column]["path"] or f"row {i}"

    def __getitem__(self, i):
        if self.hf is None:
            source, label = self.paths[i], self.labels[i]
        else:
            row = self.hf[i]
            image, label = row[self.image_column], row[self.label_column]
            source = io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"]
        try:
            with Image.open(source) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
            return i, torch.from_numpy(arr).permute(2, 0, 1), label, None
        except Exception as e:
            return i, None, label, f"{type(e).__name__}: {e}"


def _as_list(batch):
    return batch


def load_vae(vae: str, subfolder: str | None):
    from diffusers import AutoencoderKL

    how = ("Give a local directory holding config.json and diffusion_pytorch_model.safetensors, e.g. made "
           "where there is network by `hf download stabilityai/sd-vae-ft-ema --local-dir DIR`, or a hub id "
           "already in your Hugging Face cache (set HF_HUB_OFFLINE=1 when there is no network).")
    if vae.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(vae)):
        raise FileNotFoundError(f"VAE directory {vae} not found. {how}")
    try:
        return AutoencoderKL.from_pretrained(os.path.expanduser(vae), subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load the VAE {vae!r} ({e}). {how}") from e


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of a model's weights: tells apart VAEs of one config (ft-ema, ft-mse)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name} {t.dtype} {list(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def prepare(
    data: str,
    output: str,
    reader: Literal["folder", "hf"] = "folder",
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    vae: str = "stabilityai/sd-vae-ft-ema",
    vae_subfolder: str | None = None,
    image_size: int = 256,
    posterior: Literal["sample", "mean"] = "sample",
    flip: bool = True,
    shard_size: int = 10000,
    batch_size: int = 64,
    num_workers: int = 4,
    device: str | None = None,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    seed: int = 0,
) -> dict:
    """Encode images into VAE latent shards; rerun the same command to resume.

    Args:
        data: image folder with one sub-folder per class (reader 'folder'), or for reader 'hf' an
            imagefolder directory or a Hugging Face dataset name in your cache (ILSVRC/imagenet-1k).
        output: directory for shards and index.json.
        reader: 'folder' (read with PIL) or 'hf' (Hugging Face datasets).
        split: dataset split (reader 'hf').
        image_column: image column (reader 'hf').
        label_column: label column, a ClassLabel (reader 'hf').
        vae: diffusers AutoencoderKL, a local directory or a hub id in your HF cache.
        vae_subfolder: the VAE's sub-folder in a pipeline repository ('vae'), if any.
        image_size: side of the centre crop.
        posterior: 'sample' the latent distribution (DiT's extract_features) or take its 'mean'.
        flip: also encode each horizontally flipped image (latents_flip).
        shard_size: input images per shard.
        batch_size: images per VAE forward (doubled with flip).
        num_workers: processes decoding images.
        device: torch device; default cuda when available, else cpu.
        precision: VAE autocast precision on cuda.
        seed: seed of the posterior samples (per shard, so reruns write identical shards).
    """
    t0 = time.time()
    if reader == "folder":
        paths, labels, class_names, ignored = list_folder(data)
        images = Images(image_size, paths=paths, labels=labels)
    else:
        hf, class_names = load_hf(data, split, image_column, label_column)
        images, ignored = Images(image_size, hf=hf, image_column=image_column, label_column=label_column), 0
    n = len(images)
    if n == 0:
        raise ValueError(f"no images found in {data}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_vae(vae, vae_subfolder)
    vae_sha256 = weights_digest(model)
    model = model.to(device).eval().requires_grad_(False)
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    latent_shape = [model.config.latent_channels, image_size // factor, image_size // factor]
    scaling_factor = model.config.scaling_factor
    settings = dict(data=data, reader=reader, split=split, vae=vae, vae_subfolder=vae_subfolder,
                    vae_sha256=vae_sha256, image_size=image_size, posterior=posterior, flip=flip, shard_size=shard_size,
                    seed=seed, num_images=n)

    # Keep the valid shards of an earlier run; each carries its settings and index entry.
    os.makedirs(output, exist_ok=True)
    shards, todo = {}, []
    for k in range(math.ceil(n / shard_size)):
        path = os.path.join(output, shard_name(k))
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        try:
            meta = check_shard(path, latent_shape)
        except FileNotFoundError:
            todo.append(k)
            continue
        except ValueError as e:
            print(f"warning: {e}", file=sys.stderr)
            todo.append(k)
            continue
        old = json.loads(meta.get("settings", "{}"))
        if old != settings:
            diff = {key: (old.get(key), value) for key, value in settings.items() if old.get(key) != value}
            raise ValueError(f"{path} was made with other settings, {diff} (old, new); "
                             "write to another output directory or delete this one")
        shards[k] = json.loads(meta["entry"])
    reused = len(shards)

    def write_index():
        entries = [shards[k] for k in sorted(shards)]
        failed = [name for e in entries for name in e["failed"]]
        index = dict(complete=len(shards) == math.ceil(n / shard_size), vae=vae, vae_subfolder=vae_subfolder,
                     vae_sha256=vae_sha256, scaling_factor=scaling_factor, latent_shape=latent_shape,
                     image_size=image_size, posterior=posterior, flip=flip, class_names=list(class_names),
                     num_samples=sum(e["count"] for e in entries), num_failed=len(failed), failed=failed,
                     shards=entries, settings=settings)
        write_atomic(os.path.join(output, INDEX), lambda p: Path(p).write_text(json.dumps(index, indent=1)))

    write_index()
    batches = [list(range(b, min(b + batch_size, (k + 1) * shard_size, n)))
               for k in todo for b in range(k * shard_size, min((k + 1) * shard_size, n), batch_size)]
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=_as_list)
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
                if precision != "fp32" else contextlib.nullcontext())
    columns = [TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    encoded, failed, shard, start = 0, 0, None, time.time()
    with Progress(*columns) as progress, torch.inference_mode():
        task = progress.add_task("encode", total=sum(map(len, batches)), rate="")
        for batch in loader:
            k = batch[0][0] // shard_size
            if shard is None:  # a shard's noise depends only on (seed, k): reruns write identical shards
                seed_k = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
                shard = dict(latents=[], flips=[], labels=[], failed=[],
                             generator=torch.Generator(device).manual_seed(seed_k))
            for i, _, _, err in batch:
                if err is not None:
                    print(f"warning: skipping unreadable image {images.name(i)}: {err}", file=sys.stderr)
                    shard["failed"].append(images.name(i))
            ok = [item for item in batch if item[1] is not None]
            if ok:
                x = torch.stack([image for _, image, _, _ in ok]).to(device).float().div(127.5).sub(1)
                with autocast:
                    dist = model.encode(torch.cat([x, x.flip(-1)]) if flip else x).latent_dist
                    z = dist.sample(shard["generator"]) if posterior == "sample" else dist.mean
                z = (z.float() * scaling_factor).half().cpu()
                shard["latents"].append(z[:len(ok)])
                shard["flips"].append(z[len(ok):])
                shard["labels"] += [label for _, _, label, _ in ok]
            progress.update(task, advance=len(batch),
                            rate=f"{progress.tasks[0].completed / (time.time() - start):.1f} img/s")
            end = min((k + 1) * shard_size, n)
            if batch[-1][0] == end - 1:  # the shard is complete
                empty = torch.zeros(0, *latent_shape, dtype=torch.float16)
                tensors = {"latents": torch.cat([empty, *shard["latents"]]),
                           "labels": torch.tensor(shard["labels"], dtype=torch.int64)}
                if flip:
                    tensors["latents_flip"] = torch.cat([empty, *shard["flips"]])
                entry = dict(file=shard_name(k), first=k * shard_size, images=end - k * shard_size,
                             count=len(shard["labels"]), failed=shard["failed"])
                meta = {"settings": json.dumps(settings), "entry": json.dumps(entry)}
                write_atomic(os.path.join(output, entry["file"]), lambda p: save_file(tensors, p, metadata=meta))
                shards[k] = entry
                write_index()
                encoded, failed, shard = encoded + entry["count"], failed + len(entry["failed"]), None

    seconds = time.time() - t0
    summary = dict(output=output, images_written=encoded, images_failed=failed,
                   shards_written=len(todo), shards_reused=reused, samples_total=sum(e["count"] for e in shards.values()),
                   failed_total=sum(len(e["failed"]) for e in shards.values()), ignored_files=ignored,
                   seconds=round(seconds, 2), images_per_s=round((encoded + failed) / seconds, 1))
    print("prepare: " + ", ".join(f"{key} {value}" for key, value in summary.items()))
    return summary


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def write_atomic(path: str, write) -> None:
    """write(tmp) then rename over path, so path never holds a partial file."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(prepare, as_positional=False)
