"""The plain loop vqadapt is measured against: what a peer's training script does.

Library modules only (no vqadapt speed path installed), frozen towers run every step (under
``torch.no_grad`` when wholly frozen, as a careful peer would), the text model's own forward
with ``labels`` (its loss over all answer tokens), ``torch.autocast`` bf16 and PyTorch's default
AdamW (foreach). The towers, projector and LoRA layers are the same modules as vqadapt's, so
the two loops train the same parameters on the same batches.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput


def plain_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean token cross-entropy of one batch, computed the plain way."""
    text_frozen = not any(p.requires_grad for p in model.text_encoder.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not text_frozen):
        text_states = model.text_encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    mask = batch["attention_mask"]
    if model.vision is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not model.vision_frozen):
            features = model.vision(pixel_values=batch["pixel_values"]).last_hidden_state
        image = model.projector(features.to(text_states.dtype)) + model.projector.modality.weight[1]
        text_states = text_states + model.projector.modality.weight[0]
        text_states = torch.cat([text_states, image], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], image.shape[1])], dim=1)
    return model.text(
        encoder_outputs=BaseModelOutput(last_hidden_state=text_states),
        attention_mask=mask,
        decoder_input_ids=batch["decoder_input_ids"],
        labels=batch["labels"],
        use_cache=False,
    ).loss


def plain_optimizer(model) -> torch.optim.Optimizer:
    """PyTorch's AdamW with its defaults (foreach), over the trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def plain_step(model, optimizer, batch: dict[str, torch.Tensor]) -> None:
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
        loss = plain_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
