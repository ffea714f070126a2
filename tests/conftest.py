"""Shared tiny-model fixtures: random configs built in code (no model hub), traced once per session.

Fixtures that hand out a model hand out the *same* object to every test that asks for it:
tests that change weights must ``copy.deepcopy`` it first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers
from torch import nn

#: The files that take longest under `make test` (measured on 2 cores, 2026-12-05), run first:
#: pytest-xdist hands whole files to the two workers in collection order, and a long file
#: started last leaves the other worker idle (15.6 min against 13.7 min of work per worker).
LONGEST_FIRST = ("test_gguf.py", "test_layerwise.py", "test_smollm2.py", "test_conformance.py", "test_route_matrix.py",
                 "test_onnx_scale.py", "test_heads.py", "test_routes.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order and test order otherwise kept

transformers.logging.set_verbosity_error()
# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP
# synchronisation made one forward of the tiny Llama ~1 s instead of ~12 ms.
torch.set_num_threads(1)

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


def make_llama(seed: int = 0, **overrides) -> nn.Module:
    """A tiny random LlamaForCausalLM in eval mode (deterministic for a seed)."""
    cfg = transformers.LlamaConfig(**{**LLAMA, "max_position_embeddings": 64, **overrides})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def make_mlp(widths: list[int], seed: int = 0) -> nn.Sequential:
    """Linear-ReLU-...-Linear with the given feature widths (len(widths) - 1 Linears)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def hook_norms(model: nn.Module, names: list[str], batches: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent reference for calibration: (a_in, a_out) per module name, as float64 numpy.

    For each batch, the L2 norm of every feature over all batch*seq positions (an explicit
    sqrt of a sum of squares), then the plain mean of those per-batch vectors.
    """
    per_batch: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}

    def make_hook(name):
        def hook(_mod, args, output):
            x = args[0].detach().double().numpy()
            y = output.detach().double().numpy()
            x2 = x.reshape(-1, x.shape[-1])
            y2 = y.reshape(-1, y.shape[-1])
            per_batch[name].append((np.sqrt((x2 * x2).sum(axis=0)), np.sqrt((y2 * y2).sum(axis=0))))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                if hasattr(model, "config"):
                    model(input_ids=b, use_cache=False)
                else:
                    model(b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, rows in per_batch.items():
        out[n] = (np.mean([r[0] for r in rows], axis=0), np.mean([r[1] for r in rows], axis=0))
    return out


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


@dataclass
class TinyLlama:
    model: nn.Module
    traced: object
    ir: object
    calib: torch.Tensor  # [6, 16] token ids: batches of 4 and 2 with batch_size=4

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)


@pytest.fixture(scope="session")
def tiny_llama() -> TinyLlama:
    import llmrank

    model = make_llama(seed=0)
    traced = llmrank.trace(model)
    ir = llmrank.analyze(traced)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, LLAMA["vocab_size"], (6, 16), generator=gen)
    return TinyLlama(model, traced, ir, calib)


@pytest.fixture(scope="session")
def norms_of():
    """The independent calibration reference, as a fixture (see ``hook_norms``)."""
    return hook_norms


@pytest.fixture(scope="session")
def llama_factory():
    return make_llama


@pytest.fixture(scope="session")
def mlp_factory():
    return make_mlp


@pytest.fixture(scope="session")
def state_bytes_of():
    return state_bytes
