"""`spectralkern bench --plan`: the static roofline of every case, printed without a GPU, and measured / predicted
once records of a GPU run exist."""
from __future__ import annotations

import dataclasses
import typing

import torch

from spectralkern.bench import cases as case_modules
from spectralkern.bench import main as bench_main
from spectralkern.bench.plan import H100, plan_rows
from spectralkern.bench.records import Record, append_records


def test_plan_prints_every_case_of_every_op(capsys, tmp_path):
    assert bench_main(["--plan", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for op in case_modules.OPS:
        for case in case_modules.load(op).cases(torch.device("cuda"), False):
            assert case.name in out
    assert "static roofline at H100" in out


def test_backend_column_is_the_registrys_gpu_choice():
    rows = {(row.op, row.dtype): row.backend for row in plan_rows(["spectral_filter", "smoa", "coeff_attention"])}
    assert rows[("spectral_filter", "float32")] == "cuda"  # k ≤ 128: the compiled extension
    assert rows[("smoa", "bfloat16")] == "triton" and rows[("coeff_attention", "bfloat16")] == "triton"


def test_prediction_is_the_larger_floor():
    (row, *_) = plan_rows(["spectral_filter"])
    case = case_modules.load("spectral_filter").cases(torch.device("cuda"), False)[0]
    assert row.bytes_us == case.bytes / 3.0e12 * 1e6
    assert row.flops_us == case.flops / (H100.tflops[case.compute_kind] * 1e12) * 1e6
    assert row.predicted_us == max(row.bytes_us, row.flops_us) and row.measured_us is None


def _record(**values) -> Record:
    """A record with every field filled (the ones given, neutral values for the rest)."""
    hints = typing.get_type_hints(Record)
    neutral = {int: 0, float: 0.0, str: "", bool: False}
    fields = {f.name: values.get(f.name, neutral.get(hints[f.name], {})) for f in dataclasses.fields(Record)}
    return Record(**fields)


def test_gpu_records_add_measured_over_predicted(tmp_path, capsys):
    case = case_modules.load("spectral_filter").cases(torch.device("cuda"), False)[0]
    predicted = max(case.bytes / 3.0e12, case.flops / (H100.tflops[case.compute_kind] * 1e12)) * 1e3  # ms
    append_records(tmp_path / "spectral_filter.jsonl", [
        _record(op="spectral_filter", case=case.name, dtype=case.dtype_name, provider="spectralkern",
                device="NVIDIA H100 80GB HBM3", median_ms=2 * predicted),
        _record(op="spectral_filter", case=case.name, dtype=case.dtype_name, provider="torch_bmm",
                device="NVIDIA H100 80GB HBM3", median_ms=9 * predicted)])
    rows = plan_rows(["spectral_filter"], H100, tmp_path)
    assert abs(rows[0].measured_us / rows[0].predicted_us - 2.0) < 1e-9
    assert all(row.measured_us is None for row in rows[1:])
    assert bench_main(["--plan", "--ops", "spectral_filter", "--out", str(tmp_path)]) == 0
    assert "     2.00" in capsys.readouterr().out
