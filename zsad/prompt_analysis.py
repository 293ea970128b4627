"""Looking inside hand-crafted prompt ensembles (notebook 07): template families, sentence embeddings, spread.

A prompt bank (:mod:`zsad.prompts`) is state words x templates. Its templates come in *families*: the same
phrase with another article ("a photo of a {}" / "a photo of the {}") or ending. These helpers group templates
into families, build banks without one family (leave-one-out), and measure how the sentence embeddings of a
bank spread around their state's mean and how far the normal and abnormal means lie apart.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from zsad.prompts import BANKS, PromptBank, encode_sentences, get_bank

if TYPE_CHECKING:
    from zsad.backbone import CLIPBackbone

_ARTICLES = re.compile(r"\b(a|an|the|one|my)\s+")


def template_family(template: str) -> str:
    """The template without articles and final period: "a photo of the small {}." -> "photo of small {}"."""
    return _ARTICLES.sub("", template).rstrip(".").strip()


def families(bank: str | PromptBank) -> dict[str, list[str]]:
    """Family -> the bank's templates in it, in bank order."""
    bank = get_bank(bank) if isinstance(bank, str) else bank
    found: dict[str, list[str]] = {}
    for template in bank.templates:
        found.setdefault(template_family(template), []).append(template)
    return found


def register(bank: PromptBank) -> str:
    """Add a derived bank to :data:`zsad.prompts.BANKS` (this process only) so that every method option that
    takes a bank name (``bank=``, ``prompt_bank=``) accepts it; returns its name."""
    existing = BANKS.get(bank.name)
    if existing is not None and existing != bank:
        raise ValueError(f"a different prompt bank is already registered as {bank.name!r}")
    BANKS[bank.name] = bank
    return bank.name


def without_family(bank: str | PromptBank, family: str) -> str:
    """The name of the bank with every template of ``family`` removed (leave-one-family-out), registered
    with :func:`register` as ``"<bank> - <family>"``."""
    bank = get_bank(bank) if isinstance(bank, str) else bank
    kept = tuple(t for t in bank.templates if template_family(t) != family)
    if len(kept) == len(bank.templates):
        raise ValueError(
            f"{bank.name} has no template family {family!r}; families: {', '.join(families(bank))}"
        )
    return register(replace(bank, name=f"{bank.name} - {family}", templates=kept))


@torch.no_grad()
def sentence_table(
    backbone: CLIPBackbone, bank: str | PromptBank, class_name: str
) -> tuple[np.ndarray, pd.DataFrame]:
    """Unit sentence embeddings (N, D) of one class and a frame describing each sentence (``state`` normal or
    abnormal, ``state_word``, ``template``, ``family``, ``sentence``)."""
    bank = get_bank(bank) if isinstance(bank, str) else bank
    rows = []
    for state, words in (("normal", bank.normal_states), ("abnormal", bank.abnormal_states)):
        for word in words:
            for template in bank.templates:
                sentence = template.format(word.format(class_name))
                rows.append(
                    {
                        "state": state,
                        "state_word": word,
                        "template": template,
                        "family": template_family(template),
                        "sentence": sentence,
                    }
                )
    frame = pd.DataFrame(rows)
    embeddings = encode_sentences(backbone, frame["sentence"].tolist()).double().cpu().numpy()
    return embeddings, frame.assign(bank=bank.name)


def spread(embeddings: np.ndarray, states: pd.Series) -> dict[str, float]:
    """How tight each state's sentences are and how far apart the states are (cosines, higher = closer):
    ``normal_to_mean`` / ``abnormal_to_mean`` (mean cosine of a sentence to its state's mean direction) and
    ``normal_vs_abnormal`` (cosine between the two mean directions)."""
    out: dict[str, float] = {}
    means = {}
    for state in ("normal", "abnormal"):
        x = embeddings[(states == state).to_numpy()]
        mean = x.mean(axis=0)
        means[state] = mean / np.linalg.norm(mean)
        out[f"{state}_to_mean"] = float((x @ means[state]).mean())
    out["normal_vs_abnormal"] = float(means["normal"] @ means["abnormal"])
    return out


def project_2d(embeddings: np.ndarray) -> np.ndarray:
    """The first two principal components of the (centred) embeddings, (N, 2)."""
    centred = embeddings - embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T
