"""``--dry-run``: a stage's memory per process, estimated without loading weights or data.

Every network of the stage is built from its config on the ``meta`` device (shapes, no
storage): the teacher folder's ``unet/``, ``vae/`` and ``text_encoder*/config.json``, or, when
the teacher is not a local folder, the published SD1.5 / SDXL configs shipped in
``training/configs/architectures/``. From them:

- **weights**: every frozen network in ``weight_dtype`` (teacher, the student's base, TSCD's
  EMA target's base, DMD's fake score and anchor, VAE, text encoders), the LoRAs and heads in
  fp32;
- **gradients**: fp32, for what the stage trains (the LoRA, the heads, DMD's fake-score LoRA);
- **optimizer**: AdamW's two fp32 moments (8 bytes a parameter), or 2 bytes with ``adamw8bit``;
- **activations**: what autograd keeps for the backward pass, *measured* by running each
  network that gradients flow through once on meta tensors of the run's batch and latent size,
  counting every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``),
  parameters excluded. Attention counts as a fused kernel on a GPU saves it (q, k, v, output,
  the rows' log-sum-exp; ``_fused_attention``), not the L x L matrix. With gradient
  checkpointing, each checkpointed block keeps only its inputs, plus one block's activations
  recomputed at a time (the largest). The stage's peak is its largest phase, e.g. TSCD's
  student step: the student's graph and the teacher's under the discriminator heads.

Not counted: the reward and segmentation networks (feedback, DMD), no-grad forward passes'
transient buffers, the CUDA context and allocator fragmentation (budget a few GB).
"""

from __future__ import annotations

import contextlib
import unittest.mock
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from peft import LoraConfig
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.devices import torch_dtype
from training.distributed import compute_precision
from training.objectives.adversarial import TeacherFeatureDiscriminator

if TYPE_CHECKING:  # the commands' modules, which call this one
    from training.distill import DistillConfig
    from training.enhance import EnhanceConfig

ARCHITECTURES = Path(__file__).parent / "configs" / "architectures"
Architecture = Literal["sd15", "sdxl"]
GIB = 1024**3
TEXT_TOKENS = 77  # CLIP's context (SDXL packs one more token: training.teacher)


# ---------------------------------------------------------------------------------------------
# networks on the meta device


def architecture_folder(teacher: str, architecture: Architecture | None = None) -> Path:
    """Where the stage's network configs are: the teacher folder when it has them, else the
    shipped configs of ``architecture`` (guessed from the teacher's name when None: ``xl`` in it
    means SDXL)."""
    if architecture is None and (Path(teacher) / "unet" / "config.json").exists():
        return Path(teacher)
    if architecture is None:
        architecture = "sdxl" if "xl" in teacher.lower() else "sd15"
    if architecture not in ("sd15", "sdxl"):
        raise ValueError(f"architecture must be one of sd15, sdxl; got {architecture!r}")
    return ARCHITECTURES / architecture


def meta_unet(folder: Path) -> UNet2DConditionModel:
    """The folder's UNet on the meta device (no weights are read)."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    assert isinstance(unet, UNet2DConditionModel)
    return unet


def meta_vae(folder: Path) -> AutoencoderKL:
    """The folder's VAE on the meta device."""
    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    assert isinstance(vae, AutoencoderKL)
    return vae


def text_encoder_params(folder: Path) -> int:
    """The parameters of the folder's text encoder(s) (SDXL: both), built on the meta device."""
    total = 0
    for name, cls in (
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ):
        if (folder / name / "config.json").exists():
            with init_empty_weights():
                model = cls(CLIPTextConfig.from_pretrained(folder / name))
            total += count_params(model)
    return total


def count_params(module: nn.Module, lora_only: bool = False) -> int:
    """The module's parameters (``lora_only``: those of its LoRA layers)."""
    return sum(p.numel() for n, p in module.named_parameters() if not lora_only or "lora_" in n)


