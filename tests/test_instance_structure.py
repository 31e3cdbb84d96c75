"""The real-model structure loss on a tiny random Mask2Former saved as a local folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reward_models import tiny_mask2former

from training.instance_structure import (
    bernoulli_kl,
    instance_structure_loss,
    load_instance_segmenter,
    teacher_instances,
)


@pytest.fixture(scope="module")
def segmenter_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mask2former(tmp_path_factory.mktemp("mask2former"))


def test_loss_is_zero_for_identical_images_and_positive_otherwise(segmenter_folder: Path) -> None:
    segmenter = load_instance_segmenter(segmenter_folder)
    teacher = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    # a random Mask2Former is unsure of everything: take every query as an instance
    same = instance_structure_loss(teacher.clone(), teacher, segmenter, score_threshold=0.0)
    assert same["instances"].item() == 16  # 2 images x 8 queries
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-5)
    student = (teacher + 0.3 * torch.randn(teacher.shape, generator=torch.Generator())).clamp(0, 1)
    student.requires_grad_(True)
    other = instance_structure_loss(student, teacher, segmenter, score_threshold=0.0)
    assert torch.isfinite(other["loss"])
    assert other["loss"].item() > max(1e-5, 100 * abs(same["loss"].item()))
    other["loss"].backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in segmenter.parameters())


def test_no_teacher_instance_gives_zero_with_the_graph(segmenter_folder: Path) -> None:
    segmenter = load_instance_segmenter(segmenter_folder)
    student = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = instance_structure_loss(student, torch.rand(1, 3, 64, 64), segmenter, score_threshold=1.1)
    assert out["instances"].item() == 0 and out["loss"].item() == 0.0
    out["loss"].backward()  # keeps the graph: a batch without instances does not break a step
    assert student.grad is not None


def test_teacher_instances_keep_the_confident_queries_in_order() -> None:
    # 3 queries, 2 classes + no-object; query 1 is a sure class-0, query 2 a likely class-1
    logits = torch.tensor([[[-9.0, -9.0, 9.0], [9.0, -9.0, -9.0], [-9.0, 1.0, 0.0]]])
    masks = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 5.0, -5.0)], dim=1)
    kept = teacher_instances(logits, masks, score_threshold=0.6, max_instances=4)[0]
    torch.testing.assert_close(kept, torch.stack([masks[0, 1], masks[0, 2]]).sigmoid())
    assert len(teacher_instances(logits, masks, 0.6, max_instances=1)[0]) == 1


def test_bernoulli_kl_is_zero_only_at_the_target() -> None:
    targets = torch.tensor([0.1, 0.5, 0.9])
    assert bernoulli_kl(targets, torch.logit(targets)).abs().max() < 1e-6
    assert (bernoulli_kl(targets, torch.logit(targets) + 0.5) > 0).all()
