"""PyTorch training on the RSNA 2024 layout, and the synthetic lumbar MRI phantom.

Importing this package does not import torch (the phantom is used by the node's demo).
"""
