"""The DDPM noise schedule shared by training and sampling (DiT's: linear betas, 1000 steps)."""

NUM_TRAIN_TIMESTEPS = 1000

# Keyword arguments for every diffusers scheduler we build (DDPM, DDIM, DPM-Solver++), so that
# training (q_sample) and sampling agree on the same alphas.
SCHEDULE_KWARGS = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
)
