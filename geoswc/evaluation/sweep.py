"""Ablations of the last stages without the backbone: ``geoswc sweep``.

`geoswc evaluate` keeps in ``OUT/store/`` what the backbone and the networks computed for the test photos
(`geoswc.evaluation.store`). `geoswc.evaluation.replay` re-runs the stages that follow (retrieval within the
predicted cell or anywhere, clustering, aggregation) from that store, and `run_sweep` does so over a grid of
settings: the
paper's ablations of K (Table 5) and of the aggregation (Table 6), DBSCAN's eps and min_samples, the search
scope and compressed indexes (SQ8, PQ, and the 1-bit codes of McAleese, "Learning Global Features for Fast
Visual Localisation"). `geoswc evaluate` places its photos through `replay` too, so the row of the model's
own settings is `evaluate`'s result by construction.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from geoswc.eval.metrics import RADII_KM, geoguessr_points, haversine_km, radius_key
from geoswc.eval.selective import DENSITY_SCALES_KM, prediction_density  # noqa: F401
from geoswc.evaluation.replay import (  # noqa: F401  (re-exported: defined here before the store and the replay moved)
    _FAISS_MODE,
    INDEX_MODES,
    SCOPE_HELP,
    Replayed,
    Replayer,
    Setting,
    model_setting,
    scope_cells,
    scope_name,
)
from geoswc.evaluation.store import (  # noqa: F401
    LOCATE_CHUNK,
    STORE_DIR,
    STORE_TOP_CELLS,
    STORE_VERSION,
    EvalStore,
    HeadOutputs,
    head_cells,
    head_outputs,
    search_partition,
)
from geoswc.swc import AGGREGATIONS, aggregate, search_within_cell  # noqa: F401
from geoswc.swc.cluster import DEFAULT_AGGREGATION

logger = logging.getLogger(__name__)

PARAMETERS = ("head", "k", "eps_km", "min_samples", "aggregation", "scope", "index_mode")
# The paper's Search within Cell (section 3.4 and Tables 5-6): K = 10, eps = 1 km, the mean of the largest
# cluster of the neighbours in the predicted cell of an exact index.
PAPER_SETTING = {
    "k": 10,
    "eps_km": 1.0,
    "min_samples": 1,
    "aggregation": DEFAULT_AGGREGATION,
    "scope": "cell",
    "index_mode": "exact",
}


def predictions_frame(ids: Sequence[str], latlon_deg: np.ndarray) -> pd.DataFrame:
    """``IMG_ID, LAT, LON`` of the photos with a position (as ``predictions_<mode>.csv`` holds them)."""
    frame = pd.DataFrame({"IMG_ID": list(ids), "LAT": latlon_deg[:, 0], "LON": latlon_deg[:, 1]})
    return frame.dropna(subset=["LAT", "LON"])


def score_positions(store: EvalStore, latlon_deg: np.ndarray) -> Dict[str, Any]:
    """`geoswc.eval.score_predictions` of the evaluated photos' positions, without matching ids again.

    The photos are those of the store, in its order, so the distances are computed from the same numbers in the
    same order as ``score_predictions`` computes them for ``evaluate``, and every score is equal to the bit.
    """
    truth = store.truth_deg[store.evaluated]
    has = ~np.isnan(latlon_deg[:, 0])
    n_truth = len(store.ids)
    dist_km = haversine_km(truth[has, 0], truth[has, 1], latlon_deg[has, 0], latlon_deg[has, 1])
    n_scored = int(has.sum())
    return {
        "n_truth": n_truth,
        "n_scored": n_scored,
        "n_missing": n_truth - n_scored,
        "accuracy": {
            radius_key(r): 100.0 * float(np.count_nonzero(dist_km <= r)) / n_truth for r in RADII_KM
        },
        "median_km": float(np.median(dist_km)) if n_scored else None,
        "mean_km": float(np.mean(dist_km)) if n_scored else None,
        "geoguessr_score": float(geoguessr_points(dist_km).sum()) / n_truth,
    }


# ---------------------------------------------------------------------------------------------------------------
# The sweep.


def _unique(values: Iterable) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def sweep_grid(
    store: EvalStore,
    *,
    head: Optional[Sequence[str]] = None,
    k: Optional[Sequence[int]] = None,
    eps_km: Optional[Sequence[float]] = None,
    min_samples: Optional[Sequence[int]] = None,
    aggregation: Optional[Sequence[str]] = None,
    scope: Optional[Sequence[str]] = None,
    index_mode: Optional[Sequence[str]] = None,
) -> List[Setting]:
    """Every combination of the given values (a parameter not given takes the value `evaluate` used).

    ``head`` takes the store's heads and ``none`` (pure retrieval, only with scope ``global``); combinations
    of ``none`` with another scope are left out.

    Raises:
        ValueError: a value outside a parameter's choices (the message lists them).
    """
    own = model_setting(store, next(iter(store.heads), None)) if store.heads else Setting(head=None)
    heads = list(head) if head else list(store.heads) or ["none"]
    choices = list(store.heads) + ["none"]
    for h in heads:
        if h not in choices:
            raise ValueError(f"unknown head {h!r}; this store has: {', '.join(choices)}")
    grid = {
        "head": _unique(None if h == "none" else h for h in heads),
        "k": _unique(int(v) for v in (k or [own.k])),
        "eps_km": _unique(float(v) for v in (eps_km or [own.eps_km])),
        "min_samples": _unique(int(v) for v in (min_samples or [own.min_samples])),
        "aggregation": _unique(aggregation or [own.aggregation]),
        "scope": _unique(scope or [own.scope]),
        "index_mode": _unique(index_mode or [own.index_mode]),
    }
    settings = []
    for values in itertools.product(*grid.values()):
        setting = Setting(**dict(zip(grid, values)))
        if setting.head is None and setting.scope != "global":
            continue
        settings.append(setting.check())
    if not settings:
        raise ValueError("the grid is empty: head 'none' runs only with --scope global")
    return settings


def _row(setting: Setting, scores: Mapping, seconds: float, n: int, methods: np.ndarray) -> dict:
    row = asdict(setting)
    row["head"] = setting.head or "none"
    for r in RADII_KM:
        row[f"acc_{radius_key(r)}km"] = scores["accuracy"][radius_key(r)]
    row["median_km"] = scores["median_km"]
    row["mean_km"] = scores["mean_km"]
    row["geoguessr_score"] = scores.get("geoguessr_score")
    row["ms_per_photo"] = 1000.0 * seconds / max(n, 1)
    row["n_fallback"] = int(np.count_nonzero(methods == "fallback"))
    return row


def _is_paper(setting: Setting) -> bool:
    return setting.head is not None and all(
        getattr(setting, key) == value for key, value in PAPER_SETTING.items()
    )


@dataclass
class SweepResult:
    """`run_sweep`'s table (one row per setting) and the files written."""

    table: pd.DataFrame
    written: Dict[str, Path]


