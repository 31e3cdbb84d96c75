"""Evaluate a text-to-image model on the Shapes world: prompt adherence and FID (Shapes).

``hypersd-train evaluate --model NAME [--steps N] [--guidance G] [--captions 500] [--seed S]
[--out DIR]`` generates one image per caption of the fixed caption set
(``hypersd.shapes.fixed_captions``), reads every image with the attribute
network (``training.attributes``) and reports

* prompt adherence: the share of images whose predicted scene is exactly the
  caption's scene, overall and per caption kind (one / two objects);
* per-attribute accuracies (background, place, colour, shape, size), which
  say *why* images fail;
* FID (Shapes): the Fréchet distance between the generated images and fresh
  renders of the same captions, in the attribute network's feature space;
* adherence by the geometric judge (``training.geometric_judge``): the same
  question answered with no network at all (connected components, palette
  distances, the renderer's own shape templates), with per-attribute failure
  counts. The attribute network is a sibling of the alignment reward that the
  feedback and DMD stages optimise; the geometric judge shares nothing with
  training, so it sees what those rewards may have taught the models to get
  away with. Report it on the final caption set (``--caption-set 3``,
  ``hypersd.shapes.FINAL_CAPTION_SET``), which no training or selection step reads.

Other sources of images (``training.image_sources``), for the same report:

* ``--pipeline-dir DIR``: a diffusers ``StableDiffusionPipeline`` folder,
  loaded directly (works before a registry entry exists);
* ``--reference renders``: renders themselves (the measure's ceiling, ~100 %);
* ``--reference reconstructions --vae PATH``: renders passed through an
  ``AutoencoderKL`` (encode, decode). This gates the VAE: a diffusion model
  cannot be more correct than its decoder's reconstructions.

A real model on a prompts file (``--prompts FILE``: CLIP score, LAION aesthetic, ImageReward,
PickScore and FID at 1/2/4/8 steps, the paper's table) is ``training.evaluate_real``.

The core (``adherence``, ``attribute_accuracy``, ``frechet_distance``,
``evaluate_images``) is pure and needs no diffusion model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hypersd.shapes import Scene, fixed_captions, parse_caption, render
from training.attributes import DEFAULT_MODEL_DIR, AttributeNet, load_attribute_net, split_logits
from training.devices import resolve_device
from training.geometric_judge import JUDGED_ATTRIBUTES, judge_images, summarize
from training.image_ops import images_to_tensor
from training.image_sources import (
    PipelineScheduler,
    generate_with_pipeline_dir,
    generate_with_registry,
    reconstruct,
)
from training.scene_labels import HEAD_NAMES, decode_labels, labels_tensor

KINDS = ("one", "two")
# Reported attribute -> the heads that must all be right (object A and object B).
ATTRIBUTE_HEADS: dict[str, tuple[str, ...]] = {
    "background": ("background",),
    "place": ("layout",),
    "color": ("a_color", "b_color"),
    "shape": ("a_shape", "b_shape"),
    "size": ("a_size", "b_size"),
    "nothing_else": ("extra",),  # no stray object, no shape outside the vocabulary
}
ATTRIBUTE_LABELS = {
    "background": "background right",
    "place": "place right",
    "color": "colours right",
    "shape": "shapes right",
    "size": "sizes right",
    "nothing_else": "no stray or odd shapes",
}
ImageLike = Image.Image | np.ndarray
GOOD, BAD = (40, 170, 60), (210, 40, 40)  # frame colours of the sample grid


# ----------------------------------------------------------------------------- pure measures


def adherence(
    pred_scenes: Sequence[Scene | None], true_scenes: Sequence[Scene]
) -> dict[str, float]:
    """Share of exact matches: ``all`` and per caption kind (``one``, ``two``).

    A kind with no captions is left out rather than reported as 0 or NaN.
    ``None`` predictions (no valid scene) count as wrong.
    """
    if len(pred_scenes) != len(true_scenes):
        raise ValueError(f"{len(pred_scenes)} predictions for {len(true_scenes)} scenes")
    if not true_scenes:
        raise ValueError("no scenes to score")
    hits = [p == t for p, t in zip(pred_scenes, true_scenes, strict=True)]
    result = {"all": float(np.mean(hits))}
    for kind in KINDS:
        selected = [h for h, t in zip(hits, true_scenes, strict=True) if t.kind == kind]
        if selected:
            result[kind] = float(np.mean(selected))
    return result


def attribute_accuracy(
    pred_labels: np.ndarray | torch.Tensor, true_scenes: Sequence[Scene]
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy from the raw head predictions, for ``all`` and each kind.

    Computed from the heads, not from decoded scenes, so an image whose heads do
    not form a valid scene still tells which attributes it got right. Colour,
    shape and size count as right when both object heads are (for a one-object
    caption object B must be ``none``: no extra object).
    """
    predicted = np.asarray(pred_labels)
    truth = labels_tensor(list(true_scenes)).numpy()
    if predicted.shape != truth.shape:
        raise ValueError(f"labels of shape {predicted.shape}, expected {truth.shape}")
    right = predicted == truth
    kinds = np.array([s.kind for s in true_scenes])
    result: dict[str, dict[str, float]] = {}
    for group in ("all", *KINDS):
        rows = np.ones(len(kinds), bool) if group == "all" else kinds == group
        if not rows.any():
            continue
        result[group] = {
            name: float(right[rows][:, [HEAD_NAMES.index(h) for h in heads]].all(1).mean())
            for name, heads in ATTRIBUTE_HEADS.items()
        }
    return result


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets.

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))``, as FID. With fewer
    samples than dimensions the covariances are singular and ``sqrtm`` may
    return non-finite or complex values: a small ``eps`` is added to the
    diagonals then, and the imaginary part (numerical noise) is dropped.
    """
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets of shapes {a.shape} and {b.shape} do not compare")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular products are expected and handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(a.shape[1]) * eps
            covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    return max(0.0, float(value))


# ----------------------------------------------------------------------------- the report


@dataclass
class EvalReport:
    """Everything one evaluation measured, plus per-image results for inspection."""

    count: int
    adherence: dict[str, float]
    attributes: dict[str, dict[str, float]]
    fid: dict[str, float]
    captions: list[str]
    predicted: list[str | None]  # the predicted scene's caption; None when no valid scene
    correct: list[bool]
    meta: dict[str, Any] = field(default_factory=dict)
    # The geometric judge's summary (``geometric_judge.summarize``) and, per image, the
    # attributes it found wrong (empty: correct); empty when not judged.
    geometric: dict[str, Any] = field(default_factory=dict)
    geometric_failed: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        failed = data.pop("geometric_failed")
        data["per_image"] = [
            {"caption": c, "predicted": p, "correct": ok}
            for c, p, ok in zip(
                data.pop("captions"), data.pop("predicted"), data.pop("correct"), strict=True
            )
        ]
        for row, attributes in zip(data["per_image"], failed, strict=False):
            row["geometric_failed"] = attributes  # only when the judge has read the images
        return data

    def markdown(self, title: str = "Shapes evaluation") -> str:
        """The report as a markdown table: measures as rows, caption kinds as columns."""
        kinds = self.captions_by_kind()
        header = [f"all ({self.count})"] + [
            f"{'one object' if k == 'one' else 'two objects'} ({kinds[k]})" for k in KINDS
        ]
        lines = [f"## {title}", ""]
        if self.meta:
            shown = {k: v for k, v in self.meta.items() if v is not None}
            lines += [", ".join(f"{k}: {v}" for k, v in shown.items()), ""]
        lines.append("| measure | " + " | ".join(header) + " |")
        lines.append("|---" * (len(header) + 1) + "|")

        def row(name: str, values: dict[str, float], fmt: Callable[[float], str]) -> str:
            cells = [fmt(values[g]) if g in values else "–" for g in ("all", *KINDS)]
            return f"| {name} | " + " | ".join(cells) + " |"

        def percent(v: float) -> str:
            return f"{v:.1%}"

        lines.append(row("**prompt adherence**", self.adherence, percent))
        for attribute in ATTRIBUTE_HEADS:
            values = {g: acc[attribute] for g, acc in self.attributes.items()}
            lines.append(row(ATTRIBUTE_LABELS[attribute], values, percent))
        lines.append(row("**FID (Shapes)**", self.fid, lambda v: f"{v:.3f}"))
        if self.geometric:
            lines.append(
                row("**adherence, geometric judge**", self.geometric["adherence"], percent)
            )
            failures = self.geometric["failures"]
            for attribute in JUDGED_ATTRIBUTES:
                values = {g: float(f[attribute]) for g, f in failures.items()}
                lines.append(
                    row(f"judge: {attribute} wrong (images)", values, lambda v: f"{v:.0f}")
                )
        lines += [
            "",
            "FID is biased upwards at small sample sizes (renders against renders: ~25 at 100"
            " captions, ~5 at 500): compare FIDs only at the same caption count.",
        ]
        if self.geometric:
            lines += [
                "",
                "The geometric judge (training/geometric_judge.py) shares nothing with training:"
                " no network; components, palette distances and the renderer's templates. An"
                " image with the wrong object count is judged on count and background only.",
            ]
        return "\n".join(lines) + "\n"

    def captions_by_kind(self) -> dict[str, int]:
        kinds = [parse_caption(c).kind for c in self.captions]
        return {k: kinds.count(k) for k in KINDS}


@torch.no_grad()
def _read(net: AttributeNet, images: Sequence[ImageLike], batch_size: int) -> tuple[Any, Any]:
    """Head predictions (N, heads) and features (N, D) of ``images``, batch by batch."""
    labels, features = [], []
    for start in range(0, len(images), batch_size):
        batch = images_to_tensor(images[start : start + batch_size], net.device)
        feats, logits = net.features_and_logits(batch)
        labels.append(torch.stack([p.argmax(1) for p in split_logits(logits)], 1).cpu())
        features.append(feats.double().cpu())
    return torch.cat(labels).numpy(), torch.cat(features).numpy()


def render_captions(captions: Sequence[str], seed: int, stream: str = "real") -> list[np.ndarray]:
    """A fresh render of each caption; ``stream`` keeps independent sets independent."""
    return [
        render(parse_caption(c), random.Random(f"eval-{stream}:{seed}:{i}")).image
        for i, c in enumerate(captions)
    ]


def evaluate_images(
    images: Sequence[ImageLike],
    captions: Sequence[str],
    net: AttributeNet,
    *,
    reference: Sequence[ImageLike] | None = None,
    seed: int = 0,
    batch_size: int = 250,
) -> EvalReport:
    """Judge ``images`` against their ``captions``; FID against ``reference`` images.

    Without ``reference``, fresh renders of the same captions are the real set
    (``render_captions(captions, seed)``), so the FID compares like with like;
    a given ``reference`` must likewise hold one image per caption, in order.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    scenes = [parse_caption(c) for c in captions]
    if reference is None:
        reference = render_captions(captions, seed)
    if len(reference) != len(captions):
        raise ValueError(f"{len(reference)} reference images for {len(captions)} captions")
    labels, features = _read(net, images, batch_size)
    _, real_features = _read(net, reference, batch_size)
    predicted = [decode_labels(row) for row in labels.tolist()]
    verdicts = judge_images(images, captions)
    kinds = np.array([s.kind for s in scenes])
    fid = {"all": frechet_distance(features, real_features)}
    for kind in KINDS:
        rows = kinds == kind
        if rows.sum() >= 2:
            fid[kind] = frechet_distance(features[rows], real_features[rows])
    return EvalReport(
        count=len(captions),
        adherence=adherence(predicted, scenes),
        attributes=attribute_accuracy(labels, scenes),
        fid=fid,
        captions=list(captions),
        predicted=[p.caption() if p else None for p in predicted],
        correct=[p == s for p, s in zip(predicted, scenes, strict=True)],
        geometric=summarize(verdicts, captions),
        geometric_failed=[list(v.failed) for v in verdicts],
    )


