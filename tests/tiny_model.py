"""A tiny random Llama and word-level tokenizer, built offline: the local model of the tests.

It goes through the same public loading path as a real model (``save_pretrained`` directory).
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france ? paris is the capital",
    "system user assistant : hello there , how are you today",
]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
def build_tiny_model(directory: Path, chat_template: str | None) -> Path:
    """A word-level tokenizer and a 2-layer random Llama that never emits EOS, saved to disk."""
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<pad>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", pad_token="<pad>", eos_token="</s>"
    )
    tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    # A random model stops or repeats one word at once: forbid special tokens, vary the words.
    model.generation_config.suppress_tokens = list(tokenizer.all_special_ids)
    model.generation_config.repetition_penalty = 1.3
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory
