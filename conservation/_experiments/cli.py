"""Command line: `conservation run|count|sweep|report`.

Anything a user can cause (a bad config, an unusable `--out`, a folder holding other results, a
corrupted file) ends with ONE line `conservation: error: …` and exit status 2; Ctrl-C with one
line and status 130 (finished entries are kept; the same command resumes); an unexpected
failure with one line and status 1. `--debug` adds the Python traceback.
"""

import argparse
import pathlib
import sys
import traceback

from .._validation import ArgumentError
from .config import ConfigError, load_config
from .store import UserError, interrupt_guard, read_config_text, read_json


def _version() -> str:
    from .. import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: keeps `conservation --debug run`
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error")
    bars = argparse.ArgumentParser(add_help=False)
    bars.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    bars.add_argument("--progress", action="store_true",
                      help="progress bars even when stderr is not a terminal")
    parser = argparse.ArgumentParser(
        prog="conservation",
        description="Simulate training dynamics and the drift of conservation laws.")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error")
    parser.add_argument("--version", action="version", version=f"conservation {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", parents=[common, bars],
        help="run a TOML config (default: the embedded quickstart config); rerunning the same "
             "command resumes, skipping finished [[dynamics]] entries")
    run.add_argument("config", nargs="?", help="path to a TOML config; omit for the quickstart")
    run.add_argument("--out", help="output folder (default: the config's `output`, "
                                   "else results/<name>)")
    run.add_argument("--force", action="store_true",
                     help="replace the results of a different config in the output folder")
    count = commands.add_parser(
        "count", parents=[common],
        help="count the independent conservation laws of a config's model: all data "
             "vs the config's augmented data class (Lie-algebra rank)")
    count.add_argument("config", nargs="?", help="path to a TOML config; omit for the quickstart")
    count.add_argument("--depth", type=int, default=4,
                       help="deepest Lie bracket, ≥ 0 (default 4)")
    count.add_argument("--no-early-stop", action="store_true",
                       help="evaluate every depth and round even when the rank is stable")
    sweep = commands.add_parser(
        "sweep", parents=[common, bars],
        help="run or resume a config with a [sweep] table (one compiled program per "
             "shape group; finished points are never recomputed)")
    sweep.add_argument("config", help="path to a TOML config with a [sweep] table")
    sweep.add_argument("--out", help="sweep folder (default: the config's output)")
    multi = sweep.add_argument_group(
        "multi-host", "run one sweep across the processes of JAX's distributed runtime "
        "(every process runs the same command on a shared --out folder)")
    multi.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first; it reads SLURM, TPU-pod "
                            "or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="the coordinator (process 0) address; implies --distributed")
    multi.add_argument("--num-processes", type=int, metavar="N",
                       help="number of processes (with --coordinator)")
    multi.add_argument("--process-id", type=int, metavar="I",
                       help="this process's index, 0 … N-1 (with --coordinator)")
    report = commands.add_parser(
        "report", parents=[common],
        help="print the summary table of a sweep (or run) folder and rewrite its summary "
             "files and report.png")
    report.add_argument("folder", help="a folder written by `conservation sweep` or `run`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    where: dict = {}
    try:
        with interrupt_guard():
            return _dispatch(args, where)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        saved = f"; finished results are saved in {where['out']}/" if "out" in where else ""
        print(f"conservation: interrupted{saved}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (ArgumentError, UserError) as e:
        if args.debug:
            traceback.print_exc()
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"conservation: {kind}: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 — the last resort: one line, not a traceback
        if args.debug:
            traceback.print_exc()
            hint = ""
        else:
            hint = " (rerun with --debug for the traceback)"
        print(f"conservation: internal error: {type(e).__name__}: {_one_line(e)}{hint}",
              file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _load(path):
    if path is not None:
        read_config_text(path)  # a folder, missing, not UTF-8 or with a BOM: named here
    return load_config(path)


def _initialize_distributed(args) -> None:
    """`jax.distributed.initialize` for `sweep --distributed` / `--coordinator`: before the
    config is loaded, as it must precede any JAX computation."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if not args.distributed and all(v is None for v in given.values()):
        return
    if args.coordinator is not None or args.num_processes is not None \
            or args.process_id is not None:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"`{missing[0]}` is missing; give `--coordinator HOST:PORT "
                            "--num-processes N --process-id I` together, or only "
                            "`--distributed` to read them from the environment.")
        if not 0 <= args.process_id < args.num_processes:
            raise UserError(f"`--process-id` must lie in 0 … {args.num_processes - 1}, got "
                            f"{args.process_id}.")
    import jax

    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def _dispatch(args, where) -> int:
    if args.command == "sweep":
        _initialize_distributed(args)
    if args.command == "report":
        return _report(pathlib.Path(args.folder))
    config = _load(args.config)
    if args.command == "count":
        from .runner import count_table

        if args.depth < 0:
            raise UserError(f"`--depth` must be ≥ 0 (the deepest Lie bracket), "
                            f"got {args.depth}.")
        print(count_table(config, max_depth=args.depth, early_stop=not args.no_early_stop))
        return 0
    progress = args.progress or (not args.quiet and sys.stderr.isatty())
    log = (lambda _: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    out = pathlib.Path(args.out or config.output)
    where["out"] = out
    if args.command == "sweep":
        from .sweep import run_sweep

        summary = run_sweep(config, out_dir=out, progress=progress, log=log)
        print(f"{summary['finished']}/{summary['points']} points in {out}/ "
              f"({summary['computed']} computed now; sweep.json, points/, summary.csv, "
              "report.png)")
        return 0
    from .runner import format_summary, run_config

    summary = run_config(config, out_dir=out, progress=progress, log=log, force=args.force)
    print(format_summary(summary))
    print(f"results written to {out}/ (run.json, summary.json, plot.png, *.npz)")
    return 0


def _report(folder: pathlib.Path) -> int:
    from .runner import format_summary
    from .sweep import format_sweep_summary, write_report

    if folder.is_dir() and not (folder / "sweep.json").exists() and (
            (folder / "run.json").exists() and (folder / "summary.json").exists()):
        print(format_summary(read_json(folder / "summary.json")))
        return 0
    summary = write_report(folder)
    print(format_sweep_summary(summary))
    print(f"{summary['finished']}/{summary['points']} points; wrote summary.json, "
          f"summary.csv, report.png to {folder}/")
    if summary["corrupted"]:
        print(f"conservation: {len(summary['corrupted'])} corrupted point file(s), e.g. "
              f"{summary['corrupted'][0]}; rerun the sweep to recompute them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
