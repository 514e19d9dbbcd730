"""Train a DeepSeek-style byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory.

    from dsv2.train.bpe import train_tokenizer
    tok = train_tokenizer(open(p).read() for p in paths), "out/tok", vocab_size=32000)

The directory holds tokenizer.json + tokenizer_config.json, which dsv2.tokenizer.Tokenizer and transformers'
AutoTokenizer both load. Special tokens come first so bos = 0 and eos = pad = 1 (the real DeepSeek-V2 vocabulary
puts them at 100000/100001, after its 100K merges; nothing in dsv2 depends on the ids).
"""
import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dsv2.tokenizer import DEEPSEEK_CHAT_TEMPLATE, Tokenizer

BOS = "<｜begin▁of▁sentence｜>"  # full-width bars U+FF5C and U+2581, as in the real files
EOS = "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = [BOS, EOS, "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>"]


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 32000, min_frequency: int = 2,
                    model_max_length: int = 4096) -> Tokenizer:
    """Train on `texts` (any iterable: it is streamed, never held in memory) and write the tokenizer to `out_dir`.

    `vocab_size` counts the special tokens and the 256 byte symbols; a corpus too small to reach it gives a
    smaller vocabulary.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: the 256 byte symbols and {len(SPECIAL_TOKENS)} "
                         f"special tokens alone need {len(SPECIAL_TOKENS) + 256}")
    tok = HFTokenizer(models.BPE())  # no unk token: every byte is in the alphabet
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    # transformers 5 ignores add_bos_token when tokenizer.json exists and adds bos only through this
    # post-processor; dsv2.Tokenizer drops it and follows add_bos_token instead. Both then agree.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0)])

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        # LlamaTokenizerFast is what the real checkpoints name; transformers 5 sees the ByteLevel tokenizer.json
        # and loads it as a plain TokenizersBackend.
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": DEEPSEEK_CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return Tokenizer.from_pretrained(out_dir)
