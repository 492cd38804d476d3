"""Temperature-1 outputs with a draft model follow the same distribution as without speculation.

A target and a draft model over an 8-token vocabulary (two different random
Llama models with a real word-level tokenizer, written with transformers and
tokenizers), thousands of seeded requests of 4 tokens each: the first comes
from the prefill, the next two are verified proposals (accepted, or drawn
from the residual after a rejection), the last is the bonus token or the
next step's. A chi-square test of homogeneity compares the joint counts of
tokens 2 and 3 and the counts of token 4 with and without speculation.
"""

from __future__ import annotations

import pytest
import torch

from fleetlm import LLM, SamplingParams

VOCAB = ["<s>", "</s>", "a", "b", "c", "d", "e", "f"]
N = 2000


def _write_model(path, seed: int, layers: int, hidden: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
                      initializer_range=0.25)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return str(path)


def homogeneity_p_value(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square test that two count vectors come from one distribution (cells with < 10
    observations in all are pooled)."""
    a, b = a.double(), b.double()
    small = (a + b) < 10
    a = torch.cat([a[~small], a[small].sum().view(1)])
    b = torch.cat([b[~small], b[small].sum().view(1)])
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    stat = (((a * (nb / na).sqrt() - b * (na / nb).sqrt()) ** 2) / (a + b)).sum()
    df = a.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def _counts(llm: LLM):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=4, ignore_eos=True) for i in range(N)]
    outs = llm.generate([[0, 2, 3, 4]] * N, params)
    toks = torch.tensor([o.outputs[0].token_ids for o in outs])
    assert toks.shape == (N, 4)
    v = len(VOCAB)
    return torch.bincount(toks[:, 1] * v + toks[:, 2], minlength=v * v), torch.bincount(toks[:, 3], minlength=v)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vocab")
    target = _write_model(root / "target", seed=0, layers=2, hidden=64)
    draft = _write_model(root / "draft", seed=1, layers=1, hidden=32)
    llm = LLM(model=target, max_num_seqs=64, speculative_config={
        "model": draft, "num_speculative_tokens": 2, "min_acceptance_rate": 0.0, "disable_by_batch_size": 64})
    yield llm
    llm.engine.shutdown()


def test_temperature_one_outputs_follow_the_target_distribution(llm):
    eng = llm.engine
    eng.spec.enabled = False
    ref_pairs, ref_last = _counts(llm)
    eng.spec.enabled = True
    before = eng.stats()
    pairs, last = _counts(llm)
    s = eng.stats()
    proposed = s.spec_decode_proposed_tokens - before.spec_decode_proposed_tokens
    accepted = s.spec_decode_accepted_tokens - before.spec_decode_accepted_tokens
    # Both paths ran often: proposals accepted, and rejected then redrawn from the residual.
    assert proposed >= 2 * N and 0.2 < accepted / proposed < 0.9, (proposed, accepted)
    assert homogeneity_p_value(pairs, ref_pairs) > 1e-3
    assert homogeneity_p_value(last, ref_last) > 1e-3
    # The outputs are random (not a few fixed strings), and the test can tell distributions apart.
    assert (ref_pairs > 0).sum() > 20
    skewed = ref_pairs.clone()
    skewed[ref_pairs.argmax()] += N // 4  # N/4 more samples of one outcome
    assert homogeneity_p_value(pairs, skewed) < 1e-3
