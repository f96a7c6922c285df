"""Cost of perturbation and attention guidance per step: time and peak memory against the plain CFG step.

    python benchmarks/bench_guidance_cost.py            # prints the table, writes its section of docs/benchmarks.md
    python benchmarks/bench_guidance_cost.py --no-write

One guided evaluation (one Euler step's worth) on a small attention denoiser built here (conv in, two blocks of
``nn.MultiheadAttention`` self-attention over a 16x16 token grid and cross-attention to 8 context tokens, conv
out; width 64, 4 heads), batch 4, float32, one thread, no grad. Rows:

* the hand-written CFG step (the model on ``[x; x]`` with ``[cond; uncond]``, then ``u + w (c - u)``): the
  baseline every ratio is against;
* ``gk.guided`` with CFG (2 branches, one forward), twice (the second row shows the timing noise), and with
  each perturbation / attention method (PAG + CFG: 3 branches in 2 forwards; SEG, SAG, S-CFG, NAG);
* hook overhead with nothing active: PAG at scale 0 and SAG at scale 0 plan the plain ``[cond; uncond]``
  forward, ``Interval(PAG + CFG)`` outside its window the plain ``cond`` forward, so they must cost what CFG
  (and ``Interval(CFG)`` outside) costs: no hook, no swap installed.

Times are medians over interleaved rounds (the CPU is shared). Peak memory is the high-water mark of tensor
allocations during the step above what was allocated before it, from ``torch.profiler`` (allocations at the op
that made them, frees when they happen), so it is deterministic and counts activations only.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
from _docs import replace_section
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import guidekit as gk

SECTION = "## Perturbation and attention guidance: cost per step"
TOKENS, CONTEXT, WIDTH, HEADS, CLASSES = 8, 32, 64, 4, 10


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.self_attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(WIDTH, HEADS, kdim=CONTEXT, vdim=CONTEXT, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, t: Tensor, ctx: Tensor) -> Tensor:
        n = self.norm1(t)
        t = t + self.self_attn(n, n, n, need_weights=False)[0]
        t = t + self.cross_attn(self.norm2(t), ctx, ctx, need_weights=False)[0]
        return t + self.mlp(t)


class AttentionDenoiser(nn.Module):
    """``model(x, sigma, labels) -> x0`` on ``(b, 4, 16, 16)`` (EDM preconditioning), random weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Conv2d(4, WIDTH, 3, padding=1), nn.Conv2d(WIDTH, 4, 3, padding=1)
        self.time = nn.Linear(1, WIDTH)
        self.context = nn.Embedding(CLASSES + 1, TOKENS * CONTEXT)
        self.mid = nn.ModuleList([Block(), Block()])

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        h = self.inp(x / (s**2 + 1).sqrt()) + self.time(s.log().reshape(-1, 1) / 4)[..., None, None]
        b, d, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        ctx = self.context(labels).view(b, TOKENS, CONTEXT)
        for block in self.mid:
            t = block(t, ctx)
        return x / (s**2 + 1) + s / (s**2 + 1).sqrt() * self.out(t.transpose(1, 2).reshape(b, d, hh, ww))


W = 4.0
CASES: dict[str, Callable[[], gk.GuidanceStrategy]] = {
    "CFG (2 branches)": lambda: gk.CFG(W),
    "CFG, again (timing noise)": lambda: gk.CFG(W),
    "PAG + CFG (3 branches)": lambda: gk.PAG(gk.CFG(W), scale=3.0, layers=("self_attn",)),
    "SEG + CFG (3 branches)": lambda: gk.SEG(gk.CFG(W), scale=3.0, layers=("self_attn",)),
    "SAG + CFG (3 branches, map)": lambda: gk.SAG(gk.CFG(W), layers=("mid.0.self_attn",)),
    "S-CFG (2 branches, maps)": lambda: gk.SCFG(W),
    "NAG, CFG 1 (1 branch + negative rows)": lambda: gk.NAG(),
    "NAG + CFG (2 branches + negative rows)": lambda: gk.NAG(gk.CFG(W)),
    "PAG scale 0 + CFG (no hook)": lambda: gk.PAG(gk.CFG(W), scale=0.0, layers=("self_attn",)),
    "Interval(CFG) outside (1 branch)": lambda: gk.Interval(gk.CFG(W), sigma_lo=100.0, sigma_hi=200.0),
    "Interval(PAG + CFG) outside (1 branch, no hook)": lambda: gk.Interval(
        gk.PAG(gk.CFG(W), layers=("self_attn",)), sigma_lo=100.0, sigma_hi=200.0
    ),
    "SAG scale 0 + CFG (no observer)": lambda: gk.SAG(gk.CFG(W), scale=0.0, layers=("mid.0.self_attn",)),
}


