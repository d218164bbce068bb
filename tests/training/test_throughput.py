"""robuq.callbacks.Throughput: step times, the logged metrics and the end-of-fit summary."""

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from robuq.callbacks import Throughput


def test_throughput_logs_and_summarises(tmp_path, capsys):
    cb = Throughput(window=3, warmup=2)
    trainer = L.Trainer(max_steps=6, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(BoringModel())
    assert len(cb.times) == 5 and all(t > 0 for t in cb.times)  # between the ends of batches 1..6
    assert trainer.callback_metrics["train/step_ms"] > 0
    assert cb._batch == 1  # BoringModel's loader: one sample a batch, so images/s = 1000 / step_ms
    assert abs(trainer.callback_metrics["train/images_per_s"] * trainer.callback_metrics["train/step_ms"] - 1e3) < 1e-2
    out = capsys.readouterr().out
    assert "throughput:" in out and "median of 3 steps after 2" in out


@pytest.mark.parametrize("kw", [dict(window=0), dict(warmup=-1)])
def test_throughput_refuses_bad_settings(kw):
    with pytest.raises(ValueError, match="window >= 1 and warmup >= 0"):
        Throughput(**kw)