def run_sweep(
    eval_dir: Union[str, Path],
    out: Union[str, Path],
    *,
    model: Union[str, Path, None] = None,
    **grid: Any,
) -> SweepResult:
    """Re-run Search within Cell from an evaluation store over a grid of settings.

    Args:
        eval_dir: the output folder of ``geoswc evaluate`` (or its ``store/``).
        out: where ``sweep.csv``, ``sweep.md`` and the plots go.
        model: the model folder whose background index to search (default: the one evaluate recorded).
        **grid: lists of values for ``head``, ``k``, ``eps_km``, ``min_samples``, ``aggregation``, ``scope``
            and ``index_mode`` (`sweep_grid`).

    Returns:
        A `SweepResult`: columns are the parameters, ``acc_<r>km`` (% at every radius of `RADII_KM`),
        ``median_km``, ``mean_km``, ``geoguessr_score``, ``ms_per_photo``, ``n_fallback``, ``paper`` (the
        paper's setting) and ``default`` (what `evaluate` ran).
    """
    from geoswc.retrieval.index import BackgroundIndex

    store = EvalStore.load(eval_dir)
    model_dir = Path(model) if model is not None else Path(store.meta.get("model", ""))
    if not (model_dir / "index").is_dir():
        raise FileNotFoundError(
            f"no background index at {model_dir / 'index'}; give the model folder with --model DIR"
        )
    index = BackgroundIndex.load(model_dir / "index", fingerprint=store.meta.get("fingerprint"))
    settings = sweep_grid(store, **grid)
    replayer = Replayer(store, index)
    ids = store.evaluated_ids
    own = {model_setting(store, h) for h in store.heads} | {model_setting(store, None)}
    rows = []
    for setting in tqdm(settings, desc="sweep", unit="setting"):
        done = replayer.run(setting)
        scores = score_positions(store, done.latlon_deg)
        row = _row(setting, scores, done.seconds, len(ids), done.method)
        row["paper"] = _is_paper(setting)
        row["default"] = setting in own
        rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "sweep.csv"}
    table.to_csv(written["csv"], index=False)
    swept = [p for p in PARAMETERS if table[p].nunique() > 1]
    for parameter in swept:
        written[f"plot_{parameter}"] = _plot_parameter(table, parameter, out / f"sweep_{parameter}.png")
    written["markdown"] = out / "sweep.md"
    written["markdown"].write_text(_markdown(table, store, swept, written, eval_dir))
    return SweepResult(table=table, written=written)


