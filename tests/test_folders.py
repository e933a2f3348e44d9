"""Folder data sets (Office-Home and its kin) on a small fixture in the real on-disk
layout: listing, albumentations pipelines, clear errors, and a fit through the CLI."""

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.folders import OfficeHome
from dgkit.errors import DGKitError

CLASSES = [f"class_{i:02d}" for i in range(65)]


@pytest.fixture(scope="module")
def officehome_root(tmp_path_factory):
    """OfficeHomeDataset_10072016/<domain>/<class>/*.jpg with 65 classes, 3 images each;
    the class is drawn as a grey level so a model can learn it."""
    root = tmp_path_factory.mktemp("officehome")
    rng = np.random.default_rng(0)
    for d, domain in enumerate(OfficeHome.domains):
        for c, name in enumerate(CLASSES):
            folder = root / "OfficeHomeDataset_10072016" / domain / name
            folder.mkdir(parents=True)
            for j in range(3):
                noise = rng.integers(0, 8, (24, 20, 3), np.uint8)
                image = np.full((24, 20, 3), 3 * c + 10 * d, np.uint8) + noise
                cv2.imwrite(str(folder / f"{j:05d}.jpg"), image)
    return root


def test_lists_every_domain_with_shared_class_indices(officehome_root):
    data = OfficeHome(root=str(officehome_root), image_size=32)
    assert data.classes == CLASSES and data.input_shape == (3, 32, 32)
    art = data.domain_dataset(0)
    assert len(art) == 65 * 3 and art[3] == (str(officehome_root / "OfficeHomeDataset_10072016" / "Art"
                                                   / "class_01" / "00000.jpg"), 1)
    x = data.transform(train=False)(art[3][0])
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    train_x = data.transform(train=True)(art[3][0])
    assert train_x.shape == (3, 32, 32)


def test_datamodule_augments_training_splits_only(officehome_root):
    dm = DomainDataModule(OfficeHome(root=str(officehome_root), image_size=32), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 3 and batch[0][0].shape == (4, 3, 32, 32)
    x1 = next(iter(dm.val_dataloader()[0]))[0]
    x2 = next(iter(dm.val_dataloader()[0]))[0]
    assert torch.equal(x1, x2)  # evaluation images are not augmented


def test_pipeline_from_an_albumentations_file(officehome_root, tmp_path):
    path = tmp_path / "train.yaml"
    A.save(A.Compose([A.Resize(16, 16), A.HorizontalFlip(p=1.0), A.Normalize()]), str(path),
           data_format="yaml")
    data = OfficeHome(root=str(officehome_root), train_transform=str(path))
    x = data.transform(train=True)(data.domain_dataset(0)[0][0])
    assert x.shape == (3, 16, 16)  # the file's pipeline, with ToTensorV2 appended


@pytest.mark.parametrize(("make_root", "message"), [
    (lambda tmp: tmp / "nowhere", "no data root at .*Expected layout: ROOT/OfficeHomeDataset_10072016/"
                                  "<domain>/<class>/<image> with domains Art, Clipart, Product, Real World"),
    (lambda tmp: tmp, "does not hold OfficeHome.*dgkit data download officehome"),
])
def test_missing_or_wrong_root_says_what_layout_is_expected(make_root, message, tmp_path):
    with pytest.raises(DGKitError, match=message):
        OfficeHome(root=str(make_root(tmp_path)))


def test_corrupt_image_is_reported_by_path(officehome_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(officehome_root, root)
    bad = root / "OfficeHomeDataset_10072016" / "Clipart" / "class_07" / "00001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    data = OfficeHome(root=str(root), image_size=32)
    load = data.transform(train=False)
    with pytest.raises(DGKitError, match=f"cannot decode image {bad}"):
        load(str(bad))
    with pytest.raises(DGKitError, match=f"1 image\\(s\\) do not decode:\n  {bad}"):
        OfficeHome(root=str(root), verify=True).domain_dataset(1)
    # Clipart held out: its images are all evaluated (oracle and test), whatever the training draws.
    with pytest.raises(SystemExit):  # from a DataLoader worker, through the CLI: one line, the path
        main(["fit", "--data", "officehome", "--data.dataset.root", str(root), "--data.dataset.image_size",
              "32", "--data.test_domains", "[Clipart]", "--model.backbone", "mlp", "--data.num_workers", "1",
              "--data.eval_batch_size", "512", "--trainer.max_steps", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "-1"])
    err = capsys.readouterr().err
    assert f"cannot decode image {bad}" in err and "Traceback" not in err


def test_fit_and_test_through_the_cli(officehome_root, tmp_path):
    main(["fit", "--data", "officehome", "--data.dataset.root", str(officehome_root),
          "--data.dataset.image_size", "32", "--model.backbone", "mlp", "--data.batch_size", "8",
          "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false"])
    results = json.loads(next(tmp_path.glob("runs/*/test_results.json")).read_text())
    assert results["dataset"] == "OfficeHome" and set(results["domains"]) == {"Art"}
    assert results["source_domains"] == ["Clipart", "Product", "Real World"]
    assert 0.0 <= results["domains"]["Art"]["accuracy"] <= 1.0


def test_crafted_shifts_apply_to_decoded_images_before_the_pipeline(officehome_root):
    dm = DomainDataModule(OfficeHome(root=str(officehome_root), image_size=32), batch_size=4,
                          unlabeled="crafted", unlabeled_shifts=["geometric"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["unlabeled"].shape == (12, 3, 32, 32) and batch["unlabeled"].dtype == torch.float32


@pytest.fixture
def officehome_zip(officehome_root, tmp_path):
    import shutil

    return Path(shutil.make_archive(str(tmp_path / "officehome"), "zip", officehome_root))


def test_download_verifies_and_unpacks_an_archive(officehome_zip, tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from dgkit.data import download

    monkeypatch.setitem(download.SOURCES, "officehome",
                        replace(download.SOURCES["officehome"], images=65 * 4 * 3))
    main(["data", "download", "officehome", "--root", str(tmp_path / "data"),
          "--archive", str(officehome_zip)])
    assert "OfficeHome: 780 images" in capsys.readouterr().out
    assert len(OfficeHome(root=str(tmp_path / "data")).domain_dataset(3)) == 65 * 3
    monkeypatch.setitem(download.SOURCES, "officehome", replace(download.SOURCES["officehome"], images=15588))
    with pytest.raises(DGKitError, match="holds 780 images, the official officehome release has 15588"):
        download.download("officehome", tmp_path / "again", [str(officehome_zip)])


def test_download_rejects_a_corrupt_archive_and_explains_offline_use(officehome_zip, tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils

    from dgkit.data import download

    data = bytearray(officehome_zip.read_bytes())
    data[200:210] = b"XXXXXXXXXX"  # inside the first member's stored bytes
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(DGKitError, match="fails its CRC-32 check"):
        download.download("officehome", tmp_path / "d", [str(bad)])
    with pytest.raises(DGKitError, match=r"MD5 .* differs from the expected 0123"):
        download.verify_archive(officehome_zip, md5="0123")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.utils, "download_file_from_google_drive", offline)
    with pytest.raises(DGKitError, match=r"cannot download https://drive\.google\.com/uc\?id=1uY0.*"
                                         r"--archive FILE"):
        download.download("officehome", tmp_path / "d")
