"""Real text that ships offline, with a fixed train / held-out split, and perplexity.

The corpus is the Wikipedia dump inside gensim's test data (106 articles once redirects are
dropped, 3.1 M characters, CC BY-SA). The split is fixed and documented in docs/data.md:

* ``train``: the first 86 articles in dump order (calibration and fine-tuning);
* ``heldout``: the last 20 articles (evaluation only).

Perplexity is measured on non-overlapping windows spread evenly over *all* held-out articles
(the first few thousand tokens all come from one article, which would make a number that means
little), so ``perplexity(..., windows=32)`` samples 32 x ``seq_len`` tokens from across the set.
"""

from __future__ import annotations

import bz2
import functools
import json
import math
import os
import re
from pathlib import Path

import torch

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
N_HELDOUT = 20
SPLITS = ("train", "heldout")


class DataError(ValueError):
    """Missing corpus, an unknown split, or a request the corpus cannot satisfy."""


def articles_cache() -> Path:
    """Where the extracted articles are kept (JSON), so later processes skip the extraction and a
    machine without gensim can use a copied file."""
    from sparsec.models import cache_dir

    return cache_dir() / "text" / f"{WIKI_FILE}.json"


@functools.lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[tuple[str, str], ...]:
    """``(title, plain text)`` of every non-redirect article of gensim's Wikipedia dump, in order."""
    cached = articles_cache()
    if cached.exists():
        return tuple((title, text) for title, text in json.loads(cached.read_text()))
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise DataError("the bundled text needs gensim: pip install gensim") from None
    path = datapath(WIKI_FILE)
    articles = []
    with bz2.BZ2File(path) as fh:
        for title, raw, _ in extract_pages(fh):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(raw).replace("'''", "").replace("''", "")
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            articles.append((title, text))
    try:  # written atomically: a reader never sees half a file
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        tmp.write_text(json.dumps(articles))
        os.replace(tmp, cached)
    except OSError:  # a read-only cache only costs the extraction next time
        pass
    return tuple(articles)


def split_articles(split: str) -> list[tuple[str, str]]:
    """The articles of ``split`` (``train`` or ``heldout``)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    articles = wikipedia_articles()
    return list(articles[:-N_HELDOUT] if split == "train" else articles[-N_HELDOUT:])


def tokenize_split(tokenizer, split: str) -> list[torch.Tensor]:
    """One 1-D LongTensor of token ids per article of ``split`` (kept per tokenizer object: a
    recipe draws calibration, training and evaluation windows from the same split)."""
    return list(_tokenized(tokenizer, split))


@functools.lru_cache(maxsize=4)
def _tokenized(tokenizer, split: str) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
                 for _, text in split_articles(split))


def token_windows(tokenizer, split: str = "train", seq_len: int = 512, count: int | None = None,
                  seed: int = 0) -> torch.Tensor:
    """``[count, seq_len]`` windows of consecutive tokens from ``split``.

    ``count=None`` gives every non-overlapping window of the concatenated split in order.
    Otherwise windows are drawn at random positions (fixed by ``seed``) from the concatenated
    split, the usual way calibration sets for SparseGPT/GPTQ are drawn.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    ids = torch.cat(tokenize_split(tokenizer, split))
    if ids.numel() < seq_len:
        raise DataError(f"split {split!r} has only {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if count is None:
        n = ids.numel() // seq_len
        return ids[: n * seq_len].reshape(n, seq_len)
    if count < 1:
        raise DataError(f"count must be positive, got {count}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (count,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def heldout_windows(tokenizer, seq_len: int = 512, windows: int = 32) -> torch.Tensor:
    """``[windows, seq_len]`` non-overlapping evaluation windows spread evenly over every
    held-out article (each article contributes in proportion to its length)."""
    per_article = tokenize_split(tokenizer, "heldout")
    slots = [(a, s) for a, ids in enumerate(per_article) for s in range(0, ids.numel() - seq_len + 1, seq_len)]
    if len(slots) < windows:
        raise DataError(f"the held-out split has {len(slots)} windows of {seq_len} tokens, fewer than {windows}")
    step = len(slots) / windows
    chosen = [slots[int(i * step)] for i in range(windows)]
    return torch.stack([per_article[a][s: s + seq_len] for a, s in chosen])


#: text of another kind than the Wikipedia articles, for checking that a recipe generalises:
#: gensim's Lee corpus, 300 news stories from the Australian Broadcasting Corporation
NEWS_FILE = "lee_background.cor"


def news_documents() -> list[str]:
    """The Lee news corpus, one story a string (evaluation only; nothing trains on it)."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise DataError("the bundled text needs gensim: pip install gensim") from None
    with open(datapath(NEWS_FILE), encoding="utf-8", errors="replace") as fh:
        return [line.strip() for line in fh if line.strip()]


def other_windows(tokenizer, seq_len: int = 512, windows: int = 32) -> torch.Tensor:
    """``[windows, seq_len]`` evaluation windows of news text (:func:`news_documents`), spread
    evenly over the whole corpus; the stories are joined with blank lines, as one stream."""
    ids = torch.tensor(tokenizer("\n\n".join(news_documents()), add_special_tokens=False)["input_ids"],
                       dtype=torch.long)
    slots = ids.numel() // seq_len
    if slots < windows:
        raise DataError(f"the news corpus has {slots} windows of {seq_len} tokens, fewer than {windows}")
    step = slots / windows
    return torch.stack([ids[int(i * step) * seq_len: (int(i * step) + 1) * seq_len] for i in range(windows)])


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
               device: str | torch.device | None = None) -> float:
    """exp(mean next-token cross entropy) of a causal LM over ``windows`` ``[n, seq_len]``.

    ``model(input_ids)`` must return logits (a tensor, or an object with ``.logits``). The
    windows are moved to ``device`` (default: the device of ``model``'s first parameter when it
    is a module, else where they are).
    """
    if device is None and isinstance(model, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        ids = windows[start: start + batch_size]
        if device is not None:
            ids = ids.to(device)
        out = model(input_ids=ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        if not torch.isfinite(logits).all():
            return float("inf")
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
