"""Plain training and evaluation loops (torchvision references style)."""
