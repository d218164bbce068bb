import torch

from robuq.diffusion import Schedule


def test_schedule_to_moves_every_table_and_keeps_the_original():
    schedule = Schedule()
    moved = schedule.to("meta")
    assert vars(moved).keys() == vars(schedule).keys()
    assert all(v.device.type == "meta" for v in vars(moved).values())
    assert all(v.device.type == "cpu" for v in vars(schedule).values())
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.to("cpu").q_sample(x0, t, noise), schedule.q_sample(x0, t, noise), rtol=0, atol=0)
    assert moved.q_sample(x0.to("meta"), t.to("meta"), noise.to("meta")).shape == x0.shape
