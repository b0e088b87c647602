"""Command line: `conservation run [CONFIG]` and `conservation count [CONFIG]`."""

import argparse
import sys

from ._config import ConfigError, load_config
from ._runner import count_table, format_summary, run_config
from ._sweep import run_sweep, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="conservation",
        description="Simulate training dynamics and the drift of conservation laws.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run a TOML config (default: the embedded quickstart config)")
    run.add_argument("config", nargs="?", help="path to a TOML config; omit for the quickstart")
    run.add_argument("--out", help="output folder (default: the config's `output`, "
                                   "else results/<name>)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    count = commands.add_parser(
        "count", help="count the independent conservation laws of a config's model: all data "
                      "vs the config's augmented data class (Lie-algebra rank)")
    count.add_argument("config", nargs="?", help="path to a TOML config; omit for the quickstart")
    count.add_argument("--depth", type=int, default=4,
                       help="deepest Lie bracket, ≥ 0 (default 4)")
    count.add_argument("--no-early-stop", action="store_true",
                       help="evaluate every depth and round even when the rank is stable")
    sweep = commands.add_parser(
        "sweep", help="run or resume a config with a [sweep] table (one compiled program per "
                      "shape group; finished points are never recomputed)")
    sweep.add_argument("config", help="path to a TOML config with a [sweep] table")
    sweep.add_argument("--out", help="sweep folder (default: the config's output)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    report = commands.add_parser("report", help="summary table and plot of a sweep folder")
    report.add_argument("folder", help="a folder written by `conservation sweep`")
    args = parser.parse_args(argv)

    if args.command == "report":
        summary = write_report(args.folder)
        print(f"{summary['finished']}/{summary['points']} points; wrote summary.json, "
              f"summary.csv, report.png to {args.folder}/")
        return 0

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"conservation: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "sweep":
        try:
            summary = run_sweep(config, out_dir=args.out, progress=not args.quiet)
        except ConfigError as e:
            print(f"conservation: config error: {e}", file=sys.stderr)
            return 2
        print(f"{summary['finished']}/{summary['points']} points written to "
              f"{args.out or config.output}/ (sweep.json, points/, summary.csv, report.png)")
        return 0
    if args.command == "count":
        if args.depth < 0:
            print(f"conservation: error: `--depth` must be ≥ 0 (the deepest Lie bracket), "
                  f"got {args.depth}.", file=sys.stderr)
            return 2
        print(count_table(config, max_depth=args.depth, early_stop=not args.no_early_stop))
        return 0
    log = (lambda _: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    summary = run_config(config, out_dir=args.out, progress=not args.quiet, log=log)
    print(format_summary(summary))
    print(f"results written to {args.out or config.output}/ (summary.json, plot.png, *.npz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
