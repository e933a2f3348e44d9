"""ERM from scratch against ERM started from a Bonsai (RFC) representation, on Colored MNIST.

Run by hand:  python benchmarks/bonsai_init.py [--seeds 0 1 2] [--erm-steps 300]

Per seed: a Bonsai run (2 discovery rounds and a synthesis, source validation every
epoch, so each round keeps its best-validation weights), then three ERM runs of the same
length: from a random initialization, from the Bonsai checkpoint (``init_from``: the
synthesis featurizer and the averaged head), and the same with the featurizer frozen
("(cf)"). Prints held-out (-90%) accuracy, mean and standard deviation over seeds, as the
paper's Table 1 reports it (ERM: 27.3 random init, 43.4 RFC init, 35.6 RFC(cf)).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning import Trainer, seed_everything

from dgkit.data import DomainDataModule
from dgkit.data.mnist import ColoredMNIST
from dgkit.module import DGModule
from dgkit_algorithms import ERM, Bonsai


def fit(algorithm, data: DomainDataModule, steps: int, seed: int, lr: float = 1e-3,
        **module_args) -> tuple[DGModule, Trainer]:
    seed_everything(seed)
    model = DGModule(algorithm=algorithm, task=data.task, backbone="mlp",
                     optimizer=functools.partial(torch.optim.Adam, lr=lr), **module_args)
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    return model, trainer


def held_out_accuracy(model: DGModule, data: DomainDataModule) -> float:
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader()[0]:
            correct += (model.algorithm.eval()(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage-steps", type=int, nargs=3, default=[300, 300, 300],
                        metavar=("ROUND0", "ROUND1", "SYNTHESIS"))
    parser.add_argument("--erm-steps", type=int, default=300)
    parser.add_argument("--erm-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    results: dict[str, list[float]] = {"ERM (random init)": [], "ERM (Bonsai init)": [],
                                       "ERM (Bonsai init, frozen featurizer)": [],
                                       "Bonsai round 0": [], "Bonsai round 1": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            data = DomainDataModule(ColoredMNIST(), batch_size=args.batch_size)
            bonsai, trainer = fit(functools.partial(Bonsai, stage_steps=args.stage_steps), data,
                                  sum(args.stage_steps), seed)
            ckpt = Path(tmp) / f"bonsai-{seed}.ckpt"
            trainer.save_checkpoint(ckpt)
            data.setup("test")
            xs, ys = zip(*data.test_dataloader()[0], strict=True)
            with torch.no_grad():
                heads = bonsai.algorithm.eval().head_logits(torch.cat(xs)).argmax(-1)
            per_head = (heads == torch.cat(ys)[:, None]).float().mean(0).tolist()
            results["Bonsai round 0"].append(per_head[0])
            results["Bonsai round 1"].append(per_head[1])
            for name, extra in (("ERM (random init)", {}),
                                ("ERM (Bonsai init)", {"init_from": str(ckpt)}),
                                ("ERM (Bonsai init, frozen featurizer)",
                                 {"init_from": str(ckpt), "freeze_featurizer": True})):
                model, _ = fit(ERM, data, args.erm_steps, seed, args.erm_lr, **extra)
                results[name].append(held_out_accuracy(model, data))
            print(f"seed {seed}: " + ", ".join(f"{k} {100 * v[-1]:.1f}" for k, v in results.items()),
                  flush=True)
    print(f"\nColored MNIST, held-out -90% accuracy over seeds {args.seeds} "
          f"(Bonsai stages {args.stage_steps}, ERM {args.erm_steps} steps at lr {args.erm_lr}, MLP, "
          f"{time.perf_counter() - start:.0f} s):")
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {name:40s} {100 * statistics.mean(values):5.1f} +- {100 * spread:4.1f}")


if __name__ == "__main__":
    main()
