"""Shared test helpers, and one thread per test process when the suite runs in parallel (pytest -n 2)."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, and in every process they start
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import ddpo  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def main_error(capsys):
    """main_error(*argv, entry=ddpo.main): runs a command's main in this process and returns its error line, after
    checking what a user sees: a non-zero exit, one line that starts with "error:", and nothing else on stderr (no
    traceback, no library warning). In-process, as a subprocess per case would spend most of its time importing torch."""
    def run(*argv, entry=None):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            (entry or ddpo.main)(list(argv))
        line = str(stop.value.code)
        assert stop.value.code not in (None, 0) and line.startswith("error: ") and "\n" not in line, line
        assert capsys.readouterr().err.strip() == "", "something besides the error line went to stderr"
        return line
    return run


def pytest_collection_modifyitems(items):
    """The torchrun tests first (stable sort): under pytest -n 2 their xdist group, the longest chain of the suite
    (one launch, then the two failure launches), starts at once on one worker while the other takes the rest."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