def inputs(batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g) * 2.0
    return x, torch.full((batch,), 2.0), torch.arange(batch) % CLASSES, torch.full((batch,), CLASSES)


def steps(model: AttentionDenoiser, batch: int) -> dict[str, Callable[[], object]]:
    x, sigma, cond, uncond = inputs(batch)
    info = gk.samplers.StepInfo(0, 1, torch.tensor([2.0, 0.0], dtype=torch.float64))
    both_x, both_s, both_c = torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond])

    def by_hand() -> Tensor:
        c, u = model(both_x, both_s, both_c).chunk(2)
        return u + W * (c - u)

    out: dict[str, Callable[[], object]] = {"hand-written CFG step": by_hand}
    for name, make in CASES.items():
        den = gk.guided(gk.samplers.EDMModel(model), make(), cond, uncond)
        out[name] = lambda den=den: den(x, sigma, info)
    return out


def median_times(fns: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - t0) / repeat)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_bytes(fn: Callable[[], object]) -> int:
    """The high-water mark of tensor allocations during ``fn()`` above the start (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    now = peak = 0
    for event in events:
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def table(batch: int, rounds: int, repeat: int) -> str:
    torch.set_num_threads(1)
    model = AttentionDenoiser().eval()
    with torch.no_grad():
        fns = steps(model, batch)
        times = median_times(fns, rounds, repeat)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
        rows_forwards = {}
        x, sigma, cond, uncond = inputs(batch)
        info = gk.samplers.StepInfo(0, 1, torch.tensor([2.0, 0.0], dtype=torch.float64))
        for name, make in CASES.items():
            den = gk.guided(gk.samplers.EDMModel(model), make(), cond, uncond)
            den(x, sigma, info)
            rows_forwards[name] = (den.nfe, den.forwards)
    base_t, base_m = times["hand-written CFG step"], peaks["hand-written CFG step"]
    lines = [
        "| step | NFE | forwards | ms / step | time vs hand-written CFG | peak MB | memory vs hand-written CFG |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in fns:
        nfe, forwards = rows_forwards.get(name, (2, 1))
        lines.append(
            f"| {name} | {nfe} | {forwards} | {1e3 * times[name]:.2f} | {times[name] / base_t:.2f}x | "
            f"{peaks[name] / 2**20:.1f} | {peaks[name] / base_m:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    body = table(args.batch, args.rounds, args.repeat)
    took = time.perf_counter() - t0
    print(body)
    if args.no_write:
        return
    doc = "\n".join(
        [
            SECTION,
            "",
            "`python benchmarks/bench_guidance_cost.py` (defaults: batch 4, 9 interleaved rounds of 5 calls; "
            f"{took:.0f} s; {datetime.date.today()}; one CPU thread, a shared machine). One guided evaluation on "
            "the benchmark's attention denoiser (two blocks of self- and cross-attention over 16x16 tokens, width "
            "64); NFE counts network rows per sample, forwards the model calls; peak MB is the high-water mark of "
            "tensor allocations during the step (torch.profiler), activations only.",
            "",
            body,
            "",
            "A third branch in its own forward (PAG, SEG, SAG) costs up to one more network evaluation of the batch "
            "(PAG's less: its perturbed layers skip the attention product): time grows with the rows evaluated, "
            "while peak memory stays near one forward's because the perturbed "
            "forward runs after the `[cond; uncond]` forward has been freed (`max_batch` bounds it further). NAG at "
            "CFG 1 evaluates the negative rows inside the one forward (2 rows, the cost of a CFG step). The rows "
            "with nothing active (a perturbation at scale 0, SAG at scale 0, an `Interval` outside its window) plan "
            "the plain forward with no hook or swap installed: compare them with CFG (and `Interval(CFG)` "
            "outside) against the CFG-vs-CFG noise row. SAG's and S-CFG's extra time is the observer recomputing "
            "the recorded layers' attention probabilities (S-CFG reads every self- and cross-attention layer and "
            "multiplies the self-attention maps) and, for SAG, the degraded forward.",
        ]
    )
    replace_section(SECTION, doc)


if __name__ == "__main__":
    main()
