"""Train learned guidance weights ``ω(c, s, t)`` (Galashov et al. 2025): ``guidekit train-guidance``.

The denoiser is frozen; only the small :class:`~guidekit.strategies.learned_weight.GuidanceWeightNet` is
trained. One step of training draws ``groups`` triples ``(c, t, s)`` and, for each, ``2 · per_group`` true
samples of class ``c``: the first half is noised to ``t`` and moved to ``s`` by one guided deterministic
step (DDIM = Euler in EDM coordinates, methods.md §2)::

    x_t = x0 + σ_t ε,   x̂ = D_c + ω (D_c - D_∅),   x_s = x̂ + (σ_s / σ_t)(x_t - x̂)

and the second half is noised to ``s`` directly, ``y_s = x0' + σ_s ε'``. The loss is the squared MMD between
the two sets with the distance kernel ``k(x, y) = -‖x - y‖`` (the energy distance, U-statistic), in
VP-scaled coordinates ``x / sqrt(1 + σ_s²)``, averaged over the triples. The reward-tilted variant subtracts
``reward · mean log p(c | x̂)`` under a differentiable classifier (the shipped digits classifier).

Because ``ω`` enters the guided step linearly, the two network predictions need no gradient: a step costs
two frozen forwards of ``groups · per_group`` rows and a backward through the tiny ω net only.

Testbeds: ``digits`` (the shipped denoiser and its train split), ``digits-weak`` (the deliberately weak
digits denoiser: the under-trained regime), ``gmm`` (the Gaussian-mixture oracle,
exact conditional model), ``gmm-imperfect`` (its conditional model pulled halfway to the
unconditional mixture, a model trained with half its labels wrong, so the best constant scale is well above 1)
and ``glyphs`` (the glyphs model: the condition is a two-token prompt ``[digit, texture]`` with a null token
per slot, dropped per slot as the model was trained, and ω has one embedding row per prompt).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..guided import default_schedule, sample
from ..oracle import UNCOND, GaussianMixture, energy_distance
from ..samplers.adapters import ModelAdapter, adapt
from ..strategies.base import GuidanceStrategy
from ..strategies.cfg import CFG
from ..strategies.learned_weight import GuidanceWeightNet, LearnedWeight, save_guidance_weights
from .cmdline import at_least, guarded, seeds

__all__ = [
    "DigitsTestbed",
    "GMMTestbed",
    "GlyphsTestbed",
    "GuidanceRecipe",
    "Testbed",
    "TrainResult",
    "best_constant",
    "energy_mmd",
    "gmm_distance",
    "main",
    "make_testbed",
    "omega_figure",
    "prompt_panels",
    "slot_summary",
    "train_guidance",
]


@dataclass(frozen=True)
class GuidanceRecipe:
    """How ω is trained. Every choice the paper leaves open is a field here (docs/math.md, Learned weight).

    Args:
        steps: optimiser steps (Adam, learning rate cosine-decayed from ``lr`` to ``lr / 10``).
        groups: ``(c, t, s)`` triples per step; each gets its own MMD.
        per_group: samples per triple on each side of the MMD.
        lr: Adam's learning rate.
        schedule_steps: the step counts whose consecutive schedule pairs ``(t, s)`` are trained on.
        random_pairs: the share of triples whose ``(t, s)`` is drawn at random instead (``log σ_t`` uniform
            over the schedule's range, ``σ_s = r σ_t`` with ``r`` uniform in ``[0, 1)``), so the net is
            defined between the schedules too.
        p_unknown: the share of triples whose ω is asked without the condition (the *unknown condition*
            row, used where the caller cannot show the condition: the diffusers paths).
        reward: weight of the reward term ``-mean log p(c | x̂)`` (0: plain distribution matching).
        emb_dim, hidden, frequencies, omega_init: the ω net (:class:`GuidanceWeightNet`).
        seed: the run's seed; step ``i`` draws from ``seed · 1_000_003 + i``, so a resumed run is the
            same as an uninterrupted one.
        checkpoint_every: steps between resume checkpoints.
    """

    steps: int = 300
    groups: int = 16
    per_group: int = 32
    lr: float = 1e-2
    schedule_steps: tuple[int, ...] = (10, 20, 30, 50)
    random_pairs: float = 0.25
    p_unknown: float = 0.1
    reward: float = 0.0
    emb_dim: int = 16
    hidden: int = 64
    frequencies: int = 3
    omega_init: float = 0.0
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "groups", "checkpoint_every"):
            at_least(name, getattr(self, name))
        at_least("per_group", self.per_group, 2)
        for name in ("random_pairs", "p_unknown"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: expected a share in [0, 1], got {getattr(self, name)!r}")
        if not self.schedule_steps or any(n < 1 for n in self.schedule_steps):
            raise ConfigError(f"schedule_steps: expected step counts >= 1, got {self.schedule_steps!r}")


# -- testbeds -------------------------------------------------------------------------------------------
class Testbed(ABC):
    """A frozen conditional denoiser, true conditional samples and (optionally) a reward."""

    name: str
    num_classes: int
    null_label: int
    """The label of the unconditional branch (digits ``NULL_CLASS``, the oracle's ``-1``)."""
    denoiser: ModelAdapter
    prediction: str
    schedule_name: str | None = None
    event_shape: tuple[int, ...]
    extra: dict[str, Any]
    slots: tuple[int, ...] | None = None
    """Prompt testbeds: tokens per prompt slot, null token last (:class:`GuidanceWeightNet` ``slots``)."""

    def draw_conditions(self, g: int, generator: torch.Generator) -> Tensor:
        """``g`` conditions to train on: class labels ``(g,)``, uniform."""
        return torch.randint(self.num_classes, (g,), generator=generator)

    def unconditional(self, cond: Tensor) -> Tensor:
        """The unconditional branch's condition for conditions ``cond``."""
        return torch.full_like(cond, self.null_label)

    def schedule(self, steps: int) -> Tensor:
        """The EDM sigmas of a ``steps``-step run (what :func:`guidekit.sample` uses)."""
        return default_schedule(self.denoiser, steps, self.schedule_name).to(torch.float32)

    @abstractmethod
    def true_samples(self, labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``(len(labels), n, *event_shape)`` true samples, ``n`` of each condition in ``labels``."""

    def log_reward(self, x0: Tensor, labels: Tensor) -> Tensor:
        """``log p(c | x0)`` per sample; testbeds without a reward raise."""
        raise ConfigError(f"reward: expected 0 for testbed {self.name!r}, which has no classifier")

    def native_model(self) -> Any:
        """The native ``model(x, t, labels)`` for :func:`guidekit.sample`."""
        return self.denoiser.model

    def sample_kwargs(self) -> dict[str, Any]:
        return {"prediction": self.prediction, "schedule": self.schedule_name, **self.extra}


class DigitsTestbed(Testbed):
    """The shipped digits denoiser (or, ``weak``, the deliberately weak one: fewer channels, 500 training
    steps, the under-trained regime), its train split and the shipped classifier (the reward)."""

    num_classes = 10
    prediction = "eps"
    schedule_name = "trailing"
    event_shape = (1, 8, 8)

    def __init__(self, weak: bool = False) -> None:
        from . import load_classifier, load_denoiser, load_digits, load_weak_denoiser
        from .unet import NULL_CLASS

        self.name = "digits-weak" if weak else "digits"
        model = load_weak_denoiser() if weak else load_denoiser()
        self.null_label = NULL_CLASS
        self.extra = {"alphas_cumprod": model.alphas_cumprod}
        self.denoiser = adapt(model, "eps", alphas_cumprod=model.alphas_cumprod)
        images, labels = load_digits().split("train")
        self.by_class = [images[labels == c] for c in range(self.num_classes)]
        self.classifier = load_classifier()

    def true_samples(self, labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
        out = []
        for c in labels.tolist():
            pool = self.by_class[c]
            pick = torch.randperm(len(pool), generator=generator)[:n] if n <= len(pool) else None
            if pick is None:
                pick = torch.randint(len(pool), (n,), generator=generator)
            out.append(pool[pick])
        return torch.stack(out)

    def log_reward(self, x0: Tensor, labels: Tensor) -> Tensor:
        return torch.log_softmax(self.classifier(x0.float()), 1).gather(1, labels[:, None]).squeeze(1)


class GlyphsTestbed(Testbed):
    """The shipped glyphs denoiser (:mod:`guidekit.zoo.glyphs`): conditions are prompts ``(g, 2)``
    ``[digit, texture]``, each slot dropped to its null token with probability ``p_drop`` as the denoiser was
    trained (``0.25`` per slot), the all-null prompt left out (its guidance is a no-op: both branches are
    unconditional; ω's row for it is the unknown condition, trained through ``p_unknown``). True samples of a
    prompt are drawn from a pool of ``pool`` training-split glyphs: those with the prompt's digit and texture,
    a null slot matching any value (the pool's attributes are uniform, so a digit-only prompt's samples have
    uniform textures, the model's training distribution). No reward (its classifier is for evaluation)."""

    name = "glyphs"
    prediction = "eps"
    schedule_name = "trailing"

    def __init__(self, pool: int = 10_000, p_drop: float = 0.25, seed: int = 0) -> None:
        from .glyphs import NULL_DIGIT, NULL_TEXTURE, SIZE, load_denoiser, make_glyphs

        if not 0 <= p_drop < 1:
            raise ConfigError(f"p_drop: expected a share in [0, 1), got {p_drop!r}")
        self.slots = (NULL_DIGIT + 1, NULL_TEXTURE + 1)
        self.num_classes = math.prod(self.slots) - 1
        self.null = torch.tensor([NULL_DIGIT, NULL_TEXTURE])
        self.p_drop = float(p_drop)
        self.event_shape = (1, SIZE, SIZE)
        model = load_denoiser()
        self.extra = {"alphas_cumprod": model.alphas_cumprod}
        self.denoiser = adapt(model, "eps", alphas_cumprod=model.alphas_cumprod)
        data = make_glyphs(pool, seed=10_000 + seed, split="train")
        self.images, self.digits, self.textures = data.images, data.digits, data.textures

    def draw_conditions(self, g: int, generator: torch.Generator) -> Tensor:
        tokens = torch.stack(
            [torch.randint(n - 1, (g,), generator=generator) for n in self.slots], 1
        )  # (g, 2), no null yet
        drop = torch.rand(g, 2, generator=generator) < self.p_drop
        both = drop.all(1)
        keep = torch.randint(2, (g,), generator=generator)  # all-null: keep one slot, drawn at random
        drop[both, keep[both]] = False
        return torch.where(drop, self.null.expand(g, -1), tokens)

    def unconditional(self, cond: Tensor) -> Tensor:
        return self.null.expand(cond.shape[0], -1).clone()

    def true_samples(self, labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
        out = []
        for digit, texture in labels.tolist():
            match = torch.ones_like(self.digits, dtype=torch.bool)
            if digit != int(self.null[0]):
                match &= self.digits == digit
            if texture != int(self.null[1]):
                match &= self.textures == texture
            pool = self.images[match]
            if n <= len(pool):
                pick = torch.randperm(len(pool), generator=generator)[:n]
            else:
                pick = torch.randint(len(pool), (n,), generator=generator)
            out.append(pool[pick])
        return torch.stack(out)


class GMMTestbed(Testbed):
    """The Gaussian-mixture oracle (exact scores, exact samples), as a VP eps model.

    ``leak`` makes the *conditional* model deliberately imperfect: it is the exact posterior mean of
    ``(1 - leak) p(x | c) + leak · p(x)``, the class density pulled toward the unconditional mixture (what a
    model trained with a share ``leak`` of wrong labels learns); ``broaden`` multiplies its standard
    deviations (a temperature-broadened conditional). ``leak = 0, broaden = 1``: the exact conditional
    model. The unconditional model is always exact.
    """

    prediction = "eps"
    schedule_name = None  # karras

    def __init__(self, mixture: GaussianMixture, leak: float = 0.0, broaden: float = 1.0, name: str = "gmm") -> None:
        if not 0 <= leak < 1:
            raise ConfigError(f"leak: expected a share in [0, 1), got {leak!r}")
        self.name = name
        self.mixture = mixture
        self.num_classes = k = mixture.num_classes
        self.null_label = UNCOND
        self.event_shape = mixture.event_shape
        self.extra = {}
        self.leak, self.broaden = float(leak), float(broaden)
        m = mixture.components
        joint = (mixture.class_prior[:, None] * mixture.weights).reshape(-1)  # (K M,) the unconditional weights
        own = torch.block_diag(*mixture.weights[:, None, :])  # (K, K M): class k's own components
        means = mixture.means.reshape(1, k * m, *mixture.event_shape).expand(k, -1, *mixture.event_shape)
        stds = (mixture.stds * self.broaden)[None].expand(k, -1)
        weights = (1 - self.leak) * own + self.leak * joint[None]
        self.cond_mixture = GaussianMixture(means, stds, weights, mixture.class_prior)
        exact, cond = mixture.as_model("eps"), self.cond_mixture.as_model("eps")

        def model(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
            out = exact(x, t, labels)
            if labels is None:
                return out
            known = labels != UNCOND
            if bool(known.any()):
                t_rows = torch.as_tensor(t).expand(x.shape[0])
                out = out.clone()
                out[known] = cond(x[known], t_rows[known], labels[known])
            return out

        self.denoiser = adapt(model, "eps")

    @classmethod
    def small(cls, leak: float = 0.0, seed: int = 0) -> GMMTestbed:
        """Three classes of two components in 2-D (the CI configuration)."""
        mixture = GaussianMixture.random(3, 2, (2, 1, 1), spread=2.0, seed=seed)
        return cls(mixture, leak=leak, name="gmm-imperfect" if leak else "gmm")

    def true_samples(self, labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
        flat = self.mixture.sample(labels.repeat_interleave(n), generator=generator).to(torch.float32)
        return flat.reshape(len(labels), n, *self.event_shape)


# -- the objective --------------------------------------------------------------------------------------
def energy_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Squared MMD with the distance kernel (the energy distance), unbiased, per group.

    ``x``, ``y``: ``(groups, n, d)``; returns ``(groups,)``:
    ``2 E‖X - Y‖ - E‖X - X'‖ - E‖Y - Y'‖`` with the diagonal left out of the within-set terms.
    """
    n = x.shape[1]

    def dist(a: Tensor, b: Tensor) -> Tensor:
        sq = (a[:, :, None] - b[:, None]).square().sum(-1)
        return (sq + 1e-12).sqrt()

    off = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)
    within = (dist(x, x) * off).sum((1, 2)) / (n * (n - 1)) + (dist(y, y) * off).sum((1, 2)) / (n * (n - 1))
    return 2 * dist(x, y).mean((1, 2)) - within


def _pairs(
    recipe: GuidanceRecipe, schedules: Sequence[Tensor], g: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(σ_t, σ_s)`` per triple: consecutive pairs of the schedules, or random pairs (``random_pairs``)."""
    sig_t, sig_s = torch.empty(g), torch.empty(g)
    lo = min(float(s[-2]) for s in schedules)
    hi = max(float(s[0]) for s in schedules)
    choice = torch.randint(len(schedules), (g,), generator=generator)
    uniform = torch.rand(g, 3, generator=generator)
    for i in range(g):
        if float(uniform[i, 0]) < recipe.random_pairs:
            t = math.exp(math.log(lo) + float(uniform[i, 1]) * (math.log(hi) - math.log(lo)))
            sig_t[i], sig_s[i] = t, t * float(uniform[i, 2])
        else:
            sched = schedules[int(choice[i])]
            k = min(int(float(uniform[i, 1]) * (len(sched) - 1)), len(sched) - 2)
            sig_t[i], sig_s[i] = sched[k], sched[k + 1]
    return sig_t, sig_s


def _loss(
    net: GuidanceWeightNet,
    testbed: Testbed,
    recipe: GuidanceRecipe,
    schedules: Sequence[Tensor],
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, float]]:
    g, n = recipe.groups, recipe.per_group
    labels = testbed.draw_conditions(g, generator)
    sig_t, sig_s = _pairs(recipe, schedules, g, generator)
    x0 = testbed.true_samples(labels, 2 * n, generator).to(torch.float32)
    x0a, x0b = x0[:, :n].flatten(0, 1), x0[:, n:]
    rows = labels.repeat_interleave(n, 0)
    st, ss = sig_t.repeat_interleave(n), sig_s.repeat_interleave(n)
    shape = (-1,) + (1,) * (x0a.ndim - 1)
    x_t = x0a + st.view(shape) * torch.randn(x0a.shape, generator=generator)
    with torch.no_grad():
        d_c = testbed.denoiser(x_t, st, cond=rows)
        d_u = testbed.denoiser(x_t, st, cond=testbed.unconditional(rows))
    unknown = torch.rand(g, generator=generator) < recipe.p_unknown
    omega = net.at(torch.where(unknown, net.num_classes, net.index(labels, g, sig_t.device)), sig_s, sig_t)
    x_hat = d_c + omega.repeat_interleave(n).view(shape) * (d_c - d_u)
    x_s = x_hat + (ss / st).view(shape) * (x_t - x_hat)
    y_s = x0b + sig_s.view((-1, 1) + (1,) * (x0b.ndim - 2)) * torch.randn(x0b.shape, generator=generator)
    vp = (1 + sig_s.square()).rsqrt()[:, None, None]
    mmd = energy_mmd(x_s.reshape(g, n, -1) * vp, y_s.reshape(g, n, -1) * vp).mean()
    parts = {"mmd": float(mmd.detach()), "omega": float(omega.detach().mean())}
    loss = mmd
    if recipe.reward:
        log_p = testbed.log_reward(x_hat, rows).mean()
        loss = loss - recipe.reward * log_p
        parts["log_p"] = float(log_p.detach())
    return loss, parts


# -- training -------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """A trained ω net and its training log (``history``: per step ``mmd``, ``omega``, ``log_p``)."""

    net: GuidanceWeightNet
    recipe: GuidanceRecipe
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_guidance(
    testbed: Testbed,
    recipe: GuidanceRecipe = GuidanceRecipe(),
    *,
    resume: str | Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``ω(c, s, t)`` for ``testbed``'s frozen denoiser (see the module docstring for the objective).

    ``resume``: a file the state is saved to every ``recipe.checkpoint_every`` steps (atomically) and
    continued from when it exists with the same recipe; the result equals an uninterrupted run's. The
    file is removed when training ends.
    """
    torch.manual_seed(recipe.seed)
    net = GuidanceWeightNet(
        testbed.num_classes, recipe.emb_dim, recipe.hidden, recipe.frequencies, recipe.omega_init, slots=testbed.slots
    ).train()
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    start, history, seconds = 0, [], 0.0
    resume_path = Path(resume) if resume is not None else None
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, weights_only=False)
        if state["recipe"] != asdict(recipe) or state["testbed"] != testbed.name:
            raise ConfigError(
                f"--resume: expected a state of the same testbed and recipe in {resume_path}, got testbed "
                f"{state['testbed']!r} and a different recipe (delete it to start over)"
            )
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start, history, seconds = state["step"], state["history"], state["seconds"]
    schedules = [testbed.schedule(n) for n in recipe.schedule_steps]
    from .train import _progress

    bar = _progress(recipe.steps, f"train-guidance {testbed.name}", progress)
    bar.update(start)
    began = time.perf_counter()
    for step in range(start, recipe.steps):
        for group in opt.param_groups:  # cosine from lr to lr / 10, a function of the step (resumable)
            group["lr"] = recipe.lr * (0.55 + 0.45 * math.cos(math.pi * step / recipe.steps))
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        loss, parts = _loss(net, testbed, recipe, schedules, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(parts)
        bar.update(1)
        bar.set_postfix(mmd=f"{parts['mmd']:.4f}", omega=f"{parts['omega']:.2f}")
        done = step + 1
        if resume_path is not None and (done % recipe.checkpoint_every == 0) and done < recipe.steps:
            state = {
                "net": net.state_dict(),
                "opt": opt.state_dict(),
                "step": done,
                "history": history,
                "seconds": seconds + time.perf_counter() - began,
                "recipe": asdict(recipe),
                "testbed": testbed.name,
            }
            tmp = resume_path.with_name(resume_path.name + f".tmp{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, resume_path)
    bar.close()
    if resume_path is not None and resume_path.exists():
        resume_path.unlink()
    return TrainResult(net.eval().requires_grad_(False), recipe, seconds + time.perf_counter() - began, history)


# -- evaluation on the oracle ---------------------------------------------------------------------------
def gmm_distance(
    testbed: GMMTestbed,
    strategy: GuidanceStrategy,
    steps: int = 10,
    per_class: int = 500,
    seed: int = 0,
    sampler: str = "ddim",
) -> float:
    """Mean per-class energy distance of ``strategy``'s samples (``sampler``, ``steps``) to exact class samples."""
    k = testbed.num_classes
    labels = torch.arange(k).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), *testbed.event_shape, generator=gen)
    with torch.no_grad():
        x = sample(
            testbed.native_model(),
            noise,
            sampler=sampler,
            steps=steps,
            strategy=strategy,
            cond=labels,
            uncond=torch.full_like(labels, UNCOND),
            progress=False,
            **testbed.sample_kwargs(),
        )
    exact = testbed.mixture.sample(labels, generator=torch.Generator().manual_seed(10_000 + seed))
    return sum(energy_distance(x[labels == c], exact[labels == c]) for c in range(k)) / k


def best_constant(
    testbed: GMMTestbed,
    scales: Sequence[float],
    steps: int = 10,
    per_class: int = 500,
    seed: int = 0,
    sampler: str = "ddim",
) -> tuple[float, float]:
    """The CFG scale of ``scales`` with the smallest :func:`gmm_distance`, and that distance."""
    found = [(gmm_distance(testbed, CFG(s), steps, per_class, seed, sampler), s) for s in scales]
    dist, scale = min(found)
    return scale, dist


# -- the picture ----------------------------------------------------------------------------------------
def omega_figure(
    net: GuidanceWeightNet,
    schedule: Tensor,
    path: Path,
    names: Sequence[str] | None = None,
    title: str = "",
    panels: Sequence[tuple[str, Sequence[int]]] | None = None,
) -> Path:
    """ω over ``(t, s)`` (EDM sigmas, log axes, ``s < t``) per condition and for the unknown condition; the
    consecutive pairs of ``schedule`` (what a sampler evaluates) are marked. ``panels``: ``(title, rows)``
    per panel instead, each the mean ω of the embedding rows ``rows`` (prompt nets: groups of prompts)."""
    from .figures import _pyplot

    plt = _pyplot()
    k = net.num_classes
    if panels is None:
        names_ = [f"c = {c if names is None else names[c]}" for c in range(k)] + ["c unknown"]
        panels = [(label, [c]) for c, label in enumerate(names_)]
    conds = [rows for _, rows in panels]
    labels = [label for label, _ in panels]
    pos = schedule[schedule > 0]
    lo, hi = math.log(float(pos.min())), math.log(float(pos.max()))
    grid = torch.linspace(lo, hi, 60).exp()
    tt, ss = torch.meshgrid(grid, grid, indexing="xy")  # x: t, y: s
    valid = ss < tt
    values = []
    with torch.no_grad():
        for rows in conds:
            w = sum(net.at(torch.full((tt.numel(),), r), ss.reshape(-1), tt.reshape(-1)) for r in rows) / len(rows)
            values.append(torch.where(valid, w.reshape(tt.shape), torch.nan))
    vmin = min(float(v[valid].min()) for v in values)
    vmax = max(float(v[valid].max()) for v in values)
    cols = min(len(conds), 4 if len(conds) <= 4 else 6)
    rows = math.ceil(len(conds) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols + 0.8, 2.3 * rows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    t_sched, s_sched = schedule[:-1], schedule[1:].clamp(min=float(pos.min()))
    for ax, value, label in zip(axes.flat, values, labels, strict=False):
        image = ax.pcolormesh(grid, grid, value.numpy(), vmin=vmin, vmax=vmax, cmap="viridis", shading="auto")
        ax.plot(t_sched, s_sched, ".", color="white", ms=2.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(conds) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("σ_t (from)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("σ_s (to)", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="ω  (CFG scale = 1 + ω)")
    fig.suptitle(title or "learned ω(c, s, t); dots: a sampler's (t, s) pairs", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prompt_panels(net: GuidanceWeightNet) -> list[tuple[str, list[int]]]:
    """The glyphs ω picture's panels: full prompts per texture (mean over digits), digit-only prompts, the
    texture-only prompt of each texture, the unknown condition (= the all-null prompt)."""
    from .glyphs import NULL_DIGIT, NULL_TEXTURE, TEXTURES

    width = NULL_TEXTURE + 1
    digits = range(NULL_DIGIT)
    out = [(f"[digit, {t}] (mean)", [d * width + i for d in digits]) for i, t in enumerate(TEXTURES)]
    out.append(("[digit, ∅] (mean)", [d * width + NULL_TEXTURE for d in digits]))
    out += [(f"[∅, {t}]", [NULL_DIGIT * width + i]) for i, t in enumerate(TEXTURES)]
    out.append(("[∅, ∅] = unknown", [net.num_classes]))
    return out


def slot_summary(net: GuidanceWeightNet, schedule: Tensor) -> dict[str, Any]:
    """Mean ω of a glyphs prompt net over the ``(t, s)`` pairs of ``schedule`` (what its sampler evaluates),
    per kind of prompt (full, digit-only, texture-only, the unknown = all-null one), per texture and per
    digit, and over the first, middle and last third of the steps (high, mid, low noise)."""
    from .glyphs import NULL_DIGIT, NULL_TEXTURE, TEXTURES

    width = NULL_TEXTURE + 1
    m = len(schedule) - 1
    rows = torch.arange(net.num_classes + 1)
    with torch.no_grad():
        table = torch.stack(
            [net.at(rows, schedule[i + 1].expand(len(rows)), schedule[i].expand(len(rows))) for i in range(m)]
        ).double()  # (pairs, rows)
    thirds = {"high_noise": range(m // 3), "mid_noise": range(m // 3, 2 * m // 3), "low_noise": range(2 * m // 3, m)}

    def r3(v: Tensor) -> float:
        return round(float(v), 3)

    def stats(which: list[int]) -> dict[str, float]:
        part = table[:, which]
        out = {"mean": r3(part.mean()), "sd_across_prompts": r3(part.mean(0).std()) if len(which) > 1 else 0.0}
        out |= {name: r3(part[list(span)].mean()) for name, span in thirds.items()}
        return out

    digits, textures = range(NULL_DIGIT), range(NULL_TEXTURE)
    return {
        "pairs": f"the {m} consecutive (t, s) pairs of the sampler's schedule",
        "full": stats([d * width + t for d in digits for t in textures]),
        "digit_only": stats([d * width + NULL_TEXTURE for d in digits]),
        "texture_only": stats([NULL_DIGIT * width + t for t in textures]),
        "unknown_or_null": stats([net.num_classes]),
        "full_by_texture": {TEXTURES[t]: r3(table[:, [d * width + t for d in digits]].mean()) for t in textures},
        "texture_only_by_texture": {TEXTURES[t]: r3(table[:, NULL_DIGIT * width + t].mean()) for t in textures},
        "full_by_digit": {str(d): r3(table[:, [d * width + t for t in textures]].mean()) for d in digits},
        "digit_only_by_digit": {str(d): r3(table[:, d * width + NULL_TEXTURE].mean()) for d in digits},
    }


# -- the command ----------------------------------------------------------------------------------------
TESTBEDS = ("digits", "digits-weak", "gmm", "gmm-imperfect", "glyphs")
OUTPUTS = ("*.safetensors", "*.json", "*-omega.png")


def make_testbed(name: str, seed: int = 0) -> Testbed:
    """A testbed by name (``--testbed``)."""
    if name in ("digits", "digits-weak"):
        return DigitsTestbed(weak=name == "digits-weak")
    if name in ("gmm", "gmm-imperfect"):
        return GMMTestbed.small(leak=0.5 if name == "gmm-imperfect" else 0.0, seed=seed)
    if name == "glyphs":
        return GlyphsTestbed(seed=seed)
    raise ConfigError(f"--testbed: expected one of {', '.join(TESTBEDS)}, got {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guidekit train-guidance",
        description="Train learned guidance weights ω(c, s, t) for a frozen denoiser (Learn to Guide Your "
        "Diffusion Model); writes <name>.safetensors, <name>.json and <name>-omega.png into --out.",
    )
    p.add_argument("--testbed", default="digits", choices=TESTBEDS)
    p.add_argument("--steps", type=int, default=GuidanceRecipe.steps, help="optimiser steps")
    p.add_argument("--groups", type=int, default=GuidanceRecipe.groups, help="(c, t, s) triples per step")
    p.add_argument("--per-group", type=int, default=GuidanceRecipe.per_group, help="samples per triple and side")
    p.add_argument("--lr", type=float, default=GuidanceRecipe.lr)
    p.add_argument("--reward", type=float, default=0.0, help="weight of -log p(c | x̂) (digits classifier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="file name stem (default <testbed>_learned_weight)")
    p.add_argument("--out", default="learned-weight", help="output folder (staged: all files or none)")
    p.add_argument("--force", action="store_true", help="replace an earlier run's files in --out")
    p.add_argument("--resume", action="store_true", help="continue from <out>.resume.pt if present")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--eval-per-class", type=int, default=500, help="gmm testbeds: samples per class of the evaluation (0: none)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return guarded("guidekit train-guidance", lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    from .output import StagedOutput
    from .threads import torch_threads

    args = build_parser().parse_args(argv)
    seeds("--seed", [args.seed])
    at_least("--threads", args.threads)
    at_least("--eval-per-class", args.eval_per_class, 0)
    recipe = GuidanceRecipe(
        steps=args.steps, groups=args.groups, per_group=args.per_group, lr=args.lr, reward=args.reward, seed=args.seed
    )
    if args.reward and not args.testbed.startswith("digits"):
        raise ConfigError(f"--reward: expected 0 for testbed {args.testbed!r}, which has no classifier")
    name = args.name or f"{args.testbed.replace('-', '_')}_learned_weight"
    command = "guidekit train-guidance " + " ".join(sys.argv[1:] if argv is None else argv)
    with StagedOutput(args.out, OUTPUTS, args.force) as folder, torch_threads(args.threads):
        testbed = make_testbed(args.testbed, args.seed)
        resume = Path(str(Path(args.out)).rstrip("/") + ".resume.pt") if args.resume else None
        result = train_guidance(testbed, recipe, resume=resume, progress=not args.quiet)
        last = result.history[-max(1, len(result.history) // 10) :]
        record: dict[str, Any] = {
            "testbed": args.testbed,
            "command": command,
            "seed": args.seed,
            "recipe": asdict(recipe),
            "train_seconds": round(result.seconds, 1),
            "threads": args.threads,
            "torch": torch.__version__,
            "final_mmd": sum(h["mmd"] for h in last) / len(last),
        }
        weights = save_guidance_weights(result.net, folder / name, record)
        if isinstance(testbed, GMMTestbed) and args.eval_per_class:
            record["evaluation"] = _evaluate_gmm(testbed, weights, per_class=args.eval_per_class)
            save_guidance_weights(result.net, folder / name, record)
        panels = None
        if isinstance(testbed, GlyphsTestbed):
            record["omega_per_prompt"] = slot_summary(result.net, testbed.schedule(30))
            save_guidance_weights(result.net, folder / name, record)
            panels = prompt_panels(result.net)
        title = f"learned ω, {name}"
        omega_figure(result.net, testbed.schedule(30), folder / f"{name}-omega.png", title=title, panels=panels)
        print(f"trained {name} in {result.seconds:.0f} s; final MMD {record['final_mmd']:.4f}")
        if "evaluation" in record:
            print(record["evaluation"])
    return 0


def _evaluate_gmm(
    testbed: GMMTestbed, weights: Path, steps: int = 10, seeds_: Sequence[int] = (0, 1, 2), per_class: int = 500
) -> dict:
    """Energy distance of the learned ω and of the best constant CFG scale (searched per seed)."""
    learned = LearnedWeight(str(weights))
    scales = [0.5 + 0.25 * i for i in range(15)]
    out: dict[str, Any] = {
        "steps": steps,
        "sampler": "ddim",
        "per_class": per_class,
        "scales_searched": scales,
        "per_seed": [],
    }
    for seed in seeds_:
        scale, best = best_constant(testbed, scales, steps, per_class, seed=seed)
        mine = gmm_distance(testbed, learned, steps, per_class, seed=seed)
        out["per_seed"].append({"seed": seed, "learned": mine, "best_constant": best, "best_scale": scale})
    return out


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
