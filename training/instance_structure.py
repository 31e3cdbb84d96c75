"""The structure loss on real models (Hyper-SD §3.2): the student's x̂0 segmented like the
teacher's output for the same prompt and noise, with a real instance-segmentation model.

On Shapes, the structure loss compares the segmentation of x̂0 with a render's true masks
(``training.objectives.feedback.structure_loss``). Real prompts have no true masks, so the
teacher's image for the same prompt and noise stands in for them: its instances, as the frozen
segmentation model finds them, are the targets, and the student is pulled towards images in which
the same model finds the same instances with the same masks.

The model is a query-based instance segmenter, ``transformers``' Mask2Former (a local folder,
safetensors: e.g. ``facebook/mask2former-swin-large-coco-instance``): per image, Q queries each
give class logits (the last class is "no object") and mask logits. The loss
(``instance_structure_loss``):

1. teacher image, no grad: queries whose best class probability reaches ``score_threshold``
   (at most ``max_instances``, highest first) are its instances; their mask probabilities
   ``p_t`` are the soft targets;
2. student x̂0, with grad: the mask logits of every query;
3. each teacher instance is matched to one student query (Hungarian, on the mean per-pixel
   Bernoulli KL between the two masks: the query that already draws that instance best);
4. loss = mean over matched pairs and pixels of ``KL(p_t ‖ σ(student logits))`` = BCE with soft
   targets minus the targets' entropy, so it is 0 exactly when the masks agree (identical images
   give the identity matching at cost 0) and it never rewards a mask for being confident where
   the teacher's is not.

An image in which the teacher's has no instance adds nothing (the loss keeps the graph at 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from training.objectives.solvers import EpsilonModel, ddim_step, guided_epsilon, x0_from_epsilon
from training.sampling import trailing_timesteps

# Mask2Former's image processor defaults (ImageNet normalisation)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InstanceSegmenter(nn.Module):
    """A frozen Mask2Former over ``(N, 3, H, W)`` [0, 1] images: ``(class_logits (N, Q, C+1),
    mask_logits (N, Q, h, w))``, differentiable in the images.

    Args:
        model: a ``Mask2FormerForUniversalSegmentation``.
        size: the shorter side the images are resized to (None: as they are).
        mean: the processor's normalisation mean.
        std: its std.
    """

    def __init__(
        self,
        model: Any,
        size: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.mean = mean
        self.std = std

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pixels = images.float()
        if self.size is not None:
            scale = self.size / min(pixels.shape[-2:])
            pixels = F.interpolate(pixels, scale_factor=scale, mode="bilinear", antialias=True)
        mean = pixels.new_tensor(self.mean).view(1, 3, 1, 1)
        pixels = (pixels - mean) / pixels.new_tensor(self.std).view(1, 3, 1, 1)
        output = self.model(pixel_values=pixels)
        return output.class_queries_logits.float(), output.masks_queries_logits.float()


def is_instance_segmenter(folder: str | Path) -> bool:
    """Whether ``folder`` holds a Mask2Former (``config.json``'s ``model_type``), i.e. the
    real-model structure loss, rather than the Shapes segmentation network."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text()).get("model_type") == "mask2former")


def load_instance_segmenter(
    folder: str | Path, device: torch.device | str = "cpu"
) -> InstanceSegmenter:
    """A local Mask2Former folder (safetensors; its ``preprocessor_config.json``, when there,
    gives the input size and normalisation), frozen, in eval mode."""
    from transformers import Mask2FormerForUniversalSegmentation

    path = Path(folder)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True
    )
    size, mean, std = None, IMAGENET_MEAN, IMAGENET_STD
    processor = path / "preprocessor_config.json"
    if processor.exists():
        config = json.loads(processor.read_text())
        shortest = (config.get("size") or {}).get("shortest_edge")
        size = int(shortest) if shortest else None
        mean = tuple(config.get("image_mean", mean))
        std = tuple(config.get("image_std", std))
    segmenter = InstanceSegmenter(model, size, mean, std)
    return segmenter.requires_grad_(False).eval().to(device)


def teacher_instances(
    class_logits: Tensor, mask_logits: Tensor, score_threshold: float, max_instances: int
) -> list[Tensor]:
    """Per image, the mask probabilities ``(K, h, w)`` of its confident queries (K may be 0).

    Args:
        class_logits: ``(N, Q, C+1)``, the last class being "no object".
        mask_logits: ``(N, Q, h, w)``.
        score_threshold: the lowest best-class probability kept.
        max_instances: at most this many per image, the most confident first.
    """
    scores = class_logits.softmax(-1)[..., :-1].amax(-1)
    out = []
    for image_scores, image_masks in zip(scores, mask_logits, strict=True):
        order = image_scores.argsort(descending=True)[:max_instances]
        kept = order[image_scores[order] >= score_threshold]
        out.append(image_masks[kept].sigmoid())
    return out


