"""The training loop's fixed cost: ``dgkit fit`` as users run it against DomainBed's loop
and a bare PyTorch loop, over the same network, data, batch and optimizer, at step sizes
from a few milliseconds up.

Run by hand:

    git clone https://github.com/facebookresearch/DomainBed /tmp/DomainBed
    python benchmarks/loop_overhead.py --domainbed /tmp/DomainBed [--accelerator gpu]

- **dgkit**: the installed ``dgkit fit`` command in a subprocess with its defaults (CSV and
  TensorBoard loggers, the progress bar, the checkpoint callbacks, the resume checkpoint,
  the divergence check), and only a timing callback added the way a user adds one
  (``--trainer.callbacks+=``); its time is from one batch start to the next.
- **DomainBed**: its ``InfiniteDataLoader`` and ``update()``, timed as its ``train.py``
  times ``step_time`` (``benchmarks/vs_domainbed.py`` runs it); only with the MNIST CNN,
  the network DomainBed builds for MNIST.
- **Lightning**: Lightning's own loop with nothing of dgkit's: a ``LightningModule`` whose
  ``training_step`` is the bare loop's, a ``DataLoader`` of the bare loop's minibatches, a
  ``Trainer`` without logger, checkpointing, progress bar or summary. What dgkit costs over
  it is dgkit's; what it costs over the bare loop is Lightning's floor.
- **bare**: the same network as ``nn.Sequential``, minibatches indexed from the training
  tensors already in memory, ``cross_entropy``, ``backward``, ``Adam.step``.

Rotated MNIST, 0 degrees held out, 5 source domains, Adam lr 1e-3 without weight decay.
Median over ``--steps`` steps after ``--warmup``, the median of ``--rounds`` rounds in which
the sides alternate (this machine is shared and noisy). Prints per step size each side's
ms per step, dgkit's fixed cost over the bare loop and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import Callback

HERE = Path(__file__).resolve().parent
SIZES = [("mlp", 2), ("mnist_cnn", 2), ("mnist_cnn", 8), ("mnist_cnn", 32), ("mnist_cnn", 64)]


class StepClock(Callback):
    """Writes the time from one training batch start to the next, in seconds, to ``path``."""

    def __init__(self, path: str):
        self.path, self.starts = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]
        Path(self.path).write_text(json.dumps(gaps))


def fit_with_callback(fit_args: list[str], callback: str) -> object:
    """Run the installed ``dgkit fit`` with ``callback`` (a class of this folder taking
    ``path``) added as a user adds one; return what the callback wrote to ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callback.json"
        spec = {"class_path": callback, "init_args": {"path": str(out)}}
        command = [str(Path(sys.executable).with_name("dgkit")), "fit", *fit_args,
                   f"--trainer.callbacks+={json.dumps(spec)}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"dgkit fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def dgkit_steps(backbone: str, batch: int, args: argparse.Namespace) -> list[float]:
    steps = fit_with_callback([
        "--algo", "erm", "--data", "rotated_mnist", "--data.test_domains", "[0]",
        "--data.batch_size", str(batch), "--model.backbone", backbone,
        "--model.optimizer", "torch.optim.Adam", "--model.optimizer.lr", "1e-3",
        "--model.optimizer.weight_decay", "0", "--trainer.max_steps", str(args.warmup + args.steps + 1),
        "--trainer.accelerator", args.accelerator, "--trainer.precision", args.precision,
        *args.dgkit_args], "loop_overhead.StepClock")
    return steps[args.warmup:]


def _network_and_domains(backbone: str, batch: int, device: str):
    """dgkit's ERM network as ``nn.Sequential`` and the source domains' training tensors."""
    from lightning import seed_everything

    from dgkit.data import DomainDataModule
    from dgkit.data.mnist import RotatedMNIST
    from dgkit.module import DGModule
    from dgkit_algorithms import ERM

    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), test_domains=["0"], batch_size=batch)
    data.setup("fit")
    erm = DGModule(algorithm=ERM, task=data.task, backbone=backbone).algorithm
    net = torch.nn.Sequential(erm.featurizer, erm.classifier).to(device)
    domains = []
    for i in data.source_indices:
        split = data.splits[i][0]
        samples = [split[j] for j in range(len(split))]
        domains.append((torch.stack([x for x, _ in samples]).to(device),
                        torch.tensor([int(y) for _, y in samples]).to(device)))
    return net, domains


