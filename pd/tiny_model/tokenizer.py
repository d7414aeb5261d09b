"""The tiny model's tokenizer: a byte-level BPE trained on the generated corpus, DeepSeek's special tokens,
a DeepSeek-like chat template, and its tokenizer_config.json."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pd.tiny_model.corpus import corpus

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"

# DeepSeek-like: system prompts first (joined by a blank line) after BOS, then user and assistant turns,
# EOS closing each assistant turn, and the assistant tag as the generation prompt.
CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = false -%}{%- endif -%}"
    "{%- set ns = namespace(system_prompt='', seen_system=false) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if ns.seen_system -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' -%}{%- endif -%}"
    "{%- set ns.system_prompt = ns.system_prompt + message['content'] -%}"
    "{%- set ns.seen_system = true -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    f"{{{{- '{USER_TOKEN}' + message['content'] -}}}}"
    "{%- elif message['role'] == 'assistant' -%}"
    f"{{{{- '{ASSISTANT_TOKEN}' + message['content'] + eos_token -}}}}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('Unknown message role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT_TOKEN}' -}}}}{{%- endif -%}}"
)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens: BOS and EOS (special, ids 0 and 1), the 256
    byte symbols and merges learned on `corpus()`, then the User and Assistant tags (added, not special, as
    DeepSeek-V3's tokenizer has them) as the last two ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)]
    chat_tags = [AddedToken(t, special=False, normalized=False) for t in (USER_TOKEN, ASSISTANT_TOKEN)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(chat_tags),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.add_tokens(chat_tags)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"trained tokenizer has {tokenizer.get_vocab_size()} tokens, expected {vocab_size}: the generated "
            "corpus is too small for this vocabulary"
        )
    return tokenizer


def _token_entry(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def tokenizer_config(max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens, the chat template and the model's context length."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _token_entry(BOS_TOKEN),
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": _token_entry(EOS_TOKEN),
        "legacy": True,
        "model_max_length": max_length,
        "pad_token": _token_entry(EOS_TOKEN),
        # DeepSeek-V3 names LlamaTokenizerFast here, which transformers 5 rebuilds as a SentencePiece-style
        # tokenizer; the generic class loads tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
