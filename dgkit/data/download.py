"""``dgkit data download NAME --root DIR``: fetch, verify and unpack a benchmark.

Folder data sets come from the archives DomainBed downloads (Google Drive, through
torchvision's downloader, which handles Drive's confirmation page) or from a file you
downloaded yourself (``--archive``). Verification: every member's CRC-32 in a zip
archive (``zipfile.testzip``), an optional MD5 of the archive (``--md5``), then the
unpacked layout and its image count. WILDS data sets are downloaded by the ``wilds``
package itself.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tarfile
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dgkit.data.folders import IMAGE_SUFFIXES, PACS, VLCS, DomainNet, FolderDomains, OfficeHome
from dgkit.errors import DGKitError


@dataclass(frozen=True)
class Source:
    dataset: type[FolderDomains]
    urls: tuple[str, ...]  # Google Drive ids ("gdrive:<id>") or plain URLs
    unpacked: str  # the folder the archive unpacks to, renamed to dataset.folders[0]
    images: int  # images in the official release


SOURCES = {
    "officehome": Source(OfficeHome, ("gdrive:1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC",),
                         "OfficeHomeDataset_10072016", 15588),
    "pacs": Source(PACS, ("gdrive:1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",), "kfold", 9991),
    "vlcs": Source(VLCS, ("gdrive:1skwblH1_okBwxWxmRsp9_qi15hyPpxg8",), "VLCS", 10729),
    "domainnet": Source(DomainNet, tuple(
        f"http://csr.bu.edu/ftp/visda/2019/multi-source/{p}{d}.zip"
        for p, d in (("groundtruth/", "clipart"), ("", "infograph"), ("groundtruth/", "painting"),
                     ("", "quickdraw"), ("", "real"), ("", "sketch"))), "", 0),
}
WILDS = ("camelyon17", "iwildcam", "fmow")


def _fetch(url: str, directory: Path) -> Path:
    from torchvision.datasets.utils import download_file_from_google_drive, download_url

    try:
        if url.startswith("gdrive:"):
            name = f"{url[7:]}.archive"
            download_file_from_google_drive(url[7:], directory, name)
        else:
            name = url.rsplit("/", 1)[1]
            download_url(url, directory, name)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        link = (f"https://drive.google.com/uc?id={url[7:]}" if url.startswith("gdrive:") else url)
        raise DGKitError(f"cannot download {link} ({exc}). Without a network, fetch it elsewhere "
                         f"and run: dgkit data download NAME --root {directory} --archive FILE") from None
    return directory / name


def verify_archive(path: Path, md5: str | None = None) -> None:
    """CRC-32 of every zip member; MD5 of the whole file when one is given."""
    if md5 is not None:
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != md5.lower():
            raise DGKitError(f"{path}: MD5 {digest.hexdigest()} differs from the expected {md5}; "
                             "the download is incomplete or another file. Delete it and retry.")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise DGKitError(f"{path}: member {bad} fails its CRC-32 check; the archive is "
                             "corrupt. Delete it and download again.")
    elif not tarfile.is_tarfile(path):
        raise DGKitError(f"{path} is neither a zip nor a tar archive")


def _unpack(path: Path, directory: Path) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            archive.extractall(directory)
    else:
        with tarfile.open(path) as archive:
            archive.extractall(directory, filter="data")


def download(name: str, root: str | Path, archives: list[str] | None = None,
             md5: str | None = None) -> Path:
    """Fetch (or take ``archives``), verify and unpack data set ``name`` under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if name in WILDS:
        from dgkit.data.builtin import dgkit_datasets

        return dgkit_datasets()[name](root=str(root), download=True).root
    if name not in SOURCES:
        raise DGKitError(f"no download for {name!r}; known: {', '.join([*SOURCES, *WILDS])}")
    source = SOURCES[name]
    files = [Path(a) for a in archives] if archives else [_fetch(u, root) for u in source.urls]
    for path in files:
        if not path.is_file():
            raise DGKitError(f"no archive at {path}")
        verify_archive(path, md5)
    target = root / source.dataset.folders[0]
    staging = root / ".unpacking" if source.unpacked else target
    for path in files:
        _unpack(path, staging)
    if source.unpacked:
        unpacked = staging / source.unpacked
        if not unpacked.is_dir():
            raise DGKitError(f"the archive did not unpack to {source.unpacked}/ as {name}'s does")
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
        shutil.rmtree(staging)
    dataset = source.dataset(root=str(root))  # checks domains and class count
    count = sum(1 for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if source.images and count != source.images:
        raise DGKitError(f"{target} holds {count} images, the official {name} release has "
                         f"{source.images}; the archive is incomplete or another version")
    print(f"{dataset.name}: {count} images in {target}, {len(dataset.classes)} classes, "
          f"domains {', '.join(dataset.domains)}")
    return target


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dgkit data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="fetch, verify and unpack a data set")
    get.add_argument("name", choices=[*SOURCES, *WILDS])
    get.add_argument("--root", required=True, help="folder to put it in (--data.dataset.root)")
    get.add_argument("--archive", nargs="+", help="archive(s) you downloaded yourself")
    get.add_argument("--md5", help="expected MD5 of the archive")
    args = parser.parse_args(argv)
    download(args.name, args.root, args.archive, args.md5)
