"""Leave-domains-out data module with DomainBed's splits and per-domain batches.

Every domain is split once, with a fixed seed, into an *in* part (80%) and an *out* part
(``holdout_fraction``). Source domains train on *in* and validate on *out*
(training-domain validation); held-out target domains are tested on *in*, and their
*out* part is the test-domain oracle's validation set, logged separately as ``oracle/*``.

Loader order is part of the contract with ``DGModule``: ``val_dataloader()`` returns one
loader per source domain (in ``Task.source_domains`` order) followed, when
``oracle=True``, by one per target domain; ``test_dataloader()`` one per target domain.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from dgkit.data.base import MultiDomainDataset
from dgkit.data.evaluation import EvaluationPool, StreamLoader
from dgkit.data.mnist import RotatedMNIST
from dgkit.data.resumable import ResumableSampler, Seeded
from dgkit.data.shifts import FOLDS, MixedShifts, ShiftedDataset, resolve_categories
from dgkit.data.steps import Layout, StepData, StepSampler
from dgkit.data.streams import label_shifted, mixed
from dgkit.data.wilds_sets import check_no_domain_options
from dgkit.errors import ConfigError, check_choice
from dgkit.task import Task

Unlabeled = Literal["none", "target", "source_holdout", "crafted", "domains"]
TestStream = Literal["domains", "mixed"]


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into (in, out) with ``out`` of ``holdout_fraction``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_out = round(n * holdout_fraction)
    return sorted(order[n_out:]), sorted(order[:n_out])


class Transformed(Dataset):
    """``(fn(x), y, ...)`` for the samples of ``data``."""

    def __init__(self, data: Dataset, fn):
        self.data, self.fn = data, fn

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, *rest = self.data[index]
        return (self.fn(x), *rest)


class ImagesOnly(Dataset):
    """A data set's inputs without their labels."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index][0]


UNLABELED_KEY = 1000  # sampler key of the unlabeled stream; source domains use their index


def _built_by_cli() -> bool:
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # Lightning moved it: fall back to not saving the data set
        return False
    return _given_hyperparameters.get() is not None


