"""Local runner for the stage DAG.

    python -m launch.run --config launch/configs/tiny.py[:ARG] [--workdir ./workdir]
        [--stages a,b] [--force a] [--dry_run] [--preflight] [--config.<stage>.<key>=VALUE ...]

Stages run in this process in dependency order; cached stages (same fingerprint, `_SUCCESS`
present) are reused. The library entry is `launch.dag.run_pipeline`.
"""

from __future__ import annotations

from absl import app
from absl import flags

from launch import cli
from launch import dag
from launch import preflight
from launch import produce

flags.adopt_module_key_flags(cli)  # --help lists the shared flags too
flags.adopt_module_key_flags(preflight)

DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the plan (every stage, cache hit/miss and why) and exit."
)
PREFLIGHT = flags.DEFINE_bool(
    "preflight",
    False,
    "Run the stages before the first training stage, then launch.preflight's "
    "go/no-go checks of the training stages about to run; stop (exit 1) on no-go.",
)


def main(argv):
    cli.no_positional(argv)
    config = cli.config()
    try:
        plans = dag.plan(
            config,
            cli.workdir(),
            cli.registry(),
            only=cli.STAGES.value or None,
            force=cli.FORCE.value,
        )
    except dag.PlanError as e:
        cli.fail(e)
    if DRY_RUN.value:
        print(dag.format_plan(plans))
        return
    if PREFLIGHT.value:
        plans = preflight.gate(
            config,
            plans,
            cli.workdir(),
            cli.registry(),
            only=cli.STAGES.value or None,
            force=cli.FORCE.value,
            options=preflight.Options.from_flags(),
        )
    outputs = produce.execute(plans, config)
    print("Outputs:")
    for name, output in outputs.items():
        headline = {
            k: v
            for k, v in output.outputs.get("metrics", {}).items()
            if k.endswith(("top1", "accuracy", "recall@1"))
        }
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(headline.items()))
        print(f"  {name}: {output.path}" + (f"  ({shown})" if shown else ""))
    report = outputs.get("evaluate")
    if report is not None and "report" in report.outputs.get("artifacts", {}):
        print(f"Report: {report.path / report.outputs['artifacts']['report']}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
