"""Checkpoints that prove themselves: each rank's manifest, written last, and its verification.

Every rank writes its part of a checkpoint into a directory of its own, which Ray Train then
copies into the run's checkpoint directory (``ray/<name>/checkpoint_*``). After its files, each
rank writes ``manifest_rank<r>.json`` (:class:`raypo.run_layout.CheckpointLayout`): the world
size, step, epoch, pairs consumed and the size and SHA-256 of every file it wrote. A checkpoint is
whole when all ``world_size`` manifests are there, agree, and every file they list has its size
(and, when checked, its checksum). A rank's file that never arrived, a file cut short by a full
disk or an interrupted copy, or a rank's manifest itself missing, each make it incomplete:
:func:`verify_checkpoint` raises :class:`CheckpointError` naming the file and what is wrong.

Files are read through ``pyarrow.fs``, so the same check runs on a local directory, NFS or
``s3://`` / ``gs://`` storage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs

from raypo.run_layout import CheckpointLayout

MANIFEST_FORMAT = 1
"""Version of the manifest's fields; a manifest of another version is refused."""

_CHUNK = 8 << 20
"""Bytes read at a time while hashing (8 MiB)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or damaged; the message names the file and the defect."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a whole checkpoint's manifests say."""

    path: str
    """The checkpoint directory, as a path or URI of its storage."""
    world_size: int
    """Ranks that wrote it."""
    step: int
    """Optimizer steps done."""
    epoch: int
    """0-based epoch of that step."""
    pairs_done: int
    """Pairs trained in the whole run up to that step, all ranks together."""

    @property
    def name(self) -> str:
        """The directory's base name (``checkpoint_<time>``)."""
        return PurePosixPath(self.path.rstrip("/")).name


def write_manifest(directory: Path, rank: int, world_size: int, counters: dict[str, int]) -> Path:
    """Write rank ``rank``'s manifest over every file now in ``directory`` (this rank's part of
    the checkpoint, its manifest excepted); ``counters`` holds ``step``, ``epoch`` and
    ``pairs_done``. Call it after every other file of the rank is written and closed."""
    layout = CheckpointLayout(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.startswith("manifest_rank"):
            continue
        relative = path.relative_to(directory).as_posix()
        digest = _sha256(pyarrow.fs.LocalFileSystem(), str(path))
        files[relative] = {"size": path.stat().st_size, "sha256": digest}
    manifest = {
        "format": MANIFEST_FORMAT,
        "rank": rank,
        "world_size": world_size,
        **{key: int(counters[key]) for key in ("step", "epoch", "pairs_done")},
        "files": files,
    }
    target = layout.manifest(rank)
    target.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return target


def _filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def _read_manifest(filesystem: pyarrow.fs.FileSystem, path: str) -> dict | None:
    try:
        with filesystem.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): cut short?") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} is not a raypo checkpoint manifest (format 1)")
    return manifest


def _sha256(filesystem: pyarrow.fs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_files(
    filesystem: pyarrow.fs.FileSystem, base: str, manifest: dict, checksums: bool | str
) -> None:
    listed = manifest["files"]
    infos = filesystem.get_file_info([f"{base}/{name}" for name in listed])
    for (name, expected), info in zip(listed.items(), infos, strict=True):
        where = f"{base}/{name}"
        if info.type != pyarrow.fs.FileType.File:
            raise CheckpointError(f"{where} is missing (rank {manifest['rank']} wrote it)")
        if info.size != expected["size"]:
            raise CheckpointError(
                f"{where} has {info.size} bytes, its manifest says {expected['size']}: "
                "truncated or overwritten"
            )
    for name, expected in listed.items():
        checked = checksums is True or (isinstance(checksums, str) and name.startswith(checksums))
        if checked and _sha256(filesystem, f"{base}/{name}") != expected["sha256"]:
            raise CheckpointError(f"{base}/{name} does not match its manifest's SHA-256: damaged")


def verify_checkpoint(path: str, checksums: bool | str = True) -> CheckpointInfo:
    """The counters of the whole checkpoint at ``path`` (a directory or URI), after checking
    every rank's manifest and every file they list (sizes always; SHA-256 of every file with
    ``checksums`` True, of the files whose name starts with it when a string, e.g.
    ``"train_state"``); raises :class:`CheckpointError` otherwise."""
    filesystem, base = _filesystem(path)
    layout = CheckpointLayout(Path(base.rstrip("/")))
    first = _read_manifest(filesystem, layout.manifest(0).as_posix())
    if first is None:
        raise CheckpointError(
            f"{layout.manifest(0)} is missing: the checkpoint's writing did not finish (or an "
            "older raypo wrote it)"
        )
    world_size = int(first["world_size"])
    counters = {key: first[key] for key in ("world_size", "step", "epoch", "pairs_done")}
    for rank in range(world_size):
        where = layout.manifest(rank).as_posix()
        manifest = first if rank == 0 else _read_manifest(filesystem, where)
        if manifest is None:
            raise CheckpointError(
                f"{where} is missing: rank {rank} of {world_size} never finished writing its part"
            )
        theirs = {key: manifest.get(key) for key in counters}
        if theirs != counters or manifest.get("rank") != rank:
            raise CheckpointError(f"{where} says {theirs}, rank 0's manifest {counters}")
        _check_files(filesystem, layout.root.as_posix(), manifest, checksums)
    return CheckpointInfo(
        path=path,
        world_size=world_size,
        step=int(first["step"]),
        epoch=int(first["epoch"]),
        pairs_done=int(first["pairs_done"]),
    )
