"""trainer/config_checks.py: every check raises one line "<key>: <what>, got <value>" and passes
good values; the module imports nothing outside the standard library (planning imports it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer import config_checks as checks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "check, message",
    [
        (lambda: checks.positive_int("a.b", 0), "a.b: must be a positive int, got 0"),
        (lambda: checks.positive_int("a.b", True), "a.b: must be a positive int, got True"),
        (lambda: checks.int_at_least("a.b", 2.0, 0), "a.b: must be an int >= 0, got 2.0"),
        (lambda: checks.number("a.t", 0, gt=0), "a.t: must be > 0, got 0"),
        (lambda: checks.number("a.w", float("nan"), ge=0), "a.w: must be >= 0, got nan"),
        (
            lambda: checks.number("a.h", 1.5, gt=0, lt=1, what="a fraction"),
            "a.h: must be a fraction in (0, 1), got 1.5",
        ),
        (
            lambda: checks.number("a.c", 2.0, gt=0, le=1, none=True),
            "a.c: must be in (0, 1] or None, got 2.0",
        ),
        (lambda: checks.number("a.x", "1"), "a.x: must be a finite number, got '1'"),
        (
            lambda: checks.number_tuple("a.lrs", (), gt=0),
            "a.lrs: must be a non-empty tuple of numbers > 0, got ()",
        ),
        (
            lambda: checks.number_tuple("a.e", [0.1, -1], ge=0),
            "a.e: must be a non-empty tuple of numbers >= 0, got (0.1, -1)",
        ),
        (lambda: checks.boolean("a.f", 1), "a.f: must be True or False, got 1"),
        (
            lambda: checks.one_of("a.p", "maybe", ("auto", "on", "off")),
            "a.p: 'maybe' is not one of auto, on, off",
        ),
        (lambda: checks.name("a.d", ""), "a.d: must be a non-empty name, got ''"),
        (
            lambda: checks.names("a.s", ("val", ""), "a tuple of split names"),
            "a.s: must be a tuple of split names, got ('val', '')",
        ),
        (
            lambda: checks.names("a.s", (), "a non-empty tuple", empty=False),
            "a.s: must be a non-empty tuple, got ()",
        ),
        (
            lambda: checks.mesh("a.mesh", {"data": 0, "model": 1}, ("data", "model")),
            "a.mesh.data: must be a positive int or -1, got 0",
        ),
        (
            lambda: checks.mesh("a.mesh", {"data": -1, "model": -1}, ("data", "model")),
            "a.mesh: only one axis may be -1, got data=-1, model=-1",
        ),
        (
            lambda: checks.upstream("a.m", "lit", {"pretrain": None}),
            "a.m: 'lit' is not upstream of this stage (upstream: pretrain)",
        ),
    ],
)
def test_each_check_raises_one_line_naming_the_key(check, message):
    with pytest.raises(ValueError) as e:
        check()
    assert str(e.value) == message


def test_good_values_pass():
    checks.positive_int("k", 3)
    checks.int_at_least("k", 0, 0)
    checks.number("k", 0.5, gt=0, lt=1)
    checks.number("k", None, gt=0, none=True)
    checks.number_tuple("k", [0.0, 1e-3], ge=0)
    checks.boolean("k", False)
    checks.one_of("k", "on", ("on", "off"))
    checks.names("k", (), "names")
    checks.mesh("k", {"data": -1, "model": 2, "replica": 1}, ("data", "model", "replica"))
    checks.upstream("k", "anything", {})  # upstream unknown: nothing to check against
    assert checks.is_int(3, 1) and not checks.is_int(True) and not checks.is_int(1.0)
    assert checks.is_number(1) and not checks.is_number(float("inf"))
    assert not checks.is_number(False)


def test_checks_against_the_prepare_group():
    from pipelines import prepare

    group = prepare.default_config()
    checks.prepared("k", "digits", group)
    checks.prepared_split("k", "val", "digits", group)
    missing = r"^k: 'cifar' is not prepared; prepare\.datasets has digits$"
    with pytest.raises(ValueError, match=missing):
        checks.prepared("k", "cifar", group)
    split = r"^k: 'dev' is not a split of prepared dataset 'digits' \(test, train, val\)$"
    with pytest.raises(ValueError, match=split):
        checks.prepared_split("k", "dev", "digits", group)


def test_imports_only_the_standard_library():
    code = (
        "import sys; before = set(sys.modules); import trainer.config_checks; "
        "print(sorted(m for m in set(sys.modules) - before if not m.startswith('trainer') "
        "and m.split('.')[0] not in sys.stdlib_module_names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
