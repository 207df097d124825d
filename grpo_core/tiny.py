"""Tiny Qwen2 models built from a config, with a tokenizer trained offline.

They are the CPU test models: the same architecture class as Qwen2.5-14B,
so the trainer, vLLM and peft take exactly the code path they take for the
real model, only with a few thousand parameters. The tokenizer is a
word-level vocabulary learned from the task's own text, which keeps the
action space small enough for RL from scratch to find the `####` format.
"""
from __future__ import annotations

import os

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# Qwen2's pre-tokenizer split; transformers loads any qwen2 checkpoint's
# tokenizer as Qwen2Tokenizer, which re-applies it, so ours must match.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int, full_byte_alphabet: bool):
    """Byte-level BPE learned from `corpus`, loadable as Qwen2Tokenizer.

    Without the full byte alphabet the vocabulary holds only the corpus's own
    characters, which keeps it small for a from-scratch synthetic task.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet)
    corpus = list(corpus) + ["0 1 2 3 4 5 6 7 8 9 #### + - = . $ ,\n"]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    path: str | Path,
    corpus: Iterable[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    init_std: float = 0.02,
    seed: int = 0,
    max_positions: int = 2048,
    vocab_size: int = 64,
    full_byte_alphabet: bool = False,
) -> Path:
    """Write a random-init Qwen2 model + tokenizer to `path` (atomically)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = train_tokenizer(corpus, vocab_size, full_byte_alphabet)
    # vLLM's CPU attention kernels need head_dim >= 32.
    heads = max(1, hidden // 32)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Another process may have built it meanwhile; theirs is identical.
        if path.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
