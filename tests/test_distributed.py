"""Distributed training on the CPU (gloo, 2 processes, loopback): FSDP2 and DDP training with SpectralAdamW and
the regulariser equals one-process training, checkpoints reshard 2 → 1 and 1 → 2, straddling blocks raise.

Process start and gloo set-up cost seconds, so one spawned 2-rank run does every multi-process check and hands its
results to the parent, which runs the one-process references and compares. Every wait is bounded: the process
group's timeout fails a hung collective, and the parent kills the workers past ``_SPAWN_TIMEOUT_S``.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import spectralkern as sk
from spectralkern.distributed import (StraddlingBlockError, aligned_block_ptr, check_block_alignment,
                                      local_block_ptr, row_shard, shard_bounds, sharded_laplacian_quadratic)
from spectralkern.optim.checkpoint import load_checkpoint, save_checkpoint

WORLD = 2
STEPS = 10
BLOCK, K = 8, 4
_SPAWN_TIMEOUT_S = 150
_COLLECTIVE_TIMEOUT_S = 60

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")]


# ------------------------------------------------------------------------------------------ the training problem
def make_model() -> nn.Sequential:
    """Targets '0' (32 × 12: shards 16 + 16) and '2' (33 × 32: uneven shards 17 + 16, blocks cut at row 17)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 33), nn.Tanh(), nn.Linear(33, 5))


def make_filter(model: nn.Module, **kwargs) -> sk.SpectralGradientFilter:
    options = dict(block_size=BLOCK, k=K, knn=3, reg_weight=0.1, refresh_every=4)
    return sk.SpectralGradientFilter(model, ["0", "2"], **(options | kwargs))


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Step's global batch of 16 samples; rank r of W gets rows r·16/W:(r+1)·16/W (an equal share, so FSDP's and
    DDP's gradient average is the global mean)."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 12, generator=gen), torch.randn(16, 5, generator=gen)
    share = 16 // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def train(model: nn.Module, filt: sk.SpectralGradientFilter, opt: torch.optim.Optimizer, steps: range,
          rank: int = 0, world: int = 1) -> None:
    for step in steps:
        x, y = batch(step, rank, world)
        loss = nn.functional.mse_loss(model(x), y) + filt.regularization()
        loss.backward()
        if not isinstance(opt, sk.SpectralAdamW):
            filt.step()  # hook mode: filtered already; counts the step and refreshes
        opt.step()
        opt.zero_grad()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = "module."  # DDP's wrapper
    return {name.removeprefix(prefix): full(p.detach()) for name, p in model.named_parameters()}


def moments_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): full(opt.state[p]["exp_avg_sq"]) for name, p in model.named_parameters()}


def projectors_of(filt: sk.SpectralGradientFilter) -> dict[str, torch.Tensor]:
    """U diag(g) Uᵀ of every block, as a dense (N_r × N_r) matrix of this rank's rows (sign/rotation-free)."""
    out = {}
    for name, basis in filt.bases().items():
        target = next(t for t in filt.filter_targets if t.name == name)
        out[name] = sk.spectral_filter(torch.eye(basis.num_nodes), basis, target.gains)
    return out


