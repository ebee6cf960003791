"""Flags shared by the launch entry points (run, stage, xm_launch) and one-line error reporting.

Imported only by entry modules: defining absl flags is their import-time side effect, so the
library (dag.py) stays flag-free. Defining them once here lets the three entries coexist in one
process (tests, `xmanager launch`).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from data import paths
from launch import dag

FLAGS = flags.FLAGS

# Local CPU runs simulate 8 devices so that the configs' 2-D meshes work as on a pod
# (docs/DESIGN.md §6: set before JAX initializes, hence here in the entry module). It only affects
# JAX's CPU backend; an explicit setting in XLA_FLAGS wins.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Pipeline config file PATH[:ARG] (get_config(ARG)); override fields with "
    "--config.<stage>.<key>=VALUE (unknown keys are rejected).",
    lock_config=True,
)
WORKDIR = flags.DEFINE_string("workdir", "./workdir", "Cache root: <workdir>/<stage>/<fp16>/.")
STAGES = flags.DEFINE_list(
    "stages", [], "Run only these stages (comma-separated); their upstream must be in the cache."
)
FORCE = flags.DEFINE_list("force", [], "Rerun these stages (comma-separated) even on a cache hit.")
REGISTRY = flags.DEFINE_string(
    "registry",
    "launch.dag:STAGES",
    "The stage table as module:attribute (a launch.dag.Registry); tests pass their own.",
)

flags.mark_flag_as_required("config")


def fail(message: object, code: int = 2) -> NoReturn:
    """Prints a one-line error (no traceback) and exits."""
    text = " ".join(str(message).replace("\\n", " ").split())
    sys.stderr.write(f"error: {text}\n")
    sys.exit(code)


def _unknown_key_message(error: Exception, argv: Sequence[str]) -> str:
    raw = str(error)
    suggestion = re.search(r'Did you mean "([\w-]+)" instead of "([\w-]+)"', raw)
    words = re.sub(r"[\\'\"]|\\n", " ", raw).split()
    name = suggestion.group(2) if suggestion else (words[0] if words else raw)
    culprits = [
        arg.split("=", 1)[0]
        for arg in argv
        if arg.startswith("--config.") and name in arg.split("=", 1)[0].split(".")
    ]
    hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
    return f"{culprits[0] if culprits else '--config'}: unknown config key {name!r}{hint}"


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flags parser for app.run that turns every flag/config error into one line."""
    try:
        return FLAGS(list(argv))
    except (AttributeError, KeyError) as e:  # config_flags: override of a key the config lacks
        fail(_unknown_key_message(e, argv))
    except (flags.Error, TypeError, ValueError) as e:
        fail(e)


def config():
    """The loaded, locked, overridden config; a load failure becomes a one-line error."""
    try:
        value = CONFIG.value
        names = list(value)  # _ErrorConfig (file failed to load) raises on first access
    except (OSError, AttributeError, TypeError) as e:
        fail(f"{FLAGS['config'].serialize()}: {e}")
    if not names:
        fail("--config: get_config() returned an empty config")
    return value


def config_argument() -> str:
    """--config as given (PATH[:ARG]) with PATH made absolute, for child processes."""
    path, sep, arg = config_flags.get_config_filename(FLAGS["config"]).partition(":")
    return str(Path(path).resolve()) + sep + arg


def override_arguments() -> list[str]:
    """The --config.KEY=VALUE overrides given on this command line, re-serialised for children."""
    overrides = config_flags.get_override_values(FLAGS["config"])
    return [f"--config.{key}={_serialise(value)}" for key, value in sorted(overrides.items())]


def _serialise(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def registry() -> dag.Registry:
    try:
        return dag.load_registry(REGISTRY.value)
    except dag.PlanError as e:
        fail(e)


def workdir() -> Path:
    """The --workdir: an absolute local Path, or an epath.Path for a bucket URI (data/paths.py)."""
    try:
        return paths.resolve(WORKDIR.value, "--workdir")
    except paths.UnsupportedPath as e:
        fail(e)


def no_positional(argv: Sequence[str]) -> None:
    """Entry set-up after absl parsed the flags: rejects positional args, quiets library logs."""
    if len(argv) > 1:
        fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
    # absl's app.run raises an unset --verbosity to INFO, where JAX and Orbax log every backend
    # probe and checkpoint step; keep WARNING unless the user asked (--verbosity=0 for INFO).
    if not any(a.split("=")[0] in ("--verbosity", "-v", "--v") for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)
