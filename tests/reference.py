"""Slow, obviously-correct loop implementations written from the method page, for the tests."""

from __future__ import annotations

import math

import torch


def nce_direction(anchor, memory, sample_indices, num_positives, temperature, log_z, bank_size):
    """method §4 with x = exp(u)/Z and h = x/(x+c), one anchor and one column at a time."""
    batch, width = sample_indices.shape
    num_negatives = width - num_positives
    c = num_negatives / bank_size
    z = math.exp(log_z)
    total = 0.0
    for i in range(batch):
        pos = 0.0
        neg = 0.0
        for j in range(width):
            row = memory[int(sample_indices[i, j])]
            dot = sum(float(anchor[i, k]) * float(row[k]) for k in range(anchor.shape[1]))
            u = dot / temperature
            x = math.exp(u) / z
            h = x / (x + c)
            if j < num_positives:
                pos += math.log(h)
            else:
                neg += math.log(1.0 - h)
        total += -(pos / num_positives + neg)
    return total / batch


def first_batch_log_z(anchor, memory, sample_indices, temperature, bank_size):
    """log of N * mean(exp(u)) over every score of the batch."""
    values = []
    for i in range(sample_indices.shape[0]):
        for j in range(sample_indices.shape[1]):
            row = memory[int(sample_indices[i, j])]
            values.append(math.exp(float(anchor[i] @ row) / temperature))
    return math.log(bank_size * sum(values) / len(values))


def centroids(memory, labels, num_classes, relu=True):
    out = torch.zeros(num_classes, memory.shape[1], dtype=memory.dtype)
    for c in range(num_classes):
        rows = [memory[j] for j in range(memory.shape[0]) if int(labels[j]) == c]
        if not rows:
            continue
        stacked = torch.stack(rows)
        if relu:
            stacked = stacked.clamp_min(0)
        mean = stacked.mean(0)
        out[c] = mean / max(float(mean.norm()), 1e-12)
    return out


def kl_rows(p_logits, q_logits):
    """(1/B) sum_i KL(softmax(p_i) || softmax(q_i)) with plain exp/log."""
    total = 0.0
    for i in range(p_logits.shape[0]):
        p = [math.exp(float(v)) for v in p_logits[i]]
        q = [math.exp(float(v)) for v in q_logits[i]]
        sp, sq = sum(p), sum(q)
        total += sum((a / sp) * math.log((a / sp) / (b / sq)) for a, b in zip(p, q))
    return total / p_logits.shape[0]


def crp(g_s, g_t, c_s, c_t, temperature):
    return kl_rows(g_t @ c_t.T / temperature, g_s @ c_s.T / temperature)


def bank_update(memory, indices, features, momentum):
    out = memory.clone()
    for i, idx in enumerate(indices.tolist()):
        row = momentum * memory[idx] + (1 - momentum) * features[i]
        out[idx] = row / row.norm()
    return out


def ema_step(teacher_params, student_params, step, decay):
    alpha = min(1 - 1 / (step + 1), decay)
    return [alpha * t + (1 - alpha) * s for t, s in zip(teacher_params, student_params)]
