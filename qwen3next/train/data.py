"""Token datasets: text files -> one flat memory-mapped token file, and deterministic batches over it.

A token file `NAME.bin` holds every document's ids back to back, each followed by a separator token
(`<|endoftext|>` when the tokenizer has it, else its eos), as uint16 when the vocabulary fits (< 65536), else
uint32. Its sidecar `NAME.json` says the dtype, the count and which tokenizer made it.

Batches are windows of seq_len + 1 tokens (inputs and their next-token targets). `WindowSampler` is a pure
function of (seed, step): resuming needs only the step, and the same seed and step always give the same batch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")
FORMAT = "qwen3next-tokens"


# ---- token files --------------------------------------------------------------------------------------------------
def sidecar_path(bin_path: str) -> str:
    return os.path.splitext(bin_path)[0] + ".json"


class TokenFile:
    """A read-only memory map of a token file, validated against its sidecar."""

    def __init__(self, path: str):
        meta_path = sidecar_path(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"token file {path!r} does not exist (make one with `qwen3next data prepare`)")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"token file {path!r} has no sidecar {meta_path!r} (written by prepare_dataset)")
        with open(meta_path, encoding="utf-8") as f:
            try:
                self.meta = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("dtype") not in ("uint16", "uint32"):
            raise ValueError(f"{meta_path}: not a {FORMAT} sidecar with dtype uint16/uint32")
        self.path = path
        self.dtype = np.dtype(self.meta["dtype"])
        self.count = int(self.meta["count"])
        size = os.path.getsize(path)
        if size != self.count * self.dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes, but the sidecar promises {self.count} {self.dtype} tokens "
                             f"({self.count * self.dtype.itemsize} bytes); the file is truncated or stale")
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.count,)) if self.count else \
            np.zeros(0, self.dtype)

    @property
    def vocab_size(self) -> int:
        return int(self.meta.get("tokenizer", {}).get("vocab_size", 0))

    def __len__(self) -> int:
        return self.count


def write_sidecar(bin_path: str, meta: dict) -> None:
    with open(sidecar_path(bin_path), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=2)
        f.write("\n")


def write_token_file(path: str, ids, vocab_size: int, **meta) -> TokenFile:
    """Write ids (any int sequence) as a token file with its sidecar, e.g. for synthetic data."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{arr.min()}, {arr.max()}]")
    dtype = np.uint16 if vocab_size < 65536 else np.uint32
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arr.astype(dtype).tofile(path)
    write_sidecar(path, {"dtype": np.dtype(dtype).name, "count": int(arr.size), "documents": meta.pop("documents", 1),
                         "max_id": int(arr.max()) if arr.size else -1,
                         "tokenizer": {"path": None, "vocab_size": vocab_size}, **meta})
    return TokenFile(path)


# ---- preparing ----------------------------------------------------------------------------------------------------
def iter_input_files(inputs: Iterable[str]) -> list[str]:
    """Files given directly, plus every text file (TEXT_SUFFIXES) under given folders, in sorted order."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) found in {list(inputs)}")
    return files


def iter_documents(files: Iterable[str]) -> Iterator[str]:
    """One document per plain text file; one per line of a .jsonl file (its "text" field)."""
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{path}:{n}: expected a JSON object with a \"text\" string") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: \"text\" must be a string, got {type(text).__name__}")
                    yield text
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def separator_id(tokenizer) -> int:
    sep = tokenizer.token_to_id("<|endoftext|>")
    if sep is None:
        sep = tokenizer.eos_token_id
    if sep is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an eos token to separate documents")
    return sep


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    # The tokenizers backend encodes a batch on all cores; anything else encodes one text at a time.
    batch = getattr(getattr(tokenizer, "_tok", None), "encode_batch", None)
    if batch is not None:
        return [e.ids for e in batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t) for t in texts]


def prepare_dataset(inputs: list[str], tokenizer, out_path: str, eval_fraction: float = 0.01, seed: int = 0,
                    tokenizer_path: str | None = None, batch_docs: int = 256, progress: bool = False) -> dict:
    """Tokenize the documents of `inputs` (files and folders) into `out_path/train.bin` and `out_path/eval.bin`.

    Each document goes to eval with probability `eval_fraction` (a seeded draw per document, so the split is
    deterministic and whole documents stay on one side); at least one goes there when eval_fraction > 0 and there
    are two or more documents. Returns {"train": sidecar, "eval": sidecar}.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    from tqdm import tqdm
    files = iter_input_files(inputs)
    os.makedirs(out_path, exist_ok=True)
    vocab = tokenizer.vocab_size
    dtype = np.uint16 if vocab < 65536 else np.uint32
    sep = separator_id(tokenizer)
    rng = np.random.default_rng(seed)
    paths = {s: os.path.join(out_path, f"{s}.bin") for s in ("train", "eval")}
    stats = {s: {"count": 0, "documents": 0, "max_id": -1} for s in paths}
    outs = {s: open(p, "wb") for s, p in paths.items()}
    last_doc: list[int] | None = None
    try:
        docs = iter_documents(files)
        bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
        while True:
            texts = [t for _, t in zip(range(batch_docs), docs)]
            if not texts:
                break
            for ids in _encode_many(tokenizer, texts):
                ids.append(sep)
                split = "eval" if eval_fraction and rng.random() < eval_fraction else "train"
                _append(outs[split], stats[split], ids, dtype)
                last_doc = ids if split == "train" else last_doc
            bar.update(len(texts))
        bar.close()
    finally:
        for f in outs.values():
            f.close()
    if eval_fraction and stats["eval"]["documents"] == 0 and stats["train"]["documents"] >= 2:
        _move_last_document(paths, stats, last_doc, dtype)
    info = {"path": os.path.abspath(tokenizer_path) if tokenizer_path else None, "vocab_size": vocab,
            "eos_token_id": tokenizer.eos_token_id, "separator_id": sep, "backend": type(tokenizer).__name__}
    result = {}
    for split, path in paths.items():
        meta = {"split": split, "dtype": np.dtype(dtype).name, **stats[split], "tokenizer": info,
                "sources": [os.path.abspath(p) for p in inputs], "eval_fraction": eval_fraction, "seed": seed}
        write_sidecar(path, meta)
        result[split] = meta
    return result


