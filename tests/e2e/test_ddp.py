"""Fine-tuning under torch.distributed: 2 processes on 127.0.0.1 with gloo, each on its own shard of the data, must
end with identical codebooks (bit for bit) that moved, whether ``finetune`` wraps the model in DDP itself or is
given an already wrapped one; indices and dither stay as they were.

The processes meet through a file rendezvous in the test's own temporary directory (as examples/ddp_finetune.py
does): no "free" port to pick, so no race with another process taking it between the pick and the bind."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2

#: rank 0's trained codebooks and biases (sha256 of their bytes), as main's ``passes/finetune.py`` at 79df1f8 left
#: them before the training loop moved to ``passes/train.py``: the loop must still train bit for bit the same under
#: DDP. Exact float results depend on the CPU's kernels (``torch.backends.cpu.get_cpu_capability()``), so one digest
#: per CPU it was generated on: ``None`` for the first machine (capability not recorded), ``"AVX2"`` for an AMD EPYC
#: (stop 18, where the code under test matched 79df1f8's). On a capability with no digest of its own, a digest
#: matching none is skipped with a note rather than failed.
GOLDEN_BY_CPU = {None: "66a4d25be42bdceee6e692596924c482", "AVX2": "1d93ace44cfe7dcb741fdbb8e474800f"}


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import udnc_fx
    from udnc_fx.demo import DigitsCNN
    from udnc_fx.passes.finetune import finetune
    from udnc_fx.passes.materialize import served_params

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # the same untrained float model on both ranks
        model = DigitsCNN().eval()
        # Each rank its own shard: different inputs and labels (synthetic 8x8 digits-shaped data, no data set load).
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.rand(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g)
        batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 32 * 4, 32)]
        results = {}
        for how in ("auto", "prewrapped"):
            gm = udnc_fx.compress(model, udnc_fx.CompressConfig(target_bits=2.0, seed=3))
            dlps = served_params(gm)
            start = {
                "codebooks": [d.codebook.detach().clone() for d in dlps],
                "indices": [d.indices.clone() for d in dlps],
                "dither": [d.dither().clone() for d in dlps],
            }
            target = DDP(gm) if how == "prewrapped" else gm
            result = finetune(target, batches, F.cross_entropy, epochs=2, lr=1e-2, optimizer="sgd",
                              train_bias=True, train_norm=True, progress=False)
            results[how] = {
                "start": start,
                "codebooks": [d.codebook.detach().clone() for d in dlps],
                "indices": [d.indices.clone() for d in dlps],
                "dither": [d.dither().clone() for d in dlps],
                "biases": [p.detach().clone() for n, p in gm.named_parameters() if n.endswith("bias")],
                "distributed": result.distributed,
                "steps": result.steps,
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # both ranks reach teardown together (see examples/ddp_finetune.py)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_end_with_identical_codebooks(tmp_path):
    # A fresh file per run: a file left by an earlier group would be read as that group's state.
    init_method = (tmp_path / "rendezvous").as_uri()
    mp.spawn(_worker, args=(init_method, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    unpinned = []
    for how in ("auto", "prewrapped"):
        r0, r1 = ranks[0][how], ranks[1][how]
        assert r0["distributed"] == r1["distributed"] == WORLD
        assert r0["steps"] == r1["steps"] == 8
        digest = _digest(r0["codebooks"] + r0["biases"])
        capability = torch.backends.cpu.get_cpu_capability()
        if digest not in GOLDEN_BY_CPU.values() and capability in GOLDEN_BY_CPU:
            assert digest == GOLDEN_BY_CPU[capability], how
        elif digest not in GOLDEN_BY_CPU.values():
            unpinned.append(how)
        for a, b in zip(r0["codebooks"], r1["codebooks"]):
            assert torch.equal(a, b), f"{how}: ranks disagree on a codebook"
        for a, b in zip(r0["biases"], r1["biases"]):
            assert torch.equal(a, b), f"{how}: ranks disagree on a bias"
        assert any(not torch.equal(a, s) for a, s in zip(r0["codebooks"], r0["start"]["codebooks"])), how
        for r in (r0, r1):
            for a, s in zip(r["indices"], r["start"]["indices"]):
                assert torch.equal(a, s)
            for a, s in zip(r["dither"], r["start"]["dither"]):
                assert torch.equal(a, s)
    if unpinned:
        pytest.skip(f"no golden digest for CPU capability {torch.backends.cpu.get_cpu_capability()!r} ({unpinned}); "
                    "regenerate it from 79df1f8's code")