def assert_close_rel(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5,
                     what: str = "") -> None:
    assert sorted(actual) == sorted(expected), what
    for name in expected:
        err = float((actual[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-30))
        assert err <= rtol, f"{what} {name}: relative error {err:.2e} > {rtol:.0e}"


# ------------------------------------------------------------------------------------------ the 2-rank worker
def _worker(rank: int, world: int, port: int, workdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S))
    mesh = init_device_mesh("cpu", (world,))

    def fsdp_setup() -> tuple[nn.Module, sk.SpectralGradientFilter, sk.SpectralAdamW]:
        model = make_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        filt = make_filter(model)  # after fully_shard: it must hold the sharded parameters
        return model, filt, sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)

    results: dict = {}
    try:
        # FSDP2: 10 steps, then the regulariser's value and a checkpoint for the 2 → 1 check.
        model, filt, opt = fsdp_setup()
        results["layout"] = {name: (t.shard.start, t.shard.stop, t.graph.block_ptr.tolist())
                             for name, t in ((t.name, t) for t in filt.filter_targets)}
        train(model, filt, opt, range(STEPS), rank, world)
        results["fsdp_params"] = params_of(model)
        results["fsdp_moments"] = moments_of(model, opt)
        results["fsdp_reg"] = filt.regularization().item()
        results["fsdp_projectors"] = projectors_of(filt)
        save_checkpoint(os.path.join(workdir, "ckpt_2ranks"), model, opt, filt)
        results["errors"] = _fsdp2_errors(model, filt, rank, world)
        results["zero_task"] = zero_task_step(model, filt, opt, rank, world)

        # FSDP2, hook mode (filtered after the reduce-scatter) with torch's AdamW; filt.step() adds the
        # regulariser's gradient.
        model = make_model()
        fully_shard(model, mesh=mesh)
        filt = make_filter(model, hook=True)
        train(model, filt, torch.optim.AdamW(model.parameters(), lr=1e-2), range(STEPS), rank, world)
        results["fsdp_hook_params"] = params_of(model)

        # 1 → 2: resume the one-process checkpoint taken after 5 steps, train the other 5 on 2 ranks.
        model, filt, opt = fsdp_setup()
        load_checkpoint(os.path.join(workdir, "ckpt_1rank_step5"), model, opt, filt)
        results["resumed_steps"] = filt.steps
        train(model, filt, opt, range(5, STEPS), rank, world)
        results["resumed_params"] = params_of(model)

        # A one-process checkpoint whose blocks straddle the 2-rank boundary (row 17 of '2.weight').
        model, filt, opt = fsdp_setup()
        try:
            load_checkpoint(os.path.join(workdir, "ckpt_1rank_unaligned"), model, opt, filt)
            results["straddle_error"] = None
        except StraddlingBlockError as error:
            results["straddle_error"] = str(error)

        # DDP: replicated gradients, every rank filters every block (the same layout as the 2-rank FSDP2 run).
        model = DistributedDataParallel(make_model())
        filt = make_filter(model.module, align_shards=(world,))
        opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)
        train(model, filt, opt, range(STEPS), rank, world)
        results["ddp_params"] = params_of(model)
        results["ddp_reg"] = filt.regularization().item()
        results["ddp_zero_task"] = zero_task_step(model, filt, opt, rank, world)
        results["sharded_quadratic"] = _sharded_quadratic(mesh, rank)
        if rank == 0:
            torch.save(results, os.path.join(workdir, "results.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


QUADRATIC_ROWS, QUADRATIC_BLOCK = 16, 4


def quadratic_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Δ (16, 3) float64 and the rows its kNN graph is built from (blocks of 4: two per rank on 2 ranks)."""
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(QUADRATIC_ROWS, 3, generator=gen, dtype=torch.float64),
            torch.randn(QUADRATIC_ROWS, 5, generator=gen, dtype=torch.float64))


def _sharded_quadratic(mesh, rank: int) -> dict[str, object]:
    """The sharded regulariser on its own: its value on a row-sharded DTensor Δ with this rank's Laplacian, and the
    gradient this rank's rows receive."""
    from torch.distributed.tensor import Shard, distribute_tensor

    full_delta, rows = quadratic_inputs()
    delta = distribute_tensor(full_delta, mesh, [Shard(0)]).requires_grad_(True)
    bounds = shard_bounds(QUADRATIC_ROWS, mesh.size())
    mine = slice(bounds[rank], bounds[rank + 1])
    L_local = sk.ParameterGraph.knn(rows[mine], 2, block_size=QUADRATIC_BLOCK).laplacian()
    value = sharded_laplacian_quadratic(delta, L_local)
    value.backward()
    return {"value": value.item(), "grad": delta.grad.to_local().clone(), "rows": (mine.start, mine.stop)}


def _fsdp2_errors(model: nn.Module, filt: sk.SpectralGradientFilter, rank: int, world: int) -> dict[str, str]:
    """The messages of the FSDP2 errors, on the trained sharded ``model`` and its ``filt`` (regulariser on)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    errors = {}
    # A gradient with the filter's local rows but on another mesh (2-D, HSDP-like) with other placements.
    x, y = batch(0, rank, world)
    nn.functional.mse_loss(model(x), y).backward()
    weight = dict(model.named_parameters())["2.weight"]
    hsdp_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    weight.grad = distribute_tensor(weight.grad.full_tensor(), hsdp_mesh, [Replicate(), Shard(0)])
    try:
        filt.step()
    except ValueError as error:
        errors["mesh_and_placements"] = str(error)
    model.zero_grad()
    return errors


def zero_task_step(model: nn.Module, filt: sk.SpectralGradientFilter, opt: torch.optim.Optimizer, rank: int = 0,
                   world: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """With the task loss at 0: the parameters after one optimizer step (the optimizer filters and adds 2λLΔ
    itself), then the gradients after filt.step() (2λLΔ on the targets, 0 elsewhere)."""
    x, _ = batch(0, rank, world)
    out = {}
    model.zero_grad()
    (0.0 * model(x).sum() + filt.regularization()).backward()
    opt.step()
    opt.zero_grad()
    out["params"] = params_of(model)
    # the Laplacians filt.step() uses (its step count may trigger a refresh after it has added 2λLΔ)
    out["reg_laplacians"] = {t.name: t.reg_laplacian.to_dense() for t in filt.filter_targets}
    (0.0 * model(x).sum() + filt.regularization()).backward()
    filt.step()
    out["grads"] = {name.removeprefix("module."): full(p.grad) for name, p in model.named_parameters()}
    model.zero_grad()
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(workdir: str, worker: Callable[[int, int, int, str], None] = _worker) -> dict:
    """Run ``worker(rank, WORLD, port, workdir)`` on WORLD processes; rank 0's results.pt."""
    context = mp.spawn(worker, args=(WORLD, _free_port(), workdir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + _SPAWN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD}-process run did not finish within {_SPAWN_TIMEOUT_S} s")
    return torch.load(os.path.join(workdir, "results.pt"))


# ------------------------------------------------------------------------------------------ the test
def test_fsdp2_and_ddp_match_one_process(tmp_path):
    workdir = str(tmp_path)
    # One-process checkpoints the workers resume: after 5 steps (blocks aligned with 2 ranks), and unaligned.
    model = make_model()
    filt = make_filter(model, align_shards=(WORLD,))
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)
    train(model, filt, opt, range(5))
    save_checkpoint(os.path.join(workdir, "ckpt_1rank_step5"), model, opt, filt)
    model = make_model()
    filt = make_filter(model)
    save_checkpoint(os.path.join(workdir, "ckpt_1rank_unaligned"),
                    model, sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt), filt)

    start = time.monotonic()
    results = _spawn(workdir)
    spawn_s = time.monotonic() - start

    # The one-process reference: 10 steps with the 2-rank block layout.
    model = make_model()
    filt = make_filter(model, align_shards=(WORLD,))
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)
    train(model, filt, opt, range(STEPS))
    reference, reference_reg = params_of(model), filt.regularization().item()
    initial = params_of(make_model())
    assert all((reference[n] - initial[n]).norm() > 1e-3 * initial[n].norm() for n in initial)  # it trained

    # Blocks cut at the shard boundaries: '2.weight' rank 0 holds rows 0:17 in blocks 0:8, 8:16, 16:17.
    assert results["layout"]["2.weight"] == (0, 17, [0, 8, 16, 17])
    assert_close_rel(results["fsdp_params"], reference, what="FSDP2 vs one process")
    assert_close_rel(results["fsdp_moments"], moments_of(model, opt), what="FSDP2 exp_avg_sq")
    assert_close_rel(results["ddp_params"], reference, what="DDP vs one process")
    for value in (results["fsdp_reg"], results["ddp_reg"]):
        assert reference_reg > 0 and abs(value - reference_reg) <= 1e-5 * reference_reg
    projectors = projectors_of(filt)
    assert_close_rel({"0.weight": projectors["0.weight"][:16, :16], "2.weight": projectors["2.weight"][:17, :17]},
                     results["fsdp_projectors"], what="rank 0's filter")

    hook_model = make_model()
    hook_filt = make_filter(hook_model, hook=True, align_shards=(WORLD,))
    train(hook_model, hook_filt, torch.optim.AdamW(hook_model.parameters(), lr=1e-2), range(STEPS))
    assert_close_rel(results["fsdp_hook_params"], params_of(hook_model), what="FSDP2 hook mode vs one process")

    # 1 → 2: 5 steps here, 5 on two ranks equals 10 here.
    assert results["resumed_steps"] == 5
    assert_close_rel(results["resumed_params"], reference, what="resumed 1 → 2")

    # 2 → 1: the 2-rank checkpoint loads here with its states; 2 more steps match the reference's.
    resumed = make_model()
    resumed_filt = make_filter(resumed, align_shards=(WORLD,))
    resumed_opt = sk.SpectralAdamW(resumed.parameters(), lr=1e-2, spectral_filter=resumed_filt)
    load_checkpoint(os.path.join(workdir, "ckpt_2ranks"), resumed, resumed_opt, resumed_filt)
    assert resumed_filt.steps == STEPS
    assert_close_rel(params_of(resumed), reference, what="2 → 1 parameters")
    assert_close_rel(moments_of(resumed, resumed_opt), moments_of(model, opt), what="2 → 1 exp_avg_sq")
    assert_close_rel(projectors_of(resumed_filt), projectors, what="2 → 1 filter")
    train(resumed, resumed_filt, resumed_opt, range(STEPS, STEPS + 2))
    train(model, filt, opt, range(STEPS, STEPS + 2))
    assert_close_rel(params_of(resumed), params_of(model), what="2 → 1 then 2 steps")

    # Task loss 0 under FSDP2: .grad after filt.step() is 2λLΔ of each rank's rows, unfiltered, as here.
    fresh = make_model()
    fresh_filt = make_filter(fresh, align_shards=(WORLD,))
    fresh_opt = sk.SpectralAdamW(fresh.parameters(), lr=1e-2, spectral_filter=fresh_filt)
    load_checkpoint(os.path.join(workdir, "ckpt_2ranks"), fresh, fresh_opt, fresh_filt)
    zero_task = zero_task_step(fresh, fresh_filt, fresh_opt)
    for t in fresh_filt.filter_targets:
        L = zero_task["reg_laplacians"][t.name].double()
        expected = 2 * 0.1 * L @ (t.param.detach().double() - t.theta0.double())
        assert expected.norm() > 0
        assert_close_rel({t.name: results["zero_task"]["grads"][t.name]}, {t.name: expected}, what="FSDP2 2λLΔ")
    for run in ("zero_task", "ddp_zero_task"):  # FSDP2 and DDP: the same step as one process
        assert_close_rel(results[run]["grads"], zero_task["grads"], what=f"{run} grads")
        assert_close_rel(results[run]["params"], zero_task["params"], what=f"{run} step")

    errors = results["errors"]
    message = errors["mesh_and_placements"]
    assert "the gradient of 2.weight holds 17 rows with placements (Replicate(), Shard(dim=0))" in message
    assert "built for rows 0:17 of 33 ((Shard(dim=0),) on mesh" in message and "rank 0 of 2" in message
    assert "build the filter on the mesh that trains the model, after fully_shard" in message

    # The sharded regulariser on its own equals sk.laplacian_quadratic of the whole Δ; rank 0's rows get 2 L Δ.
    full_delta, rows = quadratic_inputs()
    L = sk.ParameterGraph.knn(rows, 2, block_size=QUADRATIC_BLOCK).laplacian()
    expected = sk.laplacian_quadratic(full_delta, L).item()
    quadratic = results["sharded_quadratic"]
    assert expected > 0 and abs(quadratic["value"] - expected) <= 1e-12 * expected
    grad = 2 * L.to_dense() @ full_delta
    torch.testing.assert_close(quadratic["grad"], grad[slice(*quadratic["rows"])], rtol=1e-12, atol=1e-12)
    assert sharded_laplacian_quadratic(full_delta, L).item() == expected   # a plain tensor: the global value

    message = results["straddle_error"]
    assert message is not None and "2.weight" in message and "rows 16:24" in message and "row 17" in message
    assert "align_shards=(2,)" in message and "more)" not in message
    assert spawn_s < _SPAWN_TIMEOUT_S


