"""A GGUF model's conversion, kept on disk for the next start.

transformers reads a GGUF file slowly: it parses the file's metadata (SmolLM2's 49,152-token
vocabulary) three times, maps every tensor's name and de-quantizes every tensor: about 20 s for
the 135M default on a 2-core CPU, at every start. Saved once with ``save_pretrained`` (safetensors
and the tokenizer's JSON), the same weights and tokenizer load in about a second.

An entry is named by the file (its path, size and modification time), the dtype and the
transformers version that converted it, so a changed file or a new transformers converts again.
It is written to a temporary directory and renamed into place: a reader sees all of one or none.
"""

import copy
import hashlib
import os
import shutil
from pathlib import Path

import bittensor as bt
import safetensors.torch
import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

DONE = "openai-miner-converted"  # written last: an entry without it is not one


def default_root() -> Path:
    """``$XDG_CACHE_HOME/openai-miner/models``, ``~/.cache/openai-miner/models`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "openai-miner" / "models"


def entry(gguf: Path, dtype: torch.dtype, root: Path) -> Path:
    """Where the conversion of ``gguf`` to ``dtype`` is kept under ``root``."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|transformers {transformers.__version__}"
    return root / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def kept(path: Path) -> bool:
    return (path / DONE).is_file()


def keep(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Save the converted model at ``path`` for the next start; failing that (a full disk, no
    permission), one warning and nothing else: the model in memory serves either way."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        save(model, tokenizer, temporary)
        (temporary / DONE).write_text(f"converted by transformers {transformers.__version__}\n")
        try:
            os.rename(temporary, path)
        except OSError:
            if not kept(path):  # another process kept it first: theirs serves as well as ours
                raise
        size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
        bt.logging.info(f"kept the converted model at {path} ({size / 2**20:.0f} MB): the next start loads it in seconds")
    except OSError as error:
        bt.logging.warning(f"could not keep the converted model at {path} ({error}): the next start converts it again")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """The model as a plain ``save_pretrained`` directory. transformers refuses to save a model
    it read from GGUF (it counts as quantized, though its weights are de-quantized tensors by
    then): the weights go through safetensors, the config without its GGUF quantization entry."""
    path.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(path)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(path)
    safetensors.torch.save_model(model, str(path / "model.safetensors"))
    tokenizer.save_pretrained(path)


def forget(path: Path, why: BaseException) -> None:
    """Drop an entry that would not load (it is made again from the GGUF file)."""
    bt.logging.warning(f"the converted model at {path} does not load ({type(why).__name__}: {why}): converting the GGUF file again")
    shutil.rmtree(path, ignore_errors=True)