def _append(f, stats: dict, ids: list[int], dtype) -> None:
    arr = np.asarray(ids, dtype=np.int64)
    stats["max_id"] = max(stats["max_id"], int(arr.max()))
    f.write(arr.astype(dtype).tobytes())
    stats["count"] += len(arr)
    stats["documents"] += 1


def _move_last_document(paths: dict, stats: dict, doc: list[int], dtype) -> None:
    """No document was drawn for eval: move the last train document there, so eval is never empty."""
    n = len(doc)
    with open(paths["train"], "r+b") as f:
        f.truncate((stats["train"]["count"] - n) * np.dtype(dtype).itemsize)
    stats["train"]["count"] -= n
    stats["train"]["documents"] -= 1
    with open(paths["eval"], "ab") as f:
        _append(f, stats["eval"], doc, dtype)


# ---- batches ------------------------------------------------------------------------------------------------------
@dataclass
class WindowSampler:
    """Training batches: epochs of shuffled, non-overlapping windows of seq_len + 1 tokens.

    Epoch e cuts the stream into windows starting at offset_e + i * seq_len (consecutive windows share one token,
    so every token is a target once per epoch) and visits them in a permutation drawn from (seed, e). Step s takes
    global samples s*B .. s*B + B - 1 of that endless sequence, B = micro_batch * grad_accum * world_size; rank r
    and micro-batch m take their slice. Everything is a function of (seed, step): the sampler's only state.
    """

    data: TokenFile
    seq_len: int
    micro_batch: int
    grad_accum: int = 1
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if len(self.data) < 2 * self.seq_len + 1:   # one whole window at any epoch offset in [0, seq_len)
            raise ValueError(f"{self.data.path}: {len(self.data)} tokens are too few for windows of seq_len + 1 = "
                             f"{self.seq_len + 1} (need at least 2 * seq_len + 1); lower data.seq_len or add data")
        self.step = 0
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, window permutation) of an epoch, drawn from (seed, epoch) alone."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.seq_len))
            n_windows = (len(self.data) - 1 - offset) // self.seq_len
            self._epochs[epoch] = (offset, rng.permutation(n_windows))
        return self._epochs[epoch]

    def window_starts(self, step: int) -> np.ndarray:
        """Start offsets of every window of global step `step` (all ranks, all micro-batches), in order."""
        starts = []
        for i in range(step * self.global_batch, (step + 1) * self.global_batch):
            epoch, pos = self._locate(i)
            offset, perm = self._epoch(epoch)
            starts.append(offset + int(perm[pos]) * self.seq_len)
        return np.asarray(starts, dtype=np.int64)

    def _locate(self, sample: int) -> tuple[int, int]:
        epoch = 0
        while True:   # epochs differ in length by at most one window; walk them
            n = len(self._epoch(epoch)[1])
            if sample < n:
                return epoch, sample
            sample -= n
            epoch += 1

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's grad_accum micro-batches of step `step`, each [micro_batch, seq_len + 1] int64."""
        starts = self.window_starts(step)
        mine = starts.reshape(self.grad_accum, self.world_size, self.micro_batch)[:, self.rank]
        return [read_windows(self.data, row, self.seq_len + 1) for row in mine]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "global_batch": self.global_batch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data sampler: its {key} was {state[key]}, the config now gives "
                                 f"{getattr(self, key)}")
        self.step = int(state["step"])


def read_windows(data: TokenFile, starts, length: int) -> torch.Tensor:
    rows = np.stack([np.asarray(data.tokens[s:s + length], dtype=np.int64) for s in starts])
    return torch.from_numpy(rows)


def eval_windows(data: TokenFile, seq_len: int, n_windows: int) -> np.ndarray:
    """Evenly spaced window starts over a held-out file: the same windows at every evaluation."""
    last = len(data) - (seq_len + 1)
    if last < 0:
        raise ValueError(f"{data.path}: {len(data)} held-out tokens cannot fill one window of {seq_len + 1}")
    return np.linspace(0, last, n_windows).round().astype(np.int64)
