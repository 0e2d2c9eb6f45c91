"""Tokenizers that come from no model: a byte-level BPE trained on the bundled data with a ChatML
chat template. The tiny test model uses it, so its vocabulary (and its logits) stay small.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from tensafe.data.datasets import bundled_path, load_records

    return [m["content"] for r in load_records(bundled_path()) for m in r["messages"]]


def _train(vocab_size: int, target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(target)


def trained_bpe_dir(vocab_size: int, cache: Path) -> Path:
    """The tokenizer folder for `vocab_size`, trained once per machine (under a second)."""
    from tensafe.data.datasets import bundled_path, file_digest

    key = hashlib.sha256(f"{vocab_size}:{file_digest(bundled_path())}:{CHATML}".encode()).hexdigest()[:16]
    target = cache / "tokenizers" / f"bpe{vocab_size}-{key}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=target.parent))
    try:
        _train(vocab_size, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