def bernoulli_kl(targets: Tensor, logits: Tensor) -> Tensor:
    """Per-pixel ``KL(Bernoulli(targets) ‖ Bernoulli(σ(logits)))``, same shapes; ≥ 0."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    entropy = F.binary_cross_entropy(targets, targets, reduction="none")
    return bce - entropy


def instance_structure_loss(
    student_images: Tensor,
    teacher_images: Tensor,
    segmenter: InstanceSegmenter,
    *,
    score_threshold: float = 0.5,
    max_instances: int = 16,
) -> dict[str, Tensor]:
    """The structure loss of the student's decoded x̂0 against the teacher's image (see the
    module's docstring).

    Args:
        student_images: ``(N, 3, H, W)`` [0, 1] decoded x̂0 (keep the graph).
        teacher_images: the teacher's images for the same prompts and noise (no grad needed).
        segmenter: the frozen instance-segmentation model.
        score_threshold: a teacher query is an instance from this class probability on.
        max_instances: at most this many instances per image.

    Returns ``loss`` (the mean KL over matched instance pixels; 0 with the graph kept when no
    teacher image has an instance) and ``instances`` (how many were matched, detached).
    """
    with torch.no_grad():
        class_logits, mask_logits = segmenter(teacher_images)
        targets = teacher_instances(class_logits, mask_logits, score_threshold, max_instances)
    _, student_logits = segmenter(student_images)
    losses = []
    for logits, target in zip(student_logits, targets, strict=True):
        if len(target) == 0:
            continue
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target[None], size=logits.shape[-2:], mode="bilinear")[0]
        with torch.no_grad():  # cost[k, q]: teacher instance k drawn by student query q
            pairs = (len(target), len(logits), *logits.shape[-2:])
            cost = bernoulli_kl(target[:, None].expand(pairs), logits[None].expand(pairs))
            rows, cols = linear_sum_assignment(cost.mean((-2, -1)).cpu().numpy())
        losses.append(bernoulli_kl(target[rows], logits[cols]).mean((-2, -1)))
    if not losses:
        return {"loss": student_logits.sum() * 0.0, "instances": student_logits.new_zeros(())}
    matched = torch.cat(losses)
    return {"loss": matched.mean(), "instances": matched.new_tensor(float(len(matched)))}


@torch.no_grad()
def teacher_sample(
    teacher: EpsilonModel,
    noise: Tensor,
    text: Tensor,
    uncond: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    guidance: float,
) -> Tensor:
    """The teacher's x̂0 from ``noise``: DDIM with trailing timesteps and CFG ω = ``guidance``
    (the teacher's own few-step sampling of the same prompts and noise as the student's).

    Args:
        teacher: the frozen teacher UNet.
        noise: the student's starting noise ``(N, C, H, W)``.
        text: the captions' conditioning ``(N, L, D)``.
        uncond: the empty caption's, ``(1, L, D)`` or ``(N, L, D)``.
        alphas_cumprod: the ᾱ table.
        steps: DDIM steps.
        guidance: CFG ω.
    """
    timesteps = trailing_timesteps(alphas_cumprod.shape[0], steps)
    x = noise
    x0 = noise
    for i, step_t in enumerate(timesteps):
        t = torch.full((noise.shape[0],), step_t, device=noise.device, dtype=torch.long)
        eps = guided_epsilon(teacher, x, t, text, uncond, guidance)
        x0 = x0_from_epsilon(x, eps, t, alphas_cumprod)
        if i + 1 < len(timesteps):
            x = ddim_step(x, eps, t, torch.full_like(t, timesteps[i + 1]), alphas_cumprod)
    return x0


def real_structure_loss(
    student_images: Tensor,
    noise: Tensor,
    text: Tensor,
    uncond: Tensor,
    *,
    teacher: EpsilonModel,
    vae: Any,
    alphas_cumprod: Tensor,
    segmenter: InstanceSegmenter,
    teacher_steps: int,
    guidance: float,
    score_threshold: float,
) -> dict[str, Tensor]:
    """The feedback / DMD stage's structure term on prompts: the teacher samples the same
    prompts from the same noise (``teacher_sample``, no grad), its images are decoded, and the
    student's decoded x̂0 is segmented against them (``instance_structure_loss``).

    Args:
        student_images: the student's decoded x̂0 ``(N, 3, H, W)`` in [0, 1] (keep the graph).
        noise: the noise the student started from.
        text: the captions' conditioning.
        uncond: the empty caption's (the teacher's CFG).
        teacher: the frozen teacher UNet.
        vae: the pipeline's VAE.
        alphas_cumprod: the ᾱ table.
        segmenter: the frozen instance segmenter.
        teacher_steps: the teacher's DDIM steps.
        guidance: the teacher's CFG ω.
        score_threshold: a teacher query is an instance from this class probability on.

    Returns ``structure`` (the loss) and ``structure_instances`` (matched instances, detached).
    """
    from training.objectives.feedback import latents_to_images

    x0 = teacher_sample(teacher, noise, text, uncond, alphas_cumprod, teacher_steps, guidance)
    with torch.no_grad():
        teacher_images = latents_to_images(vae, x0)
    out = instance_structure_loss(
        student_images, teacher_images, segmenter, score_threshold=score_threshold
    )
    return {"structure": out["loss"], "structure_instances": out["instances"]}
