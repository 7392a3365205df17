"""The street-scale quickstart (`run_street_demo`, ``geoswc demo --street``).

A synthetic street world (`geoswc.data.synth_street`), GeM and NetVLAD on the tiny preset's EfficientNet-Lite0
trained on its training streets (`geoswc.train.vpr.train_vpr`), every model evaluated on streets never seen in
training (`geoswc.vpr.evaluate.evaluate_vpr`) beside raw-pixel matching (`geoswc.vpr.pixels`) and the same
descriptors off the shelf, a recall table, and the best model indexed over the test database
(`geoswc.vpr.locate.index_database`) for ``geoswc serve``.

A rerun into the same folder reuses each step whose settings it recorded (``street.json``) and redoes the rest.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from geoswc.data.files import write_text_atomic
from geoswc.data.synth_street import make_street_world
from geoswc.demo_folder import claim_demo_folder
from geoswc.street.model import off_the_shelf
from geoswc.train.fit import duration
from geoswc.train.vpr import VPRTrainSettings, settings_with, train_vpr
from geoswc.vpr.evaluate import EvalSettings, evaluate_vpr
from geoswc.vpr.locate import index_database
from geoswc.vpr.pixels import pixel_recalls

STATE_FILE = "street.json"
# Streets per split and queries per street: enough training streets that a model learns arrangements of
# facades rather than three streets by heart, a val split for choosing the epoch, and unseen test streets.
STREETS = {"train": 16, "val": 4, "test": 3}
QUERIES_PER_STREET = 16
# Facade styles of the city: with 6, hard-negative mining over 16 streets keeps finding places that look the
# same as the query's (docs/place-recognition.md); 12 still repeat every style on every street.
STYLES = 12
POOLS = ("gem", "netvlad")
CLUSTERS = 16
DEMO_LOSS = "triplet"
DEMO_EPOCHS = 8
TABLE_RECALLS = (1, 5, 10)


def _read_state(out: Path) -> Dict[str, Any]:
    path = out / STATE_FILE
    if path.is_file() and not path.is_symlink():
        try:
            state = json.loads(path.read_text())
            return state if isinstance(state, dict) else {}
        except ValueError:
            return {}
    return {}


def _write_state(out: Path, state: Dict[str, Any]) -> None:
    write_text_atomic(out / STATE_FILE, json.dumps(state, indent=2, default=str) + "\n")


def _fresh(folder: Path) -> None:
    """Remove a step's own output folder (a real folder inside the demo folder) before it is redone."""
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link; the demo only replaces folders it wrote")
    if folder.exists():
        shutil.rmtree(folder)


