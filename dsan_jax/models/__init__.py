"""Networks: the 3D ResNet backbone and the DSAN classifier with online attention."""

from dsan_jax.models.dsan import DSAN, attention_from_cam, model_from_config
from dsan_jax.models.resnet3d import (ResNet3D, ResNet3D10, ResNet3D18, ResNet3D34, ResNet3D50,
                                      ResNet3DTiny)

__all__ = ["DSAN", "attention_from_cam", "model_from_config", "ResNet3D", "ResNet3D10",
           "ResNet3D18", "ResNet3D34", "ResNet3D50", "ResNet3DTiny"]
