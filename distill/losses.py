"""Knowledge-distillation losses on completion tokens: forward KL, reverse KL, generalized JSD.

Everything works on *selected positions*: the caller picks the positions whose next token is a
completion label (:func:`completion_positions`), so prompt, padding and the first token of each packed
example never count, and the big ``[positions, vocab]`` tensors exist only for those rows.

Divergences (``p`` = teacher, ``q`` = student, both at temperature ``T``):

* ``forward``  KL(p || q) = sum p (log p - log q): mean-seeking, the classic Hinton KD loss.
* ``reverse``  KL(q || p): mode-seeking (MiniLLM); the student commits to the teacher's main answer.
* ``jsd``      generalized Jensen-Shannon with ``beta`` as in TRL's GKD (arXiv:2306.13649):
  ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``;
  ``beta=0.5`` is the symmetric JSD. (TRL maps ``beta=0``/``1`` to forward/reverse KL; here those are
  the explicit ``forward``/``reverse`` kinds and ``jsd`` needs ``0 < beta < 1``.)

Temperature: logits are divided by ``T`` and the divergence is multiplied by ``T**2``, so its gradient
keeps the same scale as the cross-entropy's when ``T`` changes (Hinton et al. 2015).

Top-k teachers (a cached teacher keeps only its ``k`` largest logits per position, see
``banklm.distill.teacher_cache``). Two ways to compare distributions on that support:

* ``tail="bucket"`` (default): ``k + 1`` bins, the teacher's top-k tokens plus one "everything else"
  bin. The teacher's tail mass is exact because the cache stores the full-vocabulary log-normaliser
  (``lse``) next to the top-k logits; the student's tail mass is ``1 - sum of its probabilities on the
  k tokens``. This is the KL between the two distributions coarse-grained to ``k + 1`` events (a
  lower bound of the full KL, equal to it when the teacher's tail is empty, e.g. ``k`` = vocabulary),
  and it still pushes the student's excess mass out of the tail.
* ``tail="renorm"``: both distributions renormalised over the teacher's k tokens (no tail term); the
  student's mass outside the k tokens then gets no gradient. Cheaper to reason about, needs no ``lse``.

:func:`kd_loss` combines the divergence with the ground-truth cross-entropy:
``alpha * T**2 * divergence + (1 - alpha) * CE``, averaged over completion tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward", "reverse", "jsd")
TAILS = ("bucket", "renorm")
TAIL_FLOOR = 1e-12


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, len - 1]`` mask: position ``t`` predicts a completion label at ``t + 1``.

    ``logits[:, :-1][mask]`` and ``labels[:, 1:][mask]`` then line up, row-major, with the entries a
    teacher cache stores for the same row.
    """
    return labels[:, 1:] != -100


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str = "forward",
               beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two log-probability tensors ``[n, bins]`` -> ``[n]``.

    Zero-probability bins are handled exactly (``0 * log 0 = 0``), so a teacher with ``-inf`` log-probs
    on some tokens is fine for ``forward``; ``reverse`` and ``jsd`` then still stay finite.
    """
    if kind == "forward":
        return _kl(teacher_logp, student_logp)
    if kind == "reverse":
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1 (use 'forward' or 'reverse' for the limits), got {beta}")
        mix = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta)]),
                              dim=0)
        return beta * _kl(teacher_logp, mix) + (1.0 - beta) * _kl(student_logp, mix)
    raise ValueError(f"unknown divergence {kind!r} (expected one of {', '.join(DIVERGENCES)})")


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with ``p log p = 0`` where ``p = 0``."""
    p = p_logp.exp()
    diff = torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p_logp))
    return (p * diff).sum(-1)


# --------------------------------------------------------------------------- full logits


