"""Offline tokenizer files for the random-weight checkpoints that ``make-model`` writes.

This module owns everything a generated checkpoint needs so that
``transformers.AutoTokenizer.from_pretrained(dir)`` works with no hub access:
``tokenizer.json`` (a byte-level BPE built with the ``tokenizers`` library) and
``tokenizer_config.json`` (special tokens, chat template, BOS behaviour).  It also
owns the two chat templates the model presets refer to.

The vocabulary is laid out to match a real model's id space: special tokens sit at
the exact ids the model config names, the 256 byte tokens and the merges learned
from a small embedded English corpus take the lowest free ids, and every id left
over becomes a readable pseudo-word.  A random-weight model samples arbitrary ids,
so every id in ``[0, vocab_size)`` has to decode to something printable.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["CHATML_TEMPLATE", "SIMPLE_TEMPLATE", "write_tokenizer"]

# Qwen-style ChatML.  No default system prompt is injected: the engine's callers
# decide what goes into the conversation.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Plain "User:/Assistant:" turns for families whose real templates revolve around
# bos/eos (Mixtral, OLMoE, DeepSeek).  The BOS is written by the template rather
# than the post-processor because apply_chat_template tokenizes without special
# tokens; it is skipped when the family has no BOS (OLMoE).
SIMPLE_TEMPLATE = (
    "{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'User: ' + message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'Assistant: ' + message['content'] + (eos_token if eos_token is defined and eos_token else '')"
    " + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

# What transformers itself writes when a tokenizer has no length limit.
_UNLIMITED_LENGTH = int(1e30)

# Upper bound on learned merges; the corpus runs out of pairs to merge before
# this, so in practice the corpus size decides.
_MAX_MERGES = 4000

_CORPUS = """\
The serving engine keeps many large language models ready at the same time. Most of
them are cold: a model may wait for minutes or hours before a request arrives, and
then it has to answer quickly. A mixture of experts model is a good fit for this
kind of work, because each token only visits a few of the experts in every layer.
The rest of the weights can stay in host memory until they are needed.

When a request comes in, the scheduler looks at the prompt, finds the model that
should answer it, and places the work on one of the GPUs. The attention layers and
the key value cache stay close to the compute, while the expert weights are shared
in a pool that every model can draw from. This is the idea behind the name: the
memory for experts and the memory for the cache are pooled across models instead of
being split into fixed parts for each one.

Here is a short example of a conversation with the assistant. The user asks a
question about the weather, the time of day, or the way a program works, and the
assistant writes an answer one token at a time. It is important that the first
token comes back fast, and that the following tokens keep a steady pace. People
notice a long pause at the start much more than a small delay between words.

We measure how long it takes to load an expert, how much data moves over the bus,
and how often the same experts are used again by the next token. If an expert was
used a moment ago, there is a good chance that it will be used again soon, so it
makes sense to keep it on the device. If it has not been used for a while, its
memory can be given to another model that needs room right now.

This text is only here so that the tokenizer learns which pieces of English are
common. Words such as the, and, of, to, in, is, that, for, with, as, on, be, by,
this, are, you, at, from, have, not, or, an, they, which, one, we, can, all, there,
their, will, would, what, about, more, when, your, if, so, do, into, other, than,
then, these, some, could, time, only, new, first, also, after, over, just, like,
know, make, good, see, way, work, need, should, because, people, answer, question,
model, expert, token, layer, memory, request, hello, thank, please, yes, no, and
numbers like 0, 1, 2, 3, 10, 42, 100 or 2024 appear often in ordinary writing.

I think the best part of a long walk is the quiet hour just before the sun goes
down. The air gets cooler, the light turns warm, and the birds start to sing again.
You can hear water running in the small river near the old house, and if you stop
for a while you may see a deer crossing the field. My friend says it is the only
time of the day when she does not look at her phone.

To make a simple soup, you need water, salt, a few carrots, two onions and some
potatoes. Cut the vegetables into small pieces, put them in a large pot, and let
them cook for about twenty minutes. Add a little pepper at the end. It is not a
fancy meal, but it is warm, cheap and easy to share with your family on a cold night.

Why do we write programs? Often it is because a task has to be done again and again,
and a computer does not get tired. A function takes some input, does its work, and
returns a result. If the result is wrong, we read the code, find the bug, and try
once more. Good names, short functions and clear tests make this much easier.

