"""A torchrun worker for tests/trainer/test_precision.py: trains the same short run once per
`precision.comms` mode in one job (one process group start-up instead of three) and writes each
train result to OUT/<mode>.json.

    torchrun --nproc_per_node=2 tests/trainer/precision_worker.py CONFIG OUT MODE[,MODE...] [--set K=V ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from trainer.config import load_config
    from trainer.distributed import shutdown
    from trainer.train import Trainer

    config, out, modes, overrides = argv[0], Path(argv[1]), argv[2].split(","), argv[3:]
    sets = [overrides[i + 1] for i in range(0, len(overrides), 2)]  # "--set K=V" pairs
    for mode in modes:
        cfg = load_config(config, [*sets, f'train.run_dir="{out / mode}"', f'precision.comms="{mode}"'])
        trainer = Trainer(cfg)
        result = trainer.fit()
        if trainer.ctx.is_main:
            (out / f"{mode}.json").write_text(json.dumps(result))
        del trainer
        shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1:])
