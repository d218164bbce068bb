"""The DDPM noise schedule shared by training and sampling (DiT's: linear betas, 1000 steps),
the forward process and DiT's training objective."""

import math

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000

# Keyword arguments for every diffusers scheduler we build (DDPM, DDIM, DPM-Solver++), so that
# training (q_sample) and sampling agree on the same alphas.
SCHEDULE_KWARGS = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
)


def betas() -> torch.Tensor:
    return torch.linspace(SCHEDULE_KWARGS["beta_start"], SCHEDULE_KWARGS["beta_end"], NUM_TRAIN_TIMESTEPS, dtype=torch.float64)


class Schedule:
    """DDPM quantities in float64 (DiT's gaussian_diffusion), indexed by integer timesteps."""

    def __init__(self):
        b = betas()
        a_bar = torch.cumprod(1 - b, 0)
        a_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), a_bar[:-1]])
        self.betas, self.alphas_cumprod = b, a_bar
        self.posterior_variance = b * (1 - a_bar_prev) / (1 - a_bar)
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * a_bar_prev.sqrt() / (1 - a_bar)
        self.posterior_mean_coef2 = (1 - a_bar_prev) * (1 - b).sqrt() / (1 - a_bar)

    def to(self, device: torch.device | str) -> "Schedule":
        """The same schedule with its tables on ``device`` (indexing them there needs no host copy,
        so a captured CUDA graph can use them)."""
        moved = Schedule.__new__(Schedule)
        moved.__dict__.update({k: v.to(device) for k, v in vars(self).items()})
        return moved

    @staticmethod
    def _at(v: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(t.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps."""
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def vlb(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term (bits/dim) for the learned variance, with the mean frozen (DiT, Nichol & Dhariwal).

        log sigma^2 = frac * log beta_t + (1 - frac) * log beta~_t, frac = (v + 1) / 2;
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, decoder NLL at t = 0.
        """
        f = lambda a: self._at(a, t, x0)  # noqa: E731
        min_log, max_log = f(self.posterior_log_variance_clipped), f(torch.log(self.betas))
        frac = (v + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        a_bar = f(self.alphas_cumprod)
        pred_x0 = (xt - (1 - a_bar).sqrt() * eps.detach()) / a_bar.sqrt()
        model_mean = f(self.posterior_mean_coef1) * pred_x0 + f(self.posterior_mean_coef2) * xt
        true_mean = f(self.posterior_mean_coef1) * x0 + f(self.posterior_mean_coef2) * xt
        true_log_var = min_log
        kl = 0.5 * (-1 + model_log_var - true_log_var + (true_log_var - model_log_var).exp()
                    + (true_mean - model_mean) ** 2 * (-model_log_var).exp())
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (Ho et al.)."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, cdf_delta.clamp(min=1e-12).log()))


def diffusion_loss(schedule: Schedule, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DiT's objective: noise MSE, plus the VLB term when the model also predicts the variance."""
    c = x0.shape[1]
    eps = out[:, :c]
    loss = F.mse_loss(eps.float(), noise.float())
    if out.shape[1] == 2 * c:
        loss = loss + schedule.vlb(x0.float(), xt.float(), t, eps.float(), out[:, c:].float()).mean()
    return loss
