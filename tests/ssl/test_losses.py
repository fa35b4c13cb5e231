"""Single-process tests of the SSL losses against independently written formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinov3geo.ssl.losses import DINOLoss, GramLoss, KoLeoLoss, KoLeoLossDistributed, iBOTPatchLoss

# ----------------------------------------------------------------------------------------------------------
# Independent reference implementations (float64 numpy / python loops)
# ----------------------------------------------------------------------------------------------------------


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _sinkhorn_np(logits: np.ndarray, temp: float, n_iter: int) -> np.ndarray:
    """Sinkhorn-Knopp written from the paper: Q (K x B), Q/sum, then alternate row->1/K, col->1/B; Q*B."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


# ----------------------------------------------------------------------------------------------------------
# DINO loss
# ----------------------------------------------------------------------------------------------------------


def test_dino_loss_one_hot_teacher_is_student_nll() -> None:
    s, t, b, k = 2, 2, 3, 5
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(s, b, k, generator=gen)
    idx = torch.randint(0, k, (t, b), generator=gen)
    teacher = torch.nn.functional.one_hot(idx, k).float()

    loss = DINOLoss(k)(student, teacher)

    stu = student.double().numpy() / 0.1
    total = 0.0
    for si in range(s):
        for ti in range(t):
            for bi in range(b):
                row = stu[si, bi]
                lse = math.log(sum(math.exp(v - row.max()) for v in row)) + row.max()
                total += lse - row[idx[ti, bi]]
    assert loss.item() == pytest.approx(total / (s * t * b), rel=1e-5)


def test_dino_loss_uniform_student_gives_log_k() -> None:
    k = 4
    teacher = torch.softmax(torch.randn(2, 3, k), dim=-1)
    loss = DINOLoss(k)(torch.zeros(5, 3, k), teacher)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)


@pytest.mark.parametrize(("n_student", "n_teacher"), [(2, 2), (3, 2), (2, 3)])
def test_dino_loss_ignore_diagonal_matches_pair_loop(n_student: int, n_teacher: int) -> None:
    b, k = 4, 7
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(n_student, b, k, generator=gen)
    teacher = torch.softmax(torch.randn(n_teacher, b, k, generator=gen) / 0.05, dim=-1)

    got = DINOLoss(k, student_temp=0.2)(student, teacher, ignore_diagonal=True)

    logp = _log_softmax_np(student.double().numpy() / 0.2)
    tp = teacher.double().numpy()
    total, count = 0.0, 0
    for bi in range(b):
        for si in range(n_student):
            for ti in range(n_teacher):
                if si == ti:
                    continue
                total += -(tp[ti, bi] * logp[si, bi]).sum()
                count += 1
    assert count == b * (n_student * n_teacher - min(n_student, n_teacher))
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    # Without ignore_diagonal every pair counts.
    all_pairs = -np.einsum("sbk,tbk->", logp, tp) / (b * n_student * n_teacher)
    assert DINOLoss(k, student_temp=0.2)(student, teacher).item() == pytest.approx(all_pairs, rel=1e-5)


def test_dino_loss_gradient_only_through_student() -> None:
    student = torch.randn(2, 3, 6, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 3, 6), dim=-1)
    DINOLoss(6)(student, teacher, ignore_diagonal=True).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    # Only cross pairs count: student crop 0 is trained towards teacher crop 1 only.
    g = student.grad * 0.1 * (2 * 3)  # d/dz of CE(z/0.1) summed = (softmax - target)/0.1, mean over 2*3
    expected = torch.softmax(student.detach() / 0.1, dim=-1) - teacher.flip(0)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_constant_logits_give_uniform_assignment() -> None:
    q = DINOLoss(5).sinkhorn_knopp_teacher(torch.full((4, 5), 3.0), teacher_temp=0.07)
    torch.testing.assert_close(q, torch.full((4, 5), 1 / 5))


def test_sinkhorn_marginals_and_reference() -> None:
    b, k = 6, 4
    logits = torch.randn(b, k, generator=torch.Generator().manual_seed(3))
    loss = DINOLoss(k)

    q = loss.sinkhorn_knopp_teacher(logits, teacher_temp=0.5)
    assert q.shape == (b, k) and q.dtype == torch.float32
    # Each sample's assignment is a distribution (columns of Q sum to 1 after Q *= B).
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b))
    np.testing.assert_allclose(q.numpy(), _sinkhorn_np(logits.numpy(), 0.5, 3), rtol=1e-5, atol=1e-7)

    # With enough iterations each prototype receives B / K of the mass.
    q_conv = loss.sinkhorn_knopp_teacher(logits, teacher_temp=0.5, n_iterations=200)
    torch.testing.assert_close(q_conv.sum(dim=0), torch.full((k,), b / k), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_conv.sum(dim=1), torch.ones(b))


