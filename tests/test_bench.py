"""The benchmark harness: timers, ceilings arithmetic, records, ratios, the table, inputs, and a tiny --quick run."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time

import pytest
import torch

from spectralkern.bench import main
from spectralkern.bench.case import Case, Prepared, Provider
from spectralkern.bench.ceilings import Ceilings
from spectralkern.bench.inputs import ragged_block_ptr, random_basis, uniform_block_ptr
from spectralkern.bench.records import REQUIRED_KEYS, Record, environment, read_records
from spectralkern.bench.runner import peer_ratios, relative_error, run_case
from spectralkern.bench.table import format_table
from spectralkern.bench.timers import TimerBudget, time_cpu, time_cpu_interleaved, time_fn


def _record(**overrides) -> Record:
    env = dataclasses.asdict(environment(torch.device("cpu")))
    values = dict(op="spectral_filter", case="uniform-N8-d4-b4-k2", layout="uniform",
                  shape={"N": 8, "d": 4, "k": 2, "blocks": 2, "block_size": "4", "passthrough": 0.0},
                  dtype="float32", provider="spectralkern", backend="torch", median_ms=2.0, p20_ms=1.5, p80_ms=2.5,
                  timer="test", bytes=320, gbps=1.6e-4, copy_gbps=10.0, pct_copy=1.6e-3, flops=256, tflops=1.3e-10,
                  matmul_tflops=0.05, matmul_peak="fp32 measured", pct_matmul=2.6e-7,
                  ratios={"torch_loop": 3.0}, rel_err=1e-7, peak_mem_bytes=1024, peak_mem_kind="cpu_process_max_rss",
                  quick=True, run_id="run", timestamp="2026-01-01T00:00:00+00:00", **env)
    values.update(overrides)
    return Record(**values)


def test_cpu_timer_quantiles_are_ordered_and_sane():
    timing = time_cpu(lambda: time.sleep(0.002), TimerBudget(warmup_ms=5, rep_ms=40, min_reps=5))
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert 2.0 <= timing.median_ms < 50.0  # slept 2 ms; a loaded CI machine may add some
    assert "median of" in timing.method


def test_cpu_timer_honours_min_reps_and_max_reps():
    calls = []
    time_cpu(lambda: calls.append(1), TimerBudget(warmup_ms=0, rep_ms=0, min_reps=7, max_reps=50))
    assert len(calls) == 1 + 7  # one warm-up call, then exactly min_reps when the time budget is already spent
    calls.clear()
    time_cpu(lambda: calls.append(1), TimerBudget(warmup_ms=0, rep_ms=10_000, min_reps=1, max_reps=20))
    assert len(calls) == 1 + 20


def test_interleaved_timer_calls_in_turn_and_times_each():
    order = []
    fns = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.002))}
    timings = time_cpu_interleaved(fns, TimerBudget(warmup_ms=0, rep_ms=0, min_reps=6, max_reps=50))
    measured = order[2:]  # one warm-up call each, first
    assert measured == ["fast", "slow"] * 6  # A B A B …: drift of the machine's load hits both alike
    assert timings["slow"].median_ms >= 2.0 > timings["fast"].median_ms
    assert "interleaved with 1 other" in timings["fast"].method


def test_time_fn_rejects_devices_without_a_timer():
    with pytest.raises(ValueError, match="no timer for device type 'meta'"):
        time_fn(lambda: None, torch.device("meta"))


def test_record_round_trips_through_json_with_every_required_key():
    record = _record()
    line = record.to_json()
    data = json.loads(line)
    assert set(data) == set(REQUIRED_KEYS)
    assert all(data[key] is not None for key in REQUIRED_KEYS)
    assert Record.from_json(line) == record


def test_record_from_json_names_missing_fields():
    data = json.loads(_record().to_json())
    data["median_ms"] = None
    del data["git_sha"]
    with pytest.raises(ValueError, match=r"\['median_ms', 'git_sha'\]|\['git_sha', 'median_ms'\]"):
        Record.from_json(json.dumps(data))


def test_peer_ratios_on_hand_made_medians():
    ratios = peer_ratios({"spectralkern": 2.0, "torch_loop": 6.0, "torch_bmm": 3.0})
    assert ratios["spectralkern"] == {"torch_loop": 3.0, "torch_bmm": 1.5}
    assert ratios["torch_loop"] == pytest.approx({"spectralkern": 1 / 3, "torch_bmm": 0.5})
    assert ratios["torch_bmm"] == pytest.approx({"spectralkern": 2 / 3, "torch_loop": 2.0})
    assert peer_ratios({"only": 1.0}) == {"only": {}}


def test_matmul_ceiling_kinds():
    gpu = Ceilings("cuda", 3000.0, 2**30, {"tf32": 480.0, "bf16": 800.0})
    assert gpu.matmul_rate("tf32x3") == (160.0, "tf32 measured / 3 (tf32x3)")
    assert gpu.matmul_rate("bf16") == (800.0, "bf16 measured")
    with pytest.raises(KeyError, match="was not measured"):
        gpu.matmul_rate("fp32")
    cpu = Ceilings("cpu", 10.0, 2**26, {"fp32": 0.04})
    assert cpu.matmul_rate("tf32x3") == (0.04, "fp32 measured")  # no TF32 units on a CPU: plain fp32 runs
    with pytest.raises(ValueError, match="unknown matmul kind 'int4'"):
        cpu.matmul_rate("int4")


def test_relative_error():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_error(torch.tensor([3.0, 4.0]), ref) == 0.0
    assert relative_error(torch.tensor([3.0, 3.0]), ref) == pytest.approx(0.2)
    assert relative_error(torch.tensor([1.0]), ref) == float("inf")
    assert math.isnan(relative_error(torch.tensor([float("nan"), 4.0]), ref))  # and nan <= tol is False


def test_ragged_block_ptr_covers_n_with_sizes_in_range(seed):
    gen = torch.Generator().manual_seed(seed)
    for n, max_size in [(1, 1), (37, 5), (11008, 512)]:
        ptr = ragged_block_ptr(n, max_size, gen)
        sizes = ptr.diff()
        assert int(ptr[0]) == 0 and int(ptr[-1]) == n
        assert int(sizes.min()) >= 1 and int(sizes.max()) <= max_size
    assert uniform_block_ptr(10, 4).tolist() == [0, 4, 8, 10]


@pytest.mark.parametrize("block_ptr, k", [([0, 4, 8], 2), ([0, 3, 3, 10, 11], 4), ([0, 5], 8)])
def test_random_basis_is_orthonormal_per_block_and_packed(seed, block_ptr, k):
    ptr = torch.tensor(block_ptr)
    basis = random_basis(ptr, k, dtype=torch.float64, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(seed))
    assert basis.U.shape == (block_ptr[-1], k) and basis.eigenvalues.shape == (len(block_ptr) - 1, k)
    for b in range(basis.num_blocks):
        start, stop = block_ptr[b], block_ptr[b + 1]
        kb = min(k, stop - start)
        U_b = basis.U[start:stop]
        # built in fp32, then cast
        torch.testing.assert_close(U_b[:, :kb].T @ U_b[:, :kb], torch.eye(kb, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert bool((U_b[:, kb:] == 0).all()) and bool((basis.eigenvalues[b, kb:] == 0).all())
        values = basis.eigenvalues[b, :kb]
        assert bool((values[1:] >= values[:-1]).all()) and bool(((values >= 0) & (values < 2)).all())


def _tiny_case(providers: list[Provider], reference: torch.Tensor) -> Case:
    return Case(op="toy", name="toy-case", layout="uniform", dtype=torch.float32, shape={"N": 2}, bytes=16,
                flops=4, compute_kind="fp32",
                prepare=lambda device: Prepared(providers=providers, reference=reference, tolerance=1e-6))


def test_run_case_drops_wrong_providers_and_computes_ratios():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    good = Provider("spectralkern", "torch", lambda: torch.tensor([1.0, 2.0]))
    wrong = Provider("torch_loop", "torch", lambda: torch.tensor([1.0, 2.5]))
    also_good = Provider("torch_bmm", "torch", lambda: torch.tensor([1.0, 2.0]))
    ceilings = Ceilings("cpu", 10.0, 2**20, {"fp32": 0.05})
    records, failures = run_case(_tiny_case([good, wrong, also_good], ref), torch.device("cpu"),
                                 TimerBudget(warmup_ms=1, rep_ms=5), ceilings, environment(torch.device("cpu")),
                                 "run", True, None)
    assert [r.provider for r in records] == ["spectralkern", "torch_bmm"]
    assert len(failures) == 1 and "torch_loop" in failures[0] and "wrong answer" in failures[0]
    sk, bmm = records
    assert sk.ratios == {"torch_bmm": pytest.approx(bmm.median_ms / sk.median_ms)}
    assert sk.gbps == pytest.approx(16 / (sk.median_ms * 1e-3) / 1e9)
    assert sk.pct_copy == pytest.approx(100 * sk.gbps / 10.0)


def test_table_shows_a_ratio_column_per_peer():
    rows = [_record(provider="spectralkern", backend="triton", median_ms=1.0, ratios={"torch_loop": 3.0}),
            _record(provider="torch_loop", backend="torch", median_ms=3.0, ratios={"spectralkern": 1 / 3})]
    text = format_table(rows)
    assert "vs spectralkern" in text and "vs torch_loop" in text
    assert "spectralkern[triton]" in text and "3.00x" in text and "0.33x" in text


def test_quick_run_writes_complete_records(tmp_path, capsys):
    status = main(["--quick", "--max-cases", "1", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    records = read_records(tmp_path / "spectral_filter.jsonl")  # raises if a required field is missing or None
    by_provider = {r.provider: r for r in records}
    assert set(by_provider) == {"spectralkern", "torch_loop", "torch_bmm"}  # torch_compile is left out on CPU
    assert "torch_compile: not run" in out
    sk = by_provider["spectralkern"]
    assert sk.backend in ("triton", "torch")
    for peer in ("torch_loop", "torch_bmm"):
        assert sk.ratios[peer] == pytest.approx(by_provider[peer].median_ms / sk.median_ms)
    for r in records:
        assert r.quick and r.device_type == "cpu" and r.dtype == "float32"
        assert r.p20_ms <= r.median_ms <= r.p80_ms and r.gbps > 0 and r.rel_err < 1e-4
        assert r.bytes == (2 * 512 * 256 + 512 * 8) * 4
    assert (tmp_path / "spectral_filter.png").stat().st_size > 0
    assert len((tmp_path / "ceilings.jsonl").read_text().splitlines()) == 1
    assert "vs torch_bmm" in out
    # every provider a case timed or skipped is declared in its module's PROVIDERS (what --providers is checked by)
    from spectralkern.bench import cases as case_modules
    for op in case_modules.OPS:
        declared = set(case_modules.load(op).PROVIDERS)
        timed = {r.provider for r in read_records(tmp_path / f"{op}.jsonl")} if (tmp_path / f"{op}.jsonl").exists() \
            else set()
        assert timed <= declared, (op, timed - declared)
    skipped = set(re.findall(r"^  (\S+): not run", out, re.M))
    assert skipped <= {name for op in case_modules.OPS for name in case_modules.load(op).PROVIDERS}, skipped


def test_every_op_declares_its_provider_names_without_preparing_a_case():
    from spectralkern.bench import cases as case_modules
    for op in case_modules.OPS:
        declared = case_modules.load(op).PROVIDERS
        assert isinstance(declared, tuple) and declared and all(isinstance(n, str) for n in declared), (op, declared)
        assert len(set(declared)) == len(declared), op
