"""The ``lightning-logits`` command: Lightning's CLI over every module and DataModule here.

``lightning-logits fit --config recipes/quickstart.yaml`` trains; ``--print_config`` shows the
full configuration; dotted overrides such as ``--trainer.max_epochs 3`` change one value.
Any LightningModule / LightningDataModule can be named by ``class_path``, ours or the user's.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_logits.callbacks
import lightning_logits.data
import lightning_logits.modules  # noqa: F401


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The configured ``LightningCLI``; ``args`` defaults to ``sys.argv[1:]``."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-logits`` console script."""
    build_cli(args)


if __name__ == "__main__":
    main()
