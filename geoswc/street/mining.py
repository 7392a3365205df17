"""Training examples of place recognition: NetVLAD's weakly supervised triplets and P x K batches.

**Triplets** (Arandjelović et al., CVPR 2016, section 4: "weakly supervised triplet ranking loss"), mined the
way the place-recognition benchmark mines them (Berton et al., CVPR 2022, ``datasets_ws.TripletsDataset``):
the GPS tag only says which database photos *may* show the query's place, so

- the **positive** of a query is the database photo within ``positive_m`` (10 m) nearest to it in the current
  descriptor space (the best of the potential positives);
- its **negatives** are the ``negatives`` database photos nearest to it in descriptor space among those
  farther than ``negative_m`` (25 m, the evaluation radius): the hardest negatives;
- descriptors come from a cache computed with the current model every ``cache_refresh`` queries.

Mining modes: ``partial`` (a random subset of ``neg_samples`` database photos per refresh, embedded with the
queries' potential positives; the benchmark's default), ``full`` (the whole database embedded; per query
``neg_samples`` random candidates plus the query's previous hardest negatives, which are kept between
refreshes) and ``random`` (random negatives; only queries and positives embedded).

**P x K batches** for the batch-hard loss (McAleese, ``000_…`` section 3.1; Hermans et al. 2017): P places, each
a training query with K - 1 of its database photos within ``positive_m``; which pairs of a batch are positives
or negatives follows from their positions (`pair_relations`).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np

from geoswc.data.validation import check_choice
from geoswc.data.vpr import positives_within

MINING = ("partial", "full", "random")
TRAIN_POSITIVE_M = 10.0
NEGATIVE_M = 25.0

# embed(query_rows, database_rows) -> (query descriptors, database descriptors), rows in the given order.
EmbedRows = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]


def best_positive(query: np.ndarray, database: np.ndarray, candidates: np.ndarray) -> int:
    """The row of ``candidates`` (database rows) whose descriptor is nearest (L2) to ``query``; the first on ties."""
    diff = database[candidates] - query[None]
    return int(candidates[int(np.argmin((diff * diff).sum(axis=1)))])


def hardest_negatives(query: np.ndarray, database: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``candidates`` nearest (L2) to ``query``, nearest first (stable on ties). With fewer
    candidates than ``n`` the list repeats from the nearest, so every triplet has ``n`` negatives."""
    if len(candidates) == 0:
        raise ValueError("a query has no database photo beyond the negative radius: no negative to mine")
    diff = database[candidates] - query[None]
    order = np.argsort((diff * diff).sum(axis=1), kind="stable")
    return np.resize(candidates[order], int(n)).astype(np.int64)


