"""Held-out batches, MACs, and measure_layer leaving the student exactly as it found it."""

import copy

import torch

from robuq.ampn.search import distill_steps
from robuq.ampn.sensitivity import (
    SensitivityCache,
    adapted_reference,
    add_targets,
    calibrate,
    distill_loss,
    layer_macs,
    measure_layer,
    qat_sensitivity,
    stratified_batches,
)
from robuq.models import disable_label_dropout, load_dit
from robuq.quant import act_bits, quantize_
from robuq.quant.context import timestep_group_ids


def test_stratified_batches_cover_every_group_and_repeat_exactly():
    x0, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    a = stratified_batches(x0, y, 16, 10, seed=3)
    b = stratified_batches(x0, y, 16, 10, seed=3)
    assert [len(batch.t) for batch in a] == [16, 16, 8]
    for batch in a:  # every batch of >= 10 samples covers all 10 timestep groups
        assert len(batch.t) < 10 or set(timestep_group_ids(batch.t, 10).tolist()) == set(range(10))
    for p, q in zip(a, b):
        assert torch.equal(p.xt, q.xt) and torch.equal(p.t, q.t) and torch.equal(p.y, q.y)
    assert not torch.equal(a[0].xt, stratified_batches(x0, y, 16, 10, seed=4)[0].xt)


def test_macs_of_the_shipped_teacher():
    student = load_dit("checkpoints/fmnist_dit_teacher")
    quantize_(student)
    batch = stratified_batches(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1]), 2, 2, 0)[0]
    macs = layer_macs(student, batch)
    assert len(macs) == 42  # 6 blocks x 7 linears
    assert macs["transformer_blocks.0.attn1.to_q"] == 256 * 192 * 192  # 16 x 16 patches
    assert macs["transformer_blocks.5.ff.net.2"] == 256 * 768 * 192
    assert macs["transformer_blocks.3.norm1.linear"] == 192 * 1152  # one vector per sample


def test_measure_layer_restores_the_student(teacher_dir):
    teacher = load_dit(teacher_dir).eval()
    student = copy.deepcopy(teacher)
    quantize_(student)
    held = stratified_batches(torch.randn(12, 1, 32, 32), torch.arange(12) % 10, 4, 4, 0)
    add_targets(teacher, held)
    calibrate(student, held[0])
    before = copy.deepcopy(student.state_dict())
    name = "transformer_blocks.0.ff.net.2"

    def adapt(model, layers):
        distill_steps(model, teacher, iter([(torch.randn(4, 1, 32, 32), torch.arange(4))] * 2), 2, 1e-3, 1e-3, 0.1, 0)

    losses = [measure_layer(student, name, 1, held[1:], held[0], a) for a in (None, adapt, None)]
    assert losses[0] == losses[2] != losses[1]  # deterministic, and adaptation changed the student it measured
    after = student.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v, k
    assert set(act_bits(student).values()) == {2}


def test_adapted_sensitivity_is_measured_against_the_equally_adapted_base(teacher_dir, tmp_path):
    teacher = load_dit(teacher_dir).eval()
    disable_label_dropout(teacher)  # as search does: the adaptation is then fully seeded
    student = copy.deepcopy(teacher)
    quantize_(student)
    held = stratified_batches(torch.randn(12, 1, 32, 32), torch.arange(12) % 10, 4, 4, 0)
    add_targets(teacher, held)
    calibrate(student, held[0])
    fixed = [(torch.randn(4, 1, 32, 32), torch.arange(4))] * 3

    def adapt(model, layers):
        distill_steps(model, teacher, iter(fixed), 3, 1e-3, 1e-3, 0.1, 0)

    cache = SensitivityCache(tmp_path / "table.json", {"case": 1})
    cache.update(base_loss=distill_loss(student, held[1:]))
    before = copy.deepcopy(student.state_dict())
    ref = adapted_reference(student, held[1:], cache, adapt)
    adapted = copy.deepcopy(student)
    adapt(adapted, None)
    assert ref == distill_loss(adapted, held[1:]) != cache.get("base_loss")  # the adaptation itself is in the reference
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items() if torch.is_tensor(v))
    table = qat_sensitivity(student, held[1:], held[0], [1, 2], 2, cache, ref, adapt, log=lambda _: None)
    name = "transformer_blocks.0.ff.net.2"
    assert table[name][2] == 0.0
    assert table[name][1] == measure_layer(student, name, 1, held[1:], held[0], adapt) - ref


def test_step_scope_adaptation_trains_only_the_changed_layers_step(teacher_dir):
    teacher = load_dit(teacher_dir).eval()
    disable_label_dropout(teacher)
    student = copy.deepcopy(teacher)
    quantize_(student)
    held = stratified_batches(torch.randn(12, 1, 32, 32), torch.arange(12) % 10, 4, 4, 0)
    calibrate(student, held[0])
    name = "transformer_blocks.0.ff.net.2"
    before = copy.deepcopy(student.state_dict())
    distill_steps(student, teacher, iter([(torch.randn(4, 1, 32, 32), torch.arange(4))] * 3), 3, 1e-3, 1e-2, 0.1, 0,
                  only_steps_of=[name])
    after = student.state_dict()
    changed = {k for k, v in before.items() if torch.is_tensor(v) and not torch.equal(after[k], v)}
    assert changed == {f"{name}.act.quantizer.step"}
    assert all(p.grad is None for p in student.parameters())  # no gradients left behind