def with_lora(unet: UNet2DConditionModel, rank: int, targets: tuple[str, ...]) -> int:
    """Add a rank-``rank`` LoRA on ``targets`` to the meta ``unet``; returns its parameters."""
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    return count_params(unet, lora_only=True)


def head_params(unet: UNet2DConditionModel, hidden: int) -> int:
    """The parameters of discriminator heads of width ``hidden`` over ``unet``'s blocks."""
    with init_empty_weights():
        heads = TeacherFeatureDiscriminator(unet, hidden, freeze=False).heads
    return count_params(heads)


# ---------------------------------------------------------------------------------------------
# activations: what autograd saves, measured on meta tensors


@dataclass
class SavedBytes:
    """Bytes autograd saves for the backward pass (each tensor once, parameters excluded).

    ``total``: kept until the backward pass; ``recompute``: the largest checkpointed block's own
    activations, rebuilt one block at a time during the backward pass."""

    total: int = 0
    recompute: int = 0
    _seen: set[int] = field(default_factory=set)
    _keep: list[Tensor] = field(default_factory=list)  # so that no id is reused meanwhile

    def add(self, tensor: Tensor) -> Tensor:
        if isinstance(tensor, nn.Parameter) or id(tensor) in self._seen:
            return tensor
        self._seen.add(id(tensor))
        self._keep.append(tensor)
        self.total += tensor.numel() * tensor.element_size()
        return tensor

    def checkpoint(self, block: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A ``torch.utils.checkpoint`` stand-in for diffusers' checkpointed blocks: the
        block's tensor inputs are kept, its own saved tensors only while it is recomputed."""
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, Tensor):
                self.add(arg)
        inner = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(inner.add, _identity):
            out = block(*args, **kwargs)
        self.recompute = max(self.recompute, inner.total + inner.recompute)
        return out

    @property
    def peak(self) -> int:
        return self.total + self.recompute


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class _FusedAttention(torch.autograd.Function):
    """Attention's shapes and what a fused kernel (FlashAttention, memory-efficient SDPA)
    saves for backward: q, k, v, the output and each row's log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    out: Tensor = _FusedAttention.apply(q, k, v)
    return out


@contextlib.contextmanager
def _measuring(module: nn.Module, checkpointing: bool, saved: SavedBytes) -> Iterator[None]:
    """Count ``module``'s saved tensors into ``saved`` (its checkpointed blocks as
    ``SavedBytes.checkpoint`` keeps them), attention as a fused kernel."""
    blocks = [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]
    for block in blocks:
        # diffusers' blocks call this function on themselves when checkpointing is on
        setattr(block, "gradient_checkpointing", checkpointing)  # noqa: B010
        setattr(block, "_gradient_checkpointing_func", saved.checkpoint)  # noqa: B010
    patch = unittest.mock.patch.object(F, "scaled_dot_product_attention", _fused_attention)
    try:
        with patch, torch.autograd.graph.saved_tensors_hooks(saved.add, _identity):
            yield
    finally:
        for block in blocks:
            setattr(block, "gradient_checkpointing", False)  # noqa: B010


def unet_activations(
    unet: UNet2DConditionModel,
    batch: int,
    latent_size: tuple[int, int],
    dtype: torch.dtype,
    checkpointing: bool,
) -> int:
    """Bytes the backward pass of one ``unet`` forward keeps (gradients to its input and LoRA),
    measured on meta tensors: ``batch`` latents of ``latent_size``, activations in ``dtype``."""
    nn.Module.to(unet, dtype)  # nn.Module's: diffusers' own warns about casting
    config = unet.config
    x = torch.empty(batch, config["in_channels"], *latent_size, device="meta", dtype=dtype)
    x.requires_grad_(True)
    text = torch.empty(
        batch, TEXT_TOKENS, config["cross_attention_dim"], device="meta", dtype=dtype
    )
    added = None
    if config["addition_embed_type"] == "text_time":
        pooled = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
        added = {
            "text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    saved = SavedBytes()
    with _measuring(unet, checkpointing, saved):
        unet(x, t, text, added_cond_kwargs=added)
    return saved.peak


def vae_decode_activations(
    vae: AutoencoderKL,
    batch: int,
    latent_size: tuple[int, int],
    dtype: torch.dtype,
    checkpointing: bool,
) -> int:
    """Bytes the backward pass of decoding ``batch`` latents with grad keeps (the feedback
    rewards score decoded images), measured as ``unet_activations`` is."""
    nn.Module.to(vae, dtype)
    z = torch.empty(batch, vae.config["latent_channels"], *latent_size, device="meta", dtype=dtype)
    z.requires_grad_(True)
    saved = SavedBytes()
    with _measuring(vae, checkpointing, saved):
        vae.decode(z)
    return saved.peak


# ---------------------------------------------------------------------------------------------
# the estimate of a stage


@dataclass
class Estimate:
    """A stage's memory per process: one row per item, ``(what, parameters or None, bytes)``."""

    title: str
    rows: list[tuple[str, int | None, int]] = field(default_factory=list)

    def add(self, what: str, params: int | None, nbytes: int) -> None:
        self.rows.append((what, params, nbytes))

    @property
    def total(self) -> int:
        return sum(nbytes for _, _, nbytes in self.rows)

    def table(self) -> str:
        """The estimate as a markdown table, GiB per row and in all."""
        lines = [f"### {self.title}", "", "| | parameters | GiB |", "|---|---:|---:|"]
        for what, params, nbytes in self.rows:
            count = "" if params is None else f"{params / 1e6:,.1f} M"
            lines.append(f"| {what} | {count} | {nbytes / GIB:.2f} |")
        lines.append(f"| **total** | | **{self.total / GIB:.2f}** |")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Setting:
    """What the estimate reads of either config."""

    folder: Path
    batch: int
    resolution: int
    weight_dtype: str  # fp32 | bf16 | fp16
    weight_bytes: int
    activation_dtype: torch.dtype
    optimizer_bytes: int
    checkpointing: bool


