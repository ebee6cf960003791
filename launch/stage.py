"""One stage as its own process — what an XManager work unit / cluster job executes.

    python -m launch.stage --stage NAME --config PATH[:ARG] --workdir DIR [--force NAME]
        [--expect_fingerprint FP] [--log_file PATH] [--config.<stage>.<key>=VALUE ...]

Same fingerprint / cache / atomic-rename logic as `launch.run` (launch.dag.run_stage); the
stage's upstream outputs must already be in the cache. --log_file tees this process's stdout and
stderr (file-descriptor level, so output of native code and child processes is captured too).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator

from absl import app
from absl import flags

from launch import cli
from launch import dag

flags.adopt_module_key_flags(cli)  # --help lists the shared flags too

STAGE = flags.DEFINE_string("stage", None, "Name of the stage to run.", required=True)
EXPECT_FINGERPRINT = flags.DEFINE_string(
    "expect_fingerprint", None, "Fail unless the stage's fingerprint is this (set by launchers)."
)
LOG_FILE = flags.DEFINE_string("log_file", None, "Also append stdout+stderr to this file.")
RUN_ID = flags.DEFINE_string(
    "run_id",
    None,
    "Same on every host of a multi-host job: all hosts run the stage into one "
    "shared temp dir and JAX process 0 commits it (set by launchers).",
)


@contextlib.contextmanager
def tee_output(path: Path) -> Iterator[None]:
    """Duplicates fds 1 and 2 into `path` (appending) while still writing to the original stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    log = open(path, "ab")

    def pump() -> None:
        while chunk := os.read(read_end, 65536):
            log.write(chunk)
            log.flush()
            os.write(saved_out, chunk)

    thread = threading.Thread(target=pump, name="tee", daemon=True)
    thread.start()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)  # drops the pipe's last write ends held by fds 1/2 -> pump sees EOF
        os.dup2(saved_err, 2)
        # Children that inherited the pipe may keep it open; don't wait on them forever.
        thread.join(timeout=10)
        log.close()
        os.close(saved_out)
        os.close(saved_err)


def apply_xla_flags(config, registry, name: str) -> None:
    """The stage's `xla_flags` set (trainer/xla_flags.py) into this process's environment, for
    every platform, before JAX starts a backend: a stage is its own process, so its set holds."""
    from trainer import xla_flags

    try:
        stage = next((s for s in registry.expand(config) if s.name == name), None)
    except dag.PlanError:
        return  # dag.run_stage reports it
    group = stage.group(config) if stage is not None else None
    if group is not None and "xla_flags" in group:
        xla_flags.apply_all(group.xla_flags)


def main(argv):
    cli.no_positional(argv)
    name = STAGE.value
    if any(forced != name for forced in cli.FORCE.value):
        cli.fail(
            f"--force {','.join(cli.FORCE.value)}: launch.stage can only force its own "
            f"--stage {name}"
        )
    config = cli.config()
    registry = cli.registry()
    apply_xla_flags(config, registry, name)
    log_context = tee_output(Path(LOG_FILE.value)) if LOG_FILE.value else contextlib.nullcontext()
    # sys.exit inside the tee is safe: SystemExit runs tee_output's finally (flush, close log).
    with log_context:
        try:
            output = dag.run_stage(
                name,
                config,
                cli.workdir(),
                registry=registry,
                force=bool(cli.FORCE.value),
                expect_fingerprint=EXPECT_FINGERPRINT.value,
                run_id=RUN_ID.value,
            )
            print(f"{name}: {output.path}")
        except dag.PlanError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception:  # the traceback must land in --log_file, so print it inside the tee
            traceback.print_exc()
            sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
