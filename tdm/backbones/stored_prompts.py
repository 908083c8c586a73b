"""The prompt-embedding store, a prompt set encoded once so training and sampling never load the text encoders
(this library; the stage around it is `tdm.prompt_store`).

`tdm prompt-store` (the `prompt_store` stage, before distill) runs a model's text encoders over a prompt set and
writes, per prompt, every conditioning tensor the family's denoiser takes (what `Backbone.encode_prompts` returns:
hidden states, pooled embeddings, attention masks, SDXL's time ids, FLUX's guidance input), plus the family's
unconditional conditioning (`Backbone.null_cond`: the encoding of "" or SDXL's zeros). Distill
(`distill.prompt_store`), teacher-ft (`teacher_ft.prompt_store`) and any `load_backbone(..., prompt_store=path)`
then build the backbone without its text encoders (`text_encoders=False`: they are never constructed) and read rows
from the store; the rows are the encoder's own output bytes, so an iteration with the store equals the iteration
without it bit for bit on the device the store was written on.

Layout of a store folder (written atomically: `tdm.artifacts.atomic_folder`):
  index.json              format, version, the fingerprint and its digest, the tensor keys (dtype and per-row
                          shape), the prompts in row order (the key of row i is prompts[i]), the shards (file,
                          rows, sha256), and provenance (device, library versions), "complete": true last.
  shards/00000.safetensors ...  per key one (rows, *shape) tensor; each shard's metadata names the fingerprint digest.
  null.safetensors        the unconditional conditioning, (1, *shape) per key.

The fingerprint (`fingerprint`) is what must match for a store to stand in for the encoders of a model folder:
the family; the dtype the encoders were loaded in (`load_dtype`: "model" = the folder's own, or bfloat16 / float16,
as distill's LoRA mode loads its frozen base); per text-encoder component its weights (`tdm.artifacts.
weights_digest`) and config (less `transformers_version`); per tokenizer a digest of its vocabulary, backend
pipeline, length and padding settings; the family's prompt settings (`Backbone.prompt_settings`: sequence lengths,
SDXL time ids and zero-null switch, FLUX embedded guidance); and the version of the encoding code (`ENCODING`).
A folder saved from a backbone loaded without its encoders links the source's encoder folders
(`Backbone.copy_skipped_components`), so a teacher-ft model, its distilled student and the pretrained model share
one store. A mismatch, a prompt the store lacks, or a partial / foreign shard is refused with a message naming the
key, the prompt or the file: a store is never silently used for a model it was not made with.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from tdm.backbones.base import Backbone, Cond

FORMAT = "tdm-prompt-store"
VERSION = 1
# Bump when an adapter's encode_prompts / null_cond changes what it returns for the same files and settings.
ENCODING = "tdm-encode-1"
INDEX = "index.json"
NULL_FILE = "null.safetensors"
SHARD_DIR = "shards"
SHARD_BYTES = 1 << 30  # at most ~1 GiB per shard (a T5-XXL row at 512 tokens is 8 MiB in float32)
CACHE_BYTES = 512 << 20  # stores up to this size are read into memory once; larger ones row by row
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "bool": torch.bool, "float64": torch.float64}


class MissingPrompts(KeyError, ValueError):
    """Prompts a store does not hold: a KeyError (a lookup that failed) that is also bad input (ValueError), so the
    CLI reports it as one `tdm: error:` line; str() is the message itself, not KeyError's quoted repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreMismatch(ValueError):
    """A prompt store made with other text encoders, tokenizers, settings or dtype than the model asks for."""


def dtype_name(dtype: torch.dtype | None) -> str:
    """The fingerprint's `load_dtype`: "model" (each part in its saved dtype) or torch's name (bfloat16 ...)."""
    return "model" if dtype is None else str(dtype).removeprefix("torch.")


# -- the fingerprint -------------------------------------------------------------------------------------------
def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _component_names(folder: Path, prefix: str) -> list[str]:
    from tdm.backbones import read_json_file

    meta = read_json_file(Path(folder) / "model_index.json")
    return sorted(n for n, spec in meta.items() if n.startswith(prefix) and isinstance(spec, list) and len(spec) == 2
                  and spec[1] is not None)


