"""Tiny teachers and configs for training tests (built here, nothing downloaded)."""

import textwrap

import pytest
from diffusers import DiTTransformer2DModel

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=12, in_channels=1, out_channels=1, num_layers=1,
                sample_size=32, patch_size=4, num_embeds_ada_norm=10)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "dit"
    DiTTransformer2DModel(**TINY_DIT).save_pretrained(path)
    return str(path)


def write_config(path, teacher, max_steps=8, extra_model="", task="qat", devices=1, strategy="auto"):
    """A YAML config of a tiny CPU run (hidden 24 = 12 * 2: Kronecker Hadamard with m = 12)."""
    model = f"teacher: {teacher}" if task == "qat" else f"model: {TINY_DIT}"
    path.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: {devices}
          strategy: {strategy}
          max_steps: {max_steps}
          use_distributed_sampler: false
          val_check_interval: 4
          check_val_every_n_epoch: null
          limit_val_batches: 1
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{save_last: true, every_n_train_steps: 4, save_top_k: -1}}
        model:
          task: {task}
          {model}
          warmup_steps: 2
          ema_decay: 0.9
        {textwrap.indent(extra_model, '  ')}
        data:
          class_path: robuq.data.fmnist.FashionMNISTDataModule
          init_args: {{batch_size: 8, val_size: 8}}
        """))
    return str(path)


@pytest.fixture
def make_config():
    return write_config