# ------------------------------------------------------------------------------------------ one-process checks
def test_shard_bounds_follow_torch_chunk():
    for n in (0, 1, 5, 16, 33, 100):
        for world in (1, 2, 3, 4, 7):
            chunks = torch.arange(n).chunk(world) if n else ()
            sizes = [len(c) for c in chunks] + [0] * (world - len(chunks))
            bounds = shard_bounds(n, world)
            assert [b - a for a, b in zip(bounds[:-1], bounds[1:])] == sizes


def test_aligned_block_ptr_cuts_every_boundary():
    assert aligned_block_ptr(33, 8).tolist() == [0, 8, 16, 24, 32, 33]
    assert aligned_block_ptr(33, 8, (2,)).tolist() == [0, 8, 16, 17, 25, 33]
    assert aligned_block_ptr(32, 8, (1, 2, 4)).tolist() == [0, 8, 16, 24, 32]
    ptr = aligned_block_ptr(33, 8, (1, 2, 4))
    for world in (1, 2, 4):
        check_block_alignment(ptr, world)
    assert aligned_block_ptr(0, 8, (2,)).tolist() == [0, 0]


def test_mesh_the_graph_was_not_built_for():
    ptr = aligned_block_ptr(64, 16, (2,))                      # cuts at 32: fine for 2 ranks ...
    check_block_alignment(ptr, 2, "q_proj.weight")
    with pytest.raises(StraddlingBlockError, match=r"block 0 of q_proj.weight \(rows 0:16\) straddles the shard "
                                                   r"boundary at row 11 .* 6-rank .*align_shards=\(6,\)"):
        check_block_alignment(ptr, 6, "q_proj.weight")         # ... not for 6 (chunks of 11 rows)