def encoder_digests(folder: str | Path) -> dict[str, dict[str, str]]:
    """{component: {"weights": weights_digest, "config": digest of config.json less transformers_version}} for
    every text encoder model_index.json lists; read from the files alone (nothing is loaded)."""
    from tdm.artifacts import weights_digest
    from tdm.backbones import read_json_file

    folder = Path(folder)
    out = {}
    for name in _component_names(folder, "text_encoder"):
        config = read_json_file(folder / name / "config.json")
        config.pop("transformers_version", None)
        out[name] = {"weights": weights_digest(folder / name),
                     "config": _sha(json.dumps(config, sort_keys=True, default=str))}
    return out


def tokenizer_digest(tokenizer) -> str:
    """What decides a tokenizer's ids and padding: its class, vocabulary, backend pipeline (normaliser,
    pre-tokeniser, model; the truncation / padding left by its last call cleared first, as `save` does), length,
    padding / truncation sides and special tokens."""
    from tdm.backbones.base import forget_call_settings

    forget_call_settings(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "vocab": _sha(json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False)),
        "backend": _sha(backend.to_str()) if backend is not None and hasattr(backend, "to_str") else None,
        "model_max_length": int(min(tokenizer.model_max_length, 2**31 - 1)),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "special_tokens": sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
    }
    return _sha(json.dumps(parts, sort_keys=True))


def backbone_tokenizers(backbone: Backbone) -> dict:
    """{component name: tokenizer} of a backbone (a pipeline's tokenizer* components; digits' `tokenizer`)."""
    pipe = getattr(backbone, "pipe", None)
    if pipe is not None:
        return {n: c for n, c in sorted(pipe.components.items()) if n.startswith("tokenizer") and c is not None}
    tokenizer = getattr(backbone, "tokenizer", None)
    return {"tokenizer": tokenizer} if tokenizer is not None else {}


def fingerprint(backbone: Backbone, folder: str | Path, dtype: torch.dtype | None) -> dict:
    """The fingerprint of `backbone` (loaded from `folder` in `dtype`, with or without its text encoders): see the
    module docstring. JSON data; equal fingerprints mean equal conditioning."""
    return {"format_version": VERSION, "encoding": ENCODING, "family": backbone.family,
            "load_dtype": dtype_name(dtype), "text_encoders": encoder_digests(folder),
            "tokenizers": {n: tokenizer_digest(t) for n, t in backbone_tokenizers(backbone).items()},
            "settings": json.loads(json.dumps(backbone.prompt_settings()))}


def digest(fp: dict) -> str:
    return _sha(json.dumps(fp, sort_keys=True))


def first_difference(want, have, path: str = "") -> str | None:
    """The dotted key of the first difference between two JSON values, with both values; None when equal."""
    if isinstance(want, dict) and isinstance(have, dict):
        for key in sorted(set(want) | set(have), key=str):
            if key not in want or key not in have:
                return f"{path}{key}: store {have.get(key, '<absent>')!r}, model {want.get(key, '<absent>')!r}"
            found = first_difference(want[key], have[key], f"{path}{key}.")
            if found:
                return found
        return None
    return None if want == have else f"{path.rstrip('.')}: store {have!r}, model {want!r}"


# -- reading ---------------------------------------------------------------------------------------------------
@dataclass
class Shard:
    file: Path
    first_row: int
    rows: int


