"""SWAD's loss valley in dgkit against khanrc/swad's own ``LossValley``, on the same weights.

A small linear model takes a random walk of weights, one per step; every ``--every`` steps a
segment ends and is judged by a validation loss drawn from a noisy valley (falling, flat,
rising, with a random depth and noise). Both sides average the same segments (khanrc/swad's
``AveragedModel`` per segment and its ``LossValley``, dgkit's ``dgkit.swad.LossValley``)
and stop where the valley dies. Per trial the script prints whether the converge step, the
averaged range, the stop and the averaged weights agree (largest absolute difference).

    python benchmarks/parity_swad.py --swad /tmp/swad [--trials 200]

khanrc/swad is not a dependency: give a checkout of it (its ``domainbed`` package needs
only torch and numpy for these two modules). Its final model is moved to CUDA; on a
machine without one, ``.cuda()`` is made a no-op here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from dgkit.swad import LossValley

TARGET = 1e-6


def valley_losses(n: int, gen: torch.Generator) -> list[float]:
    bottom = int(torch.randint(2, max(3, n - 2), (1,), generator=gen))
    width = int(torch.randint(0, 6, (1,), generator=gen))
    depth, noise = float(torch.rand(1, generator=gen)) + 0.2, float(torch.rand(1, generator=gen)) * 0.3
    out = []
    for i in range(n):
        if i < bottom:
            base = 1.0 + depth * (bottom - i) / bottom
        elif i <= bottom + width:
            base = 1.0
        else:
            base = 1.0 + 0.15 * (i - bottom - width)
        out.append(base + noise * float(torch.randn(1, generator=gen)))
    return out


def trial(seed: int, every: int, segments: int, swad_module, swa_utils) -> tuple[bool, str, str]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 3)
    losses = valley_losses(segments, gen)
    kwargs = dict(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    theirs = swad_module.LossValley(evaluator=None, **kwargs)
    ours = LossValley(**kwargs)
    segment = swa_utils.AveragedModel(model)
    mine = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    count, start = 0, None
    for step in range(segments * every):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        segment.update_parameters(model, step=step)
        for name, p in model.named_parameters():
            mine[name] += (p.detach() - mine[name]) / (count + 1) if count else p.detach() - mine[name]
        count, start = count + 1, step if start is None else start
        if step % every:
            continue
        loss = losses[step // every]
        theirs.update_and_evaluate(segment, 0.0, loss, print)
        params = {k: v.clone() for k, v in mine.items()}
        ours.push({"params": params, "loss": loss, "start": start, "end": step})
        segment, count, start = swa_utils.AveragedModel(model), 0, None
        if theirs.dead_valley or ours.dead:
            break
    agree = theirs.dead_valley == ours.dead and theirs.converge_step == ours.converge_step
    if theirs.converge_step is None:
        reference = theirs.converge_Q[-1]
        ours_params, _ = ours.result()
        ref_range = (reference.start_step, reference.end_step)
        our_range = (ours.recent[-1]["start"], ours.recent[-1]["end"])
    else:
        reference = theirs.get_final_model()
        ours_params, _ = ours.result()
        ref_range = (reference.start_step, reference.end_step)
        our_range = (ours.final.start, ours.final.end)
    ref_params = {k: p.detach() for k, p in reference.module.named_parameters()}
    diff = max(float((ref_params[k] - v).abs().max()) for k, v in ours_params.items())
    agree = agree and ref_range == our_range and diff <= TARGET
    outcome = "stopped" if ours.dead else "converged" if ours.converge_step is not None else "not converged"
    return agree, outcome, (f"converge {theirs.converge_step}/{ours.converge_step} "
                            f"range {ref_range}/{our_range} stopped {theirs.dead_valley}/{ours.dead} "
                            f"max|diff| {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swad", type=Path, required=True, help="a checkout of khanrc/swad")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--every", type=int, default=5, help="steps per segment")
    parser.add_argument("--segments", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(args.swad))
    nn.Module.cuda = lambda self, *a, **k: self  # the reference moves its final model to CUDA
    from domainbed import swad as swad_module
    from domainbed.lib import swa_utils

    failed, outcomes = 0, {}
    for seed in range(args.trials):
        agree, outcome, line = trial(seed, args.every, args.segments, swad_module, swa_utils)
        failed += not agree
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if not agree or seed < 5:
            print(f"trial {seed}: {'same' if agree else 'DIFFERENT'}: {line}")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"{args.trials - failed}/{args.trials} trials identical to khanrc/swad (weights within {TARGET:g})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