def full_logit_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward",
                          beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """``T**2 * D(teacher_T, student_T)`` per position for full ``[n, vocab]`` logits."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same tokenizer/vocabulary size needed)")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature ** 2 * divergence(s, t, kind, beta)


# --------------------------------------------------------------------------- top-k teacher


def topk_teacher(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """The top-k form a cache stores: ``(values [n,k] logits, indices [n,k], lse [n])``.

    ``lse`` is the log-normaliser of the *tempered* full distribution: ``logsumexp(logits / T)``.
    """
    logits = teacher_logits.float()
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
    lse = torch.logsumexp(logits / temperature, dim=-1)
    return values, indices, lse


def topk_divergence(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                    teacher_lse: torch.Tensor | None = None, *, kind: str = "forward", beta: float = 0.5,
                    temperature: float = 1.0, tail: str = "bucket") -> torch.Tensor:
    """``T**2 * D`` per position against a top-k teacher (see the module docstring for ``tail``).

    ``student_logits`` ``[n, vocab]``; ``teacher_values`` (logits) / ``teacher_indices`` ``[n, k]``;
    ``teacher_lse`` ``[n]`` = ``logsumexp(teacher_logits / T)`` over the full vocabulary (bucket only).
    """
    T = temperature
    s_full = F.log_softmax(student_logits.float() / T, dim=-1)
    s_k = s_full.gather(-1, teacher_indices.long())
    t_scaled = teacher_values.float() / T
    if tail == "renorm":
        s = s_k - torch.logsumexp(s_k, dim=-1, keepdim=True)
        t = F.log_softmax(t_scaled, dim=-1)
    elif tail == "bucket":
        if teacher_lse is None:
            raise ValueError("tail='bucket' needs the teacher's full log-normaliser (lse)")
        t_k = t_scaled - teacher_lse.float().unsqueeze(-1)
        s = torch.cat([s_k, _log_rest(s_k)], dim=-1)
        t = torch.cat([t_k, _log_rest(t_k)], dim=-1)
    else:
        raise ValueError(f"unknown tail {tail!r} (expected one of {', '.join(TAILS)})")
    return T ** 2 * divergence(s, t, kind, beta)


def _log_rest(logp_k: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(logp_k)))`` as a ``[n, 1]`` column, floored at ``log(1e-12)``.

    The floor keeps reverse KL and JSD finite when the k tokens hold (numerically) all the mass of one
    side but not of the other; it changes the result by at most ~1e-12 per position.
    """
    covered = torch.logsumexp(logp_k, dim=-1, keepdim=True).clamp(max=0.0)
    rest = -torch.expm1(covered)  # 1 - exp(covered), accurate near 0
    return rest.clamp_min(TAIL_FLOOR).log()


# --------------------------------------------------------------------------- combined


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
            teacher_topk: tuple | None = None, kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
            alpha: float = 0.5, tail: str = "bucket", num_items: int | torch.Tensor | None = None) -> dict:
    """Distillation loss of one batch on completion tokens.

    ``student_logits`` ``[b, l, vocab]`` and ``labels`` ``[b, l]`` (``-100`` = not trained) as a causal LM
    sees them (the shift happens here). The teacher is either ``teacher_logits`` ``[b, l, vocab]`` (a live
    teacher on the same batch) or ``teacher_topk`` = ``(values, indices, lse)`` already restricted to the
    completion positions, row-major (what the teacher cache returns for the batch).

    Returns ``{"loss", "kd", "ce", "tokens"}``: ``loss = alpha * kd + (1 - alpha) * ce`` where ``kd`` is the
    (``T**2``-scaled) divergence and ``ce`` the cross-entropy, both summed over completion tokens and
    divided by ``num_items`` (the trainer's token count across gradient-accumulation steps) or by the
    batch's own count.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mask = completion_positions(labels)
    s_logits = student_logits[:, :-1][mask].float()
    targets = labels[:, 1:][mask]
    n = int(mask.sum())
    denom = num_items if num_items is not None else max(n, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(s_logits.device)
    ce = F.cross_entropy(s_logits, targets, reduction="sum") / denom if n else s_logits.sum() * 0.0
    if alpha == 0.0:
        kd = ce.detach() * 0.0
    elif teacher_logits is not None:
        t_logits = teacher_logits[:, :-1][mask]
        kd = full_logit_divergence(s_logits, t_logits, kind=kind, beta=beta, temperature=temperature).sum() / denom
    elif teacher_topk is not None:
        values, indices, lse = teacher_topk
        if values.shape[0] != n:
            raise ValueError(f"teacher top-k has {values.shape[0]} positions but the batch has {n} completion "
                             "positions (stale teacher cache?)")
        kd = topk_divergence(s_logits, values, indices, lse, kind=kind, beta=beta, temperature=temperature,
                             tail=tail).sum() / denom
    else:
        raise ValueError("kd_loss needs teacher_logits or teacher_topk (or alpha=0)")
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce, "tokens": n}