def test_local_block_ptr():
    from spectralkern.distributed.shards import RowShard

    ptr = aligned_block_ptr(33, 8, (2,))
    shard = RowShard(33, 17, 33, 2, 1, None, (), None)
    assert local_block_ptr(ptr, shard).tolist() == [0, 8, 16]
    with pytest.raises(StraddlingBlockError, match="rows 16:24"):
        local_block_ptr(aligned_block_ptr(33, 8), shard, "w")
    assert local_block_ptr(aligned_block_ptr(5, 2, (4,)), RowShard(5, 5, 5, 4, 3, None, (), None)).tolist() == [0, 0]


def test_plain_tensors_have_no_row_shard():
    assert row_shard(torch.zeros(3, 2)) is None


def test_filter_built_before_wrapping_warns():
    model = make_model()
    filt = make_filter(model, reg_weight=0.0)
    with pytest.warns(UserWarning, match="build the filter after wrapping"):
        filt.step()


# ------------------------------------------------------------------------------------------ HF Trainer, 2 ranks
# accelerate enables FSDP only for GPU-like distributed types: on the CPU (DistributedType.MULTI_CPU) the Trainer
# ignores fsdp_config and trains with DDP, silently. The FSDP2 run below therefore relabels the CPU process state as
# MULTI_GPU before the Trainer builds its Accelerator; everything after that — accelerate's fully_shard of the model,
# its swap of the optimizer's parameters, the Trainer's loop — is the real FSDP2 path, on gloo.
TRAINER_STEPS = 6