def _setting(cfg: DistillConfig | EnhanceConfig, architecture: Architecture | None) -> _Setting:
    # activations in the autocast's half type (bf16 or fp16), else fp32
    precision = compute_precision(cfg.weight_dtype, cfg.mixed_precision)
    return _Setting(
        folder=architecture_folder(cfg.teacher, architecture),
        batch=cfg.batch_size,
        resolution=cfg.resolution,
        weight_dtype=cfg.weight_dtype,
        weight_bytes=torch_dtype(cfg.weight_dtype).itemsize,
        activation_dtype=torch.float32 if precision == "no" else torch_dtype(precision),
        optimizer_bytes=2 if cfg.optimizer == "adamw8bit" else 8,
        checkpointing=cfg.gradient_checkpointing,
    )


def _frozen_and_trained(
    estimate: Estimate,
    setting: _Setting,
    unets: dict[str, int],
    frozen_lora: int,
    trained: dict[str, int],
) -> None:
    """The weights, gradients and optimizer rows: ``unets`` {role: parameters} in the weights'
    dtype, the VAE and text encoders too, ``frozen_lora`` (TSCD's EMA target) and ``trained``
    {what: parameters} in fp32, with their gradients and optimizer state."""
    for role, params in unets.items():
        estimate.add(f"{role} ({setting.weight_dtype})", params, params * setting.weight_bytes)
    vae_params = count_params(meta_vae(setting.folder))
    estimate.add(f"VAE ({setting.weight_dtype})", vae_params, vae_params * setting.weight_bytes)
    text = text_encoder_params(setting.folder)
    estimate.add(f"text encoder(s) ({setting.weight_dtype})", text, text * setting.weight_bytes)
    if frozen_lora:
        estimate.add("EMA target's LoRA (fp32)", frozen_lora, frozen_lora * 4)
    for what, params in trained.items():
        estimate.add(f"{what} (fp32)", params, params * 4)
    total = sum(trained.values())
    estimate.add("gradients (fp32)", total, total * 4)
    optimizer = "adamw8bit" if setting.optimizer_bytes == 2 else "adamw"
    estimate.add(f"optimizer state ({optimizer})", total, total * setting.optimizer_bytes)