# ----------------------------------------------------------------------------- outputs


def sample_grid(
    images: Sequence[ImageLike], correct: Sequence[bool] | None = None, columns: int = 8
) -> Image.Image:
    """Tile up to ``columns``² images; a green / red frame marks correct / wrong ones."""
    tiles = [np.asarray(i.convert("RGB") if isinstance(i, Image.Image) else i) for i in images]
    tiles = tiles[: columns * columns]
    if not tiles:
        raise ValueError("no images for the grid")
    height, width = tiles[0].shape[:2]
    frame = 2
    rows = math.ceil(len(tiles) / columns)
    cell_h, cell_w = height + 2 * frame, width + 2 * frame
    grid = np.full((rows * cell_h, min(columns, len(tiles)) * cell_w, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        y, x = r * cell_h, c * cell_w
        if correct is not None:
            grid[y : y + cell_h, x : x + cell_w] = GOOD if correct[index] else BAD
        grid[y + frame : y + frame + height, x + frame : x + frame + width] = tile[:height, :width]
    return Image.fromarray(grid)


def write_outputs(
    report: EvalReport, images: Sequence[ImageLike], out: Path, title: str
) -> dict[str, Path]:
    """Write ``eval.md``, ``eval.json`` and ``grid.png`` (the first 64 images) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "eval.md", "json": out / "eval.json", "grid": out / "grid.png"}
    paths["md"].write_text(report.markdown(title))
    data = report.to_json()
    data["grid_captions"] = report.captions[:64]
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    sample_grid(images, report.correct).save(paths["grid"])
    return paths


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypersd-train evaluate",
        description="Prompt adherence and FID (Shapes) of a model, a pipeline or a reference.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="registry model name (default: the registry's default)")
    source.add_argument("--pipeline-dir", help="a diffusers StableDiffusionPipeline folder")
    source.add_argument(
        "--reference",
        choices=("renders", "reconstructions"),
        help="evaluate renders themselves, or their VAE reconstructions (needs --vae)",
    )
    parser.add_argument(
        "--vae", help="AutoencoderKL folder (or pipeline folder) for reconstructions"
    )
    parser.add_argument("--registry", help="registry file (default: the project's)")
    parser.add_argument(
        "--scheduler",
        choices=typing.get_args(PipelineScheduler),
        default="ddim-trailing",
        help="scheduler for --pipeline-dir",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--eta", type=float, help="scheduler eta (TCD / DDIM)")
    parser.add_argument("--size", type=int, help="generate at this size (default: the model's)")
    parser.add_argument("--captions", type=int, default=500, help="number of fixed captions")
    parser.add_argument("--seed", type=int, default=0, help="seed of generation and real renders")
    parser.add_argument(
        "--caption-set",
        type=int,
        default=0,
        help="0: the fixed evaluation captions (the tables'); 1, 2: other fixed sets, held out "
        "from the tables, for choosing between training runs; 3 (FINAL_CAPTION_SET): for final "
        "numbers only, never for a choice",
    )
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--attributes", default=str(DEFAULT_MODEL_DIR), help="attribute network")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="output folder (default: runs/eval/<label>)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--prompts" or a.startswith("--prompts=") for a in arguments):
        # a real model on a prompts file: CLIP score, aesthetic, ImageReward, PickScore, FID
        from training.evaluate_real import main as evaluate_real

        return evaluate_real(arguments)
    args = build_parser().parse_args(arguments)
    if args.reference == "reconstructions" and not args.vae:
        print("--reference reconstructions needs --vae PATH", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = None if args.device == "auto" else args.device
    captions = (
        fixed_captions(args.captions)
        if args.caption_set == 0
        else fixed_captions(args.captions, seed=args.caption_set)
    )
    started = time.time()
    images: Sequence[ImageLike]
    if args.reference == "renders":
        images, label = render_captions(captions, args.seed, stream="as-model"), "renders"
    elif args.reference == "reconstructions":
        renders = render_captions(captions, args.seed, stream="as-model")
        images = reconstruct(renders, args.vae, batch_size=args.batch_size, device=device)
        label = f"reconstructions-{Path(args.vae).name}"
    else:
        common: dict[str, Any] = {
            "seed": args.seed,
            "steps": args.steps,
            "guidance": args.guidance,
            "eta": args.eta,
            "size": args.size,
            "batch_size": args.batch_size,
            "device": device,
        }
        if args.pipeline_dir:
            images = generate_with_pipeline_dir(
                args.pipeline_dir, captions, scheduler=args.scheduler, **common
            )
            label = Path(args.pipeline_dir).name
        else:
            images, label = generate_with_registry(
                args.model, captions, registry_path=args.registry, **common
            )
        label += f"-{args.steps}step" if args.steps else ""
    generation_seconds = time.time() - started
    net = load_attribute_net(args.attributes, resolve_device(device))
    report = evaluate_images(images, captions, net, seed=args.seed)
    report.meta = {
        "source": label,
        "model": args.model,
        "pipeline_dir": args.pipeline_dir,
        "scheduler": args.scheduler if args.pipeline_dir else None,
        "reference": args.reference,
        "vae": args.vae,
        "steps": args.steps,
        "guidance": args.guidance,
        "eta": args.eta,
        "captions": args.captions,
        "caption_set": args.caption_set,
        "seed": args.seed,
        "generation_seconds": round(generation_seconds, 1),
    }
    out = Path(args.out or Path("runs") / "eval" / label)
    write_outputs(report, images, out, f"Shapes evaluation: {label}")
    if not args.quiet:
        print(report.markdown(f"Shapes evaluation: {label}"))
        print(f"written to {out}/eval.md, eval.json, grid.png")
    return 0
