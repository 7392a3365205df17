"""`geoswc score PRED.csv TRUTH.csv [--json]`: score predicted positions under the stated protocol."""

from __future__ import annotations

import json

from geoswc.data.sphere import EARTH_RADIUS_KM
from geoswc.eval.benchmarks import read_locations
from geoswc.eval.metrics import format_table, geographic_breakdown, score_predictions

PROTOCOL = (
    f"Great-circle distance by haversine on a sphere of R = {EARTH_RADIUS_KM:g} km; a photo is correct at "
    "radius r when its distance is <= r. Accuracy is in percent of all ground-truth photos: photos without a "
    "prediction count as wrong. Median and mean error are over the photos with a prediction. GeoGuessr score: "
    "mean of 5000 exp(-d / 1492.7 km) over all ground-truth photos (a missing photo scores 0)."
)


def _score(args) -> int:
    truth = read_locations(args.truth)
    predictions = read_locations(args.predictions)
    result = score_predictions(predictions, truth)
    if args.countries:
        result.update(geographic_breakdown(predictions, truth))
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
        f"mean error {'-' if mean is None else f'{mean:.1f}'} km; GeoGuessr score {result['geoguessr_score']:.0f}"
    )
    if args.countries:
        share = result["country_accuracy"]
        print(
            f"right country: {'-' if share is None else f'{share:.1f}%'} of the {result['n_in_country']} photos "
            "whose true position lies in a country"
        )
        print()
        print(_group_table("continent", result["by_continent"]))
        print()
        print(_group_table("country", dict(list(result["by_country"].items())[:15])))
    return 0


def _group_table(name: str, groups) -> str:
    radii = ("1", "25", "200", "750", "2500")
    lines = [f"{name:<10} {'photos':>7} " + " ".join(f"{r + ' km':>8}" for r in radii)]
    for code, g in groups.items():
        lines.append(f"{code:<10} {g['n']:>7} " + " ".join(f"{g['accuracy'][r]:>8.1f}" for r in radii))
    return "\n".join(lines)


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
    parser.add_argument(
        "--countries",
        action="store_true",
        help="also accuracy by country and continent and the share placed in the right country (offline)",
    )
    parser.set_defaults(func=_score)
