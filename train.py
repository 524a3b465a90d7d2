"""Hydra entry point: `python train.py experiment=blackvip_caltech` (see configs/train.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from reprolab.train import run

    choices = HydraConfig.get().runtime.choices
    OmegaConf.set_struct(cfg, False)
    cfg.experiment_name = choices.get("experiment")
    cfg.table_name = choices.get("table")
    run(cfg)


if __name__ == "__main__":
    main()
