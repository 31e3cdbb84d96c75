"""Evaluate a real text-to-image model at 1/2/4/8 steps: the paper's table (Hyper-SD Table 1).

``hypersd-train evaluate --prompts prompts.txt (--model NAME [--registry FILE] | --pipeline-dir
DIR [--recipe R]) [--steps-list 1,2,4,8] [metric weights ...] [--out DIR]`` generates one image
per prompt (one per line, e.g. COCO-2017 validation captions) and step count, through hypersd's
serving pipeline (``hypersd.pipeline.load``, eager, the model's recipe: what users get), with the
same seed per prompt at every step count, and measures, per step count:

* ``clip_score``: 100 · max(cos, 0) with a plain CLIP (``--clip``: a local CLIPModel folder);
* ``aesthetic``: the LAION aesthetic predictor (``--aesthetic-clip`` CLIP ViT-L/14 folder and
  ``--aesthetic-head``, its MLP as safetensors; ``training.rewards``);
* ``imagereward``: ImageReward (``--imagereward``: the folder ``convert-imagereward`` wrote);
* ``pickscore``: PickScore or HPS v2 (``--pickscore``: a CLIPModel folder);
* ``fid``: FID against ``--fid-reference`` (an image folder, e.g. COCO images), in CLIP features
  from ``--fid-features`` (a local CLIP folder: FID_CLIP) or in Inception-v3 features from
  ``--fid-inception`` (``convert-inception``'s safetensors: the FID of published tables);
  ``training.fid``. The table's column and the JSON's ``fid_features`` name the space.

A metric whose weights are not given is left out of the table (and the reason printed). The
results go to ``OUT/real-eval.md`` (markdown: rows = steps, columns = metrics), ``OUT/
real-eval.json`` and the images to ``OUT/steps-N/``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.fid import FeatureSpace, fid, folder_features, load_features, to_tensor

# metric -> the table's column title (FID's names its feature space: ``format_table``)
COLUMNS = {
    "clip_score": "CLIP score",
    "aesthetic": "Aesthetic",
    "imagereward": "ImageReward",
    "pickscore": "PickScore",
    "fid": "FID",
}
FID_SPACES: dict[FeatureSpace, str] = {"clip": "CLIP", "inception": "Inception"}
ScoreFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a prompts file; ``ValueError`` when there are none."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompt")
    return prompts


def model_spec(args: argparse.Namespace) -> Any:
    """The ModelSpec to evaluate: a registry entry, or a diffusers folder under ``--recipe``;
    eager, and allowing every step count its recipe allows."""
    from hypersd.registry import ModelSpec, load_registry

    if args.pipeline_dir:
        folder = Path(args.pipeline_dir)
        index = json.loads((folder / "model_index.json").read_text())
        family = "sdxl" if "XL" in index.get("_class_name", "") else "sd15"
        fields: dict[str, Any] = {
            "name": "evaluated",
            "family": family,
            "path": folder.resolve(),
            "recipe": args.recipe,
        }
        if args.size:
            fields["sizes"] = [[args.size, args.size]]
        spec = ModelSpec.model_validate(fields)
    else:
        registry = load_registry(args.registry)
        spec = registry.get(args.model or registry.default)
    return spec.model_copy(update={"backend": "eager", "steps": spec.recipe_info.steps})


def generate(
    spec: Any, prompts: Sequence[str], steps: Sequence[int], args: argparse.Namespace
) -> dict[int, list[Image.Image]]:
    """Images per step count: prompt i has seed ``seed + i`` at every step count."""
    from hypersd.pipeline import ImageRequest, load

    allowed = spec.recipe_info.steps
    wrong = [n for n in steps if n not in allowed]
    if wrong:
        raise ValueError(f"--steps-list: {wrong} not allowed by recipe {spec.recipe}: {allowed}")
    generator = load(spec, device=args.device, warmup=False)
    images: dict[int, list[Image.Image]] = {}
    for n in steps:
        images[n] = []
        for start in range(0, len(prompts), args.batch_size):
            requests = [
                ImageRequest(prompt=prompt, seed=args.seed + start + i)
                for i, prompt in enumerate(prompts[start : start + args.batch_size])
            ]
            result = generator.generate(
                requests, steps=n, width=args.size, height=args.size, guidance_scale=args.guidance
            )
            images[n].extend(result.images)
    return images


def score_models(args: argparse.Namespace, device: torch.device) -> dict[str, ScoreFn]:
    """The per-image metrics whose weights were given (a missing one is said and left out)."""
    from training.imagereward import load_imagereward
    from training.preference import load_clip_preference
    from training.rewards import load_laion_aesthetic

    scorers: dict[str, ScoreFn] = {}
    if args.clip:
        scorers["clip_score"] = load_clip_preference(args.clip, device).clip_score
    if args.aesthetic_clip and args.aesthetic_head:
        scorers["aesthetic"] = load_laion_aesthetic(
            args.aesthetic_clip, args.aesthetic_head, device
        )
    if args.imagereward:
        scorers["imagereward"] = load_imagereward(args.imagereward, device)
    if args.pickscore:
        scorers["pickscore"] = load_clip_preference(args.pickscore, device)
    for name, needs in (
        ("clip_score", "--clip"),
        ("aesthetic", "--aesthetic-clip and --aesthetic-head"),
        ("imagereward", "--imagereward"),
        ("pickscore", "--pickscore"),
    ):
        if name not in scorers:
            print(f"{name} left out: needs {needs}", file=sys.stderr)
    return scorers


@torch.no_grad()
def mean_score(
    score: ScoreFn,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    batch_size: int,
    device: torch.device,
) -> float:
    """The mean of a per-image metric over the images and their prompts (scored on ``device``,
    where the metric's model is)."""
    values = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([to_tensor(image) for image in images[start : start + batch_size]])
        values.append(score(batch.to(device), prompts[start : start + batch_size]).float().cpu())
    return float(torch.cat(values).mean())


def format_table(
    rows: dict[int, dict[str, float]], label: str, fid_space: FeatureSpace = "clip"
) -> str:
    """The paper's table: one row per step count, one column per metric (markdown).

    Args:
        rows: {steps: {metric: value}}.
        label: the line above the table.
        fid_space: the FID's feature space, named in its column: ``FID (CLIP)``,
            ``FID (Inception)``.
    """
    metrics = [m for m in COLUMNS if any(m in row for row in rows.values())]
    titles = COLUMNS | {"fid": f"FID ({FID_SPACES[fid_space]})"}
    lines = [
        f"{label}",
        "",
        "| steps | " + " | ".join(titles[m] for m in metrics) + " |",
        "|---:" * (len(metrics) + 1) + "|",
    ]
    for steps, row in rows.items():
        cells = [f"{row[m]:.4f}" if m in row else "–" for m in metrics]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypersd-train evaluate --prompts",
        description="CLIP score, aesthetic, ImageReward, PickScore and FID of a real model.",
    )
    parser.add_argument("--prompts", required=True, help="prompts file, one per line")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="registry model name (default: the registry's default)")
    source.add_argument("--pipeline-dir", help="a diffusers SD1.5 or SDXL pipeline folder")
    parser.add_argument("--registry", help="registry file (default: hypersd's)")
    parser.add_argument("--recipe", default="teacher", help="--pipeline-dir's sampling recipe")
    parser.add_argument("--steps-list", default="1,2,4,8", help="step counts, comma-separated")
    parser.add_argument("--size", type=int, help="square image size (default: the model's)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--clip", help="CLIP score: a local CLIPModel folder")
    parser.add_argument("--aesthetic-clip", help="LAION aesthetic: CLIP ViT-L/14 folder")
    parser.add_argument("--aesthetic-head", help="LAION aesthetic: the MLP's .safetensors")
    parser.add_argument("--imagereward", help="a converted ImageReward folder")
    parser.add_argument("--pickscore", help="PickScore / HPS v2: a local CLIPModel folder")
    parser.add_argument("--fid-reference", help="FID: a folder of reference images")
    fid_features = parser.add_mutually_exclusive_group()
    fid_features.add_argument("--fid-features", help="FID in CLIP features: a local CLIP folder")
    fid_features.add_argument(
        "--fid-inception",
        help="FID in Inception-v3 features: the .safetensors convert-inception wrote",
    )
    parser.add_argument("--out", default="runs/evaluate-real", help="output folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--threads", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``hypersd-train evaluate --prompts FILE ...``: the table for a real model."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.fid_reference) != bool(args.fid_features or args.fid_inception):
        print(
            "--fid-reference goes with one of --fid-features (CLIP) or --fid-inception",
            file=sys.stderr,
        )
        return 2
    fid_space: FeatureSpace = "inception" if args.fid_inception else "clip"
    steps = [int(n) for n in args.steps_list.split(",") if n.strip()]
    prompts = read_prompts(args.prompts)
    spec = model_spec(args)
    images = generate(spec, prompts, steps, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    for n, batch in images.items():
        (out / f"steps-{n}").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(batch):
            image.save(out / f"steps-{n}" / f"{i:05d}.png")
    rows: dict[int, dict[str, float]] = {n: {} for n in steps}
    for name, score in score_models(args, device).items():
        for n in steps:
            rows[n][name] = mean_score(score, images[n], prompts, args.batch_size, device)
    report: dict[str, Any] = {"model": spec.name, "recipe": spec.recipe, "prompts": len(prompts)}
    if args.fid_reference:
        weights = args.fid_inception or args.fid_features
        features = load_features(fid_space, weights, device)
        reference = folder_features(features, args.fid_reference)
        for n in steps:
            rows[n]["fid"] = fid(features(images[n]), reference)
        report |= {"fid_features": fid_space, "fid_weights": str(weights)}
    label = f"{spec.name} ({spec.recipe}), {len(prompts)} prompts, seed {args.seed}"
    table = format_table(rows, label, fid_space)
    (out / "real-eval.md").write_text(table)
    report["rows"] = rows
    (out / "real-eval.json").write_text(json.dumps(report, indent=2))
    print(table)
    return 0
