"""The SimMIM model in PyTorch: encoders (timm ViT, Swin, CNN with a mask token or pixel
masking), decoders, losses and the SimMIM module that joins them. Needs torch and timm."""
