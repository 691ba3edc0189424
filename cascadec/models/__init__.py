"""Model zoo: torchvision classification nets and the paper's CIFAR nets behind one registry."""

from __future__ import annotations

from cascadec.models.registry import create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]
