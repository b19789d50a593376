"""Networks: the U-Net with its auxiliary heads (``unet``) and its portable dropout (``dropout``).

Layer: imports nothing of this project but ``common``.
"""