def test_sinkhorn_computes_in_float32_for_half_input() -> None:
    logits = torch.randn(8, 3)
    q16 = DINOLoss(3).sinkhorn_knopp_teacher(logits.half(), teacher_temp=0.1)
    assert q16.dtype == torch.float32
    np.testing.assert_allclose(
        q16.numpy(), _sinkhorn_np(logits.half().float().numpy(), 0.1, 3), rtol=1e-4, atol=1e-6
    )


def test_dino_softmax_centering_path() -> None:
    k = 3
    loss = DINOLoss(k, center_momentum=0.9)
    assert torch.isnan(loss.center).all()
    loss.init_weights()
    t = torch.randn(5, k)
    torch.testing.assert_close(loss.softmax_center_teacher(t, 0.04), torch.softmax(t / 0.04, dim=-1))
    loss.update_center(t)
    out = loss.softmax_center_teacher(t, 0.04)  # applies the pending update first
    torch.testing.assert_close(loss.center, 0.1 * t.mean(dim=0, keepdim=True))
    torch.testing.assert_close(out, torch.softmax((t - 0.1 * t.mean(0)) / 0.04, dim=-1))


# ----------------------------------------------------------------------------------------------------------
# iBOT loss
# ----------------------------------------------------------------------------------------------------------


def _masks() -> torch.Tensor:
    # 4 images x 6 patches with 2, 0, 3, 1 masked patches.
    return torch.tensor(
        [
            [1, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )


def test_ibot_uniform_student_counts_unmasked_images_in_denominator() -> None:
    masks = _masks()
    m, k = int(masks.sum()), 2
    teacher = torch.softmax(torch.randn(m, k), dim=-1)
    loss = iBOTPatchLoss(k).forward_masked(torch.zeros(m, k), teacher, student_masks_flat=masks)
    # Each masked image contributes mean CE = log 2; 3 of the 4 images are masked.
    assert loss.item() == pytest.approx(3 / 4 * math.log(2), rel=1e-6)


def test_ibot_forward_masked_weighting_matches_loop() -> None:
    masks = _masks()
    m, k = int(masks.sum()), 5
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(m, k, generator=gen)
    teacher = torch.softmax(torch.randn(m, k, generator=gen), dim=-1)
    loss_fn = iBOTPatchLoss(k)

    logp = _log_softmax_np(student.double().numpy() / 0.1)
    tp = teacher.double().numpy()
    expected, row = 0.0, 0
    for image in masks:
        n_img = int(image.sum())
        for _ in range(n_img):
            expected += -(tp[row] * logp[row]).sum() / n_img
            row += 1
    expected /= masks.shape[0]

    got = loss_fn.forward_masked(student, teacher, student_masks_flat=masks)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # Explicit weights (as produced by the collate) and padded rows cut by n_masked_patches give the same.
    weights = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0])
    padded_s = torch.cat([student, torch.randn(3, k)])
    padded_t = torch.cat([teacher, torch.softmax(torch.randn(3, k), -1)])
    got2 = loss_fn.forward_masked(padded_s, padded_t, masks, n_masked_patches=m, masks_weight=weights)
    assert got2.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_dense_forward_matches_loop() -> None:
    masks = _masks()
    b, n = masks.shape
    k = 3
    student = torch.randn(b, n, k)
    teacher = torch.softmax(torch.randn(b, n, k), dim=-1)
    got = iBOTPatchLoss(k).forward(student, teacher, masks)
    logp = _log_softmax_np(student.double().numpy() / 0.1)
    tp = teacher.double().numpy()
    per_image = []
    for i in range(b):
        sel = masks[i].numpy()
        ce = -(tp[i][sel] * logp[i][sel]).sum()
        per_image.append(ce / max(sel.sum(), 1))
    assert got.item() == pytest.approx(float(np.mean(per_image)), rel=1e-5)


def test_ibot_sinkhorn_matches_reference_and_does_not_mutate_count() -> None:
    logits = torch.randn(7, 4)
    n = torch.tensor([7])
    q = iBOTPatchLoss(4).sinkhorn_knopp_teacher(logits, teacher_temp=0.3, n_masked_patches_tensor=n)
    assert n.item() == 7
    np.testing.assert_allclose(q.numpy(), _sinkhorn_np(logits.numpy(), 0.3, 3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q, DINOLoss(4).sinkhorn_knopp_teacher(logits, teacher_temp=0.3))


# ----------------------------------------------------------------------------------------------------------
# KoLeo
# ----------------------------------------------------------------------------------------------------------


def _three_points() -> torch.Tensor:
    # Unit vectors at 0, 90 and 30 degrees (scaled, to exercise the normalisation).
    a = math.radians(30)
    return torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5 * math.cos(a), 0.5 * math.sin(a)]])


