"""pytest wiring: MicroPython test files (tests/firmware/mptest_*.py) become one pytest
item per test function per target, e.g. `mptest_framing.py::test_crc16[qemu]`; a
failure shows MicroPython's own traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import mptest  # noqa: E402


def pytest_collect_file(parent, file_path: Path):
    if file_path.suffix == ".py" and file_path.name.startswith("mptest_"):
        return MicroPythonFile.from_parent(parent, path=file_path)
    return None


def pytest_pycollect_makemodule(module_path: Path, parent):
    # A firmware test named on the command line must not also be imported by CPython.
    if module_path.name.startswith("mptest_"):
        return NothingToCollect.from_parent(parent, path=module_path)
    return None


class NothingToCollect(pytest.File):
    def collect(self):
        return []


class MicroPythonFile(pytest.File):
    def collect(self):
        spec = mptest.parse_spec(self.path)
        self._spec = spec
        self._results: dict[str, mptest.FileResult] = {}
        for target in mptest.ALL_TARGETS:
            for name in spec.test_names:
                item = MicroPythonItem.from_parent(self, name=f"{name}[{target}]")
                item.test_name, item.target = name, target
                item.add_marker(getattr(pytest.mark, target))
                if target not in spec.targets:
                    item.add_marker(pytest.mark.skip(reason=spec.targets_reason))
                yield item

    def result_for(self, target: str) -> mptest.FileResult:
        if target not in self._results:
            self._results[target] = mptest.run_file(self._spec, target)
        return self._results[target]


class MicroPythonFailure(Exception):
    pass


class MicroPythonItem(pytest.Item):
    test_name: str
    target: str

    def runtest(self):
        result = self.parent.result_for(self.target)
        outcome = result.outcomes.get(self.test_name)
        if outcome is None:
            raise MicroPythonFailure(result.fatal or "test did not run")
        status, text = outcome
        if status != "pass":
            raise MicroPythonFailure(text)
        if text:  # what a passing test printed (measured figures): shown with -s
            print(f"\n{self.name}: {text}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MicroPythonFailure):
            return f"MicroPython ({self.target}) {self.test_name}:\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, self.parent._spec.test_lines[self.test_name], self.name
