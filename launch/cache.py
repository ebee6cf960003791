"""The content-addressed cache's on-disk layout (docs/DESIGN.md §2.4).

Per stage:

    <workdir>/<stage>/<fingerprint[:16]>/   completed outputs (renamed into place, `_SUCCESS` last)
        config.json  outputs.json  metrics.jsonl  tb/  fingerprint.json  _SUCCESS  <artifacts>
    <workdir>/<stage>/.tmp-<fp16>-*          a run in progress, or the debris of a crashed one
    <workdir>/<stage>/.partial-<fp16>/       a resumable stage's run in progress: kept when it
                                             crashes or is preempted, so the next run resumes
                                             from its checkpoints
    <workdir>/<stage>/.locks/<fp16>.lock     flock() held while a process produces <fp16>

A directory without `_SUCCESS` is never reused (launch/produce.py writes them).
`workdir` may be a bucket URI (data/paths.py): completed outputs then live there as `epath.Path`s,
while the temp/partial dirs and locks live in a local staging dir (launch/produce.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data import paths
from launch.stage_types import StageOutput

SUCCESS = "_SUCCESS"
FINGERPRINT_FILE = "fingerprint.json"


def stage_dir(workdir: Path, name: str, fp: str) -> Path:
    return paths.as_path(workdir, "--workdir") / name / fp[:16]


def is_complete(path: Path) -> bool:
    return (path / SUCCESS).is_file()


def load_output(name: str, fp: str, path: Path) -> StageOutput:
    outputs = json.loads((path / "outputs.json").read_text())
    return StageOutput(name=name, fingerprint=fp, path=path, outputs=outputs)


def latest_completed_components(stage_root: Path) -> dict | None:
    """fingerprint.json of the most recently completed run of a stage, if any."""
    candidates = []
    for child in stage_root.glob("*/" + SUCCESS):
        record = child.parent / FINGERPRINT_FILE
        if record.is_file():
            candidates.append((paths.mtime(child), os.fspath(record), record))
    if not candidates:
        return None
    _, _, record = max(candidates, key=lambda item: item[:2])
    return json.loads(record.read_text())["components"]