class Regressor(nn.Module):
    """make_model() with a Trainer-style forward: a dict with the MSE loss."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def trainer_dataset() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(8 * TRAINER_STEPS, 12, generator=gen), torch.randn(8 * TRAINER_STEPS, 5, generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


def trainer_args(workdir: str, world: int, **kwargs):
    """Global batches of 8 in order (sequential sampler; rank r gets rows 4r:4r+4 of each), the default linear
    schedule and gradient clipping at 1."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=os.path.join(workdir, "trainer"), max_steps=TRAINER_STEPS,
                             per_device_train_batch_size=8 // world, train_sampling_strategy="sequential",
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_strategy="no", dataloader_num_workers=0, **kwargs)


def fsdp2_trainer_args(workdir: str, world: int):
    """trainer_args with fsdp_config {"fsdp_version": 2}, and the CPU process state relabelled MULTI_GPU (see above)
    after TrainingArguments set it up, so that the Trainer's Accelerator turns FSDP2 on."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    args = trainer_args(workdir, world, fsdp=True, fsdp_config={"fsdp_version": 2})
    assert args.distributed_state.distributed_type == DistributedType.MULTI_CPU
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return args


def trainer_filter(model: nn.Module) -> sk.SpectralGradientFilter:
    """The factory: targets net.0 and net.2, blocks cut where 2 ranks shard them."""
    return make_filter(model, align_shards=(WORLD,))


def _trainer_worker(rank: int, world: int, port: int, workdir: str) -> None:
    from torch.distributed.tensor import DTensor
    from transformers import Trainer

    from spectralkern.integrations.hf import SpectralFilterCallback, SpectralTrainer, spectral_adamw

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    results: dict = {}
    try:
        # DDP, accelerate's own choice on the CPU: it keeps the parameters, so a filter built beforehand works.
        model = Regressor()
        trainer = SpectralTrainer(model=model, args=trainer_args(workdir, world), train_dataset=trainer_dataset(),
                                  spectral_filter=trainer_filter(model))
        trainer.train()
        results["ddp_engine"] = str(trainer.accelerator.distributed_type)
        results["ddp_params"] = params_of(trainer.model)

        # FSDP2 with the factory: the filter is built on the sharded model when train() starts.
        model = Regressor()
        trainer = SpectralTrainer(model=model, args=fsdp2_trainer_args(workdir, world),
                                  train_dataset=trainer_dataset(), spectral_filter=trainer_filter)
        trainer.train()
        filt = trainer.spectral_filter
        results["fsdp_engine"] = str(trainer.accelerator.distributed_type)
        results["fsdp_targets_sharded"] = all(isinstance(p, DTensor) for _, p in filt.targets)
        results["fsdp_steps"] = filt.steps
        results["fsdp_params"] = params_of(trainer.model)
        results["fsdp_reg"] = filt.regularization().item()

        # The callback with a factory, under torch's AdamW.
        model = Regressor()
        callback = SpectralFilterCallback(trainer_filter)
        Trainer(model=model, args=fsdp2_trainer_args(workdir, world), train_dataset=trainer_dataset(),
                callbacks=[callback]).train()
        results["callback_targets_sharded"] = all(isinstance(p, DTensor) for _, p in callback.spectral_filter.targets)
        results["callback_steps"] = callback.spectral_filter.steps

        # Filters built before train(): every way in raises instead of training unfiltered.
        for way in ("SpectralTrainer", "spectral_adamw", "SpectralFilterCallback"):
            model = Regressor()
            filt = trainer_filter(model)
            kwargs = dict(model=model, args=fsdp2_trainer_args(workdir, world), train_dataset=trainer_dataset())
            trainer = (SpectralTrainer(**kwargs, spectral_filter=filt) if way == "SpectralTrainer" else
                       Trainer(**kwargs, optimizer_cls_and_kwargs=spectral_adamw(filt, kwargs["args"]))
                       if way == "spectral_adamw" else Trainer(**kwargs, callbacks=[SpectralFilterCallback(filt)]))
            try:
                trainer.train()
                results[way] = None
            except (RuntimeError, ValueError) as error:
                results[way] = str(error)
        if rank == 0:
            torch.save(results, os.path.join(workdir, "results.pt"))
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_hf_trainer_fsdp2_and_ddp_match_one_process(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from spectralkern.integrations.hf import SpectralTrainer

    workdir = str(tmp_path)
    results = _spawn(workdir, _trainer_worker)

    # The one-process reference: the same Trainer, global batch 8, the factory's filter (blocks as on 2 ranks).
    model = Regressor()
    trainer = SpectralTrainer(model=model, args=trainer_args(workdir, 1), train_dataset=trainer_dataset(),
                              spectral_filter=trainer_filter)
    trainer.train()
    reference = params_of(model)
    initial = params_of(Regressor())
    assert all((reference[n] - initial[n]).norm() > 1e-3 * initial[n].norm() for n in initial)  # it trained
    assert trainer.spectral_filter.steps == TRAINER_STEPS

    assert results["ddp_engine"] == "DistributedType.MULTI_CPU"  # accelerate's DDP on the CPU
    assert_close_rel(results["ddp_params"], reference, what="Trainer DDP vs one process")
    assert results["fsdp_engine"] == "DistributedType.FSDP"
    assert results["fsdp_targets_sharded"] and results["fsdp_steps"] == TRAINER_STEPS
    assert_close_rel(results["fsdp_params"], reference, what="Trainer FSDP2 vs one process")
    reference_reg = trainer.spectral_filter.regularization().item()
    assert reference_reg > 0 and abs(results["fsdp_reg"] - reference_reg) <= 1e-5 * reference_reg
    assert results["callback_targets_sharded"] and results["callback_steps"] == TRAINER_STEPS

    for way in ("SpectralTrainer", "SpectralFilterCallback"):
        message = results[way]
        assert message is not None and "spectral_filter targets net.0.weight, net.2.weight, which are not " \
                                        "parameters of the model the Trainer trains" in message, way
        assert "Pass a factory instead of a built filter" in message
    message = results["spectral_adamw"]
    assert message is not None and "spectral_filter targets net.0.weight, net.2.weight, which this optimizer " \
                                   "does not update" in message
    assert "SpectralTrainer(..., spectral_filter=lambda model:" in message
