"""Logging: the library installs no handler (a NullHandler only), the command line configures one, and a filter
build logs what the user waits on at INFO when asked."""
from __future__ import annotations

import io
import logging
import re

import pytest
import torch

import spectralkern as sk
from spectralkern import _logging
from spectralkern.cli import main


class TwoAttentionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"query": torch.nn.Linear(32, 48), "value": torch.nn.Linear(32, 48)}) for _ in range(2))


def test_the_library_installs_only_a_null_handler(capfd):
    handlers = logging.getLogger("spectralkern").handlers
    assert handlers and all(isinstance(h, logging.NullHandler) for h in handlers)
    logging.getLogger("spectralkern.optim").warning("a warning nobody asked to see")
    sk.SpectralGradientFilter(TwoAttentionLayers(), target_modules=["query"], block_size=16, k=4)
    assert capfd.readouterr().err == ""  # no handler of ours, and logging's last-resort handler is not used


@pytest.mark.parametrize(("log_level", "verbose", "expected"), [
    (None, 0, logging.WARNING), (None, 1, logging.INFO), (None, 2, logging.DEBUG), (None, 5, logging.DEBUG),
    ("info", 0, logging.INFO), ("ERROR", 2, logging.ERROR)])
def test_level_from_flags(log_level, verbose, expected):
    assert _logging.level_from_flags(log_level, verbose) == expected


def test_level_from_flags_rejects_a_bad_level():
    with pytest.raises(ValueError, match="log level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"):
        _logging.level_from_flags("LOUD", 0)


def test_configure_replaces_its_own_handler(clean_logger):
    first, second = io.StringIO(), io.StringIO()
    _logging.configure(logging.INFO, first)
    _logging.configure(logging.DEBUG, second)
    logging.getLogger("spectralkern.eigen").debug("solved %d blocks", 3)
    assert first.getvalue() == "" and re.search(r"DEBUG spectralkern\.eigen: solved 3 blocks$", second.getvalue())
    assert clean_logger.level == logging.DEBUG
    assert sum(h.get_name() == "spectralkern-cli" for h in clean_logger.handlers) == 1
    assert all(h.get_name() != "spectralkern-cli" for h in logging.getLogger().handlers)  # root left alone


def test_cli_verbose_flag_sends_info_lines_to_stderr(capsys, clean_logger):
    log = logging.getLogger("spectralkern.optim")
    assert main(["info"]) == 0
    log.info("built 4 targets in %.1f s", 0.25)
    assert "built 4 targets" not in capsys.readouterr().err  # default: WARNING and above
    assert main(["-v", "info"]) == 0
    log.info("built 4 targets in %.1f s", 0.25)
    assert re.search(r"^\d\d:\d\d:\d\d INFO spectralkern\.optim: built 4 targets in 0\.2 s$", capsys.readouterr().err,
                     re.M)


def test_cli_rejects_a_bad_log_level(capsys, clean_logger):
    with pytest.raises(SystemExit):
        main(["--log-level", "LOUD", "info"])
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def test_a_filter_build_logs_each_target_with_its_time_and_backend_when_asked(caplog):
    model = TwoAttentionLayers()
    with caplog.at_level(logging.INFO, logger="spectralkern"):
        filt = sk.SpectralGradientFilter(model, target_modules=["query", "value"], block_size=16, k=4)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("spectralkern") and r.levelno == logging.INFO]
    targets = [name for name, _ in filt.targets]
    assert len(targets) == 4
    for name in targets:
        mine = [line for line in lines if name in line]
        assert mine, (name, lines)
        assert any(re.search(r"\d(\.\d+)?\s*(ms|s)\b", line) for line in mine), mine  # the elapsed time
        assert any(re.search(r"eigensolver \w+", line) for line in mine), mine          # and the backend
