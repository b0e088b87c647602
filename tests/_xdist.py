"""pytest-xdist's `--dist loadfile` without its hang after a crashed worker, and with one more
try for the test a worker died in.

When a worker dies (a segfault or an abort inside a compiled library), xdist 3.8 puts the
worker's whole workload back on the queue, finished files included. A finished file is then
handed to the replacement worker as an empty list of tests, which the worker waits on for
ever, and the run never ends (pytest-xdist issues 784, 1323; fixes 1324, 1328 and 1371 are
unreleased). And the replacement gets one file: a file of one test waits for ever too, since a
worker holds its last test until more work or the shutdown arrives.

Here only files with tests still to run go back on the queue, and the replacement starts as
the first workers did, with two files or the shutdown. The test the worker died in runs once
more: its first crash is reported as a rerun (`R`, counted as "rerun" in the summary line and
named with its worker in the terminal summary), the second fails. XLA once aborted a worker
here while serialising a program for the persistent compilation cache, a call no test of this
project controls; a test that crashes every time still fails.

Nothing here imports JAX: `tests/test_readme.py` runs it in a small pytest project of its own.
"""

import collections

import pytest
from xdist.scheduler import LoadFileScheduling

RERUN = "rerun"


class CrashSafeLoadFileScheduling(LoadFileScheduling):
    """`--dist loadfile` whose crashed worker's files go on in the others (see above)."""

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.crashes: collections.Counter = collections.Counter()  # node id → crashes

    def remove_node(self, node):
        workload = self.assigned_work.pop(node)
        if not self._pending_of(workload):
            return None
        # The worker runs its tests in order: the first one not completed is the one it died in.
        scope, crashed = next((scope, nodeid) for scope, unit in workload.items()
                              for nodeid, completed in unit.items() if not completed)
        self.crashes[crashed] += 1
        if self.crashes[crashed] > 1:
            workload[scope][crashed] = True  # reported failed by xdist: not run a third time
        for scope, unit in workload.items():
            if not all(unit.values()):
                self.workqueue[scope] = unit
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def schedule(self):
        if self.collection is None:
            return super().schedule()
        # A replacement worker: give it two units, as xdist does at the start (its issue 277).
        # A worker keeps its last test until more work or the shutdown arrives (it needs the
        # next test to tear fixtures down), so one unit of one test would wait for ever.
        for node in self.nodes:
            self._reschedule(node)
            self._reschedule(node)  # a second unit, or the shutdown when none is left


def pytest_xdist_make_scheduler(config, log):
    """The crash-safe scheduler for `--dist loadfile`; xdist's own (None) for other modes.
    `tests/conftest.py` registers this module as a plugin where xdist is installed."""
    if config.getvalue("dist") == "loadfile":
        return CrashSafeLoadFileScheduling(config, log)
    return None


def pytest_handlecrashitem(crashitem, report, sched):
    # The first crash of a test: it was put back on the queue (`remove_node`), and reported
    # as a rerun, not a failure.
    if isinstance(sched, CrashSafeLoadFileScheduling) and sched.crashes[crashitem] == 1:
        report.outcome = RERUN


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report):
    if report.outcome == RERUN:
        return RERUN, "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    reruns = terminalreporter.stats.get(RERUN, [])
    if reruns:
        terminalreporter.section("tests run again after their worker crashed", yellow=True)
        for report in reruns:
            terminalreporter.line(f"{report.nodeid}: {report.longrepr}")
