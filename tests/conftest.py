"""Shared fixtures: the embedded world (SynthAD + zsad-tiny) and a small random-weight backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_WEIGHTS = REPO / "zsad" / "tiny" / "zsad-tiny.safetensors"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests push tiny tensors: one torch thread is fastest and does not stall on a shared 2-core CPU
    (measured here: WinCLIP's hundreds of 5-10 token passes ran ~10x slower with two threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthad_root() -> Path:
    """The default SynthAD copy (generated once, shared with the notebooks)."""
    from zsad.cache import default_synthad_root
    from zsad.data.synth import ensure

    return ensure(default_synthad_root())


@pytest.fixture(scope="session")
def tiny_random():
    """zsad-tiny architecture with seeded random weights and random LayerNorms (so that a swapped or
    skipped norm shows): for wiring and faithfulness tests."""
    from references import jitter_layernorms

    from zsad.backbone import load_clip

    torch.manual_seed(0)
    return jitter_layernorms(load_clip("zsad-tiny", pretrained="random"))


@pytest.fixture(scope="session")
def tiny_trained():
    """The shipped zsad-tiny weights: behavioural tests on the embedded world need them."""
    if not TINY_WEIGHTS.exists():
        pytest.skip("zsad/tiny/zsad-tiny.safetensors is absent: run `python -m zsad.tiny train`")
    from zsad.backbone import load_clip

    return load_clip("zsad-tiny")


@pytest.fixture(scope="session")
def heldout_classes() -> list[str]:
    from zsad.tiny import load_card

    card = load_card()
    if card is None:
        pytest.skip("zsad-tiny card is absent: run `python -m zsad.tiny train`")
    return card["heldout_categories"]
