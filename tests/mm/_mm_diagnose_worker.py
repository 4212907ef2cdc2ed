"""Worker of the 2-rank diagnosis test (a module of its own so that spawned children can import it)."""
import json
import os
import os.path as osp


def run(rank: int, world: int, port: int, config: str, options: dict, checkpoint: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import agvm._compat

    agvm._compat.apply()
    import torch

    torch.set_num_threads(1)
    from agvm.mm.diagnose import run as diagnose

    res = diagnose(config, 4, checkpoint, out=out, cfg_options=options, validate_batches=(2,), repeats=2, seed=1,
                   launcher="pytorch")
    with open(osp.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"sums": {m: [v["signal"], v["noise"]] for m, v in res["modules"].items()},
                   "validation": res["validation"]["rows"]}, f)
