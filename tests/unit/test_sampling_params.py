import dataclasses
import math

import pytest

from fleetlm.engine.sampling_params import SamplingParams, SamplingType

INVALID = [
    # (kwargs, the parameter the error must name)
    ({"n": 0}, "n"),
    ({"n": 1.0}, "n"),
    ({"n": True}, "n"),
    ({"n": 2, "best_of": 3}, "best_of"),
    ({"best_of": 2}, "best_of"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": 0.5}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 1.0}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": "x", "detokenize": False}, "stop"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"logit_bias": {1: 100.5}}, "logit_bias"),
    ({"logit_bias": {1: -101}}, "logit_bias"),
    ({"logit_bias": {"1": 1.0}}, "logit_bias"),
    ({"logit_bias": {1.0: 1.0}}, "logit_bias"),
    ({"logit_bias": [(1, 1.0)]}, "logit_bias"),
]


@pytest.mark.parametrize("kwargs,param", INVALID, ids=[f"{p}-{k}" for k, p in INVALID])
def test_invalid_value_raises_naming_parameter(kwargs, param):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(param + " ")


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.ignore_eos and not p.include_stop_str_in_output


def test_valid_edge_values_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(logprobs=0, prompt_logprobs=0)
    SamplingParams(n=3, best_of=3, max_tokens=None, min_tokens=100, seed=-5, temperature=0)
    SamplingParams(logit_bias={5: -100, 6: 100.0}, stop_token_ids=(3, 4), stop=("a", "b"))


def test_normalizations():
    p = SamplingParams(top_k=-1, stop="END", logit_bias={3: 1})
    assert p.top_k == 0
    assert p.stop == ["END"]
    assert p.logit_bias == {3: 1.0} and isinstance(p.logit_bias[3], float)
    ids = [1, 2]
    q = SamplingParams(stop_token_ids=ids)
    ids.append(3)
    assert q.stop_token_ids == [1, 2]  # copied, not aliased


def test_greedy_resets_filters_and_sampling_type():
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    assert g.is_greedy and g.sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=9e-6).is_greedy
    assert SamplingParams(temperature=1e-5).sampling_type == SamplingType.RANDOM
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0, seed=3).sampling_type == SamplingType.GREEDY


def test_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 5
    assert dataclasses.replace(p, max_tokens=5).max_tokens == 5
    with pytest.raises(ValueError, match="^max_tokens"):
        dataclasses.replace(p, max_tokens=0)


def test_clone_for_child():
    p = SamplingParams(n=3, best_of=3, seed=10, temperature=0.7, stop=["x"])
    kids = [p.clone_for_child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12]
    assert all(k.n == 1 and k.best_of is None and k.temperature == 0.7 and k.stop == ["x"] for k in kids)
    assert SamplingParams(n=2).clone_for_child(1).seed is None
    with pytest.raises(ValueError, match="^i "):
        p.clone_for_child(3)


@pytest.mark.parametrize(
    "kwargs,check,param",
    [
        ({"stop_token_ids": [100]}, {}, "stop_token_ids"),
        ({"logit_bias": {100: 1.0}}, {}, "logit_bias"),
        ({"logprobs": 21}, {}, "logprobs"),
        ({"logprobs": 5}, {"max_logprobs": 4}, "logprobs"),
        ({"prompt_logprobs": 21}, {}, "prompt_logprobs"),
        ({"n": 5}, {"max_n": 4}, "n"),
    ],
)
def test_validate_for_model(kwargs, check, param):
    p = SamplingParams(**kwargs)
    with pytest.raises(ValueError) as e:
        p.validate_for_model(100, **check)
    assert str(e.value).startswith(param + " ")


def test_validate_for_model_accepts_in_range():
    p = SamplingParams(stop_token_ids=[99], logit_bias={0: 1}, logprobs=20, prompt_logprobs=20, n=4)
    p.validate_for_model(100, max_logprobs=20, max_n=4)
