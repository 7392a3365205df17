"""The one-command quickstart (`run_demo`, ``geoswc demo``): a synthetic world in the MP16 format, the whole
pipeline trained on it with the ``tiny`` preset (`geoswc.train.fit.fit_model`), every Table 1 mode evaluated on its
test photos (`geoswc.evaluation.run.run_evaluation`) and a folder of them geotagged (`geoswc.tagging.run.tag_photos`).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from geoswc.data.synth import make_world
from geoswc.demo_folder import check_photos_folder, claim_demo_folder, copy_photos, remove_world
from geoswc.eval import format_table
from geoswc.evaluation.run import evaluate_command, run_evaluation
from geoswc.tagging.run import tag_photos
from geoswc.train.fit import duration, fit_model

DEMO_TRAIN = 3000
DEMO_TEST = 300
DEMO_TAG_PHOTOS = 24
# Fine-tuning the backbone is by far the slowest stage on a CPU: one epoch from the ImageNet weights keeps the
# demo within minutes and already sharpens the regions the heads learn.
DEMO_SETTINGS = ("backbone.epochs=1",)
# The modes whose 1 km and 750/2500 km accuracies show the paper's effect, classification first.
HEAD_MODES = ("ce", "hc", "mvmf")
SWC_MODES = ("ce+rrm", "hc+rrm", "mvmf+rrm")


def _make_world(folder: Path, *, n_train: int, n_test: int, seed: int) -> bool:
    """Write the synthetic world unless the same one is already there; returns whether it was written."""
    spec_file = folder / "world.json"
    if spec_file.is_file() and (folder / "test.csv").is_file():
        try:
            spec = json.loads(spec_file.read_text())
        except ValueError:
            spec = None  # damaged: written again
        if isinstance(spec, dict) and (spec.get("n_train"), spec.get("n_test"), spec.get("seed")) == (
            n_train,
            n_test,
            seed,
        ):
            return False
    remove_world(folder)
    make_world(folder, n_train=n_train, n_test=n_test, seed=seed, workers=min(4, os.cpu_count() or 1))
    return True


def paper_effect(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The comparison the paper makes (Table 1): the best head alone vs the best Search within Cell at 1 km,
    and the heads' accuracy at 750 and 2500 km."""
    heads = {m: results[m] for m in HEAD_MODES if m in results}
    swc = {m: results[m] for m in SWC_MODES if m in results}
    if not heads or not swc:
        raise ValueError(
            f"the comparison needs head and Search-within-Cell results, got: {', '.join(results)}"
        )
    best_head = max(heads, key=lambda m: heads[m]["accuracy"]["1"])
    best_swc = max(swc, key=lambda m: swc[m]["accuracy"]["1"])
    return {
        "head": best_head,
        "head_1km": heads[best_head]["accuracy"]["1"],
        "swc": best_swc,
        "swc_1km": swc[best_swc]["accuracy"]["1"],
        "heads_750km": {m: r["accuracy"]["750"] for m, r in heads.items()},
        "heads_2500km": {m: r["accuracy"]["2500"] for m, r in heads.items()},
    }


def serve_command(model_dir: Path, images: Optional[Path] = None, tags: Optional[Path] = None) -> str:
    """The ``geoswc serve`` command line that opens ``model_dir``, with thumbnails of the background photos
    under ``images`` and the tag run ``tags``."""
    command = f"geoswc serve --model {shlex.quote(str(model_dir))}"
    if images is not None:
        command += f" --images {shlex.quote(str(images))}"
    if tags is not None:
        command += f" --tags {shlex.quote(str(tags))}"
    return command


