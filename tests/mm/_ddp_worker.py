"""Worker of the 2-rank DDP test (a module of its own so that spawned children can import it)."""
import json
import os
import os.path as osp


def run(rank: int, world: int, config: str, work: str, options: dict, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import agvm._compat

    agvm._compat.apply()
    import torch

    torch.set_num_threads(1)
    from agvm.mm.train import train

    metrics = train(config, work, options, resume=False, launcher="pytorch")
    with open(osp.join(work, f"rank{rank}.json"), "w") as f:
        json.dump(metrics, f)
