"""SimMIM model code: masking, encoders, decoders, losses and the SimMIM module.

`simmim_core.masking` is numpy-only (the service imports it without torch); every other module
needs torch and timm.
"""
