"""A1111 prompt syntax -> text-encoder embeddings.

What A1111/Forge users type works here:
- `(word)` x1.1, `[word]` /1.1, `(word:1.3)` an explicit weight, nesting multiplies, `\\(` a literal bracket;
- `BREAK` starts a new 75-token chunk;
- prompts longer than 75 tokens are encoded in chunks and concatenated, never truncated;
- `<lora:name:weight>` tags are taken out of the text and applied as LoRAs (see `engine.prompt_tags.extract_lora_tags`);
- clip skip in A1111's numbering (1 = last layer, 2 = penultimate).

The bracket grammar is parsed by lark (the parsing library A1111 itself uses for its prompt
grammar); the weighted fragments are turned into embeddings by compel (chunking, weighting,
textual-inversion token expansion). compel's own syntax is different (`word++`, `(word)1.2`), so
the parsed fragments are handed to it as its `FlattenedPrompt`/`Conjunction` objects, never as text.

diffusers' own `clip_skip` is not used: its SD pipelines reach for
`text_encoder.text_model.final_layer_norm`, which transformers 5's CLIPTextModel no longer has.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from engine.errors import InputError
from engine.prompt_tags import extract_lora_tags

ATTENTION_UP = 1.1  # A1111: (word)
BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")

GRAMMAR = r"""
start: _item*
_item: weighted | emphasis | deemphasis | ESCAPED | TEXT | COLON
weighted.2: "(" _item* ":" WEIGHT ")"
emphasis: "(" _item* ")"
deemphasis: "[" _item* "]"
ESCAPED: /\\[()\[\]\\]/
WEIGHT: /\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*/
TEXT: /([^\\()\[\]:]|\\(?![()\[\]\\]))+/
COLON: ":"
"""


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float


@functools.cache
def _parser():
    from lark import Lark

    return Lark(GRAMMAR, parser="earley", ambiguity="resolve")


def _balance(text: str) -> str:
    """A1111 tolerates unbalanced brackets: a stray closer is literal text, an unclosed opener runs to
    the end. Make the text say exactly that so the grammar can parse it."""
    out, stack = [], []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i : i + 2])
            i += 2
            continue
        if ch in "([":
            stack.append(ch)
        elif ch in ")]":
            opener = "(" if ch == ")" else "["
            if stack and stack[-1] == opener:
                stack.pop()
            else:
                ch = "\\" + ch
        out.append(ch)
        i += 1
    closers = "".join(")" if o == "(" else "]" for o in reversed(stack))
    return "".join(out) + closers


def _flatten(tree, weight: float, out: list[Fragment]) -> None:
    from lark import Token

    for child in tree.children if not isinstance(tree, Token) else [tree]:
        if isinstance(child, Token):
            if child.type == "WEIGHT":
                continue
            text = child[1:] if child.type == "ESCAPED" else str(child)
            if out and out[-1].weight == weight:
                out[-1] = Fragment(out[-1].text + text, weight)
            else:
                out.append(Fragment(text, weight))
        elif child.data == "emphasis":
            _flatten(child, weight * ATTENTION_UP, out)
        elif child.data == "deemphasis":
            _flatten(child, weight / ATTENTION_UP, out)
        elif child.data == "weighted":
            w = float(child.children[-1])
            _flatten(child, weight * w, out)


def parse_attention(text: str) -> list[Fragment]:
    """One BREAK-free segment -> weighted fragments (A1111's parse_prompt_attention semantics)."""
    from lark.exceptions import LarkError

    if not text.strip():
        return []
    try:
        tree = _parser().parse(text)
    except LarkError:
        try:
            tree = _parser().parse(_balance(text))
        except LarkError as e:
            raise InputError(f"prompt {text[:60]!r} could not be parsed as A1111 syntax: {e}") from None
    out: list[Fragment] = []
    _flatten(tree, 1.0, out)
    return [f for f in out if f.text.strip()] or []


def parse_prompt(text: str) -> list[list[Fragment]]:
    """Prompt -> BREAK-separated segments of weighted fragments."""
    return [parse_attention(part) for part in BREAK_RE.split(text or "")]


def final_layer_norm(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


class _ClipSkipEncoder:
    """What compel calls as its text encoder: returns layer `-clip_skip` (final-layer-normed) as the
    last hidden state, which is A1111's clip skip."""

    def __init__(self, text_encoder, clip_skip: int) -> None:
        self.te, self.clip_skip = text_encoder, clip_skip

    @property
    def device(self):
        return self.te.device

    @property
    def dtype(self):
        return self.te.dtype

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        if not getattr(self.te.config, "use_attention_mask", False):
            attention_mask = None
        out = self.te(input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
        if self.clip_skip > 1:
            out.last_hidden_state = final_layer_norm(self.te)(out.hidden_states[-self.clip_skip])
        return out


def _conjunction(text: str):
    from compel.prompt_parser import Conjunction, FlattenedPrompt
    from compel.prompt_parser import Fragment as CFragment

    segments = [seg for seg in parse_prompt(text) if seg] or [[Fragment("", 1.0)]]
    prompts = [FlattenedPrompt([CFragment(f.text, f.weight) for f in seg]) for seg in segments]
    return Conjunction(prompts)


def _compel_sd(pipe, clip_skip: int):
    from compel import Compel, ReturnedEmbeddingsType
    from compel.diffusers_textual_inversion_manager import DiffusersTextualInversionManager

    return Compel(
        tokenizer=pipe.tokenizer,
        text_encoder=_ClipSkipEncoder(pipe.text_encoder, clip_skip),
        textual_inversion_manager=DiffusersTextualInversionManager(pipe),
        returned_embeddings_type=ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
        truncate_long_prompts=False,
        device=str(execution_device(pipe)),
    )


def _compel_sdxl(pipe) -> list:
    """One compel per SDXL text encoder (compel's recommended layout); the last one gives the pooled
    embedding. A refiner has only text_encoder_2."""
    from compel import Compel, ReturnedEmbeddingsType

    pairs = [
        (t, e)
        for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
        if t is not None and e is not None
    ]
    return [
        Compel(
            tokenizer=t,
            text_encoder=e,
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled=i == len(pairs) - 1,
            truncate_long_prompts=False,
            device=str(execution_device(pipe)),
        )
        for i, (t, e) in enumerate(pairs)
    ]


def _encode_sdxl(pipe, prompt: str, negative_prompt: str) -> dict:
    import torch

    compels = _compel_sdxl(pipe)
    pos_parts, neg_parts = [], []
    for c in compels:
        pos = c.build_conditioning_tensor_for_conjunction(_conjunction(prompt))[0]
        neg = c.build_conditioning_tensor_for_conjunction(_conjunction(negative_prompt))[0]
        pos, neg = c.pad_conditioning_tensors_to_same_length([pos, neg])
        pos_parts.append(pos)
        neg_parts.append(neg)
    if len({p.shape[1] for p in pos_parts}) != 1:
        raise InputError("prompt tokenizes to a different number of chunks for the two SDXL text encoders")
    pooled = compels[-1].conditioning_provider.get_pooled_embeddings(
        [plain_text(prompt), plain_text(negative_prompt)], device=compels[-1].device
    )
    return {
        "prompt_embeds": torch.cat(pos_parts, dim=-1),
        "negative_prompt_embeds": torch.cat(neg_parts, dim=-1),
        "pooled_prompt_embeds": pooled[:1],
        "negative_pooled_prompt_embeds": pooled[1:],
    }


def execution_device(pipe):
    device = getattr(pipe, "_execution_device", None)
    return device if device is not None else next(pipe.text_encoder.parameters()).device


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None


def encode_prompts(pipe, prompt: str, negative_prompt: str, clip_skip: int) -> dict:
    """Keyword arguments with the embeddings for a diffusers SD/SDXL pipeline call.

    Positive and negative are padded to the same number of 77-token chunks, as A1111 does.
    """
    import torch

    with torch.inference_mode():
        if is_sdxl(pipe):
            return _encode_sdxl(pipe, prompt, negative_prompt)
        compel = _compel_sd(pipe, clip_skip)
        pos = compel.build_conditioning_tensor_for_conjunction(_conjunction(prompt))[0]
        neg = compel.build_conditioning_tensor_for_conjunction(_conjunction(negative_prompt))[0]
        pos, neg = compel.pad_conditioning_tensors_to_same_length([pos, neg])
    dtype = pipe.text_encoder.dtype
    return {"prompt_embeds": pos.to(dtype), "negative_prompt_embeds": neg.to(dtype)}


def plain_text(prompt: str) -> str:
    """The prompt's words without weights, BREAKs or LoRA tags (SDXL's pooled embedding, token counts)."""
    return " ".join(f.text.strip() for seg in parse_prompt(extract_lora_tags(prompt)[0]) for f in seg)
