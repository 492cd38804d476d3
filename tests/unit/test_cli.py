"""`fleetlm serve`'s vLLM-style flags, the loopback shim, hub ids and `fleetlm bench --base-url`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fleetlm.cluster.cli import CLIError, app_args_from_cli, build_parser, main


def _cli(argv, environ=None):
    return app_args_from_cli(build_parser().parse_args(["serve", *argv]), environ or {})


def test_positional_model_and_vllm_flags():
    args, http, _ = _cli(["my/model", "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching",
                          "--max-num-batched-tokens", "1024", "--enforce-eager", "--seed", "3", "--block-size", "32",
                          "--tokenizer", "tok/dir", "--chat-template", "{{ x }}", "--max-logprobs", "5",
                          "--served-model-name", "served"])
    assert args == {
        "models": [{"model": "my/model", "gpu_memory_utilization": 0.5, "enable_prefix_caching": False,
                    "max_num_batched_tokens": 1024, "enforce_eager": True, "seed": 3, "block_size": 32,
                    "tokenizer": "tok/dir", "chat_template": "{{ x }}", "name": "served"}],
        "max_logprobs": 5,
    }
    assert _cli(["m", "--model", "m"])[0] == {"models": [{"model": "m"}]}
    with pytest.raises(CLIError, match="two models"):
        _cli(["a", "--model", "b"])


def test_trust_remote_code_is_refused_before_anything_starts(capsys):
    assert main(["serve", "--trust-remote-code"]) == 2
    assert "trust_remote_code is not supported" in capsys.readouterr().err
    from fleetlm.engine.args import EngineArgs

    with pytest.raises(ValueError, match="trust_remote_code is not supported"):
        EngineArgs(trust_remote_code=True).create_engine_config()


def test_help_names_guarded_routes_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "/v1/chat/completions" in out and "/debug/invariants" in out and "/health, /ping, /metrics" in out
    assert "(default: 256 on GPU, 64 on CPU)" in out and "(default: 127.0.0.1)" in out


def test_chat_template_is_a_file_or_a_template(tmp_path):
    from fleetlm.engine.args import resolve_chat_template

    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_chat_template(str(f)) == f.read_text()
    assert resolve_chat_template("{{ messages }}") == "{{ messages }}"
    assert resolve_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))


def test_bench_base_url_takes_the_openai_client_form():
    from fleetlm.benchmarks.serve_load import server_root

    assert server_root("http://h:8000/v1") == "http://h:8000"
    assert server_root("http://h:8000/v1/") == "http://h:8000"
    assert server_root("http://h:8000") == "http://h:8000"


# --- the loopback shim -------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, socket, sys
    out = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        try:
            s.bind((host, int(sys.argv[1]) if host == "0.0.0.0" and len(sys.argv) > 1 else 0))
            out.append(s.getsockname()[0])
        except OSError as e:
            out.append(f"error {e.errno}")
    print(json.dumps(out))
""")


def test_shim_moves_every_listener_to_loopback_but_the_kept_port(tmp_path):
    from fleetlm.cluster.loopback import KEEP_PORT_ENV, build_shim, loopback_environ

    shim, why = build_shim(tmp_path)
    assert shim is not None, why
    assert build_shim(tmp_path) == (shim, "")  # cached: built once per source
    env = loopback_environ(dict(os.environ), 1, shim)  # keep port 1: nothing here binds it
    assert env["LD_PRELOAD"].startswith(str(shim)) and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"

    def probe(*args, **extra):
        run = subprocess.run([sys.executable, "-c", PROBE, *args], env={**env, **extra}, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    # Wildcards and other hosts' addresses land on loopback (IPv6: mapped, so IPv4 clients still connect).
    assert probe() == ["127.0.0.1", "127.0.0.1", "::ffff:127.0.0.1"]
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The kept port (the HTTP port) binds where it was asked.
    assert probe(str(port), **{KEEP_PORT_ENV: str(port)})[0] == "0.0.0.0"
    # Without the shim nothing is rewritten.
    plain = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    run = subprocess.run([sys.executable, "-c", PROBE], env=plain, capture_output=True, text=True, timeout=60)
    assert json.loads(run.stdout)[0] == "0.0.0.0"


def test_shim_without_a_compiler_says_why(tmp_path, monkeypatch):
    from fleetlm.cluster import loopback

    monkeypatch.setattr(loopback.shutil, "which", lambda name: None)
    assert loopback.build_shim(tmp_path) == (None, "no C compiler (cc, gcc or clang) on PATH")


# --- hub ids -------------------------------------------------------------------------


def _hf_dir(tmp_path, arch="LlamaForCausalLM"):
    d = tmp_path / "snap"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [arch], "vocab_size": 8}))
    (d / "model.safetensors").write_bytes(b"")
    return d


def test_hub_id_is_downloaded_when_not_cached(tmp_path, monkeypatch):
    import huggingface_hub

    from fleetlm.workers.loader import source

    snap = _hf_dir(tmp_path)
    calls = []
    monkeypatch.setattr(source, "_cached_hub_snapshot", lambda repo: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name: calls.append(("file", repo, name)) or str(snap / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: calls.append(("snapshot", repo, tuple(allow_patterns))) or str(snap))
    got = source.resolve_model("org/model")
    assert (got.kind, got.path) == ("hf", str(snap))
    assert calls == [("file", "org/model", "config.json"), ("snapshot", "org/model", tuple(source.HUB_PATTERNS))]


def test_unsupported_hub_architecture_is_refused_before_the_weights(tmp_path, monkeypatch):
    import huggingface_hub

    from fleetlm.workers.loader import source

    snap = _hf_dir(tmp_path, arch="GPT2LMHeadModel")
    monkeypatch.setattr(source, "_cached_hub_snapshot", lambda repo: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(snap / name))

    def no_weights(*a, **k):
        raise AssertionError("weights downloaded for an unsupported architecture")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_weights)
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"):
        source.resolve_model("org/gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        source.resolve_model(str(snap))  # a local directory too


def test_offline_hub_id_says_it_cannot_download(monkeypatch):
    import huggingface_hub

    from fleetlm.workers.loader import source

    monkeypatch.setattr(source, "_cached_hub_snapshot", lambda repo: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        source.resolve_model("org/model")
