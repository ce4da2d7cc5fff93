"""LatentExporter: the Lightning callback that writes each predicted batch into the run directory
(RunExport)."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import datetime, timezone
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np

from glo import Stopped
from glo.store.export import RunExport

RANK0 = "GLO_RANK0_PID"  # rank 0's pid, for the ranks Lightning's launcher starts as its children


class LatentExporter(RunExport, pl.Callback):
    """Shards each predicted batch, then merges them into latents.npz, metadata.json and
    summary.json. A SIGTERM to any rank stops every rank after its batch in flight."""

    def __init__(self, out_dir: str, format: str) -> None:
        super().__init__(out_dir, format)
        self.signalled = False

    def clear_stop(self) -> None:
        super().clear_stop()
        os.environ[RANK0] = str(os.getpid())

    def on_predict_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Lightning's SIGTERM handler broadcasts from inside the handler, so a rank signalled alone
        # would wait for ever; this one only marks the stop (Lightning restores its own handler's
        # predecessor at teardown)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.metadata["start_time"] = datetime.now(timezone.utc).isoformat()
        if trainer.is_global_zero:
            self.record_session()

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        outputs: dict[str, np.ndarray],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.save_batch(trainer.global_rank, int(batch[1]["index"][0]), outputs)
        if self.signalled or self.stop_file.exists():
            self._after_rank0(trainer)
            raise Stopped(self.stopped(f"by SIGTERM{self._to_whom()} after the current batch"))

    def on_predict_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        try:
            # every rank's shards are on disk before rank 0 merges them
            trainer.strategy.barrier("glo-export")
        except RuntimeError:  # the peer it waits for has stopped and gone
            if not self.stop_file.exists():
                raise
            raise Stopped(self.stopped(f"by SIGTERM{self._to_whom()}")) from None
        if trainer.is_global_zero:
            self.merge()

    def on_exception(
        self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning ends a run on Ctrl+C itself (exit code 1, its own message is info-level): say
        # what is safe
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            print(
                f"glo: error: {self.stopped('by Ctrl+C, the batch in flight is lost')}",
                file=sys.stderr,
                flush=True,
            )

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True
        self.stop_file.write_text("SIGTERM\n")  # the other ranks stop after their batch too

    def _to_whom(self) -> str:
        return "" if self.signalled else " to another rank"

    @staticmethod
    def _after_rank0(trainer: pl.Trainer) -> None:
        """A rank Lightning's launcher started ends after rank 0: once a child ends with a non-zero
        code, the launcher kills every rank with SIGKILL, without a line and losing the batch in
        flight."""
        parent = os.getppid()
        if not trainer.local_rank or os.environ.get(RANK0) != str(parent):
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()  # rank 0 may wait in the barrier for this rank: release it
        while os.getppid() == parent:
            time.sleep(0.1)
