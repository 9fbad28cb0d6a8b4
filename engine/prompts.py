"""Prompt -> text-encoder embeddings, with A1111's clip skip.

Done here rather than through the pipeline's `clip_skip` because diffusers' SD pipelines reach for
`text_encoder.text_model.final_layer_norm`, which transformers 5's CLIPTextModel no longer has.
"""

from __future__ import annotations


def final_layer_norm(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_text(pipe, text: str, clip_skip: int):
    """Embeddings for one prompt. clip_skip uses A1111's numbering: 1 = last layer, 2 = penultimate."""
    import torch

    tok = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")  # fmt: skip
    te = pipe.text_encoder
    device = (
        next(te.parameters()).device if not hasattr(pipe, "_execution_device") else pipe._execution_device
    )
    use_mask = getattr(te.config, "use_attention_mask", False)
    mask = tok.attention_mask.to(device) if use_mask else None
    with torch.inference_mode():
        out = te(tok.input_ids.to(device), attention_mask=mask, output_hidden_states=clip_skip > 1)
        emb = out[0] if clip_skip <= 1 else final_layer_norm(te)(out.hidden_states[-clip_skip])
    return emb.to(dtype=te.dtype, device=device)


def encode_prompts(pipe, prompt: str, negative_prompt: str, clip_skip: int):
    """(prompt_embeds, negative_prompt_embeds) ready to pass to a diffusers SD pipeline."""
    return encode_text(pipe, prompt, clip_skip), encode_text(pipe, negative_prompt or "", clip_skip)