def _latent_size(setting: _Setting, vae: AutoencoderKL) -> tuple[int, int]:
    side = setting.resolution // 2 ** (len(vae.config["block_out_channels"]) - 1)
    return side, side


def distill_estimate(
    cfg: DistillConfig, method: Literal["tscd", "lcm"], architecture: Architecture | None = None
) -> Estimate:
    """TSCD's or LCM's memory per process: teacher, student and EMA target, (TSCD) the
    discriminator heads; activations of the student step (the student's graph, and TSCD's
    through the teacher under the heads)."""
    setting = _setting(cfg, architecture)
    unet = meta_unet(setting.folder)
    base = count_params(unet)
    lora = with_lora(unet, cfg.lora_rank, cfg.lora_targets)
    adversarial = method == "tscd" and cfg.adversarial
    trained = {"student LoRA": lora}
    if adversarial:
        trained["discriminator heads"] = head_params(unet, cfg.disc_hidden)
    estimate = Estimate(f"{method} {setting.folder.name} {cfg.resolution}² batch {cfg.batch_size}")
    unets = {"teacher UNet": base, "student UNet": base, "EMA target UNet": base}
    _frozen_and_trained(estimate, setting, unets, lora, trained)
    size = _latent_size(setting, meta_vae(setting.folder))
    one = unet_activations(
        unet, setting.batch, size, setting.activation_dtype, setting.checkpointing
    )
    estimate.add("activations: student forward", None, one)
    if adversarial:
        estimate.add("activations: teacher under the heads", None, one)
    return estimate


def enhance_estimate(
    cfg: EnhanceConfig,
    method: Literal["feedback", "dmd"],
    architecture: Architecture | None = None,
) -> Estimate:
    """Feedback's or DMD's memory per process: teacher, student, (DMD) fake score, GAN heads
    and anchor; activations of the larger phase (the student's update: its UNet calls with
    grad and the VAE decoding its output for the rewards; DMD's fake-score update)."""
    setting = _setting(cfg, architecture)
    unet = meta_unet(setting.folder)
    base = count_params(unet)
    unets = {"teacher UNet": base, "student UNet": base}
    trained = {"student LoRA": with_lora(unet, cfg.lora_rank, cfg.lora_targets)}
    dmd = method == "dmd"
    fake = dmd and cfg.dmd_weight > 0
    gan = fake and cfg.gan_weight > 0
    if fake:
        unets["fake score UNet"] = base
        trained["fake score LoRA"] = with_lora(
            meta_unet(setting.folder), cfg.fake_rank, cfg.lora_targets
        )
    if gan:
        trained["GAN heads"] = head_params(unet, cfg.gan_hidden)
    if dmd and cfg.anchor_loras:
        unets["anchor UNet"] = base
    estimate = Estimate(f"{method} {setting.folder.name} {cfg.resolution}² batch {cfg.batch_size}")
    _frozen_and_trained(estimate, setting, unets, 0, trained)
    vae = meta_vae(setting.folder)
    size = _latent_size(setting, vae)
    args = (setting.batch, size, setting.activation_dtype, setting.checkpointing)
    one = unet_activations(unet, *args)
    rewards = cfg.alignment != "none" or cfg.aesthetic != "none"
    decode = vae_decode_activations(vae, *args) if rewards or cfg.structure_weight > 0 else 0
    calls = cfg.dmd_steps if dmd else 1
    student = calls * one + (one if gan else 0) + (decode if rewards else 0)
    if cfg.structure_weight > 0 and cfg.prompts is None:
        student += one + decode  # the rendered scenes' x̂0, decoded for the segmentation
    fake_phase = one * (3 if gan else 1) if fake else 0  # (+ the heads on fakes and reals)
    if student >= fake_phase:
        estimate.add(f"activations: student update ({calls} UNet call(s) + decode)", None, student)
    else:
        estimate.add("activations: fake-score update", None, fake_phase)
    return estimate
