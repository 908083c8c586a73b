"""A real CLIP BPE tokenizer built offline from the vocabulary that ships inside open-clip-torch.

transformers 5 builds an empty vocabulary from `CLIPTokenizer(vocab_file=..., merges_file=...)`, so we write
`vocab.json` + `merges.txt` to a folder and load it with `from_pretrained`. The vocabulary is laid out as
OpenAI's: 256 byte symbols, the same with `</w>`, one token per merge, then the two special tokens. Taking a
prefix of the merges gives a smaller vocabulary whose ids agree with the full CLIP vocabulary on every token it has.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

FULL_NUM_MERGES = 48894


def _bpe_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open-clip-torch's BPE vocabulary is missing: {path}")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: str | Path, num_merges: int = FULL_NUM_MERGES, model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer folder using the first `num_merges` BPE merges; returns the folder."""
    if not 0 <= num_merges <= FULL_NUM_MERGES:
        raise ValueError(f"num_merges must be in [0, {FULL_NUM_MERGES}], got {num_merges}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    return folder


def vocab_size(num_merges: int) -> int:
    return 512 + num_merges + 2
