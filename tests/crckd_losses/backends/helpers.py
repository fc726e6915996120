"""Shared by the backends' tests: a backend's CCD pair called as
:func:`crckd_losses.functional.class_guided_contrastive_loss` is."""

import torch

from crckd_losses import backends
from crckd_losses import functional as CF


def ccd_pair(backend, student_emb, teacher_emb, student_memory, teacher_memory,
             sample_indices, num_positives, temperature=0.07, student_log_normalizer=None,
             teacher_log_normalizer=None, reduction="mean"):
    """``(L_S, L_T)`` on ``backend``; a ``None`` normaliser is estimated from the batch's
    scores, as the functional form does."""
    given = (student_log_normalizer, teacher_log_normalizer)
    bank_size = student_memory.shape[0]

    def log_normalizer(raw, scale):
        return torch.stack([
            CF.estimate_log_normalizer(raw[k] * scale, bank_size) if given[k] is None
            else torch.as_tensor(given[k], dtype=torch.float64) for k in range(2)])

    both = backends.ccd_pair(backend, student_emb, teacher_emb, student_memory, teacher_memory,
                             sample_indices.long(), num_positives, temperature, log_normalizer,
                             reduction)
    return both[0], both[1]