class DomainDataModule(LightningDataModule):
    def __init__(
        self,
        dataset: MultiDomainDataset | None = None,
        test_domains: list[str | int] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        oracle: bool = True,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        shuffle: bool = True,
        unlabeled: Unlabeled = "none",
        unlabeled_domains: list[str | int] | None = None,
        unlabeled_shifts: list[str] | None = None,
        unlabeled_batch_size: int | None = None,
        crafted_validation: list[str] | None = None,
        crafted_training: list[str] | None = None,
        track_test: bool = False,
        test_stream: TestStream = "domains",
        label_shift: float | None = None,
    ):
        """
        Args:
            dataset: the multi-domain data set (``--data ALIAS`` picks one by alias).
            test_domains: held-out domains, by name or index; the rest are sources.
                Default: the data set's customary held-out domain.
            batch_size: samples per source domain per step (DomainBed-style), so a step
                sees ``batch_size * n_sources`` samples.
            eval_batch_size: batch size of validation/test loaders.
            holdout_fraction: share of every domain held out (validation / oracle).
            split_seed: seed of the in/out splits; fixed so runs compare on the same data.
            oracle: also evaluate the held-out *out* split of target domains every
                validation (logged as ``oracle/*``, for test-domain oracle selection).
            num_workers: DataLoader worker processes of each of two pools: the training
                loader's (one for all source domains and the unlabeled pool: a worker loads
                a whole step) and the evaluation streams' (one for all of them, read one
                after another). Default: none for data sets held in memory as tensors (the
                embedded MNIST domains, where workers only add copying); otherwise one per
                CPU core this device's process can spare, up to 8 (image files: decoding and
                augmentation run there). Both pools keep their workers between epochs and
                validations.
            pin_memory: pin host memory for faster copies to the GPU. Default: when
                training on a GPU.
            shuffle: reshuffle training data every epoch (off: a fixed order, which makes
                multi-device and single-device runs see the same global batches).
            unlabeled: images without labels that every training step also receives
                (``Batch.unlabeled``), for algorithms that use them (DivDis, D-BAT):
                ``target``: the held-out domains' *out* split (never the test images) --
                transductive, and every result of such a run is marked so;
                ``source_holdout``: the source domains' *out* split (the validation images,
                without their labels); ``crafted``: that split under crafted shifts
                (``unlabeled_shifts``), new-looking inputs without touching the targets;
                ``domains``: every image of ``unlabeled_domains``, which are then neither
                trained nor tested on; ``none``.
            unlabeled_domains: the domains of ``unlabeled: domains``.
            unlabeled_shifts: shift categories of ``unlabeled: crafted`` (names from
                ``dgkit.data.shifts.CATEGORIES``, a fold ``A``/``B``, or ``all``, the
                default); every source image appears once under each category.
            unlabeled_batch_size: unlabeled images per step (default: ``batch_size`` times
                the number of source domains, the size of the labelled batch, or the whole
                pool where it is smaller: a held-out domain's validation part may be).
            crafted_validation: crafted-shift validation (Efthymiadis et al.): the source
                validation images under each of these shift categories (names, a fold
                ``A``/``B``, or ``all``), one stream per category, logged as
                ``crafted/<metric>/<category>`` with their mean ``crafted/<metric>`` (V_A).
            crafted_training: train on the source images under these categories too: each
                sample is drawn from the original or one of them, uniformly. Folds used
                here may never validate: a category whose fold trains is refused in
                ``crafted_validation``.
            track_test: also evaluate the held-out domains' test splits at every
                validation (``heldout/*``), never used for selection, so that a model can
                be selected after the fact by any method and its test accuracy read off.
            test_stream: how the held-out test images reach the model (what online
                test-time adaptation sees): ``domains``, one stream per held-out domain;
                ``mixed``, one stream of all of them in a seeded random order (named
                ``60+75``).
            label_shift: the concentration of a label-shifted test order (TTAB's): the
                class proportions drift along each stream, drawn from a Dirichlet of this
                concentration over parts of about a test batch each (0.1: a batch holds
                few classes; 100: close to a shuffled stream). Default: the stored order.
        """
        super().__init__()
        self.dataset = dataset if dataset is not None else RotatedMNIST()
        ds = self.dataset
        if batch_size < 1:
            raise ConfigError("data.batch_size", f"{batch_size} is not a batch size", ">= 1")
        if eval_batch_size < 1:
            raise ConfigError("data.eval_batch_size", f"{eval_batch_size} is not a batch size", ">= 1")
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError("data.holdout_fraction", f"{holdout_fraction} is not a fraction",
                              "0 < f < 1")
        if num_workers is not None and num_workers < 0:
            raise ConfigError("data.num_workers", f"{num_workers} workers", ">= 0")
        self.official = hasattr(ds, "official_splits")
        if self.official:
            check_no_domain_options(test_domains, unlabeled, ds.name)
            test_domains = []
        if test_domains is not None and not list(test_domains) and not self.official:
            raise ConfigError("data.test_domains", "is empty: the run would test on nothing",
                              f"one or more of {list(ds.domains)} (or leave it out for "
                              f"{list(ds.default_test_domains)})")
        chosen = list(ds.default_test_domains) if test_domains is None else list(test_domains)
        self.test_indices = sorted({self._domain_index(d) for d in chosen})
        check_choice(unlabeled, Unlabeled, "data.unlabeled")
        if unlabeled_shifts is not None and unlabeled != "crafted":
            raise ConfigError("data.unlabeled_shifts", "goes with --data.unlabeled crafted",
                              "no shifts, or unlabeled: crafted")
        self.unlabeled_shifts = resolve_categories(unlabeled_shifts or ["all"], "data.unlabeled_shifts")
        if (unlabeled == "domains") != bool(unlabeled_domains):
            raise ConfigError("data.unlabeled_domains", "goes with --data.unlabeled domains",
                              "a list of domains together with unlabeled: domains")
        self.unlabeled_indices = sorted({self._domain_index(d, "data.unlabeled_domains")
                                         for d in unlabeled_domains or []})
        if set(self.unlabeled_indices) & set(self.test_indices):
            raise ConfigError("data.unlabeled_domains", "a held-out domain cannot be the unlabeled "
                              "pool (that is unlabeled: target)", "domains not in test_domains")
        self.source_indices = [i for i in range(len(ds.domains))
                               if i not in self.test_indices and i not in self.unlabeled_indices]
        if not self.source_indices and not self.official:
            raise ConfigError("data.test_domains", "every domain is held out; nothing to train on",
                              f"a subset of {list(ds.domains)}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.holdout_fraction, self.split_seed = holdout_fraction, split_seed
        self.oracle, self.num_workers, self.pin_memory = oracle, num_workers, pin_memory
        self.shuffle = shuffle
        self.unlabeled = unlabeled
        self.unlabeled_batch_size = unlabeled_batch_size
        self.crafted_validation = resolve_categories(crafted_validation or [], "data.crafted_validation")
        self.crafted_training = resolve_categories(crafted_training or [], "data.crafted_training")
        seen = {f for f, cats in FOLDS.items() if set(cats) & set(self.crafted_training)}
        leaking = [c for c in self.crafted_validation if any(c in FOLDS[f] for f in seen)]
        if leaking:
            raise ConfigError("data.crafted_validation", f"{', '.join(leaking)} share a fold with "
                              f"the training shifts {', '.join(self.crafted_training)}; a fold seen "
                              "in training never validates", "categories of the other fold")
        self.track_test = track_test
        check_choice(test_stream, TestStream, "data.test_stream")
        if test_stream == "mixed" and self.official:
            raise ConfigError("data.test_stream", f"mixed joins held-out domains, and {ds.name} tests "
                              "its official splits", "domains")
        if label_shift is not None and not label_shift > 0:
            raise ConfigError("data.label_shift", f"{label_shift} is not a Dirichlet concentration",
                              "> 0 (0.1: strongly shifted), or null for the stored order")
        self.test_stream, self.label_shift = test_stream, label_shift
        self.splits: dict[int, tuple[Dataset, Dataset]] = {}
        self.official_train: Dataset | None = None
        self.official_streams: dict[str, list[Dataset]] = {}
        self._crafted_training: dict[int, Dataset] = {}
        self._sampler: StepSampler | None = None
        self._resume_at: dict[str, int] | None = None
        # Under the CLI the hparams are the parsed config (the data set as a class path), which
        # lets `dgkit test --ckpt_path` rebuild the data; a bare object would be pickled.
        self.save_hyperparameters(ignore=[] if _built_by_cli() else ["dataset"])

    def _domain_index(self, domain: str | int, parameter: str = "data.test_domains") -> int:
        names = self.dataset.domains
        if str(domain) in names:  # names first: RotatedMNIST's domains are called "0", "15", ...
            return names.index(str(domain))
        if isinstance(domain, int) and 0 <= domain < len(names):
            return domain
        raise ConfigError(parameter, f"{self.dataset.name} has no domain {domain!r}",
                          ", ".join(f"{n!r} ({i})" for i, n in enumerate(names)))

    @property
    def task(self) -> Task:
        ds = self.dataset
        if self.official:  # WILDS: its splits, then ours on top, test last
            sources, targets = tuple(ds.domains), ds.streams["test"]
            validation = tuple((s, n) for s, n in ds.streams.items() if s != "test")
        else:
            sources = tuple(ds.domains[i] for i in self.source_indices)
            targets = tuple(ds.domains[i] for i in self.test_indices)
            validation = (("val", sources), *((("oracle", targets),) if self.oracle else ()))
        # The one place that orders the evaluation streams; the loaders follow it.
        tested = ("+".join(targets),) if self.test_stream == "mixed" else targets
        streams = (*validation,
                   *((("crafted", self.crafted_validation),) if self.crafted_validation else ()),
                   *((("heldout", targets),) if self.track_test else ()), ("test", tested))
        return Task(
            streams=streams,
            input_shape=tuple(ds.input_shape),
            num_classes=ds.num_classes,
            source_domains=sources,
            target_domains=targets,
            default_backbone=ds.default_backbone,
            default_pretrained=ds.default_pretrained,
            headline_metrics=ds.headline_metrics,
            average_test=not self.official,
            dataset=ds.name,
            unlabeled=self.unlabeled,
            selection_metric=ds.selection_metric,
            evaluator=ds.evaluator(),
        )

    # --- splits -----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits or self.official_streams:
            return
        if self.official:
            self.official_train, self.official_streams = self.dataset.official_splits()
            return
        for i in range(len(self.dataset.domains)):
            data = self.dataset.domain_dataset(i)
            # Seed per domain so adding a domain never reshuffles the others.
            inn, out = split_indices(len(data), self.holdout_fraction, self.split_seed * 1000 + i)
            self.splits[i] = (Subset(data, inn), Subset(data, out))
        for i in self.source_indices:
            n = len(self.splits[i][0])
            if n < self.batch_size:
                raise ConfigError("data.batch_size", f"source domain {self.dataset.domains[i]!r} "
                                  f"has only {n} training samples", f"<= {n}")

    def _training_split(self, index: int) -> Dataset:
        data = self.official_train if self.official else self.splits[index][0]
        if not self.crafted_training:
            return data
        if self._crafted_training.get(index) is None:  # fixed draws, cached across epochs
            self._crafted_training[index] = MixedShifts(data, [
                ShiftedDataset(data, c, seed=self.split_seed) for c in self.crafted_training])
        return self._crafted_training[index]

    def _view(self, data: Dataset, train: bool) -> Dataset:
        """``data`` as model inputs: the data set's training or evaluation transform."""
        fn = self.dataset.transform(train)
        return data if fn is None else Transformed(data, fn)

    def _training_loader(self, streams: list[tuple[Dataset, int, int]], layout: Layout) -> DataLoader:
        """One loader for every ``(data, batch size, sampler key)`` stream of a step."""
        # Order and augmentation as functions of (seed, epoch, pass, position), never of
        # the global RNG, so a resumed run draws what the uninterrupted one would have;
        # under DDP each rank takes its share, as DistributedSampler(drop_last) does.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        for data, batch_size, key in streams:
            # A stream without one full batch per device would end every epoch at step 0.
            if len(data) // world < batch_size:
                raise self._short_stream(key, len(data) // world, batch_size)
        seed = torch.initial_seed()
        self._sampler = StepSampler([
            ResumableSampler(len(data), batch_size, shuffle=self.shuffle, seed=seed, key=key,
                             rank=rank, world_size=world) for data, batch_size, key in streams])
        workers = self.workers
        # batch_size=None: the sampler draws whole steps, which the worker collates per stream
        return DataLoader(StepData([Seeded(data) for data, _, _ in streams], layout), batch_size=None,
                          sampler=self._sampler, num_workers=workers, pin_memory=self.pins_memory,
                          persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))

    def _short_stream(self, key: int, size: int, batch_size: int) -> ConfigError:
        where = " per device" if self._world_size > 1 else ""
        if key == UNLABELED_KEY:
            return ConfigError("data.unlabeled_batch_size", f"{batch_size} is more than the {size} images"
                               f"{where} of the unlabeled pool ({self.unlabeled})", f"<= {size}")
        name = "the training data" if self.official else f"source domain {self.dataset.domains[key]!r}"
        return ConfigError("data.batch_size", f"{batch_size} is more than the {size} training samples"
                           f"{where} of {name}", f"<= {size}")

    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def workers(self) -> int:
        """DataLoader workers per loader (``num_workers``, or the machine's default)."""
        if self.num_workers is not None:
            return self.num_workers
        if self.dataset.transform(True) is None:  # tensors in memory: nothing to decode
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return max(0, min(8, cores // devices - 1))

    @property
    def pins_memory(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    # --- resuming: where in the epoch the training loaders stood ------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # Batches of this epoch the model has trained on (prefetched ones not counted).
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = state_dict if "batches" in state_dict else None

    def train_dataloader(self) -> DataLoader:
        loader = self._training_loaders()
        if self._resume_at is not None:
            self._sampler.start(self._resume_at["epoch"], self._resume_at["batches"])
            self._resume_at = None
        return loader

    def _training_loaders(self) -> DataLoader:
        if self.official:  # many domains: one shuffled stream, each sample with its domain
            return self._training_loader([(self._view(self._training_split(0), True), self.batch_size, 0)],
                                         "mixed")
        # One minibatch per source domain per step; smaller domains cycle (DomainBed
        # draws each domain's batch independently).
        sources = [(self._view(self._training_split(i), True), self.batch_size, i)
                   for i in self.source_indices]
        if self.unlabeled == "none":
            return self._training_loader(sources, "sources")
        if self.unlabeled == "domains":
            pool = [part for i in self.unlabeled_indices for part in self.splits[i]]
        elif self.unlabeled == "crafted":
            pool = [ShiftedDataset(self.splits[i][1], category, seed=self.split_seed)
                    for i in self.source_indices for category in self.unlabeled_shifts]
        else:
            indices = self.test_indices if self.unlabeled == "target" else self.source_indices
            pool = [self.splits[i][1] for i in indices]
        images = ImagesOnly(self._view(ConcatDataset(pool), False))
        per_device = len(images) // self._world_size
        batch = self.unlabeled_batch_size or min(self.batch_size * len(self.source_indices), per_device)
        return self._training_loader([*sources, (images, batch, UNLABELED_KEY)], "sources+unlabeled")

    def _stream_data(self, stage: str) -> list[Dataset]:
        """The data of every stream of evaluation ``stage`` (``Task.streams`` names them)."""
        if self.official:  # crafted shifts of the in-distribution validation split (id_val)
            holdouts = self.official_streams["val"]
            if stage not in ("crafted", "heldout"):
                return self.official_streams[stage]
        else:
            holdouts = [self.splits[i][1] for i in self.source_indices]
        if stage == "val":
            return holdouts
        if stage == "oracle":
            return [self.splits[i][1] for i in self.test_indices]
        if stage == "crafted":
            return [ShiftedDataset(ConcatDataset(holdouts), category, seed=self.split_seed)
                    for category in self.crafted_validation]
        if self.official:
            return self.official_streams["test"]
        return [self.splits[i][0] for i in self.test_indices]  # heldout and test

    def _test_streams(self) -> list[Dataset]:
        """The test streams of the scenario (``test_stream``, ``label_shift``)."""
        streams = self._stream_data("test")
        if self.test_stream == "mixed":
            streams = [mixed(streams, self.split_seed)]
        if self.label_shift is not None:
            streams = [label_shifted(s, self.label_shift, -(-len(s) // self.eval_batch_size),
                                     self.split_seed + i) for i, s in enumerate(streams)]
        return streams

    def test_scenario(self) -> dict[str, Any]:
        """How the test streams were cut and ordered, for the results."""
        return {"streams": self.test_stream, "label_shift": self.label_shift,
                "batch_size": self.eval_batch_size}

    def _eval_loaders(self, stages: list[tuple[str, int]], shard: bool = True) -> list[StreamLoader]:
        """One loader per ``(stage, stream)``, all served by one pool of workers; ``shard``:
        each DDP rank reads its share (for Lightning's loops, which gather the metrics)."""
        if not stages:
            return []
        data = {stage: self._test_streams() if stage == "test" else self._stream_data(stage)
                for stage, _ in stages}
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if shard and trainer is not None else (0, 1)
        streams = [self._view(data[stage][i], False) for stage, i in stages]
        return EvaluationPool(streams, self.eval_batch_size, num_workers=self.workers,
                              pin_memory=self.pins_memory, rank=rank, world=world).loaders

    def val_dataloader(self) -> list[StreamLoader]:
        return self._eval_loaders(self.task.validation_streams)

    def validation_dataloaders(self, stage: str) -> list[StreamLoader]:
        """The loaders of one validation stage (``val``, ``oracle``, ...), in stream order:
        what head selection and test-time hyperparameter selection evaluate on. Not
        sharded: every rank reads all of it, so what it selects agrees across ranks."""
        return self._eval_loaders([(s, i) for s, i in self.task.validation_streams if s == stage],
                                  shard=False)

    @property
    def images_per_step(self) -> str:
        """How a training step's images are made up, for messages about memory."""
        if self.official:  # one shuffled stream of all training domains
            return f"{self.batch_size} images per step per device"
        domains = len(self.source_indices)
        return (f"{self.batch_size} per domain x {domains} domain(s) = {self.batch_size * domains} "
                "images per step per device")

    def test_dataloader(self) -> list[StreamLoader]:
        return self._eval_loaders([("test", i) for i in range(len(self.task.stages["test"]))])

    def source_eval_dataloader(self, include_holdout: bool = True) -> DataLoader:
        """All source domains in evaluation order (in-splits, and out-splits if asked), for
        test-time stages that learn from source data (AdaNPC's memory). Not distributed:
        every rank reads all of it, so state built from it agrees across ranks."""
        if self.official:
            parts = [self.official_train]
        else:
            parts = [self.splits[i][0] for i in self.source_indices]
        if include_holdout:
            parts += self._stream_data("val")
        return DataLoader(self._view(ConcatDataset(parts), False), batch_size=self.eval_batch_size,
                          shuffle=False, num_workers=self.workers, pin_memory=self.pins_memory,
                          generator=torch.Generator())

    def predict_dataloader(self) -> list[StreamLoader]:
        return self.test_dataloader()