def test_koleo_three_points() -> None:
    x = _three_points()
    loss_fn = KoLeoLoss()
    # Nearest neighbours: 0 -> 2 (30 deg), 1 -> 2 (60 deg), 2 -> 0 (30 deg).
    xn = torch.nn.functional.normalize(x, dim=-1)
    assert loss_fn.pairwise_NNs_inner(xn).tolist() == [2, 2, 0]
    chord30, chord60 = 2 * math.sin(math.radians(15)), 1.0
    expected = -(2 * math.log(chord30) + math.log(chord60)) / 3
    assert loss_fn(x).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_distributed_single_process_equals_koleo_and_topk() -> None:
    x = _three_points()
    assert KoLeoLossDistributed()(x).item() == pytest.approx(KoLeoLoss()(x).item(), rel=1e-7)
    # topk=2 over 3 points: each point uses both others.
    chord30, chord60, chord90 = 2 * math.sin(math.radians(15)), 1.0, math.sqrt(2)
    expected = -(2 * math.log(chord30) + 2 * math.log(chord60) + 2 * math.log(chord90)) / 6
    assert KoLeoLossDistributed(topk=2)(x).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_gradient_and_group_size_checks() -> None:
    x = torch.randn(6, 8, requires_grad=True)
    KoLeoLoss()(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of local batch size"):
        KoLeoLossDistributed(loss_group_size=4)(torch.randn(6, 8))
    with pytest.raises(ValueError, match="divisible by loss group size"):
        KoLeoLossDistributed(loss_group_size=12)(torch.randn(6, 8))


# ----------------------------------------------------------------------------------------------------------
# Gram
# ----------------------------------------------------------------------------------------------------------


def test_gram_zero_for_identical_and_rescaled_features() -> None:
    f = torch.randn(2, 5, 8)
    assert GramLoss()(f, f).item() == pytest.approx(0.0, abs=1e-10)
    assert GramLoss()(3.0 * f, f).item() == pytest.approx(0.0, abs=1e-10)
    assert GramLoss(apply_norm=False)(3.0 * f, f).item() > 0


def test_gram_constructed_pair_and_img_level() -> None:
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # Gram = I
    teacher = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # Gram = all ones after normalisation
    assert GramLoss()(student, teacher).item() == pytest.approx(0.5)

    # Two images of one patch: per-image Grams are [[1]] (loss 0); over the batch they are I vs ones.
    s2 = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    t2 = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    assert GramLoss()(s2, t2, img_level=True).item() == pytest.approx(0.0)
    assert GramLoss()(s2, t2, img_level=False).item() == pytest.approx(0.5)
    assert GramLoss()(s2.flatten(0, 1), t2.flatten(0, 1), img_level=False).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        GramLoss()(s2.flatten(0, 1), t2.flatten(0, 1), img_level=True)


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        # student sim -0.6, teacher sim +0.6
        ([[1.0, 0.0], [-0.6, 0.8]], [[1.0, 0.0], [0.6, 0.8]], {"none": 0.72, "neg": 0.18, "teacher": 0.72}),
        # student sim +0.6, teacher sim -1
        ([[1.0, 0.0], [0.6, 0.8]], [[1.0, 0.0], [-1.0, 0.0]], {"none": 1.28, "neg": 0.18, "teacher": 0.18}),
        # both negative: -0.6 vs -1
        ([[1.0, 0.0], [-0.6, 0.8]], [[1.0, 0.0], [-1.0, 0.0]], {"none": 0.08, "neg": 0.0, "teacher": 0.0}),
    ],
)
def test_gram_remove_neg_options(student: list, teacher: list, expected: dict[str, float]) -> None:
    s = torch.tensor([student])
    t = torch.tensor([teacher])
    assert GramLoss()(s, t).item() == pytest.approx(expected["none"])
    assert GramLoss(remove_neg=True)(s, t).item() == pytest.approx(expected["neg"], abs=1e-7)
    assert GramLoss(remove_only_teacher_neg=True)(s, t).item() == pytest.approx(expected["teacher"], abs=1e-7)


def test_gram_options_exclusive_float32_and_grad() -> None:
    with pytest.raises(ValueError):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    s = torch.randn(2, 4, 6, dtype=torch.float16).requires_grad_(True)
    t = torch.randn(2, 4, 6, dtype=torch.float16)
    out = GramLoss(remove_only_teacher_neg=True)(s, t)
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad.float()).all()
