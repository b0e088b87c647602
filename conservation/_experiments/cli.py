"""Command line: `conservation run|count|sweep|report`.

Anything a user can cause (a bad config, an unusable `--out`, a folder holding other results, a
corrupted file, a full disk) ends with ONE line `conservation: error: …` and exit status 2;
Ctrl-C with one line and status 130, SIGTERM likewise with status 143 (finished entries are
kept; the same command resumes; a second Ctrl-C while the process exits is ignored); a closed
stdout (`conservation run … | head`) ends quietly with status 141, like a command killed by
SIGPIPE (the results are complete: the table is printed last); an unexpected failure with one
line and status 1. `--debug` adds the Python traceback.
"""

import argparse
import errno
import gc
import os
import pathlib
import signal
import sys
import traceback

from .._validation import ArgumentError
from .config import ConfigError, load_config
from .store import (
    Terminated,
    UserError,
    WriteError,
    interrupt_guard,
    read_config_text,
    read_json,
)

# Errors only a write gets (a full disk or quota, a read-only file system, a name or file too
# long): the user's to fix, wherever they surface.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG)


def _version() -> str:
    from .. import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: keeps `conservation --debug run`
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error")
    common.add_argument("--no-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (default: on, in "
                             "$CONSERVATION_CACHE_DIR or ~/.cache/conservation/jax; "
                             "CONSERVATION_NO_CACHE=1 also turns it off)")
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
    sweep.add_argument("--force", action="store_true",
                       help="replace the results of a different sweep in the output folder")
    jobs = sweep.add_argument_group(
        "independent workers", "any number of processes, started at any time (a SLURM "
        "array, submitit, a shell loop), on one shared --out: each claims the points it "
        "computes (claims/ in the folder), a killed one loses only its claimed points, and "
        "the last to finish writes the summary")
    jobs.add_argument("--worker", action="store_true",
                      help="compute pending points until none is left unclaimed")
    jobs.add_argument("--shard", nargs="?", const="", metavar="I/N",
                      help="compute only points I, I+N, I+2N, … (claimed like --worker); "
                           "without I/N, read SLURM_ARRAY_TASK_ID and the array's size")
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
    """The `conservation` command; returns the exit status. `argv=None` (the command itself)
    also makes the exiting process ignore a second Ctrl-C / SIGTERM after the first was
    handled (JAX's exit handlers would print a traceback), and freezes the process's objects
    for the garbage collector once done; a call with `argv` leaves the caller's signal
    handlers and collector alone."""
    try:
        return _command(argv)
    finally:
        if argv is None:
            # The process ends now: the interpreter's last collections need not walk every
            # object the run made (the results are written; nothing is left to free in time
            # to matter), which is most of a warm run's exit.
            gc.freeze()


def _command(argv: list[str] | None) -> int:
    program = argv is None
    args = _parser().parse_args(argv)
    if not getattr(args, "no_cache", False):
        _compilation_cache()
    where: dict = {}
    try:
        with interrupt_guard():
            return _dispatch(args, where)
    except KeyboardInterrupt as e:
        if program:
            _ignore_signals()
        if args.debug:
            traceback.print_exc()
        saved = f"; finished results are saved in {where['out']}/" if "out" in where else ""
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        _say(f"conservation: {what}{saved}; rerun the same command to resume")
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except BrokenPipeError:  # `conservation run | head`: the reader left; end quietly
        _silence_closed_streams()
        return 128 + signal.SIGPIPE
    except (ArgumentError, UserError) as e:
        if args.debug:
            traceback.print_exc()
        kind = "config error" if isinstance(e, ConfigError) else "error"
        _say(f"conservation: {kind}: {_one_line(e)}")
        return 2
    except Exception as e:  # noqa: BLE001 — the last resort: one line, not a traceback
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS and e.filename:
            # A file system refusing a write we did not wrap (a folder, the lock): the disk's
            # fault, which the user can fix.
            if args.debug:
                traceback.print_exc()
            _say(f"conservation: error: {_one_line(WriteError(e.filename, e))}")
            return 2
        if args.debug:
            traceback.print_exc()
            hint = ""
        else:
            hint = " (rerun with --debug for the traceback)"
        _say(f"conservation: internal error: {type(e).__name__}: {_one_line(e)}{hint}")
        return 1


def _say(line: str) -> None:
    """One line to stderr; nothing if stderr is closed (`2>&1 | head`)."""
    try:
        print(line, file=sys.stderr)
    except (BrokenPipeError, ValueError):
        _silence_closed_streams()


def _ignore_signals() -> None:
    """The process is exiting after an interrupt: a second Ctrl-C (or SIGTERM) would only
    raise inside JAX's atexit clean-up and print its traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _silence_closed_streams() -> None:
    """Point stdout/stderr at /dev/null where the reader has gone, so that Python's final
    flush does not print "Exception ignored … BrokenPipeError"."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)
            except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
                pass
        except OSError:
            pass


def _compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default for the command: a second run of a
    config loads its compiled programs instead of compiling them (a cached program is the
    same executable, so the numbers are the same bit for bit). An unusable cache folder
    costs only the speed-up."""
    from .._cache import enable_compilation_cache

    try:
        enable_compilation_cache()
    except ArgumentError as e:
        _say(f"conservation: note: running without the compilation cache: {_one_line(e)}")


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


def _shard(args) -> tuple[int, int] | None:
    """`--shard I/N` as (I, N); bare `--shard` from SLURM's array variables; checked before
    any compute, like the flags it cannot combine with."""
    from .sweep import parse_shard, slurm_shard

    distributed = args.distributed or args.coordinator is not None
    if distributed and (args.worker or args.shard is not None):
        flag = "--worker" if args.worker else "--shard"
        raise UserError(f"`{flag}` runs independent processes and `--distributed` one JAX "
                        "distributed run; give one of them.")
    if args.shard is None:
        return None
    return slurm_shard() if args.shard == "" else parse_shard(args.shard)


def _dispatch(args, where) -> int:
    shard = None
    if args.command == "sweep":
        shard = _shard(args)
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

        summary = run_sweep(config, out_dir=out, progress=progress, log=log, force=args.force,
                            worker=args.worker, shard=shard)
        if summary.get("summary_written", True):
            print(f"{summary['finished']}/{summary['points']} points in {out}/ "
                  f"({summary['computed']} computed now; sweep.json, points/, summary.csv, "
                  "report.png)")
        else:
            print(f"{summary['finished']}/{summary['points']} points in {out}/ "
                  f"({summary['computed']} computed now; the last worker to finish writes "
                  f"summary.csv and report.png, or run `conservation report {out}`)")
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
        print(format_summary(read_json(
            folder / "summary.json", fix="rerun `conservation run` with its config and the "
            "same `--out` to rewrite it")))
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