class PromptStore:
    """A store folder, opened and checked (`open`); `encode` / `null` give conditioning like the backbone's own."""

    def __init__(self, path: Path, index: dict):
        self.path, self.index = Path(path), index
        self.fingerprint: dict = index["fingerprint"]
        self.keys: dict[str, dict] = index["keys"]
        self.prompts: list[str] = index["prompts"]
        self.rows: dict[str, int] = {p: i for i, p in enumerate(self.prompts)}
        self.shards: list[Shard] = []
        first = 0
        for entry in index["shards"]:
            self.shards.append(Shard(self.path / entry["file"], first, int(entry["rows"])))
            first += int(entry["rows"])
        self._cache: dict[str, torch.Tensor] | None = None
        self._null: Cond | None = None

    # -- opening and checks --------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "PromptStore":
        """Open a store folder; FileNotFoundError / ValueError naming the file when it is not a complete store:
        no index (an interrupted or foreign folder), another format or version, a shard or the null file
        missing, truncated, with other keys / shapes / row counts than the index says, or from another store."""
        from tdm.backbones import check_safetensors, read_json_file

        path = Path(path).expanduser()
        index_file = path / INDEX
        if not path.is_dir():
            raise FileNotFoundError(f"prompt store not found: {path} (run `tdm prompt-store` first?)")
        if not index_file.is_file():
            raise ValueError(f"{path}: not a complete prompt store ({INDEX} missing: an interrupted write or "
                             f"another folder); rerun `tdm prompt-store`")
        index = read_json_file(index_file)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{index_file}: not a {FORMAT} v{VERSION} index (format {index.get('format')!r}, "
                             f"version {index.get('version')!r}); rerun `tdm prompt-store`")
        needed = ("fingerprint", "fingerprint_digest", "keys", "prompts", "shards", "complete")
        missing = [k for k in needed if k not in index]
        if missing or index["complete"] is not True:
            raise ValueError(f"{index_file}: incomplete index (missing {missing or ['complete: true']})")
        if digest(index["fingerprint"]) != index["fingerprint_digest"]:
            raise ValueError(f"{index_file}: the fingerprint does not match its digest (edited by hand?)")
        store = cls(path, index)
        total = sum(s.rows for s in store.shards)
        if total != len(store.prompts) or len(store.rows) != len(store.prompts):
            raise ValueError(f"{index_file}: {len(store.prompts)} prompts ({len(store.rows)} distinct) but the "
                             f"shards hold {total} rows")
        for shard in [*store.shards, Shard(path / NULL_FILE, -1, 1)]:
            if not shard.file.is_file():
                raise FileNotFoundError(f"{shard.file}: missing from the prompt store {path} (partially copied?)")
            check_safetensors(shard.file)
            store._check_header(shard)
        return store

    def _check_header(self, shard: Shard) -> None:
        from safetensors import safe_open

        with safe_open(str(shard.file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("tdm_prompt_store") != self.index["fingerprint_digest"]:
                raise ValueError(f"{shard.file}: belongs to another prompt store (fingerprint "
                                 f"{meta.get('tdm_prompt_store')!r}, the index says "
                                 f"{self.index['fingerprint_digest']!r})")
            if set(f.keys()) != set(self.keys):
                raise ValueError(f"{shard.file}: holds keys {sorted(f.keys())}, the index lists {sorted(self.keys)}")
            for key, spec in self.keys.items():
                shape = f.get_slice(key).get_shape()
                if list(shape) != [shard.rows, *spec["shape"]]:
                    raise ValueError(f"{shard.file}: {key} has shape {list(shape)}, expected "
                                     f"{[shard.rows, *spec['shape']]}")

    def check_files(self, folder: str | Path, family: str, dtype: torch.dtype | None) -> None:
        """The part of the fingerprint the model folder's files decide (family, load dtype, text encoders),
        checked without loading anything; StoreMismatch naming the first difference."""
        want = {"family": family, "load_dtype": dtype_name(dtype), "text_encoders": encoder_digests(folder)}
        have = {k: self.fingerprint.get(k) for k in want}
        self._refuse(first_difference(want, have), folder)

    def check(self, backbone: Backbone, folder: str | Path, dtype: torch.dtype | None) -> None:
        """The whole fingerprint against `backbone` (loaded from `folder` in `dtype`); StoreMismatch naming the
        first difference."""
        self._refuse(first_difference(fingerprint(backbone, folder, dtype), self.fingerprint), folder)

    def _refuse(self, difference: str | None, folder) -> None:
        if difference:
            raise StoreMismatch(f"prompt store {self.path} was made for another model or setting than {folder}: "
                                f"{difference}; rebuild it (`tdm prompt-store`) for this model")

    def require(self, prompts: Iterable[str], what: str = "prompts") -> None:
        """KeyError naming the first prompts of `prompts` the store lacks (and how many), before any compute."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if missing:
            shown = ", ".join(repr(p) for p in missing[:3])
            raise MissingPrompts(f"prompt store {self.path}: {len(missing)} of the {what} are not in it ({shown}"
                           f"{', ...' if len(missing) > 3 else ''}); rebuild it with them (prompt_store.prompts)")

    # -- rows ------------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(s.file.stat().st_size for s in self.shards)

    def _load_all(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if self._cache is None:
            parts = [load_file(str(s.file)) for s in self.shards]
            self._cache = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in self.keys}
        return self._cache

    def _rows(self, rows: list[int]) -> dict[str, torch.Tensor]:
        if self.nbytes <= CACHE_BYTES:
            table = self._load_all()
            index = torch.tensor(rows, dtype=torch.long)
            return {k: table[k].index_select(0, index) for k in self.keys}
        from safetensors import safe_open

        out: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        handles = {}
        for row in rows:
            shard = next(s for s in self.shards if s.first_row <= row < s.first_row + s.rows)
            if shard.file not in handles:
                handles[shard.file] = safe_open(str(shard.file), framework="pt")
            f, r = handles[shard.file], row - shard.first_row
            for k in self.keys:
                out[k].append(f.get_slice(k)[r:r + 1])
        return {k: torch.cat(v) for k, v in out.items()}

    def _live_settings(self, backbone: Backbone) -> None:
        have = self.fingerprint["settings"]
        want = json.loads(json.dumps(backbone.prompt_settings()))
        if want != have:
            self._refuse(first_difference({"settings": want}, {"settings": have}), backbone.source_folder)

    def encode(self, prompts: Sequence[str], backbone: Backbone) -> Cond:
        """The conditioning of `prompts` (batch-first, on the backbone's device), the rows the encoders wrote:
        equal to `backbone.encode_prompts(prompts)` with the encoders on the device the store was written on.
        KeyError naming a missing prompt; StoreMismatch when the backbone's prompt settings changed since attach."""
        self._live_settings(backbone)
        self.require(prompts)
        rows = self._rows([self.rows[p] for p in prompts])
        return {k: v.to(backbone.device) for k, v in rows.items()}

    def null(self, backbone: Backbone) -> Cond:
        """The unconditional conditioning (1, ...) per key, as `backbone.null_cond(1)` gives it."""
        from safetensors.torch import load_file

        self._live_settings(backbone)
        if self._null is None:
            self._null = load_file(str(self.path / NULL_FILE))
        return {k: v.to(backbone.device) for k, v in self._null.items()}


def attach(backbone: Backbone, path: str | Path, dtype: torch.dtype | None = None) -> PromptStore:
    """Open the store at `path`, check its whole fingerprint against `backbone` (loaded from its
    `source_folder` in `dtype`), and make `backbone.encode_prompts` / `null_cond` read it. Raises as
    `PromptStore.open` and `PromptStore.check`."""
    if backbone.source_folder is None:
        raise ValueError(f"a prompt store needs a backbone loaded from a model folder (this {backbone.family} "
                         f"backbone was built in memory)")
    store = PromptStore.open(path)
    store.check(backbone, backbone.source_folder, dtype)
    backbone.prompt_store = store
    backbone._null_cache = None
    return store


def open_for(path: str | Path, folder: str | Path, dtype: torch.dtype | None, prompts: Iterable[str] = (),
             key: str = "prompt_store") -> PromptStore:
    """A stage's check before any model loads: the store opens, was made from `folder`'s text encoders in
    `dtype` (`check_files`), and holds every prompt of `prompts`. Errors are prefixed with the config `key`."""
    from tdm.backbones import check_model

    try:
        folder, family = check_model(folder)
        store = PromptStore.open(path)
        store.check_files(folder, family, dtype)
        store.require(prompts)
    except KeyError as err:
        raise MissingPrompts(f"{key}: {err.args[0]}") from None
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from None
    except ValueError as err:
        raise type(err)(f"{key}: {err}") from None
    return store


# -- writing ---------------------------------------------------------------------------------------------------
def write_store(backbone: Backbone, folder: str | Path, prompts: Sequence[str], out: str | Path,
                dtype: torch.dtype | None = None, batch_size: int = 64, progress: bool = False) -> dict:
    """Encode `prompts` (deduplicated, "" always included) with `backbone` (loaded from `folder` in `dtype`, its
    text encoders present) in batches of `batch_size`, and write the store folder `out` atomically. Returns a
    summary (prompts, shards, bytes, seconds, fingerprint digest)."""
    from safetensors.torch import save_file

    from tdm.artifacts import atomic_folder

    if backbone.prompt_store is not None or backbone.skipped_components:
        raise ValueError("write_store: the backbone must run its own text encoders (no store attached)")
    unique = list(dict.fromkeys([*prompts, ""]))
    fp = fingerprint(backbone, folder, dtype)
    fp_digest = digest(fp)
    meta = {"format": "pt", "tdm_prompt_store": fp_digest}
    t0 = time.perf_counter()
    keys: dict[str, dict] | None = None
    shards: list[dict] = []
    pending: dict[str, list[torch.Tensor]] = {}
    pending_rows = pending_bytes = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(unique), desc="prompt_store", unit="prompt", dynamic_ncols=True)
    with atomic_folder(out) as tmp:
        (tmp / SHARD_DIR).mkdir()

        def flush() -> None:
            nonlocal pending, pending_rows, pending_bytes
            if not pending_rows:
                return
            name = f"{SHARD_DIR}/{len(shards):05d}.safetensors"
            save_file({k: torch.cat(v).contiguous() for k, v in pending.items()}, str(tmp / name), metadata=meta)
            shards.append({"file": name, "rows": pending_rows,
                           "sha256": hashlib.sha256((tmp / name).read_bytes()).hexdigest()})
            pending, pending_rows, pending_bytes = {}, 0, 0

        for start in range(0, len(unique), batch_size):
            batch = unique[start:start + batch_size]
            cond = {k: v.detach().to("cpu") for k, v in backbone.encode_prompts(batch).items()}
            if keys is None:
                keys = {k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape[1:])} for k, v in cond.items()}
            elif set(cond) != set(keys):
                raise RuntimeError(f"{backbone.family}: encode_prompts returned keys {sorted(cond)} then {sorted(keys)}")
            row_bytes = sum(v[0].numel() * v.element_size() for v in cond.values())
            for i in range(len(batch)):
                if pending_rows and pending_bytes + row_bytes > SHARD_BYTES:
                    flush()
                for k, v in cond.items():
                    pending.setdefault(k, []).append(v[i:i + 1])
                pending_rows += 1
                pending_bytes += row_bytes
            if bar is not None:
                bar.update(len(batch))
        flush()
        null = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.null_cond(1).items()}
        if set(null) != set(keys):
            raise RuntimeError(f"{backbone.family}: null_cond keys {sorted(null)} differ from the prompts' {sorted(keys)}")
        save_file(null, str(tmp / NULL_FILE), metadata=meta)
        import diffusers
        import transformers

        import tdm

        index = {"format": FORMAT, "version": VERSION, "fingerprint": fp, "fingerprint_digest": fp_digest,
                 "keys": keys, "prompts": unique, "shards": shards, "null": NULL_FILE,
                 "provenance": {"model": str(folder), "device": str(backbone.device), "tdm": tdm.__version__,
                                "torch": torch.__version__, "transformers": transformers.__version__,
                                "diffusers": diffusers.__version__},
                 "complete": True}
        (tmp / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if bar is not None:
        bar.close()
    return {"prompts": len(unique), "shards": len(shards), "keys": sorted(keys),
            "bytes": sum((Path(out) / s["file"]).stat().st_size for s in shards),
            "encode_time_s": round(time.perf_counter() - t0, 2), "fingerprint": fp_digest}


# -- shared helpers (no config reads: every stage that imports the backbones imports this module) -----------
def digit_prompts() -> list[str]:
    """Every digits prompt any stage uses: the ten digits in each phrasing (`tdm.data.PROMPT_TEMPLATES`)."""
    from tdm.data import PROMPT_TEMPLATES, digit_prompt

    return [digit_prompt(label, t) for t in range(len(PROMPT_TEMPLATES)) for label in range(10)]


def frozen_dtype(mode: str, mixed_precision: str) -> torch.dtype | None:
    """The dtype distill loads its frozen base in (teacher, text encoders, VAE): LoRA mode under bf16 / fp16 holds
    it in that dtype (the adapters stay float32); full mode, or no mixed precision, keeps the saved dtype (None)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision) if mode == "lora" else None


__all__ = ["PromptStore", "StoreMismatch", "attach", "open_for", "write_store", "fingerprint", "encoder_digests",
           "tokenizer_digest", "digit_prompts", "frozen_dtype", "first_difference", "dtype_name"]
