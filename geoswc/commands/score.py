"""`geoswc score PRED.csv TRUTH.csv [--json]`: score predicted positions under the stated protocol."""

from __future__ import annotations

import json

from geoswc.data.sphere import EARTH_RADIUS_KM
from geoswc.eval.benchmarks import read_locations
from geoswc.eval.metrics import format_table, score_predictions

PROTOCOL = (
    f"Great-circle distance by haversine on a sphere of R = {EARTH_RADIUS_KM:g} km; a photo is correct at "
    "radius r when its distance is <= r. Accuracy is in percent of all ground-truth photos: photos without a "
    "prediction count as wrong. Median and mean error are over the photos with a prediction."
)


def _score(args) -> int:
    truth = read_locations(args.truth)
    predictions = read_locations(args.predictions)
    result = score_predictions(predictions, truth)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"predictions: {args.predictions}")
    print(f"ground truth: {args.truth}")
    print(PROTOCOL)
    print()
    print(format_table({"predictions": result}))
    mean = result["mean_km"]
    print()
    print(
        f"{result['n_scored']} of {result['n_truth']} photos scored, {result['n_missing']} missing; "
        f"mean error {'-' if mean is None else f'{mean:.1f}'} km"
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="accuracy at 0.1-2500 km of predicted positions against ground truth",
        description="Score predictions against ground truth. " + PROTOCOL,
    )
    parser.add_argument("predictions", metavar="PRED.csv", help="predictions: columns IMG_ID,LAT,LON")
    parser.add_argument(
        "truth", metavar="TRUTH.csv", help="ground truth: columns IMG_ID,LAT,LON (other columns ignored)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print exactly one JSON object instead of a table"
    )
    parser.set_defaults(func=_score)