def _minibatch(domains: list, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    picks = [torch.randint(len(y), (batch,), device=device) for _, y in domains]
    x = torch.cat([xs[p] for (xs, _), p in zip(domains, picks, strict=True)])
    y = torch.cat([ys[p] for (_, ys), p in zip(domains, picks, strict=True)])
    return x, y


def _device(args: argparse.Namespace) -> str:
    return "cuda" if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu"


def lightning_steps(backbone: str, batch: int, args: argparse.Namespace) -> list[float]:
    from lightning import LightningModule, Trainer
    from torch.utils.data import DataLoader, Dataset

    device = _device(args)  # once: on a CPU-only CUDA build each CUDA check costs 0.16 ms
    net, domains = _network_and_domains(backbone, batch, "cpu")
    domains = [(x.to(device), y.to(device)) for x, y in domains]

    class Minibatches(Dataset):  # the bare loop's draws, one per step
        def __len__(self) -> int:
            return args.warmup + args.steps + 1

        def __getitem__(self, index: int):
            return _minibatch(domains, batch, device)

    class Plain(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, step, batch_idx):
            x, y = step
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.net.parameters(), lr=1e-3, weight_decay=0.0)

    with tempfile.TemporaryDirectory() as tmp:
        clock = StepClock(str(Path(tmp) / "steps.json"))
        trainer = Trainer(accelerator=args.accelerator, devices=1, precision=args.precision,
                          max_steps=args.warmup + args.steps + 1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[clock], default_root_dir=tmp)
        trainer.fit(Plain(), DataLoader(Minibatches(), batch_size=None))
        return json.loads((Path(tmp) / "steps.json").read_text())[args.warmup:]


def bare_steps(backbone: str, batch: int, args: argparse.Namespace) -> list[float]:
    device = _device(args)
    net, domains = _network_and_domains(backbone, batch, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=0.0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))
    times, last = [], time.perf_counter()
    for _ in range(args.warmup + args.steps):
        x, y = _minibatch(domains, batch, device)
        with autocast:
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[args.warmup:]


def domainbed_steps(backbone: str, batch: int, args: argparse.Namespace) -> list[float] | None:
    if args.domainbed is None or backbone != "mnist_cnn":
        return None
    sys.path.insert(0, str(HERE))
    from vs_domainbed import domainbed_steps as run

    return run("erm", argparse.Namespace(batch_size=batch, rho=0.05, accelerator=args.accelerator,
                                         warmup=args.warmup, steps=args.steps), args.domainbed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domainbed", type=Path, help="a DomainBed checkout (without: no DomainBed column)")
    parser.add_argument("--sizes", nargs="+", default=[f"{b}:{n}" for b, n in SIZES],
                        help="backbone:batch per domain pairs")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--dgkit-args", nargs="*", default=[],
                        help="more `dgkit fit` arguments (what turning a default off saves), after --")
    args = parser.parse_args()
    if args.domainbed is not None and not (args.domainbed / "domainbed" / "algorithms.py").exists():
        parser.error(f"{args.domainbed} has no domainbed/algorithms.py: pass the root of a checkout")

    rows = []
    for size in args.sizes:
        backbone, batch = size.split(":")[0], int(size.split(":")[1])
        medians: dict[str, list[float]] = {"dgkit": [], "DomainBed": [], "Lightning": [], "bare": []}
        sides = (("dgkit", dgkit_steps), ("DomainBed", domainbed_steps), ("Lightning", lightning_steps),
                 ("bare", bare_steps))
        for _ in range(args.rounds):  # alternate, so drifts of the machine hit every side
            for side, fn in sides:
                steps = fn(backbone, batch, args)
                if steps is not None:
                    medians[side].append(statistics.median(steps))
        ms = [1000 * statistics.median(m) if m else None for m in medians.values()]
        rows.append((backbone, batch, *ms))
        print(f"done {backbone} {batch}", file=sys.stderr)
    device = (torch.cuda.get_device_name() if args.accelerator != "cpu" and torch.cuda.is_available()
              else f"CPU, {torch.get_num_threads()} threads")
    print(f"\nERM on Rotated MNIST, 5 source domains, {device}, {args.precision}, "
          f"median of {args.rounds} rounds x {args.steps} steps (ms per step)")
    print(f"{'network':<10} {'batch':>5} {'dgkit':>8} {'DomainBed':>10} {'Lightning':>10} {'bare':>8} "
          f"{'dgkit-bare':>11} {'dgkit-Lightning':>16} {'dgkit/bare':>11} {'dgkit/DomainBed':>16}")
    for backbone, batch, ours, theirs, plain, bare in rows:
        db = f"{theirs:>10.2f}" if theirs is not None else f"{'-':>10}"
        ratio = f"{ours / theirs:>16.3f}" if theirs is not None else f"{'-':>16}"
        print(f"{backbone:<10} {batch:>5} {ours:>8.2f} {db} {plain:>10.2f} {bare:>8.2f} {ours - bare:>11.2f} "
              f"{ours - plain:>16.2f} {ours / bare:>11.3f} {ratio}")


if __name__ == "__main__":
    main()
