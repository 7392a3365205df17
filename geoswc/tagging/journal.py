"""The embeddings a tag run keeps beside its output ``OUT`` for ``geoswc similar`` and near-duplicate groups.

A ``geoswc tag`` run over a model with a retrieval module keeps each photo's retrieval embedding (the
L2-normalised vector Search within Cell compares, paper section 3.3) beside its output ``OUT``:

* ``OUT.embeddings.npy``: ``(N, D)`` float16, opened memory-mapped, so a search reads no more than it needs;
* ``OUT.embeddings.json``: the path of each row (as the output names the photo), ``D``, ``N`` and the
  fingerprint of the weights that made them (`embedding_fingerprint`).

While a run goes on, each rank appends to its own journal (``OUT.embeddings-<rank>.f16``: raw float16 rows;
``OUT.embeddings-<rank>.paths``: one JSON string per line), written before the photo's output row, so every
row on disk has its embedding. At the end rank 0 writes the two final files from the earlier final files
and all journals in the output's row order (`finalize_embeddings`), then deletes the journals; a killed run
leaves its journals, and ``--resume`` folds them in. Float16 keeps cosine similarities to ~1e-3.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from geoswc.data.files import atomic_path
from geoswc.tagging.files import OutputError, open_nofollow, os_errors, read_json_object

logger = logging.getLogger(__name__)

EMBEDDINGS_VERSION = 1
# Rows copied per step into the final file.
_BLOCK = 8192


def embeddings_path(output: str) -> str:
    return f"{output}.embeddings.npy"


def embeddings_meta_path(output: str) -> str:
    return f"{output}.embeddings.json"


def embedding_journal_paths(output: str, rank: int) -> Tuple[str, str]:
    """The vectors and paths journal of one rank."""
    return f"{output}.embeddings-{rank:05d}.f16", f"{output}.embeddings-{rank:05d}.paths"


def all_embedding_journals(output: str) -> List[Tuple[str, str]]:

    pattern = glob.escape(output) + ".embeddings-[0-9][0-9][0-9][0-9][0-9].f16"
    return [(path, path[: -len(".f16")] + ".paths") for path in sorted(glob.glob(pattern))]


def embedding_files(output: str) -> List[str]:
    """Every embedding file of ``output`` that exists (final files and journals)."""
    files = [embeddings_path(output), embeddings_meta_path(output)]
    for vectors, paths in all_embedding_journals(output):
        files += [vectors, paths]
    return [path for path in files if os.path.exists(path)]


def embedding_fingerprint(model) -> str:
    """SHA-256 of the weights that make a `Geolocator`'s retrieval embeddings (backbone, retrieval pool and
    retrieval module).

    Two models with the same fingerprint embed every photo alike, wherever their folders lie.
    """
    digest = hashlib.sha256()
    for part in (model.backbone, getattr(model, "retrieval_pool", None), model.retrieval):
        if part is None:
            continue
        for name, tensor in sorted(part.state_dict().items()):
            digest.update(name.encode())
            data = tensor.detach().cpu()
            if data.dtype.is_floating_point:
                data = data.float()
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.contiguous().numpy().tobytes())
    return digest.hexdigest()


def embed_pixels(model, pixels) -> np.ndarray:
    """``(B, D)`` float32 retrieval embeddings of a batch of transformed photos."""
    return model.embed(model.features(pixels)).float().cpu().numpy()


class EmbeddingJournal:
    """Appends one rank's embeddings and their paths; flushed per batch, before the batch's rows."""

    def __init__(self, output: str, rank: int, dim: int):
        self.dim = dim
        self.vectors_path, self.paths_path = embedding_journal_paths(output, rank)
        _repair_journal(self.vectors_path, self.paths_path, dim)
        with os_errors("write", self.vectors_path):
            self._vectors = open_nofollow(self.vectors_path, "ab")
        with os_errors("write", self.paths_path):
            self._paths = open_nofollow(self.paths_path, "a", encoding="utf-8")

    def write(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        if not len(paths):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float16)
        assert vectors.shape == (len(paths), self.dim), (vectors.shape, len(paths), self.dim)
        with os_errors("write", self.vectors_path):
            self._vectors.write(vectors.tobytes())
            self._vectors.flush()
        with os_errors("write", self.paths_path):
            # JSON strings keep any file name (newlines, non-UTF-8 bytes as escapes) on one line.
            self._paths.write("".join(json.dumps(p) + "\n" for p in paths))
            self._paths.flush()

    def close(self) -> None:
        # Closing flushes what is buffered: a full disk shows here too.
        try:
            with os_errors("write", self.vectors_path):
                self._vectors.close()
        finally:
            with os_errors("write", self.paths_path):
                self._paths.close()


def _read_journal_paths(path: str) -> List[str]:
    with os_errors("read", path), open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    lines = text.split("\n")[:-1]  # a torn last line (no newline) is left out
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _journal_count(vectors_path: str, paths_path: str, dim: int) -> int:
    with os_errors("read", vectors_path):
        n_vectors = os.path.getsize(vectors_path) // (2 * dim) if os.path.exists(vectors_path) else 0
    n_paths = len(_read_journal_paths(paths_path)) if os.path.exists(paths_path) else 0
    return min(n_vectors, n_paths)


def _repair_journal(vectors_path: str, paths_path: str, dim: int) -> None:
    """Cut both files of a journal to the entries whole in both (a kill can tear either)."""
    if not (os.path.exists(vectors_path) or os.path.exists(paths_path)):
        return
    n = _journal_count(vectors_path, paths_path, dim)
    with os_errors("repair", vectors_path), open_nofollow(vectors_path, "ab") as f:
        f.truncate(n * 2 * dim)
    paths = _read_journal_paths(paths_path) if os.path.exists(paths_path) else []
    with os_errors("repair", paths_path), open_nofollow(paths_path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in paths[:n]))


@dataclass
class ArchiveEmbeddings:
    """The embeddings a tag run kept (`load_embeddings`): ``vectors`` memory-mapped float16 ``(N, D)``,
    ``paths`` the output's name of each row's photo, ``fingerprint`` of the weights that made them."""

    vectors: np.ndarray
    paths: List[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.paths)


def load_embeddings(output: str) -> ArchiveEmbeddings:
    """The embeddings kept beside a tag run's output ``output``.

    Raises:
        FileNotFoundError: the run kept none (a model without a retrieval module, ``--no-embeddings``, or an
            unfinished run: ``geoswc tag --resume`` completes them).
        ValueError: a file is damaged or not what geoswc tag writes, or the two disagree (naming the file).
    """
    meta_path, npy_path = embeddings_meta_path(output), embeddings_path(output)
    if not (os.path.exists(meta_path) and os.path.exists(npy_path)):
        unfinished = (
            " (an unfinished run: complete it with geoswc tag --resume)"
            if all_embedding_journals(output)
            else ""
        )
        raise FileNotFoundError(
            f"no archive embeddings beside {output} ({npy_path} and {meta_path}){unfinished}; tag the archive "
            "with a model that has a retrieval module"
        )
    hint = f"rerun geoswc tag --overwrite on {output}"
    meta = read_json_object(meta_path, what="the embeddings index of a geoswc tag run", hint=hint)
    paths = meta.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{meta_path} has no list of photo paths ('paths'); {hint}")
    if not isinstance(meta.get("fingerprint"), str):
        raise ValueError(f"{meta_path} has no model fingerprint ('fingerprint'); {hint}")
    try:
        with os_errors("read", npy_path):
            vectors = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    except OutputError:
        raise
    except (
        ValueError,
        EOFError,
    ) as err:  # a cut or foreign file: "mmap length is greater than file size", ...
        raise ValueError(f"{npy_path} is not a readable .npy array ({err}); {hint}") from None
    if meta.get("version") != EMBEDDINGS_VERSION or vectors.ndim != 2 or len(vectors) != len(paths):
        raise ValueError(
            f"{npy_path} ({vectors.shape}) and {meta_path} ({len(paths)} paths, version "
            f"{meta.get('version')!r}) do not match; rerun geoswc tag --resume on {output}"
        )
    return ArchiveEmbeddings(vectors=vectors, paths=list(paths), fingerprint=meta["fingerprint"])


def check_finite(archive: ArchiveEmbeddings, source: str, *, block: int = 65536) -> None:
    """Refuse embeddings with a NaN or infinite value: they would rank arbitrarily against every query.

    Raises:
        ValueError: naming ``source``, how many rows and the first one's photo.
    """
    bad: List[int] = []
    for start in range(0, len(archive.vectors), block):
        rows = np.asarray(archive.vectors[start : start + block], dtype=np.float32)
        bad.extend((np.flatnonzero(~np.isfinite(rows).all(axis=1)) + start).tolist())
    if bad:
        raise ValueError(
            f"{source} holds {len(bad)} embeddings that are not finite (the first of {archive.paths[bad[0]]}); "
            "rerun geoswc tag --overwrite on the archive"
        )


def finalize_embeddings(
    output: str,
    order: Sequence[str],
    *,
    fingerprint: str,
    dim: int,
    key: Optional[Callable[[str], str]] = None,
) -> Optional[ArchiveEmbeddings]:
    """Write ``OUT.embeddings.npy`` and ``.json`` for the photos ``order`` (the output's rows that have an
    embedding, in row order) from the earlier final files and every rank's journal, then delete the journals.

    A photo embedded twice (a resumed run re-embeds the photos whose rows a kill lost) keeps its latest
    embedding. Photos of ``order`` without one are left out (and logged).

    Returns:
        The final embeddings, or None when there are none at all.
    """
    key = key or (lambda path: path)
    sources: List[np.ndarray] = []
    where: Dict[str, Tuple[int, int]] = {}
    if os.path.exists(embeddings_path(output)) and os.path.exists(embeddings_meta_path(output)):
        earlier = load_embeddings(output)
        sources.append(earlier.vectors)
        for row, path in enumerate(earlier.paths):
            where[key(path)] = (0, row)
    journals = all_embedding_journals(output)
    for vectors_path, paths_path in journals:
        n = _journal_count(vectors_path, paths_path, dim)
        if n == 0:
            continue
        with os_errors("read", vectors_path):
            vectors = np.memmap(vectors_path, dtype=np.float16, mode="r", shape=(n, dim))
        sources.append(vectors)
        for row, path in enumerate(_read_journal_paths(paths_path)[:n]):
            where[key(path)] = (len(sources) - 1, row)
    kept = [(path, where[key(path)]) for path in order if key(path) in where]
    if len(kept) < len(order):
        logger.warning("%d photos of %s have no kept embedding", len(order) - len(kept), output)
    if not sources and not kept:
        return None
    npy_path, meta_path = embeddings_path(output), embeddings_meta_path(output)
    with os_errors("write", npy_path), atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as f:  # open_memmap wants a name ending in .npy; write the header ourselves
            np.lib.format.write_array_header_1_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                    "fortran_order": False,
                    "shape": (len(kept), dim),
                },
            )
            offset = f.tell()
        out = np.memmap(tmp, dtype=np.float16, mode="r+", offset=offset, shape=(len(kept), dim))
        for start in range(0, len(kept), _BLOCK):
            block = kept[start : start + _BLOCK]
            for i, (_, (source, row)) in enumerate(block):
                out[start + i] = sources[source][row]
        out.flush()
        del out
    meta = {
        "version": EMBEDDINGS_VERSION,
        "fingerprint": fingerprint,
        "dim": dim,
        "count": len(kept),
        "paths": [path for path, _ in kept],
    }
    with os_errors("write", meta_path), atomic_path(meta_path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            json.dump(meta, f)
    for vectors_path, paths_path in journals:
        for path in (vectors_path, paths_path):
            with os_errors("remove", path), contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return load_embeddings(output)
