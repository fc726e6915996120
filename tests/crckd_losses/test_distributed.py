"""Two CPU processes on gloo give the same banks, Z, losses and gradients as one process."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crckd_losses import CRCKDLoss, EMATeacher, MomentumMemoryBank
from crckd_losses.distributed import all_gather_varlen

N, CLASSES, BATCH, STEPS = 64, 4, 8, 3

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="torch.distributed with gloo needed"
)


def build():
    torch.manual_seed(0)
    labels = torch.arange(N) % CLASSES
    crckd = CRCKDLoss(labels, 6, 6, embed_dim=5, num_positives=3, num_negatives=12).double()
    g = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(STEPS):
        idx = torch.randperm(N, generator=g)[:BATCH]
        # One sample on both ranks: the highest rank's copy (the last after the gather, as in
        # one process on the whole batch) writes its row, once.
        idx[BATCH // 2] = idx[0]
        f_s = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
        f_t = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
        sample = crckd.student_bank.sample(idx, 3, 12, generator=g)
        steps.append((f_s, f_t, idx, sample))
    return crckd, steps


def run(rank, world):
    crckd, steps = build()
    opt = torch.optim.SGD(crckd.parameters(), lr=0.5)
    losses = []
    for f_s, f_t, idx, sample in steps:
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        out = crckd(f_s[part], f_t[part], idx[part], sample_indices=sample[part])
        out.loss.backward()
        if world > 1:
            for p in crckd.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            total = out.loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total / world)
        else:
            losses.append(out.loss.detach())
        opt.step()
    return {"losses": torch.stack(losses), **crckd.state_dict()}


def worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = run(rank, world)
        result["varlen"] = all_gather_varlen(torch.arange(rank + 1).double())
        torch.manual_seed(100 + rank)  # each rank draws different initial rows
        bank = MomentumMemoryBank(torch.arange(10) % 2, dim=3)
        bank.update(torch.tensor([rank]), torch.ones(1, 3))
        result["unsynced_bank"] = bank.memory
        torch.manual_seed(0)
        student = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        teacher = EMATeacher(student)
        with torch.no_grad():
            student.module.weight.add_(1.0)
        teacher.update(student)
        result["ema_weight"] = (teacher.module.weight - student.module.weight).detach()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    single = run(0, 1)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("student_bank.memory", "teacher_bank.memory", "ccd.log_normalizer"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    ranks[1].pop("ema_weight")
    # banks drawn differently per rank start from rank 0's rows at their first update
    assert torch.equal(ranks[0].pop("unsynced_bank"), ranks[1].pop("unsynced_bank"))
    for key, value in single.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert ranks[0]["varlen"].tolist() == [0.0, 0.0, 1.0]
    # EMATeacher reads through the DDP wrapper: its first update copies the student.
    assert float(ranks[0].pop("ema_weight").abs().max()) == 0.0