def recall_table(rows: Sequence[Dict[str, Any]], recalls: Sequence[int] = TABLE_RECALLS) -> str:
    """A Markdown table of ``rows`` (``name`` and ``recall@N`` values in percent, optional ``median_top1_m``)."""
    head = "| model | " + " | ".join(f"recall@{n}" for n in recalls) + " | median error of the first match |"
    lines = [head, "|---|" + "---:|" * (len(recalls) + 1)]
    for row in rows:
        median = row.get("median_top1_m")
        cells = [f"{row[f'recall@{n}']:.1f}" for n in recalls]
        cells.append("-" if median is None else f"{median:.1f} m")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_street_demo(
    out: Path,
    *,
    seed: int = 0,
    streets: Optional[Dict[str, int]] = None,
    queries_per_street: int = QUERIES_PER_STREET,
    styles: int = STYLES,
    epochs: int = DEMO_EPOCHS,
    loss: str = DEMO_LOSS,
    overrides: Sequence[str] = (),
    cpu: bool = False,
    echo: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Street world -> off-the-shelf and raw-pixel baselines -> GeM and NetVLAD trained -> evaluated -> indexed.

    Args:
        out: the demo folder (new, empty, or written by an earlier demo; `geoswc.demo_folder`).
        seed: the world's and the training's seed.
        streets, queries_per_street: the world's size (default `STREETS`, `QUERIES_PER_STREET`).
        styles: facade styles of the world (default `STYLES`).
        epochs, loss: how both models train (`geoswc.train.vpr.VPRTrainSettings`).
        overrides: ``key=value`` training settings.
        cpu: train on CPU even with a GPU.
        echo: where progress and the closing table go.

    Returns:
        What ``street.json`` holds: the table's rows, timings, the model folders and the commands.
    """
    out = Path(out)
    streets = dict(streets or STREETS)
    claim_demo_folder(out)
    world, models, evals, located = out / "world", out / "models", out / "eval", out / "street-model"
    old = _read_state(out)
    if not old and any(p.exists() or p.is_symlink() for p in (world, models, evals, located)):
        # A folder of the global demo (or an older run without a record): its world is not ours to replace.
        raise ValueError(
            f"-o {out} holds a world, models or evaluations the street demo did not record ({STATE_FILE} is "
            "missing); choose a new folder for geoswc demo --street"
        )
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    world_key = {"streets": streets, "queries": queries_per_street, "styles": styles, "seed": seed}
    reuse = old.get("world") == world_key and (world / "world.json").is_file()
    state: Dict[str, Any] = {"world": world_key, "steps": dict(old.get("steps", {})) if reuse else {}}

    echo(
        f"[street demo 1/5] synthetic street world: {streets} streets, {queries_per_street} queries each, "
        f"{styles} facade styles -> {world}"
    )
    t = time.perf_counter()
    if reuse:
        echo("  already there, reused")
    else:
        for folder in (world, models, evals, located):
            _fresh(folder)
        make_street_world(
            world, streets=streets, queries_per_street=queries_per_street, styles=styles, seed=seed
        )
    timings["world"] = time.perf_counter() - t
    _write_state(out, state)
    evaluate = EvalSettings(
        split="test", recalls=(1, 5, 10, 20), progress=False, seed=seed, compact_table=False
    )

    def step(name: str, key: Dict[str, Any], folder: Path, run: Callable[[], Any]) -> bool:
        """Run ``run`` unless the recorded key of ``name`` equals ``key`` and its folder is there."""
        if state["steps"].get(name) == key and folder.exists():
            echo(f"  {name}: already done, reused")
            return False
        _fresh(folder)
        run()
        state["steps"][name] = key
        _write_state(out, state)
        return True

    echo("[street demo 2/5] baselines on the test streets: raw pixels, descriptors off the shelf")
    t = time.perf_counter()
    rows: List[Dict[str, Any]] = [
        {"name": "raw pixels (32x24 grey, normalised correlation)", **pixel_recalls(world)}
    ]
    for pool in POOLS:
        folder = evals / f"off-the-shelf-{pool}"
        step(
            f"off-the-shelf {pool}",
            {"pool": pool, "clusters": CLUSTERS},
            folder,
            lambda pool=pool, folder=folder: evaluate_vpr(
                off_the_shelf(preset="tiny", pool=pool, clusters=CLUSTERS), world, folder, evaluate
            ),
        )
    timings["baselines"] = time.perf_counter() - t

    echo(
        f"[street demo 3/5] geoswc vpr train --preset tiny ({loss}, {epochs} epochs), GeM and NetVLAD -> {models}"
    )
    t = time.perf_counter()
    trained: Dict[str, Dict[str, Any]] = {}
    for pool in POOLS:
        settings = settings_with(
            VPRTrainSettings(), overrides, pool=pool, clusters=CLUSTERS, loss=loss, epochs=epochs, seed=seed
        )
        folder = models / pool

        def train(pool=pool, settings=settings, folder=folder) -> None:
            echo(f"  training {pool} ...")
            train_vpr(
                off_the_shelf(preset="tiny", pool=pool, clusters=CLUSTERS), world, folder, settings, cpu=cpu
            )

        step(f"train {pool}", settings.to_dict(), folder, train)
        trained[pool] = json.loads((folder / "train_vpr.json").read_text())
    timings["train"] = time.perf_counter() - t

    echo(f"[street demo 4/5] geoswc vpr evaluate on the test streets -> {evals}")
    t = time.perf_counter()
    from geoswc.street.model import from_folder

    for pool in POOLS:
        folder = evals / pool
        step(
            f"evaluate {pool}",
            state["steps"][f"train {pool}"],
            folder,
            lambda pool=pool, folder=folder: evaluate_vpr(
                from_folder(models / pool), world, folder, evaluate
            ),
        )
    timings["evaluate"] = time.perf_counter() - t

    def row(name: str, folder: Path) -> Dict[str, Any]:
        results = json.loads((folder / "results.json").read_text())
        return {
            "name": name,
            **{k: v for k, v in results.items() if k.startswith("recall@") or k == "median_top1_m"},
        }

    for pool in POOLS:
        rows.append(
            row(
                f"off the shelf, {pool} (ImageNet weights{', k-means init' if pool == 'netvlad' else ''})",
                evals / f"off-the-shelf-{pool}",
            )
        )
    for pool in POOLS:
        best_epoch = (trained[pool].get("best_epoch") or {}).get("epoch")
        rows.append(row(f"trained, {pool} ({loss}, best epoch {best_epoch})", evals / pool))
    trained_recall = {pool: r["recall@1"] for pool, r in zip(POOLS, rows[-len(POOLS) :])}
    best = max(POOLS, key=lambda pool: trained_recall[pool])  # the first of equal ones

    echo(f"[street demo 5/5] geoswc vpr index --model {models / best} on the test database -> {located}")
    t = time.perf_counter()
    step(
        "index",
        {"model": best, **state["steps"][f"train {best}"]},
        located,
        lambda: index_database(
            from_folder(models / best), world, located, split="test", progress=False, seed=seed
        ),
    )
    timings["index"] = time.perf_counter() - t

    table = recall_table(rows)
    database_root = world / "images" / "test"
    serve = f"geoswc serve --model {shlex.quote(str(located))} --images {shlex.quote(str(database_root))}"
    commands = [
        f"geoswc vpr synth {world} --train-streets {streets['train']} --val-streets {streets['val']} "
        f"--test-streets {streets['test']} --queries {queries_per_street} --styles {styles} --seed {seed}",
        *(
            f"geoswc vpr evaluate {world} --preset tiny --pool {p} --clusters {CLUSTERS} -o {evals / ('off-the-shelf-' + p)}"
            for p in POOLS
        ),
        *(
            f"geoswc vpr train {world} -o {models / p} --preset tiny --pool {p} --loss {loss} --epochs {epochs} "
            f"--set clusters={CLUSTERS}" + "".join(f" --set {s}" for s in overrides)
            for p in POOLS
        ),
        *(f"geoswc vpr evaluate {world} --model {models / p} -o {evals / p}" for p in POOLS),
        f"geoswc vpr index {world} --model {models / best} --split test -o {located}",
    ]
    timings["total"] = time.perf_counter() - started
    summary = {**state, "rows": rows, "best": best, "timings": timings, "commands": commands, "serve": serve}
    _write_state(out, summary)
    write_text_atomic(
        out / "street_results.md",
        "# geoswc demo --street: recall on the test streets (never seen in training)\n\n" + table + "\n\n"
        "Equivalent commands:\n\n```\n" + "\n".join(commands) + "\n```\n",
    )
    echo("")
    echo(f"Recall on the {streets['test']} test streets (never seen in training; within 25 m, % of queries):")
    echo(table)
    echo("")
    echo(f"models:   {models / 'gem'}, {models / 'netvlad'}  (geoswc vpr evaluate --model ...)")
    echo(f"reports:  {evals}/<model>/report.html")
    echo(f"table:    {out / 'street_results.md'}")
    echo(f"serve:    {serve}  (then open http://127.0.0.1:8000/)")
    echo("time:     " + ", ".join(f"{k} {duration(v)}" for k, v in timings.items()))
    return summary
