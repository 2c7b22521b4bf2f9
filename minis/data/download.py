"""Download COCO 2017 (images and annotations), resumably, with checksums.

For Colab and GPU machines (the development machines have no internet)::

    paths = download_coco("data/coco", splits=("val2017",))
    dataset = CocoInstances(**paths["val2017"])

Only the Python standard library's ``urllib`` is used. An interrupted download leaves a
``.part`` file that the next call continues from (HTTP Range request); a finished archive is
checked against the official MD5 before anything is unpacked.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

CHUNK_BYTES = 1 << 20  # read, write and hash in 1 MiB pieces: constant memory for an 18 GB file


@dataclass(frozen=True)
class Archive:
    """One official COCO zip: where it lives under the base URL, its MD5 and size in bytes."""

    url_path: str
    md5: str
    size: int | None


COCO_2017 = {
    "train2017.zip": Archive("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2", 19_336_861_798),
    "val2017.zip": Archive("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80", 815_585_330),
    "annotations_trainval2017.zip": Archive(
        "annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541
    ),
}
ANNOTATIONS_ARCHIVE = "annotations_trainval2017.zip"


def download_coco(
    root: str | os.PathLike,
    splits: tuple[str, ...] | list[str] = ("val2017",),
    *,
    base_url: str = "http://images.cocodataset.org",
    progress: bool = True,
    checksums: dict[str, str] | None = None,
    keep_archives: bool = False,
) -> dict[str, dict[str, Path]]:
    """Download and unpack COCO 2017 ``splits`` and the train/val annotations into ``root``.

    Result on disk: ``root/val2017/*.jpg``, ``root/annotations/instances_val2017.json`` (and
    the same for ``train2017``). Returns ``{split: {"image_dir": ..., "ann_file": ...}}``,
    the arguments of :class:`minis.data.CocoInstances`.

    Each archive goes through: download to ``<name>.part`` (continued where it stopped if the
    file exists), MD5 check, unpack, then a marker ``<name>.unpacked`` so a second call skips
    it. A corrupted archive (wrong MD5, or not a readable zip) is not unpacked: it is renamed
    ``<name>.corrupt`` and a ValueError says so; calling again downloads it afresh.

    Args:
        root: destination folder (created).
        splits: any of ``"train2017"`` (18 GB) and ``"val2017"`` (780 MB).
        base_url: server holding ``zips/`` and ``annotations/`` (a mirror, or a test server).
        progress: show a tqdm bar per download.
        checksums: archive file name -> MD5 to use instead of the official one (for mirrors
            and tests); an entry of ``None`` skips the MD5 and only checks the zip's CRCs.
        keep_archives: keep the zips after unpacking (default: delete them to save space).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in splits if f"{s}.zip" not in COCO_2017]
    if unknown:
        raise ValueError(f"unknown COCO split(s) {unknown}; choose from 'train2017', 'val2017'")

    for name in [f"{split}.zip" for split in splits] + [ANNOTATIONS_ARCHIVE]:
        archive = COCO_2017[name]
        md5, size = archive.md5, archive.size
        if checksums is not None and name in checksums:
            md5, size = checksums[name], None  # a replacement file has its own size
        marker = root / f"{name}.unpacked"
        if marker.exists():
            continue
        destination = root / name
        if not destination.exists():
            fetch(f"{base_url.rstrip('/')}/{archive.url_path}", destination, expected_size=size, progress=progress)
        verify_archive(destination, md5)
        with zipfile.ZipFile(destination) as zf:
            zf.extractall(root)  # zipfile strips absolute paths and '..' from member names
        marker.write_text(f"{md5 or 'no md5 given'}\n")
        if not keep_archives:
            destination.unlink()

    return {
        split: {"image_dir": root / split, "ann_file": root / "annotations" / f"instances_{split}.json"}
        for split in splits
    }


def fetch(url: str, destination: Path, expected_size: int | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``destination`` through ``destination.part``, resuming a partial file.

    When the ``.part`` file exists, only the missing bytes are requested (``Range:
    bytes=<size>-``). A server that answers 200 instead of 206 ignores ranges: the download
    starts again from zero. A connection that drops raises and keeps the ``.part`` file.
    """
    part = destination.with_name(destination.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        offset = 0  # not a prefix of the file we want
    if expected_size is not None and offset == expected_size:  # finished, only the rename was missing
        part.replace(destination)
        return destination

    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # "range not satisfiable": nothing is missing
            part.replace(destination)
            return destination
        raise RuntimeError(f"{url}: HTTP {error.code} {error.reason}") from error

    with response:
        if offset and response.status == 206:
            _check_content_range(url, response.headers.get("Content-Range", ""), offset)
        else:
            offset = 0
        remaining = response.headers.get("Content-Length")
        total = offset + int(remaining) if remaining is not None else expected_size
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=destination.name, disable=not progress,
        ) as bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as error:
                raise RuntimeError(
                    f"{url}: connection lost after {f.tell()} of {total} bytes ({error!r}); "
                    f"run again to resume from {part}"
                ) from error

    if total is not None and part.stat().st_size != total:
        raise RuntimeError(
            f"{url}: connection lost after {part.stat().st_size} of {total} bytes; run again to resume from {part}"
        )
    part.replace(destination)
    return destination


def _check_content_range(url: str, content_range: str, offset: int) -> None:
    """A 206 answer must start exactly where our partial file ends."""
    match = re.match(r"bytes (\d+)-", content_range)
    if match is None or int(match.group(1)) != offset:
        raise RuntimeError(f"{url}: asked for bytes from {offset}, server sent {content_range!r}")


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(path: Path, md5: str | None) -> None:
    """Raise ValueError (and set the file aside as ``.corrupt``) unless ``path`` is the expected zip.

    With an MD5 the whole file is compared; without one, every member's CRC is checked.
    """
    problem = None
    if md5 is not None:
        actual = md5sum(path)
        if actual != md5:
            problem = f"MD5 is {actual}, expected {md5}"
    if problem is None:
        try:
            with zipfile.ZipFile(path) as zf:
                bad_member = None if md5 is not None else zf.testzip()  # a matching MD5 implies good CRCs
            if bad_member is not None:
                problem = f"member {bad_member!r} fails its CRC check"
        except zipfile.BadZipFile as error:
            problem = f"not a readable zip file ({error})"
    if problem is not None:
        corrupt = path.with_name(path.name + ".corrupt")
        path.replace(corrupt)
        raise ValueError(
            f"{path}: corrupted download, {problem}. Nothing was unpacked; the file was moved to "
            f"{corrupt}. Run again to download it afresh."
        )
