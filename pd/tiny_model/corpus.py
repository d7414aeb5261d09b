"""The tokenizer's training text, generated here (deterministically, from a fixed seed): word lists,
invented words, several scripts, emoji, numbers and code."""

from __future__ import annotations

import random
from collections.abc import Iterator

_TOKENIZER_CORPUS_SEED = 20240101  # the tokenizer depends on its vocabulary size only, not on --seed

_EN_TEXT = (
    "the of and to in is it that was for on are with as his they be at one have this from or had by word but "
    "what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more "
    "day could go come did number sound no most people my over know water than call first who may down side "
    "been now find model token server request prefill decode cache page expert router attention latent batch "
    "graph kernel memory transfer stream prompt answer question system user assistant hello world data "
    "learning machine language small large fast slow quick brown fox jumps lazy dog river mountain city "
    "green blue red yellow morning evening night summer winter table window garden music story"
)
_EN_WORDS = tuple(_EN_TEXT.split())
_ACCENTED_TEXT = (
    "café naïve über señor façade résumé Zürich crème brûlée déjà piñata jalapeño smörgåsbord straße "
    "Øresund Ångström élan fiancée garçon Málaga São Paulo Kraków Łódź Ελλάδα καλημέρα Москва привет "
    "mañana año niño Müller Köln Größe français español português"
)
_ACCENTED_WORDS = tuple(_ACCENTED_TEXT.split())
_CJK_TEXT = (
    "中文 你好 世界 模型 日本語 こんにちは 東京 한국어 서울 数据 计算 注意力 専門家 機械学習 大規模 推理 "
    "服务器 请求 缓存 学生 老师 今天 明天 天气 很好 ありがとう さようなら 안녕하세요 감사합니다"
)
_CJK_WORDS = tuple(_CJK_TEXT.split())
_EMOJI = ("🙂", "🚀", "🎉", "👍🏽", "🇫🇷", "❤️", "🤖", "🔥", "✨", "👩‍💻", "🌍", "☕")
_PUNCT = (".", ".", ".", "!", "?", "...", ";")
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiouy"


def _pseudo_word(rng: random.Random) -> str:
    syllables = [rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.4:
        syllables.append(rng.choice(_CONSONANTS))
    return "".join(syllables)


def corpus(n_lines: int = 6000) -> Iterator[str]:
    """Deterministic training text: sentences from word lists (Zipf-weighted) with invented words, accented
    Latin, Greek, Cyrillic, CJK and emoji (so merges span multi-byte characters), numbers and code."""
    rng = random.Random(_TOKENIZER_CORPUS_SEED)
    pseudo = sorted({_pseudo_word(rng) for _ in range(3000)})
    rng.shuffle(pseudo)
    latin = [*_EN_WORDS, *pseudo]
    latin_weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(latin))]
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.12:
            line = "".join(rng.choices(_CJK_WORDS, k=rng.randint(2, 8))) + rng.choice(("。", "！", "？", ""))
        elif kind < 0.17:
            name = rng.choice(latin[:200])
            line = f"def {name}(x, y={rng.randint(0, 99)}):\n    return x * {rng.randint(1, 9)} + y  # {rng.choice(latin)}"
        else:
            words = rng.choices(latin, weights=latin_weights, k=rng.randint(4, 16))
            for _ in range(rng.randint(0, 3)):
                extra = rng.random()
                if extra < 0.45:
                    word = rng.choice(_ACCENTED_WORDS)
                elif extra < 0.65:
                    word = rng.choice(_CJK_WORDS)
                elif extra < 0.85:
                    word = rng.choice(_EMOJI)
                else:
                    word = str(
                        rng.choice(
                            (rng.randint(0, 100), rng.randint(0, 100000), round(rng.random() * 100, 2))
                        )
                    )
                words.insert(rng.randrange(len(words) + 1), word)
            line = " ".join(words).capitalize() + rng.choice(_PUNCT)
            if rng.random() < 0.1:
                line = f'"{line}" {rng.choice(("she said", "he asked", "they wrote"))}.'
        yield line + ("\n" if rng.random() < 0.3 else "")
