"""What a tag run records beside its output, and the checks a run makes before it writes.

A run holds a lock on its output (``OUT.lock``, `OutputLock`) and records what it was started with
(``OUT.run.json``: the model, precision, head, EXIF folder, predict and review options; `run_identity`);
``resume`` refuses an output started otherwise (`start_output`), and matches photos by their real path
(`RealPaths`), so ``archive/`` and ``/home/me/archive/`` are the same photos.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, List, Optional, Tuple

from geoswc import __version__
from geoswc.data.files import atomic_path
from geoswc.geolocator import FORMAT_VERSION, Geolocator
from geoswc.tagging.files import REPLACE_HINT, os_errors, output_error, read_json_object, refuse_links
from geoswc.tagging.journal import (
    all_embedding_journals,
    embedding_files,
    embedding_journal_paths,
    embeddings_meta_path,
    embeddings_path,
)
from geoswc.tagging.output import journal_path, journal_paths
from geoswc.tagging.report import html_path
from geoswc.tagging.rows import ReviewOptions

if TYPE_CHECKING:
    from geoswc.tagging.run import Ranks

try:
    import fcntl
except ImportError:  # not on Windows: runs are not locked there
    fcntl = None

logger = logging.getLogger(__name__)

# Version of the run record OUT.run.json; a record of another version is refused by --resume.
# 2: the reviewable columns (docs/tagging.md) and the review options in the identity.
RUN_RECORD_VERSION = 2


def run_record_path(output: str) -> str:
    return f"{output}.run.json"


def lock_path(output: str) -> str:
    return f"{output}.lock"


class OutputLock:
    """The exclusive lock a run holds on ``OUT.lock`` while it writes ``OUT`` (``fcntl.flock``, not waiting).

    The lock file is removed on `release`; a run that was killed leaves it behind, unlocked, and the next run
    takes it. After locking, the file is checked to still be the one at ``OUT.lock`` (a run that ended may
    have removed it in between), so two runs never hold locks on different files.
    """

    def __init__(self, output: str):
        self.output, self.path = output, lock_path(output)
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        """Take the lock.

        Raises:
            FileExistsError: another run holds it.
            OutputError: the lock file cannot be created.
        """
        if fcntl is None:
            logger.warning("no fcntl on this system: %s is not locked against a second run", self.output)
            return self
        while True:
            with os_errors("create the lock file", self.path):
                # O_NOFOLLOW: a link planted at OUT.lock would get the file it points at truncated.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise FileExistsError(
                    f"another geoswc tag run (pid {holder}) is writing {self.output}; wait for it to end "
                    f"(lock {self.path})"
                ) from None
            except OSError as err:
                os.close(fd)
                raise output_error("lock", self.path, err) from err
            try:
                held, named = os.fstat(fd), os.stat(self.path)
                same = (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                with contextlib.suppress(OSError):  # the pid only helps the message of a second run
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)  # removed by the run that held it: lock the file now at that name

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while still locked: nobody can take the old file in between
        os.close(self._fd)
        self._fd = None


def read_run_record(output: str) -> Optional[dict]:
    """The run record of ``output`` (``OUT.run.json``), or None when there is none.

    Raises:
        ValueError: the record is not valid JSON.
    """
    path = run_record_path(output)
    if not os.path.exists(path):
        return None
    record = read_json_object(path, what="the run record of geoswc tag")
    if not isinstance(record.get("identity"), dict):
        raise ValueError(f"{path} is not the run record of geoswc tag; {REPLACE_HINT}")
    return record


def write_run_record(output: str, record: dict) -> None:
    """Write ``OUT.run.json`` atomically."""
    path = run_record_path(output)
    with os_errors("write", path), atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")


class RealPaths:
    """The real path of a photo's path (symlinks resolved, relative paths taken from ``base``): what `resume`
    matches photos by. Folders are resolved once each, files with one ``lstat``."""

    def __init__(self, base: str):
        self.base = base
        self._folders: dict = {}

    def __call__(self, path: str) -> str:
        path = os.path.join(self.base, path)
        folder, name = os.path.split(path)
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder or os.sep)
        full = os.path.join(real, name)
        return os.path.realpath(full) if os.path.islink(full) else full


def _model_identity(model, predictor) -> dict:
    if not isinstance(predictor, Geolocator):
        return {"class": f"{type(predictor).__module__}.{type(predictor).__qualname__}"}
    folder, meta = None, {}
    if isinstance(model, (str, os.PathLike)):
        folder = os.path.realpath(model)
        try:
            meta = read_json_object(
                os.path.join(folder, "geolocator.json"), what="a model folder's description"
            )
        except (OSError, ValueError):
            pass  # from_pretrained read it a moment ago
    # Folders that record the SHA-256 of their parts: one digest of them tells two models of one partition
    # apart, wherever the folder lies.
    parts = meta.get("sha256")
    return {
        "class": f"{Geolocator.__module__}.{Geolocator.__qualname__}",
        "folder": folder,
        "parts_sha256": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        if isinstance(parts, dict)
        else None,
        "format_version": meta.get("format_version", FORMAT_VERSION),
        "fingerprint": predictor.fingerprint,
        "backbone": predictor.backbone_name,
        "heads": sorted(predictor.head_names),
    }


def run_identity(
    model,
    predictor,
    *,
    head: Optional[str],
    precision: str,
    write_exif: Optional[str],
    target: Optional[int],
    predict_options: dict,
    review: Optional[ReviewOptions] = None,
) -> dict:
    """What a run's rows depend on, as recorded in ``OUT.run.json`` and compared by ``resume``."""
    if isinstance(predictor, Geolocator):
        try:
            head = predictor.resolve_head(head)  # the model's default head and naming it are one run
        except ValueError:
            pass  # a model without heads (retrieval only)
    options = {key: value for key, value in predict_options.items() if key != "head"}
    return {
        "model": _model_identity(model, predictor),
        "precision": precision,
        "head": head,
        "write_exif": os.path.realpath(write_exif) if write_exif else None,
        "target": target,
        # JSON, as it will be read back (tuples become lists; what JSON cannot hold, its repr).
        "predict_options": json.loads(json.dumps(options, sort_keys=True, default=repr)),
        "review": (review or ReviewOptions()).identity(),
    }


