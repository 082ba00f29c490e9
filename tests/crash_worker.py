"""examples/fsdp_train.py with one process killed (SIGKILL) at a chosen moment, for test_crash.py.

    python -m torch.distributed.run --nproc-per-node 2 --max-restarts 1 tests/crash_worker.py WHEN:STEP:RANK [args]

The process of rank RANK kills itself, in the group's first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT 0;
the restarted group runs to the end):

* ``step:N`` after optimizer step N, before the checkpoint of that step (if any);
* ``save:N`` during the save of step N, once DCP has written this process's file: the other process's files, the
  ``.metadata`` and the manifest are not written yet;
* ``commit:N`` on process 0 (RANK must be 0) once the manifest of step N is written, before the directory is renamed.

The remaining arguments go to the example.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import torchlamb.checkpoint

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp_train.py"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(when: str, step: int) -> None:
    name = f"step-{step:09d}"
    if when == "step":
        after_step = torchlamb.Checkpointer.after_step

        def after_step_then_die(self, number, **extra):
            if number == step:
                die()
            return after_step(self, number, **extra)

        torchlamb.Checkpointer.after_step = after_step_then_die
    elif when == "save":
        class DyingWriter(torchlamb.checkpoint.FileSystemWriter):
            def write_data(self, plan, planner):
                written = super().write_data(plan, planner)
                if Path(self.path).name.startswith(name):
                    written.wait()
                    die()
                return written

        torchlamb.checkpoint.FileSystemWriter = DyingWriter
    elif when == "commit":
        write_manifest = torchlamb.checkpoint.write_manifest

        def write_manifest_then_die(directory, *args, **kwargs):
            write_manifest(directory, *args, **kwargs)
            if Path(directory).name.startswith(name):
                die()

        torchlamb.checkpoint.write_manifest = write_manifest_then_die
    else:
        raise ValueError(f"unknown moment {when!r}: step, save or commit")


def main() -> None:
    when, step, rank = sys.argv[1].split(":")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ["RANK"] == rank:
        inject(when, int(step))
    sys.argv = [str(EXAMPLE), *sys.argv[2:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


if __name__ == "__main__":
    main()
