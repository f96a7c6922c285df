"""An analytic Gaussian-mixture oracle: exact predictions, exact samples, metrics (evaluation.md §5).

Class ``k`` has density ``sum_m pi_km N(mu_km, s_km^2 I)`` over an event of any shape (vectors, images
``(c, h, w)``, video ``(c, f, h, w)``); the unconditional density weights classes by ``class_prior``.
For a noisy ``x = a · x0 + b · eps`` (VP ``a = alpha, b = sigma_vp``; flow ``a = 1 - t, b = t``; EDM
``a = 1, b = sigma``) every component stays Gaussian, so the posterior mean is exact:

* marginal of component ``j``: ``N(a mu_j, v_j I)`` with ``v_j = a^2 s_j^2 + b^2``;
* responsibilities ``r_j(x) ∝ w_j N(x; a mu_j, v_j I)``;
* ``E[x0 | x] = sum_j r_j (mu_j + a s_j^2 / v_j · (x - a mu_j))`` and ``E[eps | x] = (x - a E[x0 | x]) / b``.

The conditional model uses the components of the sample's class, the unconditional one all of them.
Everything is computed in float64. Labels are integer tensors; ``-1`` means "unconditional".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import ConfigError, ShapeError
from .ops.spaces import edm_x_from, from_x0, sigma_from_flow_t, vp_alpha, vp_sigma, vp_x
from .ops.timesteps import vp_sigma_from_timestep

__all__ = ["UNCOND", "GaussianMixture", "energy_distance"]

UNCOND = -1
"""The label of the unconditional branch."""

F64 = torch.float64


class GaussianMixture:
    """Class-conditional isotropic Gaussian mixture with exact denoising predictions.

    Args:
        means: ``(K, M, *event_shape)``: ``M`` component means for each of ``K`` classes.
        stds: ``(K, M)`` component standard deviations (> 0), or one number.
        weights: ``(K, M)`` component weights within each class (rows are normalised); default uniform.
        class_prior: ``(K,)`` class probabilities of the unconditional density; default uniform.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float = 1.0,
        weights: Tensor | None = None,
        class_prior: Tensor | None = None,
    ) -> None:
        means = torch.as_tensor(means, dtype=F64)
        if means.ndim < 3:
            raise ShapeError(f"means: expected (classes, components, *event_shape), got shape {tuple(means.shape)}")
        k, m = means.shape[:2]
        stds = torch.as_tensor(stds, dtype=F64).expand(k, m).clone()
        weights = torch.ones(k, m, dtype=F64) if weights is None else torch.as_tensor(weights, dtype=F64)
        prior = torch.ones(k, dtype=F64) if class_prior is None else torch.as_tensor(class_prior, dtype=F64)
        if not bool((stds > 0).all()):
            raise ConfigError(f"stds: expected positive values, got min {float(stds.min())}")
        if weights.shape != (k, m) or not bool((weights >= 0).all()) or not bool((weights.sum(1) > 0).all()):
            raise ConfigError(f"weights: expected non-negative ({k}, {m}), positive rows; got {tuple(weights.shape)}")
        if prior.shape != (k,) or not bool((prior >= 0).all()) or float(prior.sum()) <= 0:
            raise ConfigError(f"class_prior: expected non-negative ({k},), positive sum; got {tuple(prior.shape)}")
        self.event_shape = tuple(means.shape[2:])
        self.num_classes, self.components = k, m
        self.means = means.reshape(k * m, -1)  # (J, D), component j = k * M + m
        self.stds = stds.reshape(-1)
        self.weights = weights / weights.sum(1, keepdim=True)
        self.class_prior = prior / prior.sum()
        self.dim = self.means.shape[1]

    @classmethod
    def random(
        cls,
        num_classes: int = 3,
        components: int = 2,
        event_shape: Sequence[int] = (2,),
        spread: float = 2.0,
        std: float = 0.5,
        seed: int = 0,
    ) -> GaussianMixture:
        """Means ``~ N(0, spread^2 / D · I)·sqrt(D)`` scaled so that ``|mu| ≈ spread``; all stds ``std``."""
        g = torch.Generator().manual_seed(seed)
        dim = math.prod(event_shape)
        means = torch.randn(num_classes, components, dim, generator=g, dtype=F64) * (spread / math.sqrt(dim))
        return cls(means.reshape(num_classes, components, *event_shape), std)

    # -- exact posterior ----------------------------------------------------------------------------------
    def _log_weights(self, labels: Tensor) -> Tensor:
        """``(n, J)`` log weights of the components each sample's density uses."""
        labels = torch.as_tensor(labels).long().reshape(-1)
        if bool(((labels < UNCOND) | (labels >= self.num_classes)).any()):
            bad = labels.unique().tolist()
            raise ConfigError(f"labels: expected -1 (uncond) or 0..{self.num_classes - 1}, got {bad}")
        joint = (self.class_prior[:, None] * self.weights).reshape(-1)  # uncond weights
        own = torch.arange(self.num_classes).repeat_interleave(self.components)
        cond = torch.where(own[None] == labels[:, None], self.weights.reshape(-1)[None], torch.zeros(1, dtype=F64))
        w = torch.where((labels == UNCOND)[:, None], joint[None], cond)
        return w.log()

    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ShapeError(f"x: expected (n, *{self.event_shape}), got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1).to(F64)

    def posterior_x0(self, x: Tensor, a: Tensor, b: Tensor, labels: Tensor) -> Tensor:
        """Exact ``E[x0 | x]`` for ``x = a · x0 + b · eps`` (``a``, ``b`` per sample ``(n,)``), float64."""
        xf = self._flat(x)
        a = torch.as_tensor(a, dtype=F64).expand(xf.shape[0])[:, None]
        b = torch.as_tensor(b, dtype=F64).expand(xf.shape[0])[:, None]
        s2 = self.stds[None] ** 2
        var = a * a * s2 + b * b  # (n, J)
        sq = (xf * xf).sum(1, keepdim=True) - 2 * a * (xf @ self.means.T) + a * a * (self.means**2).sum(1)[None]
        logp = self._log_weights(labels) - 0.5 * sq / var - 0.5 * self.dim * var.log()
        r = torch.softmax(logp, dim=1)
        gain = a * s2 / var  # weight of x in each component's posterior mean
        x0 = (r * (1 - a * gain)) @ self.means + (r * gain).sum(1, keepdim=True) * xf
        return x0.reshape(x.shape)

    def predict(self, x: Tensor, sigma: Tensor, labels: Tensor, space: str = "x0") -> Tensor:
        """The exact prediction in ``space`` (``x0``, ``eps``, ``v``, ``flow``) at EDM ``(x, sigma)``.

        ``sigma`` may be ``inf`` (then ``x`` holds ``x / sigma``, as in the samplers).
        """
        sigma = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        x64 = x.to(F64)
        x0 = self.posterior_x0(vp_x(x64, sigma), vp_alpha(sigma), vp_sigma(sigma), labels)
        return from_x0(x0, space, x64, sigma).to(x.dtype)  # type: ignore[arg-type]

    # -- packaging as a native model ---------------------------------------------------------------------
    def as_model(
        self,
        prediction: str = "eps",
        *,
        alphas_cumprod: Tensor | None = None,
        time_scale: float = 1.0,
    ) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """A native ``model(x, t, labels)`` for :func:`guidekit.sample` / the adapters.

        ``prediction``: ``"eps"``, ``"v"``, ``"x0"`` (VP: ``x`` is ``x_vp``, ``t`` the timestep on
        ``alphas_cumprod``, default DDPM linear), ``"flow"`` (``x_t``, ``t · time_scale``) or ``"edm"``
        (``x``, ``t = sigma``, returns x0). ``labels`` ``(b,)`` with ``-1`` for the unconditional branch;
        ``None`` is unconditional. Output in ``x``'s dtype.
        """
        if prediction not in ("eps", "v", "x0", "flow", "edm"):
            raise ConfigError(f"prediction: expected one of 'eps', 'v', 'x0', 'flow', 'edm', got {prediction!r}")
        if alphas_cumprod is None:
            from .ops.timesteps import betas_linear

            alphas_cumprod = torch.cumprod(1 - betas_linear(), 0)
        acp = torch.as_tensor(alphas_cumprod, dtype=F64)

        def model(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
            n = x.shape[0]
            labels = torch.full((n,), UNCOND) if labels is None else labels
            t = torch.as_tensor(t, dtype=F64).expand(n)
            if prediction == "flow":
                a, b = 1 - t / time_scale, t / time_scale
                sigma, coords = sigma_from_flow_t(t / time_scale), "flow"
            elif prediction == "edm":
                a, b = torch.ones_like(t), t
                sigma, coords = t, "edm"
            else:
                sigma, coords = vp_sigma_from_timestep(t, acp), "vp"
                a, b = vp_alpha(sigma), vp_sigma(sigma)
            x0 = self.posterior_x0(x, a, b, labels)
            space = "x0" if prediction == "edm" else prediction
            x_edm = edm_x_from(x.to(F64), sigma, coords)  # type: ignore[arg-type]
            return from_x0(x0, space, x_edm, sigma).to(x.dtype)  # type: ignore[arg-type]

        return model

    # -- exact samples and metrics -----------------------------------------------------------------------
    def sample(self, labels: Tensor | int, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples ``(n, *event_shape)`` of the classes ``labels`` (``-1``: unconditional), float64."""
        labels = torch.full((n,), int(labels)) if n is not None else torch.as_tensor(labels).long().reshape(-1)
        probs = self._log_weights(labels).exp()
        comp = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        noise = torch.randn(labels.numel(), self.dim, generator=generator, dtype=F64)
        x = self.means[comp] + self.stds[comp, None] * noise
        return x.reshape(-1, *self.event_shape)

    def sample_masked_posterior(
        self,
        mask: Tensor,
        measurement: Tensor,
        noise_std: float,
        labels: Tensor | int,
        n: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact samples of ``p(x | y, label)`` for ``y = mask ⊙ x + noise``, ``noise ~ N(0, noise_std² I)``.

        The posterior of an isotropic Gaussian mixture under a masked (diagonal) linear measurement is again
        a mixture, in closed form: on observed entries each component's variance becomes
        ``v = (1/s² + 1/σ_y²)⁻¹`` and its mean ``v (μ/s² + y/σ_y²)``; missing entries keep the prior; the
        component weights are multiplied by ``N(y_obs; μ_obs, (s² + σ_y²) I)``. ``mask`` and
        ``measurement`` are shaped like one event (0/1 mask). The ground truth of loss guidance (DPS).
        """
        m = torch.as_tensor(mask, dtype=F64).reshape(-1)
        y = torch.as_tensor(measurement, dtype=F64).reshape(-1)
        if m.numel() != self.dim or y.numel() != self.dim:
            raise ShapeError(
                f"mask, measurement: expected one event of {self.dim} entries, got {m.numel()}, {y.numel()}"
            )
        if not noise_std > 0:
            raise ConfigError(f"noise_std: expected a positive number, got {noise_std!r}")
        obs = m > 0
        s2, n2 = self.stds**2, float(noise_std) ** 2  # (J,)
        resid = ((y[None, obs] - self.means[:, obs]) ** 2).sum(1)  # (J,)
        k = int(obs.sum())
        log_lik = -0.5 * resid / (s2 + n2) - 0.5 * k * torch.log(2 * math.pi * (s2 + n2))
        labels = torch.full((n,), int(labels)) if not isinstance(labels, Tensor) else labels.long().expand(n)
        probs = torch.softmax(self._log_weights(labels) + log_lik[None], dim=1)
        comp = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        var = torch.where(obs[None], (1 / (1 / s2[:, None] + 1 / n2)), s2[:, None].expand(-1, self.dim))  # (J, D)
        mean = torch.where(obs[None], var * (self.means / s2[:, None] + y[None] / n2), self.means)
        noise = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return (mean[comp] + var[comp].sqrt() * noise).reshape(n, *self.event_shape)

    def log_prob(self, x: Tensor, labels: Tensor | int) -> Tensor:
        """``log p(x | label)`` (``-1``: the unconditional density), ``(n,)``."""
        xf = self._flat(x)
        labels = torch.as_tensor(labels).long().expand(xf.shape[0])
        var = self.stds[None] ** 2
        sq = torch.cdist(xf, self.means) ** 2
        logn = -0.5 * sq / var - 0.5 * self.dim * (2 * math.pi * var).log()
        return torch.logsumexp(self._log_weights(labels) + logn, dim=1)

    def class_posterior(self, x: Tensor, labels: Tensor | int) -> Tensor:
        """Bayes ``p(label | x)`` under the clean mixture, ``(n,)``; its mean measures class fidelity."""
        xf = self._flat(x)
        labels = torch.as_tensor(labels).long().expand(xf.shape[0])
        per_class = torch.stack([self.log_prob(x, torch.full_like(labels, k)) for k in range(self.num_classes)], 1)
        logits = per_class + self.class_prior.log()[None]
        return torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)

    def mean_basis(self) -> Tensor:
        """An orthonormal basis ``(D, r)`` of the span of the component means."""
        q, r = torch.linalg.qr(self.means.T)
        keep = r.diagonal().abs() > 1e-10 * r.diagonal().abs().max()
        return q[:, keep]

    def project(self, x: Tensor) -> Tensor:
        """Coordinates ``(n, r)`` of ``x`` in the span of the component means, where the classes differ."""
        return self._flat(x) @ self.mean_basis()


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two sample sets (V-statistic, float64).

    Zero iff the distributions are equal (Székely & Rizzo 2013); two independent sets of the same
    distribution give a small positive "noise floor" of order ``1 / n``.
    """
    xf = x.reshape(x.shape[0], -1).to(F64)
    yf = y.reshape(y.shape[0], -1).to(F64)
    if xf.shape[1] != yf.shape[1]:
        raise ShapeError(f"y: expected {xf.shape[1]} features per sample like x, got {yf.shape[1]}")
    xy = torch.cdist(xf, yf).mean()
    xx = torch.cdist(xf, xf).mean()
    yy = torch.cdist(yf, yf).mean()
    return float(2 * xy - xx - yy)
