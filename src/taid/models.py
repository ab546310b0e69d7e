"""Model helpers: the student's and teacher's output layers."""

from __future__ import annotations

from torch import Tensor, nn

# Config attributes of transformers models that change the logits after the output layer (value
# that means "no change"). The fused path computes hidden @ W.T + b only, so any of these set to
# another value would make it optimise a different objective.
LOGIT_TRANSFORMS: dict[str, tuple[str, object]] = {
    "final_logit_softcapping": ("final-logit soft-capping (Gemma 2/3)", None),
    "logit_scale": ("a logit scale (Cohere)", 1.0),
    "logits_scaling": ("logit scaling (Granite)", 1.0),
    "lm_head_multiplier": ("an output multiplier (Falcon-H1)", 1.0),
    "output_multiplier": ("an output multiplier", 1.0),
}


def plain_linear_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight ``[V, H]`` and bias of a causal LM's output layer, if it is a plain linear map.

    Args:
        model: a transformers causal LM (anything with ``get_output_embeddings()`` and
            ``config``).

    Returns:
        ``(weight, bias)``; the weight may be tied to the input embeddings.

    Raises:
        ValueError: the model transforms its logits after the output layer (soft-capping, a
            logit scale, ...) or its output layer is not an ``nn.Linear``; use the logits path.
    """
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        for attr, (what, neutral) in LOGIT_TRANSFORMS.items():
            value = getattr(cfg, attr, neutral)
            if value is not None and value != neutral:
                raise ValueError(
                    f"{type(model).__name__} applies {what} after its output layer "
                    f"({attr}={value!r}); the fused output-layer loss would optimise a different "
                    f"objective. Use the logits path instead (loss on model(...).logits)."
                )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__}'s output layer is {type(head).__name__}, not a plain "
            f"nn.Linear; use the logits path instead (loss on model(...).logits)."
        )
    return head.weight, head.bias
