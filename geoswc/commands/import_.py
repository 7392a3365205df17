"""``geoswc import visloc``: the ICMR 2021 authors' released model as a geoswc model folder (docs/visloc.md)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, List, Optional

from geoswc.commands.precision import add_precision_photos_argument
from geoswc.data.download import is_url

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _checksums(items: Optional[List[str]], roles) -> Dict[str, str]:
    """``--sha256 ROLE=HEX`` (or ``FILE=HEX``) values as ``{role or file name: hex}``."""
    out: Dict[str, str] = {}
    for item in items or []:
        key, sep, digest = item.partition("=")
        if not sep or not _HEX64.fullmatch(digest.strip()):
            raise ValueError(
                f"--sha256 expects ROLE=HEX with 64 hexadecimal digits (ROLE one of: {', '.join(roles)}, or a "
                f"file name), got {item!r}"
            )
        out[key.strip()] = digest.strip().lower()
    return out


def _visloc(args: argparse.Namespace) -> int:
    from geoswc.extras import require

    require("h5py")  # the background file is HDF5: say so before hours of downloading or checking
    from geoswc.importers.visloc import ROLES, import_visloc, resolve_source

    sources = {role: getattr(args, role) for role in ROLES}
    checksums = _checksums(args.sha256, ROLES)
    known = set(ROLES) | {Path(str(v).split("?", 1)[0]).name for v in sources.values()}
    unknown = sorted(set(checksums) - known)
    if unknown:
        raise ValueError(
            f"--sha256 names {', '.join(unknown)}, which is no input; use a role ({', '.join(ROLES)}) or the "
            "name of an input file"
        )
    download_dir = (
        Path(args.download_dir) if args.download_dir else Path(args.out).parent / "visloc-downloads"
    )
    files = {}
    for role, value in sources.items():
        digest = checksums.get(role) or checksums.get(Path(str(value).split("?", 1)[0]).name)
        files[role] = resolve_source(
            value,
            role,
            download_ok=args.download,
            download_dir=download_dir,
            sha256=digest,
            progress=not args.quiet,
        )
    result = import_visloc(
        **files,
        out=args.out,
        prekappa0=args.prekappa0,
        index_dtype=args.index_dtype,
        urls={role: str(v) for role, v in sources.items() if is_url(v)},
        overwrite=args.overwrite,
        progress=not args.quiet,
        padding_rule=args.padding_rule,
    )
    s = result.summary
    print(
        f"imported the authors' model into {result.out}: {s['components']} MvMF components as cells "
        f"({s['components_with_background']} with background photos), {s['index_rows']} background photos "
        f"indexed ({s['index_dtype']}), features of dim {s['feature_dim']}"
    )
    if args.precision_photos:
        from geoswc.commands.precision import record_written_folder

        record_written_folder(result.out, args.precision_photos)
    print(f"next: geoswc tag PHOTOS --model {result.out} -o tags.csv")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import",
        help="turn a model released in another format into a geoswc model folder",
        description="Turn a model released in another format into a geoswc model folder.",
    )
    commands = parser.add_subparsers(dest="import_command", metavar="FORMAT", required=True)
    visloc = commands.add_parser(
        "visloc",
        help="the ICMR 2021 authors' model (github.com/mever-team/visloc-estimation)",
        description="Convert the ICMR 2021 authors' released files (EfficientNet-B4 backbone, MvMF head, "
        "residual retrieval module, background features and cell assignments) into a model folder that "
        "evaluate, tag and Geolocator.from_pretrained use unchanged. Each input is a file or an http(s) URL; "
        "URLs are downloaded only with --download. See docs/visloc.md.",
    )
    visloc.add_argument("--backbone", required=True, metavar="PT|URL", help="efficientnet_backbone.pt")
    visloc.add_argument("--mvmf", required=True, metavar="PT|URL", help="mvmf_head.pt")
    visloc.add_argument("--rrm", required=True, metavar="PT|URL", help="rrm_head.pt")
    visloc.add_argument("--background", required=True, metavar="HDF5|URL", help="back_coll_features.hdf5")
    visloc.add_argument(
        "--assignments",
        required=True,
        metavar="PKL|URL",
        help="cells_assignments.pkl (data/ of their repository)",
    )
    visloc.add_argument("-o", "--out", required=True, metavar="MODEL", help="model folder to write")
    visloc.add_argument(
        "--download",
        action="store_true",
        help="download inputs given as URLs (resumable, with a progress bar)",
    )
    visloc.add_argument(
        "--download-dir", metavar="DIR", help="where downloads go (default: visloc-downloads beside MODEL)"
    )
    visloc.add_argument(
        "--sha256",
        action="append",
        metavar="ROLE=HEX",
        help="expected SHA-256 of an input (ROLE: backbone, mvmf, rrm, background, assignments, or a file "
        "name); repeatable",
    )
    visloc.add_argument(
        "--index-dtype",
        choices=("float16", "float32"),
        help="storage of the background embeddings (default: the background file's precision)",
    )
    visloc.add_argument(
        "--prekappa0",
        type=float,
        default=16.0,
        help="their concentration offset: kappa = exp(kappas + prekappa0) (default: 16, as released)",
    )
    visloc.add_argument(
        "--padding-rule",
        choices=("efficientnet_pytorch==0.7.0", "tensorflow"),
        default="efficientnet_pytorch==0.7.0",
        help="the static padding of the efficientnet_pytorch version the backbone was trained with: 0.7.0 "
        "(default, the authors' pin) pads odd amounts on both sides, 0.7.1 and later as TensorFlow",
    )
    visloc.add_argument("--overwrite", action="store_true", help="replace MODEL if it exists")
    visloc.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_precision_photos_argument(visloc)
    visloc.set_defaults(func=_visloc)