def _reference(table: pd.DataFrame, parameter: str) -> pd.Series:
    """Per parameter other than ``parameter``: the default row's value when the grid has it, else the first."""
    defaults = table[table["default"]]
    ref = {}
    for p in PARAMETERS:
        if p == parameter:
            continue
        candidates = defaults[p].tolist() if len(defaults) else []
        ref[p] = candidates[0] if candidates and candidates[0] in table[p].tolist() else table[p].iloc[0]
    return pd.Series(ref)


def _plot_parameter(table: pd.DataFrame, parameter: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    ref = _reference(table, parameter)
    fixed = [p for p in ref.index if p != "head" or parameter == "head"]
    mask = np.ones(len(table), bool)
    for p in fixed:
        if p == "head" and parameter != "head":
            continue
        mask &= (table[p] == ref[p]).to_numpy()
    subset = table[mask]
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    values = _unique(table[parameter].tolist())
    x = np.arange(len(values))
    groups = [("all", subset)] if parameter == "head" else list(subset.groupby("head", sort=False))
    for head, rows in groups:
        for radius, style in (("1", "o-"), ("25", "s--")):
            y = [
                rows.loc[rows[parameter] == v, f"acc_{radius}km"].iloc[0]
                if (rows[parameter] == v).any()
                else np.nan
                for v in values
            ]
            label = f"{radius} km" if parameter == "head" else f"{head}, {radius} km"
            ax.plot(x, y, style, label=label)
    paper_value = PAPER_SETTING.get(parameter)
    if paper_value in values:
        ax.axvline(values.index(paper_value), color="0.6", ls=":", lw=1.2, label="paper's setting")
    ax.set_xticks(x, [str(v) for v in values])
    ax.set_xlabel(parameter)
    ax.set_ylabel("photos within r (%)")
    others = ", ".join(f"{p}={ref[p]}" for p in fixed if p != parameter)
    ax.set_title(f"accuracy vs {parameter} ({others})", fontsize=8)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _markdown(table: pd.DataFrame, store: EvalStore, swept: Sequence[str], written: Mapping, eval_dir) -> str:
    acc = [f"acc_{radius_key(r)}km" for r in RADII_KM]
    header = list(PARAMETERS) + [c.replace("acc_", "").replace("km", " km") for c in acc]
    header += ["median km", "ms/photo", "fallback", ""]
    lines = [
        "| " + " | ".join(header) + " |",
        "|"
        + "|".join(["---"] * len(PARAMETERS) + ["---:"] * (len(header) - len(PARAMETERS) - 1) + ["---"])
        + "|",
    ]
    for _, row in table.iterrows():
        mark = " ".join(m for m, flag in (("paper", row["paper"]), ("default", row["default"])) if flag)
        cells = [str(row[p]) for p in PARAMETERS] + [f"{row[c]:.1f}" for c in acc]
        median = row["median_km"]
        cells += [
            "-" if pd.isna(median) else f"{median:.1f}",
            f"{row['ms_per_photo']:.3f}",
            str(row["n_fallback"]),
            mark,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n = int(store.evaluated.sum())
    parts = [
        "# geoswc sweep",
        "",
        f"From the evaluation store of {eval_dir} ({n} of {len(store.ids)} photos evaluated; model "
        f"{store.meta.get('model')}, partition {store.meta.get('fingerprint')}). Accuracy in % of all "
        "ground-truth photos (haversine, R = 6371 km, correct when <= r); `paper` marks the paper's setting "
        "(K = 10, eps = 1 km, largest-cluster mean in the predicted cell, exact index), `default` the row "
        "`geoswc evaluate` reported. ms/photo times the search and the aggregation (not the backbone, which "
        "does not run, nor the one-off training of a compressed index).",
        "",
        *lines,
        "",
    ]
    for parameter in swept:
        name = written[f"plot_{parameter}"].name
        parts += [f"![accuracy vs {parameter}]({name})", ""]
    return "\n".join(parts)


def describe_setting(setting: Setting) -> str:
    """A setting in one line, e.g. ``hc k=10 eps=1 km min_samples=1 largest-cluster-mean cell exact``."""
    return (
        f"{setting.head or 'none'} k={setting.k} eps={setting.eps_km:g} km min_samples={setting.min_samples} "
        f"{setting.aggregation} {setting.scope} {setting.index_mode}"
    )


__all__ = [
    "EvalStore",
    "HeadOutputs",
    "INDEX_MODES",
    "PAPER_SETTING",
    "Replayer",
    "Setting",
    "SweepResult",
    "head_outputs",
    "model_setting",
    "run_sweep",
    "sweep_grid",
]
