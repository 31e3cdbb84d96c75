"""``hypersd``: serve the API, run a worker, generate images from the command line, list models.

Each command imports only what it runs: `hypersd serve` with `REDIS_URL` is the gateway alone and
loads neither torch nor the worker, so it runs from a gateway-only install (`pip install
".[gateway]"`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hypersd.registry import ARTEFACT_BACKENDS, load_registry


def _output_paths(out: Path, count: int) -> list[Path]:
    """One file per image: ``out`` itself for one image to a file name, else numbered files."""
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        if count == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
    return [out / f"image-{i}.png" for i in range(count)]


def _quiet_libraries() -> None:
    """Keep the CLI's output to what it made: no loading bars or library chatter."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (transformers_logging, diffusers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def generate(args: argparse.Namespace) -> int:
    registry = load_registry(args.registry)
    spec = registry.get(args.model or registry.default)
    # Check the request before the (slow) model load, so a typo fails at once.
    spec.resolve_sampling(
        args.steps, args.guidance_scale, args.eta, negative_prompt=bool(args.negative_prompt)
    )
    spec.resolve_size(args.width, args.height)
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    _quiet_libraries()
    from hypersd.pipeline import ImageRequest, load

    # A compiled backend's warm-up is its first call: a failure there falls back to eager (unless
    # strict) instead of failing the image. Eager needs none.
    generator = load(spec, device=args.device, warmup=spec.backend != "eager")
    requests = [
        ImageRequest(prompt=args.prompt, seed=args.seed + i, negative_prompt=args.negative_prompt)
        for i in range(args.n)
    ]
    result = generator.generate(
        requests,
        steps=args.steps,
        width=args.width,
        height=args.height,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
    )
    paths = _output_paths(Path(args.out), len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
    print(f"{len(paths)} image(s) in {result.timings['total']:.2f} s", file=sys.stderr)
    return 0


def models(args: argparse.Namespace) -> int:
    registry = load_registry(args.registry)
    for name in registry.names:
        spec = registry.get(name)
        marker = "*" if name == registry.default else " "
        print(f"{marker} {name:<28} {spec.family:<5} {spec.recipe:<20} {spec.description}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """The HTTP gateway; without REDIS_URL, with the model served in-process (embedded mode)."""
    import uvicorn

    from jobs.settings import Settings

    overrides = {"host": args.host, "port": args.port, "registry": args.registry}
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    import logging

    from jobs.logs import configure

    configure(settings.log_format)
    # The in-process workers log each model's start-up cost at INFO: load, warm-up and the
    # backend's artefact (built on a first start, from the cache afterwards); webhooks log their
    # deliveries.
    for name in ("worker.runner", "hypersd.backends", "jobs.webhooks"):
        logging.getLogger(name).setLevel(logging.INFO)
    # JSON logs: uvicorn's own loggers go through the root's JSON handler too (its default
    # config gives them text handlers of their own).
    uvicorn_logs: dict[str, None] = {}
    if settings.log_format == "json":
        uvicorn_logs["log_config"] = None
        logging.getLogger("uvicorn").setLevel(logging.INFO)
    if settings.redis_url:
        from service.app import create_app

        app = create_app(settings)
    else:
        from launcher.embedded import create_embedded_app

        app = create_embedded_app(settings)
    # Open waits (`Prefer: wait`, the OpenAI route) must not hold the shutdown past the grace.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        **uvicorn_logs,  # type: ignore[arg-type]
    )
    return 0


def worker(args: argparse.Namespace) -> int:
    """A Celery worker for one model's queue (needs REDIS_URL)."""
    import logging

    from jobs.logs import configure
    from jobs.settings import Settings
    from worker.celery_app import run_worker

    overrides = {
        "model": args.model,
        "registry": args.registry,
        "device": args.device,
        "worker_metrics_port": args.metrics_port,
    }
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    configure(settings.log_format, logging.INFO)
    run_worker(settings)
    return 0


def build_engine(args: argparse.Namespace) -> int:
    """Build a model's backend artefact into the cache (ahead of the workers, e.g. in an init
    container), print each export's error against eager and the artefact's folder."""
    registry = load_registry(args.registry)
    spec = registry.get(args.model or registry.default)
    backend = args.backend or spec.backend
    if backend not in ARTEFACT_BACKENDS:  # before loading anything
        print(
            f"hypersd: error: model {spec.name} runs on backend {backend!r}, which builds no "
            f"artefact; pass --backend ({' or '.join(ARTEFACT_BACKENDS)})",
            file=sys.stderr,
        )
        return 2
    _quiet_libraries()
    import torch

    from hypersd.backends import build_artefact
    from hypersd.backends.tensorrt import TensorRTUnavailableError, require_tensorrt
    from hypersd.pipeline import load

    if backend == "tensorrt":
        # Before loading anything: without TensorRT and a GPU there is nothing to build.
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            require_tensorrt(torch.device(device))
        except TensorRTUnavailableError as error:
            print(f"hypersd: error: {error}", file=sys.stderr)
            return 2
    # Exports are float32 on every device.
    eager_spec = spec.model_copy(update={"backend": "eager"})
    eager = load(eager_spec, device=args.device, dtype=torch.float32, warmup=False)
    result = build_artefact(
        eager.pipe, spec.model_copy(update={"backend": backend}), args.cache_dir
    )
    for parity in result.parity:
        print(parity)
    print(f"{result.artefact} ({'built' if result.built else 'already in the cache'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypersd", description=__doc__)
    parser.add_argument("--registry", help="registry TOML (default: $HYPERSD_REGISTRY or shipped)")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--model", help="registry name (default: the registry's default model)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; +1 per image")
    gen.add_argument("--n", type=int, default=1, help="number of images (one batched call)")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--eta", type=float, help="TCD eta, for the unified 1-step recipe")
    gen.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--out", required=True, help="a .png/.jpg/.webp file, or a folder")
    gen.set_defaults(handler=generate)

    listing = commands.add_parser("models", help="list the registry's models")
    listing.set_defaults(handler=models)

    server = commands.add_parser(
        "serve", help="the HTTP API; embedded worker unless REDIS_URL is set"
    )
    server.add_argument("--host", help="default: $HYPERSD_HOST or 127.0.0.1")
    server.add_argument("--port", type=int, help="default: $HYPERSD_PORT or 8000")
    server.set_defaults(handler=serve)

    work = commands.add_parser("worker", help="a Celery worker for one model (needs REDIS_URL)")
    work.add_argument("--model", help="registry name (default: the registry's default model)")
    work.add_argument(
        "--device", help="e.g. cuda:1 for one worker per GPU (default: $HYPERSD_DEVICE or auto)"
    )
    work.add_argument(
        "--metrics-port",
        type=int,
        help="this worker's /metrics port, one per worker on a host; 0 = off "
        "(default: $HYPERSD_WORKER_METRICS_PORT or 9101)",
    )
    work.set_defaults(handler=worker)

    engine = commands.add_parser(
        "build-engine", help="build a model's compiled-backend artefact into the cache"
    )
    engine.add_argument("--model", help="registry name (default: the registry's default model)")
    engine.add_argument(
        "--backend",
        choices=ARTEFACT_BACKENDS,
        help="the backend to build for (default: the model's registry backend)",
    )
    engine.add_argument(
        "--cache-dir",
        type=Path,
        help="artefact cache (default: $HYPERSD_ENGINE_CACHE or ~/.cache/hypersd/engines)",
    )
    engine.add_argument(
        "--device", help="the device the workers run on: cpu or cuda (default: cuda when available)"
    )
    engine.set_defaults(handler=build_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, KeyError) as error:
        print(f"hypersd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