class TripletMiner:
    """Mines ``(query, positive, negative_1..n)`` rows of database/query indices of one split.

    Args:
        queries_utm, database_utm: ``(Q, 2)`` and ``(N, 2)`` metres.
        mining: one of `MINING`.
        negatives: negatives per query (the benchmark's 10).
        neg_samples: database photos sampled as negative candidates per refresh (``partial``) or per query
            (``full``), the benchmark's 1000; at most the database.
        positive_m: potential positives lie within this many metres.
        negative_m: negatives lie farther than this.
    """

    def __init__(
        self,
        queries_utm: np.ndarray,
        database_utm: np.ndarray,
        *,
        mining: str = "partial",
        negatives: int = 10,
        neg_samples: int = 1000,
        positive_m: float = TRAIN_POSITIVE_M,
        negative_m: float = NEGATIVE_M,
    ) -> None:
        check_choice("mining", mining, MINING)
        if negatives < 1 or neg_samples < 1:
            raise ValueError(f"negatives and neg_samples must be >= 1, got {negatives} and {neg_samples}")
        self.mining = mining
        self.negatives = int(negatives)
        self.neg_samples = int(neg_samples)
        self.n_database = len(database_utm)
        self.hard_positives = positives_within(queries_utm, database_utm, positive_m)
        self.soft_positives = positives_within(queries_utm, database_utm, negative_m)
        self.usable = np.array([i for i, p in enumerate(self.hard_positives) if len(p)], dtype=np.int64)
        self.neg_cache_ = np.full((len(queries_utm), self.negatives), -1, dtype=np.int64)

    def _candidates(self, query: int, pool: np.ndarray) -> np.ndarray:
        return pool[~np.isin(pool, self.soft_positives[query])]

    def mine(self, queries: np.ndarray, embed: EmbedRows, rng: np.random.Generator) -> np.ndarray:
        """``(len(queries), 2 + negatives)`` rows ``[query, positive, negatives...]`` for the given query rows,
        with descriptors from ``embed`` (called once, on every row the mode needs)."""
        queries = np.asarray(queries, dtype=np.int64)
        positives = np.unique(np.concatenate([self.hard_positives[q] for q in queries] + [np.zeros(0, int)]))
        sampled: Optional[np.ndarray] = None
        if self.mining == "partial":
            sampled = np.sort(
                rng.choice(self.n_database, min(self.neg_samples, self.n_database), replace=False)
            )
            rows = np.union1d(sampled, positives)
        elif self.mining == "full":
            rows = np.arange(self.n_database)
        else:
            rows = positives
        q_desc, db_rows_desc = embed(queries, rows)
        database = np.zeros((self.n_database, db_rows_desc.shape[1]), np.float32)
        database[rows] = db_rows_desc
        out = []
        for i, q in enumerate(queries):
            positive = best_positive(q_desc[i], database, self.hard_positives[q])
            if self.mining == "partial":
                negs = hardest_negatives(q_desc[i], database, self._candidates(q, sampled), self.negatives)
            elif self.mining == "full":
                drawn = rng.choice(self.n_database, min(self.neg_samples, self.n_database), replace=False)
                previous = self.neg_cache_[q][self.neg_cache_[q] >= 0]
                pool = self._candidates(q, np.unique(np.concatenate([previous, drawn])))
                negs = hardest_negatives(q_desc[i], database, pool, self.negatives)
                self.neg_cache_[q] = negs
            else:
                drawn = rng.choice(
                    self.n_database,
                    min(self.n_database, self.negatives + len(self.soft_positives[q])),
                    replace=False,
                )
                pool = self._candidates(q, drawn)
                if len(pool) == 0:
                    raise ValueError("a query has no database photo beyond the negative radius")
                negs = np.resize(pool, self.negatives)
            out.append(np.concatenate([[q, positive], negs]))
        return np.asarray(out, dtype=np.int64).reshape(len(queries), 2 + self.negatives)


def place_batch(
    places: np.ndarray, hard_positives: List[np.ndarray], k: int, rng: np.random.Generator
) -> List[Tuple[int, np.ndarray]]:
    """P x K photos: for every place (a query row), the query and ``k - 1`` of its database photos within the
    positive radius (without repetition while there are enough, then repeating).

    Returns:
        ``[(query, database rows (k - 1,)), ...]``.
    """
    out = []
    for q in places:
        pos = hard_positives[int(q)]
        take = rng.permutation(pos)
        out.append((int(q), np.resize(take, max(0, int(k) - 1)).astype(np.int64)))
    return out


def pair_relations(utm: np.ndarray, positive_m: float, negative_m: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(positive, negative)`` boolean ``(N, N)`` masks of a batch's photos at ``utm`` ``(N, 2)``: positives
    within ``positive_m`` (not the photo itself), negatives farther than ``negative_m``; pairs in between are
    neither (the weak supervision cannot tell)."""
    utm = np.asarray(utm, dtype=np.float64)
    dist = np.sqrt(((utm[:, None] - utm[None]) ** 2).sum(axis=-1))
    positive = (dist <= positive_m) & ~np.eye(len(utm), dtype=bool)
    return positive, dist > negative_m
