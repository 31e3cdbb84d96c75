"""The feedback and DMD stages on prompts with the real-model rewards: ImageReward (converted),
a CLIP preference model and the Mask2Former structure loss, on tiny random pipelines; and the
teacher's sample the structure loss compares with, against diffusers' own sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from reward_models import tiny_clip, tiny_imagereward, tiny_mask2former
from test_training_enhance import log_lines, tiny_config

from training.enhance import run
from training.instance_structure import is_instance_segmenter, teacher_sample


@pytest.fixture(scope="module")
def reward_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-rewards")
    return {
        "imagereward": tiny_imagereward(root / "imagereward"),
        "pickscore": tiny_clip(root / "pickscore") and root / "pickscore",
        "mask2former": tiny_mask2former(root / "mask2former"),
    }


@pytest.mark.parametrize(("family", "method"), [("sd15", "feedback"), ("sdxl", "dmd")])
def test_stage_runs_with_real_rewards_and_structure_on_prompts(
    family: str,
    method: Any,
    tiny_models: Any,
    reward_weights: dict[str, Path],
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a street\n")
    assert is_instance_segmenter(reward_weights["mask2former"])
    cfg = tiny_config(
        getattr(tiny_models, family),
        tmp_path / "run",
        prompts=str(prompts),
        alignment="imagereward",
        alignment_path=str(reward_weights["imagereward"]),
        alignment_margin=10.0,  # above any score: the term always pulls
        aesthetic="pickscore",
        aesthetic_path=str(reward_weights["pickscore"]),
        aesthetic_margin=100.0,
        segmentation_path=str(reward_weights["mask2former"]),
        structure_threshold=0.0,  # a random Mask2Former is unsure: every query is an instance
        structure_teacher_steps=2,
    )
    assert run(cfg, method) is not None
    lines = log_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [0, 1]
    for line in lines:
        names = {key.rsplit("/", 1)[-1] for key in line}
        assert {"alignment_reward", "aesthetic_reward", "structure"} <= names, sorted(line)
        instances = next(v for k, v in line.items() if k.endswith("structure_instances"))
        assert instances == 16  # 2 images x 8 queries


def test_teacher_sample_is_diffusers_ddim_trailing_with_cfg(tiny_models: Any) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd15, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # the scheduler's x̂0 at its last step (its sample itself stops at t = 0, not at x0)
    predictions = []
    step = pipe.scheduler.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        output = step(*args, **kwargs)
        # (prev_sample, pred_original_sample) when the pipeline asks for no dict
        predictions.append(output[1] if isinstance(output, tuple) else output.pred_original_sample)
        return output

    pipe.scheduler.step = recording_step  # type: ignore[method-assign]
    with torch.no_grad():
        pipe(
            prompts,
            num_inference_steps=4,  # 999, 749, 499, 249: evenly spaced, as DDIM steps
            guidance_scale=4.0,
            latents=noise,
            output_type="latent",
            height=64,
            width=64,
        )
        expected = predictions[-1]
        text = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)[0]
        empty = pipe.encode_prompt([""], "cpu", 1, do_classifier_free_guidance=False)[0]
    alphas = pipe.scheduler.alphas_cumprod
    x0 = teacher_sample(pipe.unet, noise, text, empty, alphas, steps=4, guidance=4.0)
    torch.testing.assert_close(x0, expected, rtol=1e-4, atol=1e-4)
