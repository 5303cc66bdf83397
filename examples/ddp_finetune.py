"""Distributed fine-tuning of a compressed model's codewords with DDP (gloo on CPU, NCCL on GPU).

    torchrun --standalone --nproc_per_node=2 examples/ddp_finetune.py
    .venv/bin/python examples/ddp_finetune.py [--smoke] [--nproc 2]     # spawns the processes itself

Rank 0 trains the digits CNN and broadcasts its weights; every rank compresses it with the same config (the same
seed gives the same indices, codebooks and dither), fine-tunes on its own shard of the training set
(``DistributedSampler``), and the ranks check that they end with identical codebooks. ``udnc_fx.finetune`` wraps
the model in ``DistributedDataParallel`` by itself when a process group is initialised.
"""

from __future__ import annotations

import argparse
import os


def _worker(rank: int, world: int, args: argparse.Namespace, init_method: str | None) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import udnc_fx
    from udnc_fx.demo import evaluate, load_digits_split, train_digits_cnn
    from udnc_fx.passes.finetune import finetune
    from udnc_fx.passes.materialize import served_params

    use_cuda = torch.cuda.is_available() and not args.cpu
    backend = "nccl" if use_cuda else "gloo"
    if init_method is None:  # launched by torchrun: RANK, WORLD_SIZE, MASTER_ADDR... are in the environment
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    try:
        data = load_digits_split()
        epochs = 1 if args.smoke else 30
        model = train_digits_cnn(data, epochs=epochs, seed=0, progress=False) if rank == 0 else None
        state = [model.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(state, src=0)  # every rank starts from rank 0's float weights
        if rank != 0:
            from udnc_fx.demo import DigitsCNN

            model = DigitsCNN()
            model.load_state_dict(state[0])
        model.eval()

        config = udnc_fx.CompressConfig(lattice="Z", target_bits=args.bits, seed=args.seed)
        gm = udnc_fx.compress(model, config).to(device)
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
        before = evaluate(gm, x_test, y_test)

        train = TensorDataset(data.x_train, data.y_train)
        sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(train, batch_size=32, sampler=sampler)
        result = finetune(
            gm,
            loader,
            F.cross_entropy,
            epochs=1 if args.smoke else args.epochs,
            lr=3e-3,
            train_bias=True,
            train_norm=True,
            max_steps_per_epoch=4 if args.smoke else None,
            eval_fn=lambda m: evaluate(m, x_test, y_test),
            keep="last",
            progress=not args.smoke and rank == 0,
        )
        after = evaluate(gm, x_test, y_test)

        # Every rank must hold the same codebooks: compare them bit for bit with rank 0's.
        codebooks = torch.cat([dlp.codebook.detach().reshape(-1) for dlp in served_params(gm)]).cpu()
        reference = [codebooks if rank == 0 else None]
        dist.broadcast_object_list(reference, src=0)
        same = torch.tensor([float(torch.equal(codebooks, reference[0]))], device=device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"world size {world} ({backend}), DDP used: {result.distributed > 1}, steps per rank {result.steps}")
            print(f"accuracy before fine-tuning {before:.2f} %, after {after:.2f} %")
            print(f"codebooks identical on every rank: {bool(same.item())}")
        if not bool(same.item()):
            raise SystemExit(1)
        # Every rank reaches teardown together: a rank that destroys its gloo group while a peer still talks to it
        # can abort the process at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests (a few steps)")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn when not run under torchrun")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--bits", type=float, default=2.0, help="target entropy, bits/weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA is available")
    args = parser.parse_args(argv)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return 0
    import tempfile

    import torch.multiprocessing as mp

    # A file rendezvous: no port to pick, so no race with other processes taking a "free" port first.
    with tempfile.TemporaryDirectory(prefix="udnc-ddp-") as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(_worker, args=(args.nproc, args, init), nprocs=args.nproc, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