Thank you for your message. Yes, I can help with that. Please let me know what you
would like to do next, and I will try to give you a clear and useful answer. What
is your name? Where are you from? How are you today? It was nice to talk to you.
"""

# Pieces of the pseudo-words that fill otherwise unused ids.
_ONSETS = (
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_SYLLABLES = tuple(onset + vowel for onset in _ONSETS for vowel in _VOWELS)
# Coprime with every power of len(_SYLLABLES) (= 232 = 2**3 * 29), so stepping by it
# visits each word once while neighbouring ids get unrelated-looking words.
_FILLER_STRIDE = 7919


@functools.cache
def _byte_to_unicode() -> tuple[str, ...]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves and the
    rest to code points from 256 up, which is what the ByteLevel pre-tokenizer and
    decoder of ``tokenizers`` expect."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return tuple(table[b] for b in range(256))


@functools.cache
def _learned_merges() -> tuple[tuple[str, str], ...]:
    """Merges learned from the embedded corpus, in priority order.

    Learned once per process; the trainer is deterministic for a fixed corpus and
    settings, so every checkpoint gets the same merges.
    """
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + _MAX_MERGES,
        # Frequency 1 lets every corpus word become whole; the trainer still merges
        # the most frequent pairs first, so a small vocab keeps the common pieces.
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    # Feed paragraphs separately so that no merge spans a paragraph break.
    scratch.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    merges = json.loads(scratch.to_str())["model"]["merges"]
    # Older tokenizers serialise merges as "a b" strings, newer ones as pairs.
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    return tuple((a, b) for a, b in pairs)


def _filler_words() -> Iterator[str]:
    """Endless, deterministic stream of distinct byte-level pseudo-word tokens."""
    n_syllables = len(_SYLLABLES)
    emitted = 0
    length = 2
    while True:
        space = n_syllables**length
        for i in range(space):
            j = (i * _FILLER_STRIDE + 1) % space
            parts = []
            for _ in range(length):
                j, digit = divmod(j, n_syllables)
                parts.append(_SYLLABLES[digit])
            word = "".join(parts)
            # A mix of shapes reads more like text than a wall of identical words.
            # Each stem is used once, so the variants cannot collide with each other.
            kind = emitted % 8
            if kind == 5:
                token = word  # continuation piece, glues onto the previous word
            elif kind == 6:
                token = "Ġ" + word.capitalize()
            elif kind == 7:
                token = "Ġ" + word + ","
            else:
                token = "Ġ" + word
            emitted += 1
            yield token
        length += 1


def _build_vocab(
    vocab_size: int, special_tokens: dict[int, str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Assign every id in ``[0, vocab_size)``: specials, then bytes, merges, filler."""
    vocab: dict[str, int] = {}
    for token_id, content in special_tokens.items():
        vocab[content] = token_id
    free_ids = (i for i in range(vocab_size) if i not in special_tokens)

    for char in _byte_to_unicode():
        if char in vocab:
            raise ValueError(f"special token {char!r} clashes with a byte token")
        vocab[char] = next(free_ids)

    budget = vocab_size - len(special_tokens) - 256
    merges: list[tuple[str, str]] = []
    for left, right in _learned_merges():
        if len(merges) >= budget:
            break
        merged = left + right
        if merged in vocab:
            # Only possible if a special token's text equals a learned piece; the
            # merge would then produce the special id from plain text, so drop it.
            continue
        vocab[merged] = next(free_ids)
        merges.append((left, right))

    fillers = _filler_words()
    for token_id in free_ids:
        token = next(fillers)
        while token in vocab:
            token = next(fillers)
        vocab[token] = token_id
    return vocab, merges


def _check_arguments(
    vocab_size: int,
    special_tokens: dict[int, str],
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None,
    add_bos_token: bool,
) -> None:
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold 256 byte tokens and {len(special_tokens)} special tokens"
        )
    bad_ids = [i for i in special_tokens if not 0 <= i < vocab_size]
    if bad_ids:
        raise ValueError(f"special token ids {bad_ids} are outside [0, {vocab_size})")
    if len(set(special_tokens.values())) != len(special_tokens):
        raise ValueError("special token strings must be distinct")
    known = set(special_tokens.values())
    for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
        if token is not None and token not in known:
            raise ValueError(f"{role} token {token!r} is not one of the special tokens")
    if add_bos_token and bos_token is None:
        raise ValueError("add_bos_token needs a bos_token")


def write_tokenizer(
    out_dir: Path,
    *,
    vocab_size: int,
    special_tokens: dict[int, str],
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None,
    chat_template: str,
    add_bos_token: bool,
    model_max_length: int | None = None,
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``.

    ``special_tokens`` maps id to text; each becomes a special added token at that
    exact id.  ``bos_token``/``eos_token``/``pad_token`` must be among them.  When
    ``add_bos_token`` is true the BOS is prepended by a post-processor stored in
    ``tokenizer.json``, so plain ``tokenizers`` and ``AutoTokenizer`` agree.
    ``model_max_length`` defaults to "unlimited", as transformers does.
    """
    _check_arguments(vocab_size, special_tokens, bos_token, eos_token, pad_token, add_bos_token)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    vocab, merges = _build_vocab(vocab_size, special_tokens)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # The specials are already in the model vocab at their ids; registering them as
    # added tokens keeps that id and stops the pre-tokenizer from splitting them.
    tokenizer.add_special_tokens(
        [
            AddedToken(special_tokens[i], special=True, normalized=False, lstrip=False, rstrip=False)
            for i in sorted(special_tokens)
        ]
    )
    if add_bos_token:
        assert bos_token is not None  # checked above; narrows the type
        bos_id = vocab[bos_token]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A:0",
            pair=f"{bos_token} $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, bos_id)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": None,
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        # Byte-level decoding is already exact; the legacy clean-up would rewrite
        # " ." to "." and break decode(encode(text)) == text.
        "clean_up_tokenization_spaces": False,
        "model_max_length": _UNLIMITED_LENGTH if model_max_length is None else model_max_length,
        "chat_template": chat_template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
