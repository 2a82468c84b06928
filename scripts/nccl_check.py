"""Two processes on one GPU, each its own NCCL_HOSTID, one NCCL all-reduce through
torch.distributed: the set-up herd's two-worker GPU tests use (scripts/gpu-test.sh nccl runs
this first), so a device whose NCCL refuses it is told apart from a bug in herd. Prints NCCL's
version and the sum, exits 0 when it is right."""
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, port):
    os.environ.update({
        "NCCL_HOSTID": f"w{rank}",  # as tests/cuda_cli.rs gives each worker
        "NCCL_MULTI_RANK_GPU_ENABLE": "1",
        "NCCL_IB_DISABLE": "1",
        "NCCL_SOCKET_IFNAME": "lo",
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
    })
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, device_id=torch.device("cuda:0"))
    x = torch.full((1 << 20,), float(rank + 1), device="cuda:0")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    ok = bool((x == 3.0).all())
    print(f"rank {rank}: NCCL {torch.cuda.nccl.version()}, sum {x[0].item()} "
          f"({'right' if ok else 'WRONG'})", flush=True)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=2, join=True)
    print("torch's two-process NCCL all-reduce on one GPU works")
