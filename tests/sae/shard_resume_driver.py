"""Run under torchrun by test_shard_latents.py: train a run given as JSON, stop it on every rank after the
checkpoint of step STOP (a callback raising), then resume it to the end in the same processes."""

import json
import sys

from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train


class Stop(Exception):
    pass


def main() -> None:
    cfg, stop_at = TrainConfig(**json.loads(sys.argv[1])), int(sys.argv[2])

    def stop(trainer) -> None:
        if trainer.step == stop_at:
            raise Stop

    try:
        train(cfg, progress=False, callback=stop)
        raise SystemExit("the run was not stopped")
    except Stop:
        pass
    cfg.resume = True
    result = train(cfg, progress=False)
    assert result.resumed_from == stop_at, result.resumed_from


if __name__ == "__main__":
    main()
