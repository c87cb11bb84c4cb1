"""The command line validates every argument when it parses it: one line, exit code 2, before any work."""
from __future__ import annotations

import pytest

from spectralkern.cli import main


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("argv, fragment", [
    (["--k", "0"], "argument --k: expected a positive integer, got '0'"),
    (["--block-size", "-1"], "argument --block-size: expected a positive integer"),
    (["--lr", "nan"], "argument --lr: expected a finite number"),
    (["--heat", "-2"], "argument --heat: expected a finite number >= 0"),
    (["--knn", "0"], "argument --knn: expected a positive integer"),
    (["--reg-weight", "-1"], "argument --reg-weight: expected a finite number >= 0"),
    (["--fractions", "0.5,1.5"], "argument --fractions: fractions must lie in (0, 1], got 1.5"),
    (["--fractions", "0.5,nan"], "argument --fractions: fractions must lie in (0, 1], got nan"),
    (["--device", "meta"], "argument --device: expected cpu or cuda[:N]"),
    (["--device", "bogus"], "argument --device: expected a device such as cpu"),
    (["--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
])
def test_demo_rejects_bad_arguments_in_one_line(capsys, argv, fragment):
    line = _error_line(capsys, ["demo", "--methods", "full,lora,spectral", *argv])
    assert fragment in line


def test_demo_data_dir_is_checked_before_any_work(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "needs >= 2 class sub-folders" in _error_line(capsys, ["demo", "--data-dir", str(empty)])
    for name, docs in (("a", 2), ("b", 1)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(docs):
            (tmp_path / "data" / name / f"{i}.txt").write_text("words")
    line = _error_line(capsys, ["demo", "--data-dir", str(tmp_path / "data")])
    assert "(found a: 2, b: 1)" in line                       # one usable class
    (tmp_path / "data" / "c").mkdir()
    for i in range(2):
        (tmp_path / "data" / "c" / f"{i}.txt").write_text("words")
    line = _error_line(capsys, ["demo", "--data-dir", str(tmp_path / "data")])
    assert "class folder(s) b hold fewer than 2 .txt documents" in line
    assert "is not a folder" in _error_line(capsys, ["demo", "--data-dir", str(tmp_path / "missing")])


@pytest.mark.parametrize("device", ["bogus", "meta"])
def test_bench_rejects_a_bad_device_in_one_line(capsys, device):
    assert "argument --device" in _error_line(capsys, ["bench", "--device", device])


def test_bench_rejects_an_unknown_provider_before_any_work(capsys, monkeypatch):
    from spectralkern.bench import runner

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --providers was checked")
    monkeypatch.setattr(runner, "measure_ceilings", no_work)
    monkeypatch.setattr(runner, "run_case", no_work)
    monkeypatch.setattr("spectralkern.bench.cases.load", lambda op, _load=runner.case_modules.load: _Unprepared(
        _load(op)))
    line = _error_line(capsys, ["bench", "--device", "cpu", "--providers", "nope", "torch_loop"])
    assert "argument --providers: no case of" in line and "provider called nope (known:" in line


class _Unprepared:
    """A case module whose cases may not be built: only its static declarations can be read."""

    def __init__(self, module):
        self.OP, self.PROVIDERS = module.OP, module.PROVIDERS

    def cases(self, *args, **kwargs):
        raise AssertionError("a case was built before --providers was checked")