def run_demo(
    out: Path,
    *,
    n_train: int = DEMO_TRAIN,
    n_test: int = DEMO_TEST,
    seed: int = 0,
    overrides: Sequence[str] = (),
    cpu: bool = False,
    echo: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Synthetic world -> fit (tiny preset) -> evaluate -> tag, then a summary; a rerun reuses what is done.

    Args:
        out: the demo folder: ``world/``, ``model/``, ``eval/``, ``photos/``, ``tags.csv``, ``demo.json``; new,
            empty, or written by an earlier demo (`geoswc.demo_folder`: a folder of anything else is refused).
        n_train, n_test: photos of the synthetic world; seed: its seed.
        overrides: ``section.key=value`` settings applied to the tiny preset.
        cpu: run on CPU even when a GPU is there.
        echo: where the progress and the closing summary go.

    Returns:
        What ``demo.json`` holds: the paper's effect (`paper_effect`), timings and the equivalent commands.
    """
    out = Path(out)
    world, model_dir, eval_dir = out / "world", out / "model", out / "eval"
    photos, tags = out / "photos", out / "tags.csv"
    # Refused here, before anything is written: a folder of the user's, or photos the demo did not copy.
    copied = claim_demo_folder(out)
    check_photos_folder(photos, copied)
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    sets = list(DEMO_SETTINGS) + list(overrides)
    user_flags = "".join(f" --set {s}" for s in overrides)
    evaluate_options = {"batch_size": 32, "workers": 0, "device": "cpu" if cpu else None}
    commands = [
        f"geoswc demo -o {out}"
        + (
            f" --train {n_train} --test {n_test} --seed {seed}"
            if (n_train, n_test, seed) != (DEMO_TRAIN, DEMO_TEST, 0)
            else ""
        )
        + user_flags,
        "# which runs the equivalent of:",
        f"geoswc data synth {world} --train {n_train} --test {n_test} --seed {seed}",
        f"geoswc fit {world / 'train.csv'} --images {world / 'images'} -o {model_dir} --preset tiny"
        + "".join(f" --set {s}" for s in sets),
        evaluate_command(
            model_dir, world / "test.csv", images=world / "images", out=eval_dir, **evaluate_options
        ),
        f"geoswc tag {photos} --model {model_dir} -o {tags} --overwrite --workers 0",
    ]

    echo(f"[demo 1/4] synthetic world: {n_train} training and {n_test} test photos -> {world}")
    t = time.perf_counter()
    if not _make_world(world, n_train=n_train, n_test=n_test, seed=seed):
        echo("  already there, reused")
    timings["world"] = time.perf_counter() - t

    echo(f"[demo 2/4] geoswc fit --preset tiny -> {model_dir}")
    t = time.perf_counter()
    fit_model(
        world / "train.csv",
        images=world / "images",
        out=model_dir,
        preset="tiny",
        overrides=sets,
        cpu=cpu,
        echo=lambda message: echo("  " + message),
    )
    timings["fit"] = time.perf_counter() - t

    echo(f"[demo 3/4] geoswc evaluate on the {n_test} test photos -> {eval_dir}")
    t = time.perf_counter()
    evaluation = run_evaluation(
        model_dir,
        world / "test.csv",
        images=world / "images",
        out=eval_dir,
        commands=commands,
        title=f"geoswc demo: synthetic world, {n_test} test photos",
        **evaluate_options,
    )
    timings["evaluate"] = time.perf_counter() - t

    echo(f"[demo 4/4] geoswc tag on a folder of {DEMO_TAG_PHOTOS} test photos -> {tags}")
    t = time.perf_counter()
    copy_photos(out, world, DEMO_TAG_PHOTOS, copied)
    tag_photos([str(photos)], model=evaluation.model, out=tags, overwrite=True, workers=0)
    timings["tag"] = time.perf_counter() - t

    results, written = evaluation.results, evaluation.written
    effect = paper_effect(results)
    total = time.perf_counter() - started
    margin = effect["swc_1km"] - effect["head_1km"]
    echo("")
    echo(f"Table 1 on the synthetic test split ({n_test} photos; accuracy in % within each distance):")
    echo(format_table(results))
    echo("")
    echo(
        f"Search within Cell ({effect['swc']}) places {effect['swc_1km']:.1f}% of the photos within 1 km, "
        f"the best head alone ({effect['head']}) {effect['head_1km']:.1f}% ({margin:+.1f} points); "
        "the heads place "
        + ", ".join(f"{m} {v:.1f}%" for m, v in effect["heads_2500km"].items())
        + " within 2500 km."
    )
    echo("")
    echo(f"model folder:  {model_dir}  (Geolocator.from_pretrained; stages and logs in {model_dir / 'work'})")
    echo(f"report:        {written['markdown']}")
    echo(f"               {written['html']}  (self-contained, opens offline)")
    echo(f"predictions:   {eval_dir}/predictions_<mode>.csv, {eval_dir / 'results.json'}")
    echo(f"tags:          {tags}  ({DEMO_TAG_PHOTOS} photos from {photos})")
    echo(
        f"serve:         {serve_command(model_dir, world / 'images', tags)}  (then open http://127.0.0.1:8000/)"
    )
    echo(
        "time:          "
        + ", ".join(f"{k} {duration(v)}" for k, v in timings.items())
        + f"; total {duration(total)}"
    )
    summary = {"effect": effect, "timings": timings, "total_s": total, "commands": commands}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
