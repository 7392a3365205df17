"""`geoswc serve --model DIR`: the web app and HTTP API over a model folder (`geoswc.serve.create_app`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from geoswc.runtime import RUNTIMES

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost",)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted."""
    import uvicorn

    from geoswc.serve import ServeSettings, create_app
    from geoswc.tagging.output import output_format
    from geoswc.tagging.run import load_predictor

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.max_decode_mb <= 0:
        raise ValueError(f"--max-decode-mb must be positive, got {args.max_decode_mb}")
    if args.max_files < 1:
        raise ValueError(f"--max-files must be >= 1, got {args.max_files}")
    if args.images is not None and not os.path.isdir(args.images):
        raise FileNotFoundError(f"--images {args.images!r} is not a folder")
    if args.tags is not None:
        if not os.path.isfile(args.tags):
            raise FileNotFoundError(f"--tags {args.tags!r} does not exist")
        output_format(args.tags)
    if not _is_loopback(args.host):
        logger.warning(
            "serving on %s: anyone who can reach this address can upload photos to the model", args.host
        )
        if args.host in ("0.0.0.0", "::") and not args.allowed_host:
            logger.warning(
                "bound to every address: requests are answered only when their Host header names localhost, "
                "127.0.0.1 or [::1]; name the server's other names with --allowed-host"
            )
    model = load_predictor(args.model, device=args.device, runtime=args.runtime)
    settings = ServeSettings(
        max_upload_mb=args.max_upload_mb,
        max_files=args.max_files,
        keep_uploads=args.keep_uploads,
        images=args.images,
        tags=args.tags,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        tile_url=None if args.offline else args.tiles,
        host=args.host,
        allowed_hosts=tuple(args.allowed_host),
        max_decode_mb=args.max_decode_mb,
    )
    app = create_app(model, settings)
    print(f"geoswc serve: {args.model} on http://{args.host}:{args.port}/  (API docs: /docs; Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="web app and HTTP API: drop a photo, see where it was taken and why",
        description="Serve a model folder: a page to upload photos and browse the predictions on a map (works "
        "offline), and the HTTP API POST /v1/locate, GET /v1/model, GET /healthz (OpenAPI at /docs). "
        "Binds to 127.0.0.1 unless --host says otherwise. See docs/serving.md.",
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="model folder (Geolocator.save_pretrained)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a further name the server answers to in the Host header (repeatable; the --host address, "
        "localhost, 127.0.0.1 and [::1] always are); others are refused with 400 (DNS rebinding)",
    )
    parser.add_argument(
        "--images",
        metavar="ROOT",
        help="folder of the background photos (index ids are paths under it): thumbnails of the neighbours",
    )
    parser.add_argument(
        "--tags", metavar="FILE", help="a geoswc tag output to show in the tag-run view (with its photos)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=25.0,
        help="largest request body in MiB (default 25; 413 beyond)",
    )
    parser.add_argument("--max-files", type=int, default=16, help="most photos per request (default 16)")
    parser.add_argument(
        "--max-decode-mb",
        type=float,
        default=1024.0,
        help="memory budget in MiB for the uploads and decoded pixels of all requests in flight "
        "(default 1024; 503 with Retry-After beyond)",
    )
    parser.add_argument(
        "--keep-uploads",
        metavar="DIR",
        help="save every uploaded file under DIR (default: uploads stay in memory and are never written)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=32, help="most photos per forward pass (default 32; 1: no batching)"
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a photo waits for others to share its forward pass (default 5 ms)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when available)")
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the backbone: auto (default: on a CPU the fastest engine that agrees, measured once per "
        "machine and model; PyTorch on a GPU), torch, onnx, openvino",
    )
    parser.add_argument(
        "--tiles",
        default=None,
        metavar="URL",
        help="online map tiles the page may switch to, e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png "
        "(default: none; the page uses the shipped Natural Earth basemap and requests nothing elsewhere)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="never offer online tiles, even with --tiles (the shipped basemap only; the default)",
    )
    parser.set_defaults(func=run)