def _identity_differences(old: dict, new: dict) -> List[str]:
    differences = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if key == "model" and isinstance(before, dict) and isinstance(now, dict):
            for part in sorted(set(before) | set(now)):
                # A Geolocator passed as an object has no folder (nor its parts' digest): the rest decides.
                if part in ("folder", "parts_sha256") and None in (before.get(part), now.get(part)):
                    continue
                if before.get(part) != now.get(part):
                    differences.append(f"model {part} {before.get(part)!r} (now {now.get(part)!r})")
        elif before != now:
            differences.append(f"{key.replace('_', ' ')} {before!r} (now {now!r})")
    return differences


def start_output(output: str, *, resume: bool, overwrite: bool, identity: dict, relative_inputs: bool) -> str:
    """Check (or clear) what an earlier run left at ``output`` and write this run's record.

    Returns:
        The folder the output's relative paths are relative to (where its first run was started).

    Raises:
        FileExistsError: ``output`` or a journal exists and neither ``resume`` nor ``overwrite`` is set.
        ValueError: resuming an output that was started with other settings, or from another folder with
            relative inputs.
    """
    cwd = os.path.realpath(os.getcwd())
    record_path = run_record_path(output)
    existing = [path for path in [output, *journal_paths(output)] if os.path.exists(path)]
    if overwrite:
        for path in [*existing, record_path]:
            if os.path.exists(path):
                with os_errors("remove", path):
                    os.remove(path)
        existing = []
    if not existing:
        # Embeddings and a review page of an output that is gone belong to no run: start them afresh.
        for path in [*embedding_files(output), html_path(output)]:
            if os.path.exists(path):
                with os_errors("remove", path):
                    os.remove(path)
    if existing and not resume:
        what = "output" if existing[0] == output else "unfinished run's journal"
        raise FileExistsError(
            f"{what} {existing[0]} already exists; pass --resume to complete it or --overwrite to replace it"
        )
    base = cwd
    if existing:
        record = read_run_record(output)
        if record is None:
            logger.warning(
                "%s has no run record (%s; written by an older geoswc): its settings cannot be checked",
                output,
                record_path,
            )
        else:
            if record.get("version") != RUN_RECORD_VERSION:
                raise ValueError(
                    f"{record_path} is a run record of version {record.get('version')!r}, this geoswc reads "
                    f"version {RUN_RECORD_VERSION}; finish the run with the geoswc that started it or pass "
                    "--overwrite"
                )
            differences = _identity_differences(record["identity"], identity)
            if differences:
                raise ValueError(
                    f"{output} was started with other settings: {'; '.join(differences)}; resume with the "
                    "settings it was started with, or pass --overwrite to start again"
                )
            base = record.get("cwd") or cwd
            if base != cwd and relative_inputs:
                raise ValueError(
                    f"{output} was started in {base} and this run names photos by relative paths; resume "
                    f"from {base} or name the inputs by absolute paths"
                )
            return base
    write_run_record(
        output,
        {"version": RUN_RECORD_VERSION, "geoswc_version": __version__, "cwd": cwd, "identity": identity},
    )
    return base


def run_files(output: str, world: int = 1) -> List[str]:
    """Every file a run of ``world`` ranks may create or write beside (and at) ``output``."""
    files = [output, lock_path(output), run_record_path(output), html_path(output)]
    files += [embeddings_path(output), embeddings_meta_path(output)]
    for rank in range(world):
        files += [journal_path(output, rank), *embedding_journal_paths(output, rank)]
    files += journal_paths(output)
    for pair in all_embedding_journals(output):
        files += pair
    return files


def prepare_output(output: str, *, ranks: Ranks, **checks) -> Tuple[Optional[OutputLock], str]:
    """On rank 0: refuse symbolic links at the run's files (`run_files`), lock ``output``, then
    `start_output`; every rank gets the outcome (or the same error).

    Returns:
        The lock (held by rank 0; None on the other ranks) and the folder of the output's relative paths.
    """
    lock, outcome = None, None
    if ranks.rank == 0:
        try:
            folder = os.path.dirname(output) or os.curdir
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"the output's folder {folder} does not exist")
            # Files are also opened with O_NOFOLLOW or replaced by a rename; this says so before any work.
            refuse_links(run_files(output, ranks.world))
            lock = OutputLock(output).acquire()
            outcome = ("ok", start_output(output, **checks))
        except (OSError, ValueError) as err:
            if lock is not None:
                lock.release()
            if ranks.world == 1:
                raise
            kinds = (FileExistsError, FileNotFoundError)
            outcome = (next((k.__name__ for k in kinds if isinstance(err, k)), "ValueError"), str(err))
            ranks.share(outcome)
            raise
    outcome = ranks.share(outcome)
    if outcome[0] != "ok":
        raise {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError}.get(
            outcome[0], ValueError
        )(outcome[1])
    return lock, outcome[1]
