"""WILDS benchmarks through the ``wilds`` package on small fixtures in the real on-disk
layouts (Camelyon17, iWildCam): official splits, grouper domains, official evaluators."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.wilds_sets import Camelyon17, avg_over_groups
from dgkit.errors import ConfigError, DGKitError


@pytest.fixture(scope="module")
def camelyon_root(tmp_path_factory):
    """camelyon17_v1.0/: RELEASE_v1.0.txt, metadata.csv (index first, patient as a zero-padded
    string), 96x96 PNG patches; hospitals 0, 3, 4 train (split 0) or id_val (split 1),
    wilds moves hospital 1 to OOD val and 2 to test. Tumour patches are bright."""
    root = tmp_path_factory.mktemp("wilds")
    folder = root / "camelyon17_v1.0"
    rng = np.random.default_rng(0)
    rows = []
    for center in range(5):
        for i in range(24):
            patient, node, tumor = f"{center * 10 + i % 2:03d}", i % 2, i % 2
            x, y = 100 + i, 200 + i
            path = folder / f"patches/patient_{patient}_node_{node}"
            path.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(0, 30, (96, 96, 3), np.uint8)
            image = np.full((96, 96, 3), 60 + 120 * tumor, np.uint8) + noise
            cv2.imwrite(str(path / f"patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"), image)
            rows.append({"patient": patient, "node": node, "x_coord": x, "y_coord": y, "tumor": tumor,
                         "slide": center * 2 + node, "center": center, "split": int(i >= 18)})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv")
    (folder / "RELEASE_v1.0.txt").write_text("v1.0")
    return root


@pytest.fixture(scope="module")
def iwildcam_root(tmp_path_factory):
    """iwildcam_v2.0/: RELEASE_v2.0.txt, metadata.csv (no index; split, filename, y,
    location_remapped, sequence_remapped, datetime), images under train/; classes,
    locations and sequences each cover 0..max."""
    root = tmp_path_factory.mktemp("wilds")
    folder = root / "iwildcam_v2.0"
    (folder / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    plan = {"train": [0, 1, 2], "id_val": [0, 1, 2], "val": [3], "test": [4], "id_test": [0, 1, 2]}
    seq = 0
    for split, locations in plan.items():
        for location in locations:
            for j in range(6):
                y = j % 3
                name = f"{split}_{location}_{j}.jpg"
                noise = rng.integers(0, 20, (40, 48, 3), np.uint8)
                image = np.full((40, 48, 3), 40 + 80 * y, np.uint8) + noise
                cv2.imwrite(str(folder / "train" / name), image)
                rows.append({"split": split, "filename": name, "y": y, "location_remapped": location,
                             "sequence_remapped": seq, "datetime": "2013-06-05 10:20:30.000"})
                seq += 1
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    (folder / "RELEASE_v2.0.txt").write_text("v2.0")
    return root


def test_importing_wilds_starts_no_update_check_and_needs_no_torch_scatter():
    probe = ("from dgkit.data.wilds_sets import import_wilds; import_wilds(); import sys, wilds.version; "
             "print(wilds.version.check_outdated, 'outdated' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]  # no update thread, and outdated left alone
    v = torch.tensor([1.0, 2.0, 3.0, 5.0])
    g = torch.tensor([0, 0, 2, 2])
    means, counts = avg_over_groups(v, g, 3)
    assert means.tolist() == [1.5, 0.0, 4.0] and counts.tolist() == [2.0, 0.0, 2.0]


def test_camelyon_splits_domains_and_official_evaluation(camelyon_root):
    data = Camelyon17(root=str(camelyon_root), image_size=32)
    assert data.domains == ("hospital = 0", "hospital = 3", "hospital = 4") and data.num_classes == 2
    dm = DomainDataModule(data, batch_size=8)
    task = dm.task
    assert task.stages == {"val": ("id_val",), "ood_val": ("val",), "test": ("test",)}
    dm.setup("fit")
    train = dm.official_train
    assert len(train) == 3 * 18 and set(train.domains.tolist()) == {0, 1, 2}
    assert [len(s) for s in dm.official_streams["ood_val"]] == [24]
    batch = next(iter(dm.train_dataloader()))
    x, y, d = batch["mixed"]
    assert x.shape == (8, 3, 32, 32) and d.dtype == torch.long
    x, y, metadata = next(iter(dm.test_dataloader()[0]))
    assert len(metadata) == 24 and (metadata[:, 0] == 2).all()  # hospital 2 is the test
    results = data.evaluator()(y, y, metadata)
    assert results["acc_avg"] == 1.0


def test_missing_wilds_root_says_what_to_put_where(tmp_path):
    expected = r"no WILDS data at .*camelyon17_v1\.0\. Expected .*RELEASE_v1\.0\.txt"
    with pytest.raises(DGKitError, match=expected):
        Camelyon17(root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.test_domains: .*official splits"):
        DomainDataModule(Camelyon17.__new__(Camelyon17), test_domains=["x"])


@pytest.mark.parametrize(("alias", "root", "metrics"), [
    ("camelyon17", "camelyon_root", {"accuracy", "acc_avg"}),
    ("iwildcam", "iwildcam_root", {"accuracy", "F1-macro_all", "acc_avg"}),
])
def test_fit_and_test_with_official_metrics(alias, root, metrics, request, tmp_path):
    main(["fit", "--data", alias, "--data.dataset.root", str(request.getfixturevalue(root)),
          "--data.dataset.image_size", "32", "--model.backbone", "mlp", "--data.batch_size", "8",
          "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
          "--trainer.enable_progress_bar", "false"])
    results = json.loads(next(tmp_path.glob("runs/*/test_results.json")).read_text())
    assert metrics <= set(results["domains"]["test"])
    assert "official" not in " ".join(results["domains"]["test"])
    metrics_csv = pd.read_csv(next(tmp_path.glob("runs/*/metrics.csv")))
    selection = {"camelyon17": "ood_val/acc_avg", "iwildcam": "ood_val/F1-macro_all"}[alias]
    assert selection in metrics_csv.columns  # WILDS selects on its OOD validation split
    assert selection.split("/")[1] in results["selection"]


def test_corrupt_wilds_image_is_reported_by_file(camelyon_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(camelyon_root, root)
    data = Camelyon17(root=str(root), image_size=32)
    dm = DomainDataModule(data)
    dm.setup("fit")
    stream = dm.official_streams["test"][0]
    name = stream.subset.dataset._input_array[stream.subset.indices[0]]
    (root / "camelyon17_v1.0" / name).write_bytes(b"\x89PNG broken")
    with pytest.raises(DGKitError, match=f"cannot read image {name} under .*camelyon17_v1.0"):
        stream[0]


def test_crafted_shifts_and_heldout_tracking_on_official_splits(camelyon_root):
    """Crafted validation shifts the in-distribution validation split (id_val), crafted
    training mixes shifted copies into the training stream, and the OOD test is tracked."""
    data = Camelyon17(root=str(camelyon_root), image_size=32)
    dm = DomainDataModule(data, batch_size=8, crafted_validation=["edges", "weather"],
                          crafted_training=["color"], track_test=True)
    assert list(dm.task.stages) == ["val", "ood_val", "crafted", "heldout", "test"]
    assert dm.task.stages["crafted"] == ("edges", "weather")
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert len(loaders) == 5
    clean = next(iter(loaders[0]))
    edged = next(iter(loaders[2]))
    assert torch.equal(clean[1], edged[1]) and torch.equal(clean[2], edged[2])  # same samples
    assert not torch.equal(clean[0], edged[0])
    heldout, test = next(iter(loaders[4])), next(iter(dm.test_dataloader()[0]))
    assert torch.equal(heldout[0], test[0])
    x, _, domains = next(iter(dm.train_dataloader()))["mixed"]
    assert x.shape == (8, 3, 32, 32) and domains.dtype == torch.long
    mixed = dm._training_split(0)
    assert [s.category for s in mixed.shifted] == ["color"] and mixed.data is dm.official_train
    with pytest.raises(ConfigError, match="share a fold"):
        DomainDataModule(data, crafted_validation=["blur"], crafted_training=["color"])
