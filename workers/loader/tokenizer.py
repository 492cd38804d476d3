"""Tokenizers for every kind of ModelSource, chat template set.

- hf: `AutoTokenizer.from_pretrained(dir)`, as the directory defines it.
- gguf: transformers' own GGUF conversion (`gguf_file=`), with the chat
  template from the file's `tokenizer.chat_template`. The conversion takes
  about 8 s for the embedded model, so the converted tokenizer is saved under
  `cache_dir` keyed by a hash of the GGUF header (where the vocabulary lives;
  weights do not change a tokenizer), the file size and the transformers
  version; later loads take ~0.2 s.
- dummy: a byte-level tokenizer built locally (no downloads, no dependency on
  any model file) that spans the config's whole vocabulary: the 256 bytes,
  the config's bos/eos/pad ids as special tokens, and `<|unused_N|>` fillers
  for every other id, so any id < vocab_size decodes (random weights sample
  any id). One id per byte keeps encoding trivially correct for any text.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetlm.workers.loader.gguf_format import read_gguf_header
from fleetlm.workers.loader.source import ModelSource, resolve_model

if TYPE_CHECKING:  # transformers costs ~1.5 s to import: only when a tokenizer is built
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "fleetlm" / "tokenizers"

DUMMY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def model_tokenizer(mc) -> PreTrainedTokenizerBase:
    """The tokenizer an engine serving ``mc`` (a ``ModelConfig``) uses: its ``tokenizer``
    setting (a directory or hub id) or the model's own, with its ``chat_template`` override."""
    if mc.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer)
    else:
        tokenizer = load_tokenizer(resolve_model(mc.model, "dummy" if mc.kind == "dummy" else "auto"))
    if mc.chat_template is not None:
        tokenizer.chat_template = mc.chat_template
    return tokenizer


def load_tokenizer(source: ModelSource, *, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `source`; `cache_dir` (GGUF only) defaults to
    ~/.cache/fleetlm/tokenizers."""
    from transformers import AutoTokenizer

    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(source.path)
    if source.kind == "gguf":
        return _gguf_tokenizer(Path(source.path), Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    if source.kind == "dummy":
        return byte_level_tokenizer(source.hf_config)
    raise ValueError(f"unknown ModelSource kind {source.kind!r}")


def _gguf_tokenizer(path: Path, cache_dir: Path) -> PreTrainedTokenizerBase:
    import transformers
    from transformers import AutoTokenizer

    header = read_gguf_header(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(header.data_offset)).hexdigest()[:32]
    cached = cache_dir / f"{digest}-{path.stat().st_size}-tf{transformers.__version__}"
    if cached.is_dir():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception:  # a damaged cache entry: rebuild it below
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = header.metadata.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    _save_atomically(tokenizer, cached)
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write to a temp dir, then rename: a concurrent reader (other workers of
    the same host) never sees a half-written entry. A cache that cannot be
    written only costs the next load another conversion."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    except OSError:
        return
    try:
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:  # another process won the race, or the disk is full
        shutil.rmtree(tmp, ignore_errors=True)


def byte_level_tokenizer(hf_config: dict[str, Any]) -> PreTrainedTokenizerFast:
    """A tokenizer over exactly `vocab_size` ids (see module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(hf_config["vocab_size"])
    specials, roles = _special_tokens(hf_config)
    for token_id in specials:
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"special token id {token_id} is outside vocab_size {vocab_size}")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    free_ids = (i for i in range(vocab_size) if i not in specials)
    vocab = {symbol: next(free_ids) for symbol in _bytes_to_unicode().values()}
    vocab.update({text: token_id for token_id, text in specials.items()})
    vocab.update({f"<|unused_{i}|>": i for i in free_ids})

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=roles.get("bos"),
        eos_token=roles.get("eos"),
        pad_token=roles.get("pad", roles.get("eos")),
        additional_special_tokens=[t for t in specials.values() if t not in roles.values()],
        chat_template=DUMMY_CHAT_TEMPLATE,
        model_max_length=int(hf_config.get("max_position_embeddings", 1 << 30)),
    )


def _special_tokens(hf_config: dict[str, Any]) -> tuple[dict[int, str], dict[str, str]]:
    """(id -> text, role -> text) for the config's bos/eos/pad ids. eos may be
    a list (its first id is *the* eos token); roles may share an id."""
    specials: dict[int, str] = {}
    roles: dict[str, str] = {}
    for role in ("bos", "eos", "pad"):
        value = hf_config.get(f"{role}_token_id")
        ids = [] if value is None else [int(v) for v in (value if isinstance(value, list) else [value])]
        for n, token_id in enumerate(ids):
            text = specials.setdefault(token_id, f"<|{role}|>" if n == 0 else f"<|{role}_{n}|>")
            roles.setdefault(role, text)
    return specials, roles


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE:
    printable Latin-1 bytes map to themselves, the rest to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))
