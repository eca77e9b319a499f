"""A GGUF model's conversion kept for the next start (``--fallback.cache_dir``): named by what made
it, written whole or not at all, loaded back the same, made again when damaged."""

import logging
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from openai_miner.miner import OpenAIMiner  # noqa: E402
from openai_miner.sources import conversions, gguf_cache, local_source  # noqa: E402
from openai_miner.sources.local_model import _load, load_model  # noqa: E402
from openai_miner.testing.localnet import miner_argv  # noqa: E402


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_an_entry_is_named_by_the_file_its_size_and_time_the_dtype_and_transformers(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    root = tmp_path / "cache"
    first = gguf_cache.entry(model, torch.float32, root)
    assert first.parent == root and first.name.startswith("model-") and gguf_cache.entry(model, torch.float32, root) == first
    assert gguf_cache.entry(model, torch.bfloat16, root) != first
    os.utime(model, ns=(0, 10**9))
    touched = gguf_cache.entry(model, torch.float32, root)
    model.write_bytes(b"GGUF" + bytes(61))
    os.utime(model, ns=(0, 10**9))
    assert len({first, touched, gguf_cache.entry(model, torch.float32, root)}) == 3


def test_a_kept_model_loads_back_the_same_and_nothing_half_written_stays(tmp_path: Path, tiny_model: str, caplog) -> None:
    original = load_model(tiny_model, "cpu")
    kept = tmp_path / "cache" / "tiny-0123"
    with caplog.at_level(logging.INFO, logger="bittensor"):
        gguf_cache.keep(original.model, original.tokenizer, kept)
    assert gguf_cache.kept(kept) and "kept the converted model at" in caplog.text
    assert [path.name for path in kept.parent.iterdir()] == ["tiny-0123"]  # no .partial left
    tokenizer, model = _load(str(kept), {"local_files_only": True}, torch.float32)
    assert same_weights(model, original.model)
    text = "héllo wörld, twice: héllo"
    assert tokenizer(text).input_ids == original.tokenizer(text).input_ids
    assert tokenizer.chat_template == original.tokenizer.chat_template


def test_a_cache_that_cannot_be_written_costs_one_warning(tmp_path: Path, tiny_model: str, caplog) -> None:
    original = load_model(tiny_model, "cpu")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="bittensor"):
        gguf_cache.keep(original.model, original.tokenizer, blocked / "tiny-0123")
    assert caplog.text.count("could not keep the converted model") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_the_flag_picks_where_conversions_are_kept(tmp_path: Path, monkeypatch) -> None:
    default = tmp_path / "default"
    assert conversions(None, lambda: default) == default == conversions(" ", lambda: default)
    assert conversions("off", lambda: default) is None and conversions("OFF", lambda: default) is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert conversions("~/kept", lambda: default) == tmp_path / "kept"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.default_root() == tmp_path / "xdg" / "openai-miner" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gguf_cache.default_root() == tmp_path / ".cache" / "openai-miner" / "models"


@pytest.mark.parametrize("flag, expected", [(None, "default"), ("off", None), ("{tmp}/mine", "{tmp}/mine")])
def test_the_miners_local_model_is_loaded_with_the_flags_cache(tmp_path: Path, tiny_model: str, monkeypatch, flag, expected) -> None:
    import openai_miner.sources.local_model as local_model

    asked: list[Path | None] = []

    def loading(model: str, device: str, dtype: str | None = "auto", cache: Path | None = None):
        asked.append(cache)
        return load_model(model, device, dtype)

    monkeypatch.setattr(local_model, "load_model", loading)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    flags = ["--fallback.model", tiny_model, "--fallback.device", "cpu"]
    if flag is not None:
        flags += ["--fallback.cache_dir", flag.format(tmp=tmp_path)]
    config = OpenAIMiner.config(miner_argv(tmp_path / "wallets", 8091, *flags), env={})
    source = local_source(config, required=True)
    source.load()
    source.close()
    wanted = {"default": tmp_path / "xdg" / "openai-miner" / "models", None: None}.get(expected, Path(str(expected).format(tmp=tmp_path)))
    assert asked == [wanted]


def test_a_damaged_entry_is_dropped_and_made_again_then_loaded_without_the_gguf_file(
    tmp_path: Path, tiny_model: str, monkeypatch, caplog
) -> None:
    """load_model's path around the conversion, with the tiny model standing for what transformers
    makes of a GGUF file (the real conversion has its own test below)."""
    import openai_miner.sources.local_model as local_model

    real_load, converted_from_gguf = local_model._load, []

    def loading(source: str, kwargs: dict, dtype: torch.dtype):
        if "gguf_file" in kwargs:
            converted_from_gguf.append(kwargs["gguf_file"])
            return real_load(tiny_model, {"local_files_only": True}, dtype)
        return real_load(source, kwargs, dtype)

    monkeypatch.setattr(local_model, "_load", loading)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    cache = tmp_path / "cache"
    damaged = gguf_cache.entry(gguf, torch.float32, cache)
    damaged.mkdir(parents=True)
    (damaged / "config.json").write_text("{not json")
    (damaged / gguf_cache.DONE).write_text("")
    with caplog.at_level(logging.INFO, logger="bittensor"):
        remade = load_model(str(gguf), "cpu", cache=cache)
        assert caplog.text.count("does not load") == 1 and "kept the converted model at" in caplog.text
        caplog.clear()
        again = load_model(str(gguf), "cpu", cache=cache)
    assert converted_from_gguf == ["model.gguf"]  # the second load read the kept copy only
    assert f"converted before: {damaged}" in caplog.text and same_weights(again.model, remade.model)


@pytest.mark.slow
def test_the_default_models_kept_conversion_is_the_gguf_files_model(smollm2, kept_conversions) -> None:
    """This run's first load of SmolLM2 converted its GGUF file and kept the result; the copy loads
    the GGUF file's own weights (its embedding table, de-quantized here by the gguf package) and
    answers as the worker's shared load does."""
    from gguf import GGUFReader, dequantize

    path, loader = smollm2
    shared = loader(path, "cpu")
    kept = gguf_cache.entry(Path(path), torch.float32, kept_conversions)
    assert gguf_cache.kept(kept)
    tokenizer, model = _load(str(kept), {"local_files_only": True}, torch.float32)
    embedding = next(tensor for tensor in GGUFReader(path).tensors if tensor.name == "token_embd.weight")
    from_file = torch.from_numpy(dequantize(embedding.data, embedding.tensor_type).copy())
    assert torch.equal(from_file, model.model.embed_tokens.weight) and same_weights(model, shared.model)
    asked = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.apply_chat_template(asked, add_generation_prompt=True) == shared.tokenizer.apply_chat_template(
        asked, add_generation_prompt=True
    )
