"""Every bad input: one ``dgkit: error:`` line naming the problem and the fix, exit code 2,
no traceback. Each row is a command a user could type, on files laid out as users have them;
the README's table of errors shows the same rows."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from e2e.command import QUIET, dgkit

DOMAINS = ("Art", "Clipart", "Product", "Real World")
CLASSES = [f"class_{i:02d}" for i in range(65)]
FAST = ["--trainer.max_steps=2", "--data.batch_size=2", "--model.backbone=mlp", *QUIET]


def officehome(root: Path, images: int = 1) -> Path:
    """OfficeHomeDataset_10072016/<domain>/<class>/<image>.jpg, as the archive unpacks."""
    for d, domain in enumerate(DOMAINS):
        for c, name in enumerate(CLASSES):
            folder = root / "OfficeHomeDataset_10072016" / domain / name
            folder.mkdir(parents=True)
            for j in range(images):
                cv2.imwrite(str(folder / f"{j:05d}.jpg"), np.full((16, 16, 3), 3 * c + 10 * d, np.uint8))
    return root


@pytest.fixture(scope="module")
def good_root(tmp_path_factory) -> Path:
    return officehome(tmp_path_factory.mktemp("oh"), images=2)


def _copy(good_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(good_root, root)
    return root


def _fit_officehome(root: Path) -> list[str]:
    return ["fit", "--data", "officehome", "--data.dataset.root", str(root)]


def _without(folder: str):
    """Office-Home with one folder (a domain, or a domain's class) removed."""
    def setup(tmp_path: Path, good_root: Path) -> list[str]:
        root = _copy(good_root, tmp_path)
        shutil.rmtree(root / "OfficeHomeDataset_10072016" / folder)
        return _fit_officehome(root)
    return setup


def _extra_class(tmp_path: Path, good_root: Path) -> list[str]:
    root = _copy(good_root, tmp_path)
    (root / "OfficeHomeDataset_10072016" / "Art" / "extra").mkdir()
    return _fit_officehome(root)


def _beside_folder(tmp_path: Path, good_root: Path) -> list[str]:
    (tmp_path / "fmow").mkdir()  # --data fmow is still the alias
    return ["fit", "--data", "fmow", "--data.dataset.root", str(tmp_path / "x")]


def _config_typo(tmp_path: Path, good_root: Path) -> list[str]:
    (tmp_path / "c.yaml").write_text(
        "model:\n  algorithm:\n    class_path: dgkit_algorithms.SAM\n    init_args:\n      rhoo: 0.1\n")
    return ["fit", "--config", str(tmp_path / "c.yaml")]


def _unfinished_run(tmp_path: Path, good_root: Path) -> list[str]:
    """A run killed after its last.ckpt was written, whose last.ckpt is then cut short."""
    args = ["fit", "--trainer.max_steps=4", "--last_checkpoint.every_n_steps=2", "--model.backbone=mlp",
            *QUIET]
    assert dgkit(*args, cwd=tmp_path).code == 0
    run = tmp_path / "runs" / "version_0"
    (run / "test_results.json").unlink()  # as if killed before testing
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    return args


def _checkpoint(kind: str):
    def setup(tmp_path: Path, good_root: Path) -> list[str]:
        path = tmp_path / f"{kind}.ckpt"
        if kind == "random":
            path.write_bytes(np.random.default_rng(0).bytes(4096))
        elif kind == "cut":  # the start of a zip archive, and nothing more
            path.write_bytes(b"PK\x03\x04" + bytes(100))
        elif kind == "pickle":  # pickles that would run code when loaded unsafely
            path.write_bytes(pickle.dumps({"state_dict": {}, "x": shutil.rmtree}))
            torch.save({"state_dict": {}, "x": shutil.rmtree}, tmp_path / "zipped.ckpt")
        return ["test", "--ckpt_path", str(path)]
    return setup


def _argv(*argv: str):
    return lambda tmp_path, good_root: list(argv)


# (id, set-up -> argv, what the one line must say)
CASES = [
    ("missing root", lambda t, g: _fit_officehome(t / "nope"), "OfficeHome: no data root at"),
    ("empty root", lambda t, g: _fit_officehome(t),
     "does not hold OfficeHome. Expected layout: ROOT/OfficeHomeDataset_10072016/<domain>/<class>/<image>"),
    ("missing domain folder", _without("Clipart"), "lacks the domain folder(s) Clipart"),
    ("domain lacks a class", _without("Art/class_07"), "every domain needs the same 65 class folders"),
    ("class sets differ", _extra_class, "has 66 class folders, expected 65"),
    ("empty WILDS root", lambda t, g: ["fit", "--data", "camelyon17", "--data.dataset.root", str(t)],
     "Camelyon17: no WILDS data at"),
    ("alias beside a folder of its name", _beside_folder, "FMoW: no WILDS data at"),
    ("hyperparameter typo", _argv("fit", "--algo", "sam", "--model.algorithm.rhoo", "0.1"),
     "model.algorithm.rhoo: SAM has no option 'rhoo'. Did you mean 'rho'?"),
    ("nested hyperparameter typo", _argv("fit", "--algo", "adanpc", "--model.algorithm.base", "sam",
                                         "--model.algorithm.base.rhoo", "0.1"),
     "model.algorithm.base.rhoo: SAM has no option 'rhoo'. Did you mean 'rho'?"),
    ("bad value of a base's hyperparameter", _argv("fit", "--algo", "adanpc", "--model.algorithm.base",
                                                   "sam", "--model.algorithm.base.rho", "-1"),
     "model.algorithm.base.rho: -1.0 is negative (allowed: >= 0)"),
    ("typo in a config file", _config_typo,
     "model.algorithm.rhoo: SAM has no option 'rhoo'. Did you mean 'rho'?"),
    ("wrong type", _argv("fit", "--algo", "sam", "--model.algorithm.rho", "abc"),
     "model.algorithm.rho: expected a float, got 'abc'"),
    ("abbreviated option", _argv("fit", "--trainer.max_step", "20"),
     "unrecognized arguments: --trainer.max_step 20. Did you mean 'trainer.max_steps'?"),
    ("random bytes as checkpoint", _checkpoint("random"),
     "random.ckpt is not a readable checkpoint (truncated, damaged"),
    ("truncated checkpoint", _checkpoint("cut"),
     "cut.ckpt is not a readable checkpoint (truncated, damaged"),
    ("unsafe pickle as checkpoint", _checkpoint("pickle"),
     "pickle.ckpt is not a readable checkpoint (truncated, damaged or another kind of file"),
    ("truncated last.ckpt of an unfinished run", _unfinished_run, "cannot be resumed"),
    ("divdis without unlabeled data", _argv("fit", "--algo", "divdis", "--data", "colored_mnist"),
     "data.unlabeled: DivDis learns from unlabeled images, and none are given"),
    ("batch larger than a source domain",
     _argv("fit", "--data.batch_size", "1000", "--model.backbone", "mlp"),
     "data.batch_size: source domain '0' has only 667 training samples (allowed: <= 667)"),
    ("unlabeled batch larger than its pool",
     _argv("fit", "--algo", "divdis", "--data.unlabeled", "target", "--data.unlabeled_batch_size", "500"),
     "data.unlabeled_batch_size: 500 is more than the 167 images of the unlabeled pool (target) "
     "(allowed: <= 167)"),
    ("no test domains", _argv("fit", "--data.test_domains", "[]"),
     "data.test_domains: is empty: the run would test on nothing"),
    ("unknown test domain", _argv("fit", "--data.test_domains", "[90]"),
     "data.test_domains: RotatedMNIST has no domain 90"),
    ("pretrained weights offline", lambda t, g: _fit_officehome(g),
     "pretrained weights for 'resnet50' are not cached and the hub is unreachable"),
    ("diverging loss", _argv("fit", "--model.optimizer.lr", "1e6", "--model.backbone", "mlp", *QUIET),
     "training diverged: train/loss has stayed above 1000x its starting value"),
    ("unknown algorithm", _argv("fit", "--algo", "ermm"), "unknown algorithm 'ermm'. Did you mean 'erm'?"),
    ("meta-test as many as the source domains",
     _argv("fit", "--algo", "mldg", "--data", "colored_mnist", "--model.algorithm.n_meta_test", "2"),
     "model.algorithm.n_meta_test: 2 (allowed: at least 1 and fewer than the 2 source domains)"),
    ("a backbone without stages for MIRO", _argv("fit", "--algo", "miro", "--model.backbone", "mlp"),
     "model.backbone: MLP has no known stages (allowed: mnist_cnn, mnist_cnn_bn or a timm ResNet"),
    ("trials beside a grid", _argv("sweep", "--dir", "s", "--algos", "erm", "--test-domains", "75", "--grid",
                                   "model.optimizer.lr=1e-3,1e-4", "--random", "1", "--trials", "2"),
     "--trials K goes with --random N and no --grid (DomainBed's random search)"),
    ("no time between resume checkpoints", _argv("fit", "--last_checkpoint.every_n_minutes", "0"),
     "last_checkpoint.every_n_minutes: 0.0 (allowed: > 0 (or --last_checkpoint.every_n_steps 0"),
    ("double backward in fp16", _argv("fit", "--algo", "udim", "--trainer.precision", "16-true",
                                      "--model.backbone", "mlp", *QUIET),
     "trainer.precision: UDIM's double backward is unstable in fp16 (allowed: bf16-mixed, 32)"),
]


def test_a_checkpoint_with_code_in_torch_format_is_refused_too(tmp_path):
    _checkpoint("pickle")(tmp_path, tmp_path)
    result = dgkit("test", "--ckpt_path", str(tmp_path / "zipped.ckpt"), cwd=tmp_path)
    line = result.error_line()
    assert result.code == 2 and "zipped.ckpt is not a dgkit checkpoint: it holds data that a safe" in line
    assert "weights_only=False" not in result.text


@pytest.mark.parametrize(("setup", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_exit_code_2(setup, expected, tmp_path, good_root):
    argv = setup(tmp_path, good_root)
    result = dgkit(*argv, cwd=tmp_path, timeout=300)
    assert result.code == 2, result.text[-3000:]
    assert expected in result.error_line()


def test_a_truncated_jpeg_is_named_in_training_and_by_verify(tmp_path, good_root):
    root = _copy(good_root, tmp_path)
    bad = root / "OfficeHomeDataset_10072016" / "Art" / "class_03" / "00001.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    cv2.imwrite(str(bad), noise)
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) * 2 // 3])  # an interrupted download
    assert cv2.imread(str(bad)) is not None  # OpenCV alone decodes it: a grey lower third
    base = ["fit", "--data", "officehome", "--data.dataset.root", str(root), "--model.pretrained=false",
            "--data.dataset.image_size=16", "--data.num_workers=0", "--trainer.max_epochs=1", *FAST]
    verify = dgkit(*base, "--data.dataset.verify=true", cwd=tmp_path)
    assert verify.code == 2 and str(bad) in verify.err and "do not decode" in verify.err
    # Without verify the file is named when a loader reaches it (at the latest in testing).
    run = dgkit(*base, "--data.test_domains=[Art]", cwd=tmp_path)
    assert run.code == 2 and f"cannot decode image {bad}: the file is truncated" in run.error_line()
