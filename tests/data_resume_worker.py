"""Run under torchrun: each rank reads its micro-batches for some steps from a saved data state
(or the start) and writes them; rank 0 also writes the state after those steps."""

import json
import sys

import numpy as np
import torch.distributed as dist

from scaletrain.data.loader import ShardLoader, StreamSpec


def main() -> None:
    data_dir, out, steps, gas, state_in = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    global_batch = 8
    mbs = global_batch // (gas * world)
    spec = StreamSpec(data_dir, ("arxiv", "general"), (0.3, 0.7), 32, mbs, gas, rank, world, 0)
    loader = ShardLoader(spec, num_workers=1 if rank == 0 else 0)
    if state_in != "-":
        loader.load_state_dict(json.loads(open(state_in).read()))
    rows = [next(loader)[0].numpy() for _ in range(steps * gas)]
    np.save(f"{out}.rank{rank}.npy", np.stack(rows))  # (steps*gas, mbs, T)
    if rank == 0:
        with open(f"{out}.state.json", "w") as f:
            json.dump(loader.state_dict(), f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
