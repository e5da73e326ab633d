"""Retrieval-augmented classification: the labelled pairs most similar to a row, with their verdicts, go in front of it.

The pieces, each testable without Ray:
- `embed_texts` / `Embedder`: a sentence encoder (the packaged MiniLM by default), mean pooling over tokens
  and L2 norm, the sentence-transformers recipe; `embed_rows` embeds rows as `retrieval.embed` says:
      prompt  the prompt's turns, joined;
      pair    prompt, A and B embedded apart and joined as [p, unit(a + b)] / sqrt(2): a unit vector whose
              inner product with another is the mean of the prompts' cosine and the response pairs' cosine;
              it is the same for (A, B) and (B, A), so both orders of a row find the same neighbours.
  Vectors are rounded to float16, the precision the checkpoint stores, wherever they are made, so training
  and prediction search with the same numbers. `embed_texts` caches vectors by text hash in `cache_dir`.
- `JudgedPairs`: the labelled pairs an index covers (texts, verdicts, prompt-group ids, vectors); it is saved
  in a checkpoint's `retrieval/` folder, so prediction searches the model's own training pairs.
- `NeighbourIndex`: a faiss inner-product index (`retrieval.index`: flat = exact, hnsw = approximate) whose
  `search` skips given positions per query.
- `find_neighbours`: the leakage rule. A row never gets a pair of its own prompt group (the unit the folds of
  app/data.py keep together), nor itself. In training the index holds the training folds only: a training
  row's neighbours are the other training rows outside its prompt group; a validation row's come from the
  training folds. At prediction the checkpoint's index (its training rows) serves, under the same rule.
- `BlockBuilder`: the neighbour block in the model's tokens, at most `retrieval.max_tokens`:
      Similar judged pairs: Pair: Prompt: ... A: ... B: ... Verdict: A Pair: ... Verdict: tie Pair to judge:
  Markers and verdicts are kept whole; the neighbours' texts share the rest max-min fairly (a long
  neighbour cannot crowd out a short one), each cut text keeping its head and tail as in app/formatting.py;
  the least similar neighbours are dropped when fewer than `MIN_NEIGHBOUR_TEXT` tokens of text would remain
  each. PairEncoder puts the block after the leading specials and gives the query the rest of
  `format.max_length` (rule 0 of its truncation policy), so the query keeps at least
  `format.max_length - retrieval.max_tokens` tokens.
- `RetrievalAugmenter`: what the Predictor asks for the blocks of new rows (`load_augmenter` reads a
  checkpoint's `retrieval/` folder).

A/B swap: a neighbour is a self-contained judged example, shown as stored: its verdict names its own A or B,
not the query's. When the query's A and B are exchanged (swap augmentation, swap TTA), its block stays as it
is, verdicts included: nothing in the block refers to the query's A or B, and since neighbour search is
order-free (both embeddings above), the swapped view of a row is exactly the plain view of the swapped row.
So swap TTA stays exactly equivariant: predicting (p, b, a) gives the A/B-exchanged probabilities of (p, a, b).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from app.config import PACKAGED_MINILM, Config, RetrievalConfig
from app.data import prompt_group_key
from app.formatting import MARKERS, keep_head_tail, share_budget

if TYPE_CHECKING:
    import faiss
    import torch

RETRIEVAL_DIR = "retrieval"  # inside a checkpoint folder
RETRIEVAL_FORMAT = 1
BLOCK_HEADER = "Similar judged pairs:"
PAIR_MARKERS = ("Pair: Prompt:", "A:", "B:", "Verdict:")  # before the prompt, A, B, and the verdict word
BLOCK_CLOSING = "Pair to judge:"
VERDICT_WORDS = ("A", "B", "tie")  # class 0, 1, 2
MIN_NEIGHBOUR_TEXT = 12  # a neighbour is shown only with at least this many tokens of its texts
SEARCH_BATCH = 1024  # queries per faiss call
HNSW_LINKS = 32


def join_turns(turns: Sequence[str]) -> str:
    """One text of a prompt or response: its turns joined by newlines."""
    return "\n".join(turns)


# A neighbour block shows at most `retrieval.max_tokens` tokens of a text, from its head and tail
# (app.formatting.keep_head_tail). On the real rows a MiniLM word-piece averages 4.4 characters; keeping 8 per
# token, 950 of 1,000 random 3-neighbour blocks at max_tokens=64 are the same as from the whole texts (the
# others differ where a cut falls inside a word or tokens run long), and the stored pairs shrink from 15.6 to
# 10.2 MiB. Training, checkpoints and prediction all read the same kept texts, so they agree with each other.
CHARS_PER_TOKEN_BOUND = 8


def showable_turns(turns: Sequence[str | None], max_tokens: int) -> list[str | None]:
    """What a neighbour block can show of a prompt or response: the turns themselves, or where their joined
    text is longer than twice max_tokens * CHARS_PER_TOKEN_BOUND characters, only its head and its tail."""
    keep = max_tokens * CHARS_PER_TOKEN_BOUND
    text = join_turns([turn or "" for turn in turns])
    return list(turns) if len(text) <= 2 * keep else [text[:keep], text[-keep:]]


class Embedder:
    """A sentence encoder: mean of the last hidden states over real tokens, L2-normalised."""

    def __init__(self, encoder: str = PACKAGED_MINILM, max_tokens: int = 128, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        from app.modeling import resolve_model_path

        path = resolve_model_path(encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.max_tokens, self.device = max_tokens, device

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, D) float32 unit vectors; texts longer than `max_tokens` encoder tokens are cut."""
        import torch

        dim = self.model.config.hidden_size
        vectors = np.zeros((len(texts), dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad little
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                inputs = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                        max_length=self.max_tokens, return_tensors="pt").to(self.device)
                hidden = self.model(**inputs).last_hidden_state  # (B, T, D)
                vectors[batch] = _mean_pool(hidden, inputs["attention_mask"]).float().cpu().numpy()
        return vectors


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # (B, D)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@functools.lru_cache(maxsize=2)
def load_embedder(encoder: str = PACKAGED_MINILM, max_tokens: int = 128) -> Embedder:
    """An `Embedder`, loaded once per process and settings."""
    return Embedder(encoder, max_tokens)


def embed_texts(texts: Sequence[str], batch_size: int = 64, encoder: str = PACKAGED_MINILM, max_tokens: int = 128,
                cache_dir: str | None = None) -> np.ndarray:
    """(N, D) float32 unit vectors of `texts` (mean pooling + L2 norm), each text embedded once; (0, 0) for none.

    With `cache_dir` (a local folder) vectors are kept by content hash in one file per (encoder, max_tokens),
    so reruns and the folds of a cross-validation embed nothing twice.
    """
    unique = list(dict.fromkeys(texts))
    keys = [hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest() for text in unique]
    cache_path = None
    cached: dict[bytes, np.ndarray] = {}
    if cache_dir is not None:
        settings = hashlib.sha1(f"{encoder}|{max_tokens}".encode()).hexdigest()[:16]
        cache_path = os.path.join(cache_dir, f"embeddings-{settings}.npz")
        if os.path.exists(cache_path):
            with np.load(cache_path) as stored:
                cached = dict(zip((row.tobytes() for row in stored["keys"]), stored["vectors"]))
    missing = [i for i, key in enumerate(keys) if key not in cached]
    if missing:
        fresh = load_embedder(encoder, max_tokens).embed([unique[i] for i in missing], batch_size)
        cached.update({keys[i]: vector for i, vector in zip(missing, fresh)})
        if cache_path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            temporary = f"{cache_path}.{os.getpid()}.tmp.npz"
            digests = np.frombuffer(b"".join(cached), dtype=np.uint8).reshape(len(cached), -1)  # (N, 20) sha1
            np.savez(temporary, keys=digests, vectors=np.stack(list(cached.values())))
            os.replace(temporary, cache_path)  # readers never see a half-written file
    by_text = dict(zip(unique, (cached[key] for key in keys)))
    return np.stack([by_text[text] for text in texts]).astype(np.float32) if texts else np.zeros((0, 0), np.float32)


def embed_rows(prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
               responses_b: Sequence[Sequence[str]], settings: RetrievalConfig,
               cache_dir: str | None = None) -> np.ndarray:
    """(N, D) search vectors of rows per `settings.embed`, rounded to float16 precision (see the module doc)."""
    embed = functools.partial(embed_texts, batch_size=settings.embed_batch_size, encoder=settings.encoder,
                              max_tokens=settings.embed_max_tokens, cache_dir=cache_dir)
    if settings.embed == "prompt":
        vectors = embed([join_turns(p) for p in prompts])
    else:
        n = len(prompts)
        texts = [join_turns(t) for column in (prompts, responses_a, responses_b) for t in column]
        parts = embed(texts)
        responses = parts[n : 2 * n] + parts[2 * n :]  # (N, D): order-free, so (A, B) and (B, A) agree
        responses /= np.maximum(np.linalg.norm(responses, axis=1, keepdims=True), 1e-6)
        vectors = np.concatenate([parts[:n], responses], axis=1) / math.sqrt(2)
    return vectors.astype(np.float16).astype(np.float32)


def group_ids(prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """(N,) int64 ids of the rows' prompt groups (`app.data.prompt_group_key`, hashed)."""
    return np.array([int.from_bytes(hashlib.blake2b(prompt_group_key(list(p)).encode("utf-8", "surrogatepass"),
                                                    digest_size=8).digest(), "little", signed=True)
                     for p in prompts], dtype=np.int64)


@dataclass
class JudgedPairs:
    """Labelled pairs that an index covers: what a neighbour block shows, and what the search compares."""

    prompts: list[list[str]]
    responses_a: list[list[str]]
    responses_b: list[list[str]]
    labels: np.ndarray  # (N,) int64: 0 A wins, 1 B wins, 2 tie
    groups: np.ndarray  # (N,) int64 prompt-group ids
    vectors: np.ndarray  # (N, D) float16 search vectors; (N, 0) where only texts are needed

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, vectors: np.ndarray, max_tokens: int | None = None) -> JudgedPairs:
        """The pairs of a labelled frame (prompt, response_a, response_b, label) with their vectors; with
        `max_tokens` (the block budget) each text keeps only what a block can show (`showable_turns`), so
        training workers and every checkpoint carry less. Prompt groups come from the whole prompts."""
        if len(vectors) != len(frame):
            raise ValueError(f"{len(vectors)} vectors for {len(frame)} rows")

        def texts(column: str) -> list[list[str | None]]:
            cells = [list(cell) for cell in frame[column]]
            return cells if max_tokens is None else [showable_turns(cell, max_tokens) for cell in cells]

        return cls(texts("prompt"), texts("response_a"), texts("response_b"), frame["label"].to_numpy(dtype=np.int64),
                   group_ids([list(p) for p in frame["prompt"]]), vectors.astype(np.float16))

    def texts_only(self) -> JudgedPairs:
        """The same pairs without vectors (what tokenizing actors need)."""
        return replace(self, vectors=np.zeros((len(self), 0), dtype=np.float16))

    def to_files(self, settings: RetrievalConfig) -> dict[str, bytes]:
        """The `retrieval/` folder of a checkpoint: relative path -> content."""
        table = pd.DataFrame({"prompt": [json.dumps(p) for p in self.prompts],
                              "response_a": [json.dumps(a) for a in self.responses_a],
                              "response_b": [json.dumps(b) for b in self.responses_b],
                              "label": self.labels, "group": self.groups})
        pairs, vectors = io.BytesIO(), io.BytesIO()
        table.to_parquet(pairs, index=False)
        np.save(vectors, self.vectors.astype(np.float16))
        meta = {"format": RETRIEVAL_FORMAT, "rows": len(self), "dim": int(self.vectors.shape[1]),
                "retrieval": settings.model_dump(mode="json")}
        return {f"{RETRIEVAL_DIR}/pairs.parquet": pairs.getvalue(), f"{RETRIEVAL_DIR}/vectors.npy": vectors.getvalue(),
                f"{RETRIEVAL_DIR}/retrieval.json": json.dumps(meta, indent=2).encode()}

    def save(self, checkpoint_dir: str, settings: RetrievalConfig) -> None:
        """Write the `retrieval/` folder into a checkpoint folder."""
        for relative, content in self.to_files(settings).items():
            os.makedirs(os.path.dirname(os.path.join(checkpoint_dir, relative)), exist_ok=True)
            with open(os.path.join(checkpoint_dir, relative), "wb") as handle:
                handle.write(content)

    @classmethod
    def load(cls, checkpoint_dir: str) -> tuple[JudgedPairs, dict[str, Any]]:
        """The pairs of a checkpoint's `retrieval/` folder and its retrieval.json."""
        folder = os.path.join(checkpoint_dir, RETRIEVAL_DIR)
        with open(os.path.join(folder, "retrieval.json"), encoding="utf-8") as handle:
            meta = json.load(handle)
        if meta.get("format") != RETRIEVAL_FORMAT:
            raise ValueError(f"{folder}: retrieval format {meta.get('format')}, this version reads {RETRIEVAL_FORMAT}")
        table = pd.read_parquet(os.path.join(folder, "pairs.parquet"))
        vectors = np.load(os.path.join(folder, "vectors.npy"))
        if len(table) != meta["rows"] or vectors.shape != (meta["rows"], meta["dim"]):
            raise ValueError(f"{folder} is inconsistent: retrieval.json says {meta['rows']} rows of dim {meta['dim']}, "
                             f"the files hold {len(table)} pairs and vectors of shape {vectors.shape}; copy the "
                             "checkpoint again")
        columns = [[json.loads(cell) for cell in table[name]] for name in ("prompt", "response_a", "response_b")]
        return cls(*columns, table["label"].to_numpy(np.int64), table["group"].to_numpy(np.int64), vectors), meta


class NeighbourIndex:
    """Inner-product search over unit vectors (cosine similarity) with faiss."""

    def __init__(self, vectors: np.ndarray, kind: Literal["flat", "hnsw"] = "flat") -> None:
        import faiss  # owned here: no other module imports faiss

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
        dim = self.vectors.shape[1]
        if kind == "flat":
            self.index: faiss.Index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"unknown index kind {kind!r}; use flat or hnsw (retrieval.index)")
        self.kind = kind
        if len(self.vectors):
            self.index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[Collection[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar indexed vectors of each query, best first, skipping `exclude[i]` for query i.

        Returns (N, k) int64 positions and (N, k) float32 similarities; -1 and -inf where fewer than k remain.
        The flat index is exact: it fetches k plus the query's exclusions, so k valid ones always come back.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (N, D)
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        if len(self) == 0:
            return positions, scores
        for start in range(0, len(queries), SEARCH_BATCH):
            stop = min(start + SEARCH_BATCH, len(queries))
            skips = [set(exclude[i]) for i in range(start, stop)] if exclude is not None else [set()] * (stop - start)
            fetch = min(len(self), k + max(map(len, skips)))
            if self.kind == "hnsw":
                self.index.hnsw.efSearch = max(64, fetch)
            found_scores, found = self.index.search(queries[start:stop], fetch)
            for row, skip in enumerate(skips):
                kept = [j for j in range(fetch) if found[row, j] >= 0 and int(found[row, j]) not in skip][:k]
                positions[start + row, : len(kept)] = found[row, kept]
                scores[start + row, : len(kept)] = found_scores[row, kept]
        return positions, scores


def find_neighbours(index: NeighbourIndex, index_groups: np.ndarray, queries: np.ndarray, query_groups: np.ndarray,
                    k: int, self_positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` under the leakage rule: no query gets a pair of its own prompt group, nor itself.

    `self_positions[i]` is query i's own position in the index (training rows), or absent for rows that are
    not indexed. Returns (N, k) positions (-1 = none) and similarities.
    """
    members: dict[int, list[int]] = {}
    for position, group in enumerate(index_groups.tolist()):
        members.setdefault(group, []).append(position)
    exclude = [members.get(group, []) for group in query_groups.tolist()]
    if self_positions is not None:
        exclude = [[*skip, int(own)] for skip, own in zip(exclude, self_positions, strict=True)]
    return index.search(queries, k, exclude)


class BlockBuilder:
    """Neighbour blocks in a model's tokens, from positions into `JudgedPairs` (the same for both A/B views)."""

    def __init__(self, tokenizer, pairs: JudgedPairs, max_tokens: int, head_fraction: float = 0.5) -> None:
        self.tokenizer, self.pairs = tokenizer, pairs
        self.max_tokens, self.head_fraction = max_tokens, head_fraction
        fixed = [BLOCK_HEADER, BLOCK_CLOSING, *PAIR_MARKERS, *VERDICT_WORDS, MARKERS["ellipsis"]]
        ids = tokenizer(fixed, add_special_tokens=False)["input_ids"]
        self.header, self.closing = ids[0], ids[1]
        self.pair_markers = ids[2:6]
        self.verdicts = ids[6:9]
        self.ellipsis = ids[9]
        self._texts: dict[int, tuple[list[int], list[int], list[int]]] = {}  # tokenized pairs, by position

    def _tokenize(self, positions: Collection[int]) -> None:
        todo = sorted(set(positions) - set(self._texts))
        if not todo:
            return
        texts = [join_turns(column[p]) for p in todo
                 for column in (self.pairs.prompts, self.pairs.responses_a, self.pairs.responses_b)]
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for n, position in enumerate(todo):
            self._texts[position] = (ids[3 * n], ids[3 * n + 1], ids[3 * n + 2])

    def block(self, neighbours: Sequence[int]) -> list[int]:
        """The block of one row: its neighbours' positions, best first (-1 ignored)."""
        shown = [int(p) for p in neighbours if p >= 0]
        self._tokenize(shown)
        fixed_per_pair = sum(map(len, self.pair_markers))

        def fixed_cost(pair_positions: list[int]) -> int:
            verdicts = sum(len(self.verdicts[self.pairs.labels[p]]) for p in pair_positions)
            return len(self.header) + len(self.closing) + fixed_per_pair * len(pair_positions) + verdicts

        while shown and fixed_cost(shown) + MIN_NEIGHBOUR_TEXT * len(shown) > self.max_tokens:
            shown.pop()  # the least similar goes first
        if not shown:
            return []
        texts = [self._texts[p] for p in shown]
        room = share_budget([sum(map(len, t)) for t in texts], self.max_tokens - fixed_cost(shown))
        ids = list(self.header)
        for position, (prompt, response_a, response_b), pair_room in zip(shown, texts, room):
            label = int(self.pairs.labels[position])
            pieces = (prompt, response_a, response_b)
            cut = [keep_head_tail(piece, share, self.head_fraction, self.ellipsis)
                   for piece, share in zip(pieces, share_budget([len(p) for p in pieces], pair_room))]
            for marker, piece in zip(self.pair_markers, cut):
                ids += marker + piece
            ids += self.pair_markers[3] + self.verdicts[label]
        ids += self.closing
        assert len(ids) <= self.max_tokens, (len(ids), self.max_tokens)
        return ids

    def blocks(self, neighbours: np.ndarray) -> list[list[int]]:
        """The blocks of rows with (N, k) neighbour positions."""
        self._tokenize([int(p) for p in np.asarray(neighbours).ravel() if p >= 0])  # one tokenizer call
        return [self.block(row) for row in neighbours]


class RetrievalAugmenter:
    """The neighbour blocks of new rows, searched in a checkpoint's index of its training pairs."""

    def __init__(self, pairs: JudgedPairs, settings: RetrievalConfig, tokenizer, head_fraction: float = 0.5) -> None:
        self.pairs, self.settings = pairs, settings
        self.index = NeighbourIndex(pairs.vectors, settings.index)
        self.builder = BlockBuilder(tokenizer, pairs, settings.max_tokens, head_fraction)

    def neighbours(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                   responses_b: Sequence[Sequence[str]]) -> np.ndarray:
        """(N, k) positions of each row's neighbours in the index, under the leakage rule."""
        queries = embed_rows(prompts, responses_a, responses_b, self.settings)
        return find_neighbours(self.index, self.pairs.groups, queries, group_ids(prompts), self.settings.k)[0]

    def contexts(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                 responses_b: Sequence[Sequence[str]]) -> list[list[int]]:
        """Each row's neighbour block (PairEncoder `contexts`, for either A/B view)."""
        if not len(prompts):
            return []
        return self.builder.blocks(self.neighbours(prompts, responses_a, responses_b))


def load_augmenter(checkpoint_dir: str, tokenizer, config: Config) -> RetrievalAugmenter | None:
    """The checkpoint's augmenter, or None when it was trained without retrieval."""
    if not config.retrieval.enabled:
        return None
    if not os.path.isdir(os.path.join(checkpoint_dir, RETRIEVAL_DIR)):
        raise FileNotFoundError(f"{checkpoint_dir} was trained with retrieval.enabled=true but has no {RETRIEVAL_DIR}/ "
                                "folder (the index of its training pairs, which prediction searches): copy the "
                                "checkpoint with that folder, or retrain it")
    pairs, _ = JudgedPairs.load(checkpoint_dir)
    return RetrievalAugmenter(pairs, config.retrieval, tokenizer, config.format.head_fraction)


@dataclass
class RetrievalPlan:
    """What a training run needs: the index of its training pairs and every row's neighbours in it."""

    pairs: JudgedPairs  # the training rows, in training-frame order: the index each checkpoint carries
    train_neighbours: np.ndarray  # (N_train, k) positions into `pairs`, -1 = none
    valid_neighbours: np.ndarray  # (N_valid, k)


def plan_retrieval(train: pd.DataFrame, valid: pd.DataFrame, config: Config,
                   cache_dir: str | None = None) -> RetrievalPlan:
    """Embed the training and validation rows, index the training rows, find everyone's neighbours.

    Training rows search the training rows minus themselves and their prompt group; validation rows search
    the training rows (their prompt groups are in no training fold).
    """
    settings = config.retrieval

    def vectors_of(frame: pd.DataFrame) -> np.ndarray:
        return embed_rows(list(frame["prompt"]), list(frame["response_a"]), list(frame["response_b"]),
                          settings, cache_dir)

    pairs = JudgedPairs.from_frame(train, vectors_of(train), settings.max_tokens)
    index = NeighbourIndex(pairs.vectors, settings.index)
    train_neighbours, _ = find_neighbours(index, pairs.groups, pairs.vectors, pairs.groups, settings.k,
                                          self_positions=np.arange(len(pairs)))
    valid_groups = group_ids(list(valid["prompt"]))
    valid_neighbours, _ = find_neighbours(index, pairs.groups, vectors_of(valid), valid_groups, settings.k)
    return RetrievalPlan(pairs, train_neighbours, valid_neighbours)
