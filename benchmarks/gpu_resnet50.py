"""ResNet-50 at 224 px: images/s of dgkit's ERM and SAM steps against a bare PyTorch loop
over the same network and batch, with peak memory and ``torch.compile``'s effect.

Run by hand on an accelerator:  python benchmarks/gpu_resnet50.py
(on CPU, for the pipeline only:  python benchmarks/gpu_resnet50.py --accelerator cpu
 --backbone resnet18 --image-size 64 --batch-size 2 --steps 3 --warmup 1 --precision 32-true)

Synthetic data already in device memory (3 source domains x ``--batch-size`` images, 65
classes, as Office-Home), so the figures are the step's, not the loader's
(``benchmarks/loader.py`` measures that). dgkit's step is ``DGModule`` under a Lightning
``Trainer`` (logger, progress bar and checkpoints off: the loop's own fixed cost is
``benchmarks/loop_overhead.py``'s subject), timed from one batch start to the next; the bare
loop is ``autocast`` + ``backward`` + ``SGD``/``Adam`` in a ``for`` loop (SAM: its two
passes, Foret et al.'s update). Both in ``--precision`` with channels-last; random weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from lightning import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset

from dgkit.module import DGModule
from dgkit.task import Task
from dgkit_algorithms import ERM, SAM

DOMAINS = ("Art", "Clipart", "Product", "Real World")  # three sources, one held out


class SameBatch(Dataset):
    """The same device-resident step, ``steps`` times."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        return self.batch


class Clock(Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def _batch(args, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
             torch.randint(65, (args.batch_size,), generator=g).to(device)) for _ in range(3)]


def dgkit_rate(algo, compile_: bool, args, device: str) -> tuple[float, float]:
    seed_everything(0)
    task = Task((3, args.image_size, args.image_size), 65, DOMAINS[:3], DOMAINS[3:],
                default_backbone=args.backbone)
    model = DGModule(algorithm=algo, task=task, backbone=args.backbone, pretrained=False,
                     channels_last=True, compile=compile_)
    clock = Clock()
    steps = args.warmup + args.steps + 1
    trainer = Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                      accelerator=args.accelerator, devices=1, precision=args.precision,
                      num_sanity_val_steps=0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=DataLoader(SameBatch(_batch(args, device), steps), batch_size=None))
    gaps = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)][args.warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return 3 * args.batch_size / statistics.median(gaps), peak


def bare_rate(sam: bool, args, device: str) -> float:
    import timm

    seed_everything(0)
    net = timm.create_model(args.backbone, pretrained=False, num_classes=65).to(device)
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-5)
    x = torch.cat([x for x, _ in _batch(args, device)]).contiguous(memory_format=torch.channels_last)
    y = torch.cat([y for _, y in _batch(args, device)])
    bf16 = args.precision.startswith("bf16")

    def loss() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return F.cross_entropy(net(x), y)

    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss().backward()
        if sam:  # ascend to the worst point within rho, take its gradient back at the start
            params = [p for p in net.parameters() if p.grad is not None]
            with torch.no_grad():
                norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
                eps = [p.grad * (0.05 / (norm + 1e-12)) for p in params]
                torch._foreach_add_(params, eps)
            optimizer.zero_grad()
            loss().backward()
            with torch.no_grad():
                torch._foreach_sub_(params, eps)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 3 * args.batch_size / statistics.median(times[args.warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="per source domain (3 domains)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    device = "cuda" if args.accelerator in ("gpu", "cuda") else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for label, algo, sam in (("ERM", ERM, False), ("SAM", SAM, True)):
        for compile_ in (False, True) if not args.no_compile else (False,):
            if compile_ and sam:
                continue  # one compiled row shows the effect; SAM's second pass compiles the same graph
            ours, peak = dgkit_rate(algo, compile_, args, device)
            bare = bare_rate(sam, args, device) if not compile_ else None
            rows.append((label + (" compiled" if compile_ else ""), ours, bare, peak))
    print(f"\n{args.backbone} at {args.image_size} px, 3 x {args.batch_size} images a step, {name}, "
          f"{args.precision}, channels-last, median of {args.steps} steps after {args.warmup}")
    print(f"{'step':<14} {'dgkit (img/s)':>14} {'bare (img/s)':>13} {'dgkit/bare':>11} {'peak (GiB)':>11}")
    for label, ours, bare, peak in rows:
        b = f"{bare:>13.1f}" if bare is not None else f"{'-':>13}"
        r = f"{ours / bare:>11.3f}" if bare is not None else f"{'-':>11}"
        print(f"{label:<14} {ours:>14.1f} {b} {r} {peak:>11.2f}")
    erm, compiled = rows[0][1], next((o for lbl, o, _, _ in rows if lbl == "ERM compiled"), None)
    if compiled is not None:
        print(f"torch.compile: ERM {compiled / erm:.2f}x the eager step's images/s")
    sam = next(o for lbl, o, _, _ in rows if lbl == "SAM")
    print(f"SAM step / ERM step: {erm / sam:.2f}")


if __name__ == "__main__":
    main()
