"""One rank of the 2-process gloo run of tests/test_heads_distributed.py.

    python tests/distributed_worker.py RANK WORLD INIT_FILE OUT_DIR [RESUME_DIR]

Trains every head of heads_setup.CASES on its share of the global batches and writes each step's
loss and embedding gradient, the final state (state_dict: a collective for the sharded heads) and,
when RESUME_DIR is given, the losses after loading the one-process checkpoints found there."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from heads_setup import (CASES, STEPS, encoder_gradient, local_rows, make, run_steps,  # noqa: E402
                         step_with_nan_on_rank_one)


def main(rank, world, init_file, out_dir, resume_dir=None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name in CASES:
        head, opt = make(name)
        rows = local_rows(rank, world)
        steps = run_steps(head, opt, name, range(STEPS), rows)
        state = head.state_dict()  # every rank calls it: the sharded heads gather their shards
        resumed = None
        if resume_dir is not None:
            other, opt2 = make(name)
            other.load_state_dict(torch.load(os.path.join(resume_dir, f"{name}.pt")))
            local = other.weight.detach().clone() if hasattr(other, "weight") else None
            resumed = {"local_weight": local,
                       "steps": run_steps(other, opt2, name, range(STEPS, STEPS + 3), rows)}
        results[name] = {"steps": steps, "state": state, "resumed": resumed,
                         "ddp_grad": encoder_gradient(name, rows, ddp=True),
                         "nan_one_rank": step_with_nan_on_rank_one(head, name, rows, rank, STEPS + 5)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    main(rank, world, sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
